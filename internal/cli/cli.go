// Package cli is f2b-shim's command line: the forced command that sshd
// runs, and the admin subcommands. It wires the pure policy package to the
// side-effect packages (audit, lock, firewall) and owns the exit codes.
package cli

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/audit"
	"github.com/f2b-shim/f2b-shim/internal/engine"
	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/policy"
)

// Exit codes. They are documented in the README and in "f2b-shim help";
// fail2ban logs any non-zero code as an action error.
const (
	ExitOK         = 0 // done, or a check is true
	ExitCheckFalse = 1 // a check is false, as with "iptables -C"
	ExitUsage      = 2 // the admin's command line is wrong
	ExitDenied     = 3 // the policy refused the request; nothing was changed
	ExitFirewall   = 4 // iptables or the lock failed; see the audit log
	ExitSetup      = 5 // the policy file, the audit log or the capabilities are unusable; nothing was changed
)

// Env is what the shim reads from its environment, and nothing more.
type Env struct {
	// OriginalCommand is SSH_ORIGINAL_COMMAND; HasCommand tells whether
	// it was set at all (it is not for an interactive login).
	OriginalCommand string
	HasCommand      bool
	// SSHConnection is SSH_CONNECTION: "client-ip client-port server-ip server-port".
	SSHConnection string
}

// EnvFrom picks the shim's variables out of an environment list.
func EnvFrom(environ []string) Env {
	var e Env
	for _, kv := range environ {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "SSH_ORIGINAL_COMMAND":
			e.OriginalCommand, e.HasCommand = v, true
		case "SSH_CONNECTION":
			e.SSHConnection = v
		}
	}
	return e
}

// Deps are the side effects, injected so that tests can replace them.
type Deps struct {
	// Ports are the firewall's side effects and the clock, which the
	// engine uses.
	engine.Ports
	// LoadPolicy reads and checks a policy file.
	LoadPolicy func(path string) (*policy.Policy, error)
	// Context gathers what the policy needs to know about the proxy (its
	// addresses, nameservers, gateways, local port range, service names)
	// for a request from client.
	Context func(client netip.Addr) (policy.Context, error)
	// Syslog sends an audit record to syslog (policy key syslog).
	Syslog func(audit.Record) error
	// PrepareExec readies the process to run iptables: as a non-root user
	// it raises the ambient capabilities (see package privilege).
	PrepareExec func() error
	// DefaultPolicyFile is read when no --policy is given and it exists.
	DefaultPolicyFile string
	// Stdin carries a stream session's requests; one-shot mode never
	// reads it.
	Stdin io.Reader
}

