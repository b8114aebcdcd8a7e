// Package firewall carries out an authorized policy.Operation on one
// iptables table, idempotently, the way fail2ban expects: creating what
// exists, deleting what is absent and adding a ban twice all succeed
// without changing anything.
//
// Table is the narrow interface to iptables. The real implementation uses
// github.com/coreos/go-iptables; tests use the recording fake in fwtest.
package firewall

import (
	"errors"
	"fmt"
	"strings"

	"github.com/f2b-shim/f2b-shim/policy"
)

// Table is one family's filter table.
type Table interface {
	ChainExists(chain string) (bool, error)
	NewChain(chain string) error
	// FlushChain empties an existing chain.
	FlushChain(chain string) error
	DeleteChain(chain string) error
	Exists(chain string, spec ...string) (bool, error)
	Insert(chain string, pos int, spec ...string) error
	Append(chain string, spec ...string) error
	Delete(chain string, spec ...string) error
	// List returns the chain's rules in "iptables -S CHAIN" form.
	List(chain string) ([]string, error)
	// ListChains names every chain of the table, built-in ones first.
	ListChains() ([]string, error)
}

// Outcome is what Apply did or found.
type Outcome int

// The outcomes, as the audit log names them.
const (
	Applied    Outcome = iota + 1 // the firewall was changed
	Unchanged                     // it already was as asked
	CheckTrue                     // a check found the rule
	CheckFalse                    // a check did not find it
)

// String is the outcome's name in the audit log.
func (o Outcome) String() string {
	return map[Outcome]string{Applied: "applied", Unchanged: "unchanged", CheckTrue: "check-true", CheckFalse: "check-false"}[o]
}

// ErrBanLimit is returned when a chain already holds max_bans_per_chain bans.
var ErrBanLimit = errors.New("ban limit reached")

// Apply carries out op on t. maxBans is the policy's max_bans_per_chain.
// The caller holds the host-wide lock, so the check and the change that
// follows it cannot race with another shim.
func Apply(t Table, op policy.Operation, maxBans int) (Outcome, error) {
	chain, spec := string(op.Chain), op.RuleSpec()
	switch op.Kind {
	case policy.CreateChain:
		return ifAbsent(t, chain, func() error { return t.NewChain(chain) })
	case policy.FlushChain:
		return ifPresent(t, chain, func() error { return t.FlushChain(chain) })
	case policy.DeleteChain:
		return ifPresent(t, chain, func() error { return t.DeleteChain(chain) })
	case policy.AddReturn:
		return addRule(t, chain, spec, func() error { return t.Append(chain, spec...) })
	case policy.AddHook:
		return addRule(t, chain, spec, func() error { return t.Insert(chain, 1, spec...) })
	case policy.AddBan:
		return addRule(t, chain, spec, func() error {
			if err := checkBanLimit(t, chain, maxBans); err != nil {
				return err
			}
			return t.Insert(chain, 1, spec...)
		})
	case policy.DeleteHook, policy.DeleteBan:
		return deleteRule(t, op, spec)
	case policy.CheckReturn, policy.CheckBan, policy.CheckHook:
		found, err := ruleExists(t, op, spec)
		return checkOutcome(found, err)
	case policy.CheckHookListed:
		found, err := jumpsTo(t, chain, string(op.Jump))
		return checkOutcome(found, err)
	}
	return 0, fmt.Errorf("operation %v is not implemented", op.Kind)
}

func ifAbsent(t Table, chain string, create func() error) (Outcome, error) {
	ok, err := t.ChainExists(chain)
	if err != nil || ok {
		return Unchanged, err
	}
	return Applied, create()
}

func ifPresent(t Table, chain string, change func() error) (Outcome, error) {
	ok, err := t.ChainExists(chain)
	if err != nil || !ok {
		return Unchanged, err
	}
	return Applied, change()
}

func addRule(t Table, chain string, spec []string, add func() error) (Outcome, error) {
	ok, err := t.Exists(chain, spec...)
	if err != nil || ok {
		return Unchanged, err
	}
	return Applied, add()
}

// ruleExists checks a rule. A hook names the ban chain as its target, and
// iptables fails (rather than answering "no") when that chain is missing;
// a missing ban chain means no hook, so it is looked at first.
func ruleExists(t Table, op policy.Operation, spec []string) (bool, error) {
	if op.Kind == policy.CheckHook || op.Kind == policy.DeleteHook {
		ok, err := t.ChainExists(string(op.Jump))
		if err != nil || !ok {
			return false, err
		}
	}
	return t.Exists(string(op.Chain), spec...)
}

func deleteRule(t Table, op policy.Operation, spec []string) (Outcome, error) {
	ok, err := ruleExists(t, op, spec)
	if err != nil || !ok {
		return Unchanged, err
	}
	return Applied, t.Delete(string(op.Chain), spec...)
}

func checkOutcome(found bool, err error) (Outcome, error) {
	if err != nil {
		return 0, err
	}
	if found {
		return CheckTrue, nil
	}
	return CheckFalse, nil
}

// checkBanLimit counts the chain's ban rules (those with a source).
func checkBanLimit(t Table, chain string, maxBans int) error {
	rules, err := t.List(chain)
	if err != nil {
		return err
	}
	bans := 0
	for _, r := range rules {
		if strings.HasPrefix(r, "-A "+chain+" ") && strings.Contains(r, " -s ") {
			bans++
		}
	}
	if bans >= maxBans {
		return fmt.Errorf("%w: chain %q already holds %d bans (max_bans_per_chain); unban some or raise the limit in the policy", ErrBanLimit, chain, bans)
	}
	return nil
}

// jumpsTo answers fail2ban 0.10/0.11's "iptables -n -L P | grep -q 'C[ \t]'"
// exactly: does parent hold a rule whose target is chain?
func jumpsTo(t Table, parent, chain string) (bool, error) {
	ok, err := t.ChainExists(parent)
	if err != nil || !ok {
		return false, err
	}
	rules, err := t.List(parent)
	if err != nil {
		return false, err
	}
	for _, r := range rules {
		f := strings.Fields(r)
		for i := 0; i+1 < len(f); i++ {
			if (f[i] == "-j" || f[i] == "-g") && f[i+1] == chain {
				return true, nil
			}
		}
	}
	return false, nil
}
