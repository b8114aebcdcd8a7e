// Package policy decides what a mail host may do to the proxy's firewall.
//
// It is the pure core of f2b-shim. ParseCommand turns the text that sshd
// hands over in SSH_ORIGINAL_COMMAND into a typed Command, using a grammar
// that accepts only the iptables command lines a fail2ban proxy action
// sends. Authorize then checks that Command against a Policy and returns
// the Operation to carry out, or a *Denial that names the offending word.
//
// Nothing in this package executes programs, touches files or keeps global
// mutable state, so that table tests and fuzzing can reach every branch.
// The firewall, the audit log and the lock live in packages under internal/.
package policy