const usage = `f2b-shim: the forced command that lets a fail2ban host manage its own ban chains on this proxy

Usage:
  f2b-shim [--policy FILE]                   run as sshd's command= (reads SSH_ORIGINAL_COMMAND);
                                             without --policy, /etc/f2b-shim/policy.toml if it exists;
                                             "f2b-shim stream" as the command: one request per stdin line
  f2b-shim check [--policy FILE] [--client ADDR] 'COMMAND'
                                             show how COMMAND parses and whether the policy allows it
  f2b-shim restore [--policy FILE | --all [--dir DIR]] [--sets-only]
                                             put the state's chains, bans and hooks back (at boot);
                                             --all: every policy file in DIR (default /etc/f2b-shim);
                                             --sets-only: only the set backend's ipsets (netfilter-persistent)
  f2b-shim list [--policy FILE] [--json] [CHAIN]
                                             show the chains, hooks and bans the shim has made
  f2b-shim reconcile [--policy FILE | --all [--dir DIR]] [--fix] [--quiet]
                                             compare the state with the firewall; --fix puts back what
                                             is missing (a timer runs it every minute); --quiet: say
                                             nothing when there is no drift
  f2b-shim audit [--policy FILE] [--since T] [--until T] [--client NAME] [--denied] [--ip ADDR]
                 [--chain CHAIN] [--summary | --json | --verify]
                                             review the audit log, rotated files included;
                                             --verify checks its hash chain
  f2b-shim ban [--policy FILE] [--target T] CHAIN ADDRESS
  f2b-shim unban [--policy FILE] CHAIN ADDRESS
                                             the admin's own ban or unban, judged, recorded and audited
  f2b-shim prune [--policy FILE] CHAIN       retire a chain: unhook, flush, delete, forget
  f2b-shim status [--policy FILE | --all [--dir DIR]]
                                             self-test: policy, capabilities, audit log, lock, state,
                                             the firewall (iptables and ipset, or the nftables table),
                                             drift, and the install as the mail
                                             host's account sees it (binary, key line, sshd -T), each
                                             failure with its fix; exit 0 when all is well
  f2b-shim expire [--policy FILE | --all [--dir DIR]]
                                             lift bans older than max_ban_time (a timer runs it)
  f2b-shim metrics [--policy FILE | --all [--dir DIR]] [--out FILE]
                                             Prometheus text for node_exporter's textfile collector
  f2b-shim relay --outbox DIR --chain NAME --proxy DEST [--proxy DEST]... [--port P] [--protocol P]
                                             on the mail host: proxy-stream.py's child, which keeps
                                             the jail's outbox and streams it to every proxy
  f2b-shim outbox [--dir DIR]                on the mail host: per stream jail and proxy, what is not
                                             yet delivered, its age, and the last error; exit 0 when
                                             every proxy has everything, 1 when something is pending
                                             (DIR: the action's outbox_dir, /var/lib/fail2ban/f2b-shim)
  f2b-shim version (or --version, -V)        print the version
  f2b-shim help                              print this text

Examples:
  restrict,from="192.0.2.10",command="/usr/sbin/f2b-shim --policy /etc/f2b-shim/policy.toml" ssh-ed25519 AAAA... fail2ban@mail
  f2b-shim check 'iptables -w -I mail-remote-f2b-imap 1 -s 203.0.113.45 -j REJECT'

Exit status:
  0 done, a check is true, or no drift   3 denied by the policy
  1 a check is false, or drift           4 the firewall (iptables, ipset, nftables or the lock) failed
  2 usage error                          5 the policy file, the audit log or the capabilities are unusable
`

// Run is the whole program: main only calls it and exits with its result.
func Run(args []string, env Env, stdout, stderr io.Writer, deps Deps) int {
	if len(args) > 0 {
		switch args[0] {
		case "check":
			return runCheck(args[1:], env, stdout, stderr, deps)
		case "restore":
			return runRestore(args[1:], stdout, stderr, deps)
		case "list":
			return runList(args[1:], stdout, stderr, deps)
		case "reconcile":
			return runReconcile(args[1:], stdout, stderr, deps)
		case "audit":
			return runAudit(args[1:], stdout, stderr, deps)
		case "expire":
			return runExpire(args[1:], stdout, stderr, deps)
		case "status":
			return runStatus(args[1:], stdout, stderr, deps)
		case "ban", "unban":
			return runBanUnban(args[0], args[1:], stdout, stderr, deps)
		case "prune":
			return runPrune(args[1:], stdout, stderr, deps)
		case "metrics":
			return runMetrics(args[1:], stderr, deps)
		case "relay":
			in := deps.Stdin
			if in == nil {
				in = os.Stdin
			}
			return runRelay(args[1:], in, stdout, stderr)
		case "outbox":
			return runOutbox(args[1:], stdout, stderr, time.Now)
		case "version", "--version", "-V":
			if len(args) > 1 {
				return usageError(stderr, "version takes no arguments")
			}
			fmt.Fprintln(stdout, "f2b-shim", Version())
			return ExitOK
		case "help", "-h", "-help", "--help":
			fmt.Fprint(stdout, usage)
			return ExitOK
		}
	}
	fs := newFlagSet("f2b-shim")
	policyPath := fs.String("policy", "", "policy file (TOML)")
	if err := fs.Parse(args); err != nil {
		return usageError(stderr, err.Error())
	}
	if fs.NArg() > 0 {
		return usageError(stderr, fmt.Sprintf("unknown subcommand %q", fs.Arg(0)))
	}
	if !env.HasCommand && env.SSHConnection == "" {
		// Not started by sshd (which always sets SSH_CONNECTION): someone
		// ran the binary in a shell. Say how to use it; change nothing.
		fmt.Fprint(stderr, usage)
		return ExitUsage
	}
	if env.HasCommand && env.OriginalCommand == StreamCommand {
		return runStream(*policyPath, env, stdout, stderr, deps)
	}
	return runForced(*policyPath, env, stderr, deps)
}

func newFlagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are reported once, by usageError
	return fs
}

func usageError(stderr io.Writer, msg string) int {
	fmt.Fprintf(stderr, "f2b-shim: %s\nf2b-shim: hint: run \"f2b-shim help\" for usage\n", msg)
	return ExitUsage
}

// loadPolicy reads the named policy file; without one, the installed
// policy (deps.DefaultPolicyFile) when it exists, else the built-in
// defaults. Falling back to the defaults while an installed policy says
// otherwise once made "reconcile --fix" add rules next to a set backend.
func loadPolicy(path string, deps Deps) (*policy.Policy, error) {
	if path == "" && deps.DefaultPolicyFile != "" {
		if _, err := os.Stat(deps.DefaultPolicyFile); err == nil {
			path = deps.DefaultPolicyFile
		}
	}
	if path == "" {
		return policy.Default(), nil
	}
	return deps.LoadPolicy(path)
}

// parseSSHConnection takes the client's address and port from SSH_CONNECTION.
func parseSSHConnection(s string) (netip.Addr, int) {
	f := strings.Fields(s)
	if len(f) != 4 {
		return netip.Addr{}, 0
	}
	a, err := netip.ParseAddr(f[0])
	if err != nil {
		return netip.Addr{}, 0
	}
	port, _ := strconv.Atoi(f[1])
	return a.WithZone(""), port
}

func runCheck(args []string, env Env, stdout, stderr io.Writer, deps Deps) int {
	fs := newFlagSet("check")
	policyPath := fs.String("policy", "", "policy file (TOML)")
	clientFlag := fs.String("client", "", "judge COMMAND as if it came from this ssh client address")
	if err := parseInterspersed(fs, args); err != nil {
		return usageError(stderr, err.Error())
	}
	if fs.NArg() != 1 {
		return usageError(stderr, "check takes exactly one COMMAND, quoted as one argument")
	}
	if *clientFlag != "" {
		if _, err := netip.ParseAddr(*clientFlag); err != nil {
			return usageError(stderr, fmt.Sprintf("--client %q is not an IP address", *clientFlag))
		}
		env.SSHConnection = *clientFlag + " 0 0.0.0.0 0"
	}
	pol, err := loadPolicy(*policyPath, deps)
	if err != nil {
		fmt.Fprintf(stderr, "f2b-shim: policy: %v\n", err)
		return ExitSetup
	}
	client, _ := parseSSHConnection(env.SSHConnection)
	ctx, err := deps.Context(client)
	if err != nil {
		fmt.Fprintf(stderr, "f2b-shim: %v\n", err)
		return ExitSetup
	}
	line := fs.Arg(0)
	fmt.Fprintf(stdout, "command:   %s\n", strconv.Quote(line))
	op, err := policy.Decide(pol, line, ctx)
	if err != nil {
		fmt.Fprintf(stdout, "decision:  denied: %v\n", err)
		return ExitDenied
	}
	fmt.Fprintf(stdout, "operation: %s\n", describe(op))
	fmt.Fprintf(stdout, "canonical: %s\n", op.CommandLine())
	fmt.Fprintf(stdout, "decision:  allowed by policy %q (nothing was changed)\n", pol.Name)
	return ExitOK
}

// describe is a one-line summary of an operation for people.
func describe(op policy.Operation) string {
	s := fmt.Sprintf("%s %s chain=%s", op.Kind, op.Family, op.BanChain())
	if op.Jump != "" {
		s += fmt.Sprintf(" parent=%s", op.Chain)
	}
	if op.Proto != "" {
		s += fmt.Sprintf(" proto=%s match=%s", op.Proto, op.Match)
	}
	if len(op.Ports) > 0 {
		ports := make([]string, len(op.Ports))
		for i, p := range op.Ports {
			ports[i] = p.String()
		}
		s += " ports=" + strings.Join(ports, ",")
	}
	if op.Source.IsValid() {
		s += fmt.Sprintf(" source=%s target=%q", op.Source, op.Target)
	}
	return s
}

// errorStatus digs iptables' exit status and stderr out of an error.
func errorStatus(err error) (int, string) {
	var ce *firewall.CommandError
	if errors.As(err, &ce) {
		return ce.Status, ce.Stderr
	}
	return 0, ""
}
