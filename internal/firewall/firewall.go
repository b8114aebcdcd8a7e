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

// Backend is where the shim keeps bans: as one rule per ban in the chain
// (Sets is nil, the default), or in ipsets that the chain matches with
// one rule per target (policy backend = "ipset"), which keeps bans and
// packets O(1) at any number of bans.
type Backend struct {
	Table  Table
	Sets   Sets
	Policy *policy.Policy
	// Index, when set, lets the rule backend ban without reading the
	// chain (see state.Index).
	Index BanIndex
}

// BanIndex is the rule backend's record of its own bans per chain.
type BanIndex interface {
	Known(fam policy.Family, chain policy.Chain) bool
	Build(fam policy.Family, chain policy.Chain, bans []policy.Operation) error
	Has(op policy.Operation) bool
	Count(fam policy.Family, chain policy.Chain) (int, error)
	MarkPending(op policy.Operation) error
	Pending(op policy.Operation) bool
	Add(op policy.Operation) error
	Remove(op policy.Operation) error
	Settle(op policy.Operation) error
	Drop(fam policy.Family, chain policy.Chain) error
}

// Apply carries out op. The caller holds the host-wide lock, so the check
// and the change that follows it cannot race with another shim.
func Apply(b Backend, op policy.Operation) (Outcome, error) {
	t := b.Table
	chain, spec := string(op.Chain), op.RuleSpec()
	if b.Sets != nil {
		if out, done, err := applySet(b, op); done {
			return out, err
		}
	}
	switch op.Kind {
	case policy.CreateChain:
		return ifAbsent(t, chain, func() error { return t.NewChain(chain) })
	case policy.FlushChain, policy.DeleteChain:
		if b.Index != nil {
			// Forget the chain's bans first: whatever happens next, the
			// index never claims a ban the firewall may have lost.
			if err := b.Index.Drop(op.Family, op.Chain); err != nil {
				return 0, err
			}
		}
		if op.Kind == policy.FlushChain {
			return ifPresent(t, chain, func() error { return t.FlushChain(chain) })
		}
		return ifPresent(t, chain, func() error { return t.DeleteChain(chain) })
	case policy.AddReturn:
		return addRule(t, chain, spec, func() error { return t.Append(chain, spec...) })
	case policy.AddHook:
		return addRule(t, chain, spec, func() error { return t.Insert(chain, 1, spec...) })
	case policy.AddBan:
		if b.Index != nil {
			return addBanIndexed(b, op)
		}
		return addBanRule(t, chain, spec, b.Policy.MaxBansPerChain)
	case policy.DeleteBan:
		if b.Index == nil {
			return deleteBan(t, chain, spec)
		}
		if err := b.Index.Remove(op); err != nil {
			return 0, err
		}
		out, err := deleteBan(t, chain, spec)
		if err != nil {
			return 0, err // the ban stays pending: the next ban of it asks the chain
		}
		return out, b.Index.Settle(op)
	case policy.DeleteHook:
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

// addBanRule reads the chain once, both to find a duplicate and to count
// the bans against the limit, then inserts the ban at the top, where
// fail2ban's "-I C 1" puts it. iptables -S prints a rule exactly as
// RuleSpec builds it, so a plain comparison finds the duplicate.
func addBanRule(t Table, chain string, spec []string, maxBans int) (Outcome, error) {
	rules, err := t.List(chain)
	if err != nil {
		return 0, err
	}
	want := "-A " + chain + " " + strings.Join(spec, " ")
	bans := 0
	for _, r := range rules {
		if r == want {
			return Unchanged, nil
		}
		if strings.HasPrefix(r, "-A "+chain+" ") && strings.Contains(r, " -s ") {
			bans++
		}
	}
	if bans >= maxBans {
		return 0, fmt.Errorf("%w: chain %q already holds %d bans (max_bans_per_chain); unban some or raise the limit in the policy", ErrBanLimit, chain, bans)
	}
	return Applied, t.Insert(chain, 1, spec...)
}

// addBanIndexed bans with one iptables call: the index says whether the
// ban is there and how many the chain holds. The first ban into a chain
// the index does not know reads the chain once to learn it.
func addBanIndexed(b Backend, op policy.Operation) (Outcome, error) {
	t, chain := b.Table, string(op.Chain)
	if !b.Index.Known(op.Family, op.Chain) {
		rules, err := t.List(chain)
		if err != nil {
			return 0, err
		}
		var bans []policy.Operation
		for _, r := range rules {
			rest, ok := strings.CutPrefix(r, "-A "+chain+" ")
			if !ok || !strings.HasPrefix(rest, "-s ") {
				continue
			}
			if ban, err := policy.Decide(b.Policy, op.Family.Binary()+" -I "+chain+" 1 "+rest, policy.Context{}); err == nil {
				bans = append(bans, ban)
			}
		}
		if err := b.Index.Build(op.Family, op.Chain, bans); err != nil {
			return 0, err
		}
	}
	if b.Index.Has(op) {
		return Unchanged, nil
	}
	if b.Index.Pending(op) {
		// A shim was stopped between marking this ban and listing it: its
		// iptables call may or may not have gone through.
		ok, err := t.Exists(chain, op.RuleSpec()...)
		if err != nil {
			return 0, err
		}
		if ok {
			return Unchanged, b.Index.Add(op)
		}
	}
	n, err := b.Index.Count(op.Family, op.Chain)
	if err != nil {
		return 0, err
	}
	if n >= b.Policy.MaxBansPerChain {
		return 0, fmt.Errorf("%w: chain %q already holds %d bans (max_bans_per_chain); unban some or raise the limit in the policy", ErrBanLimit, chain, n)
	}
	if err := b.Index.MarkPending(op); err != nil {
		return 0, err
	}
	if err := t.Insert(chain, 1, op.RuleSpec()...); err != nil {
		return 0, err
	}
	return Applied, b.Index.Add(op)
}

// deleteBan removes a ban with one iptables call, as fail2ban's own
// action does; a ban that is not there is no error.
func deleteBan(t Table, chain string, spec []string) (Outcome, error) {
	err := t.Delete(chain, spec...)
	var ce *CommandError
	if errors.As(err, &ce) && notThere(ce.Stderr) {
		return Unchanged, nil
	}
	if err != nil {
		return 0, err
	}
	return Applied, nil
}

// notThere recognises iptables' answers for a rule or chain that does not
// exist, in both backends' wording.
func notThere(stderr string) bool {
	for _, s := range []string{"does a matching rule exist", "No chain/target/match by that name", "does not exist"} {
		if strings.Contains(stderr, s) {
			return true
		}
	}
	return false
}

// applySet carries out the operations that the set backend does
// differently; done is false for those it leaves to the rule code.
func applySet(b Backend, op policy.Operation) (out Outcome, done bool, err error) {
	t, sets, chain := b.Table, b.Sets, string(op.Chain)
	switch op.Kind {
	case policy.AddBan:
		ok, err := t.ChainExists(chain)
		if err != nil || !ok {
			return 0, true, errors.Join(err, fmt.Errorf("chain %q does not exist; fail2ban creates it at actionstart", chain))
		}
		name := SetName(op.Family, op.Chain, op.Target)
		if err := sets.Create(name, op.Family, b.Policy.MaxBansPerChain); err != nil {
			return 0, true, err
		}
		match := append([]string{"-m", "set", "--match-set", name, "src"}, op.Target.Args()...)
		if _, err := addRule(t, chain, match, func() error { return t.Insert(chain, 1, match...) }); err != nil {
			return 0, true, err
		}
		added, err := sets.Add(name, op.Source.String())
		if errors.Is(err, ErrSetFull) {
			return 0, true, fmt.Errorf("%w: set %s of chain %q already holds max_bans_per_chain (%d) bans with target %q; unban some or raise the limit", ErrBanLimit, name, chain, b.Policy.MaxBansPerChain, op.Target)
		}
		if err != nil || !added {
			return Unchanged, true, err
		}
		return Applied, true, nil
	case policy.DeleteBan:
		removed, err := sets.Del(SetName(op.Family, op.Chain, op.Target), op.Source.String())
		if err != nil || !removed {
			return Unchanged, true, err
		}
		return Applied, true, nil
	case policy.CheckBan:
		found, err := sets.Test(SetName(op.Family, op.Chain, op.Target), op.Source.String())
		out, err := checkOutcome(found, err)
		return out, true, err
	case policy.FlushChain, policy.DeleteChain:
		out, err := Apply(Backend{Table: t, Policy: b.Policy}, op)
		if err != nil {
			return 0, true, err
		}
		for _, name := range setNames(op.Family, op.Chain, b.Policy) {
			if op.Kind == policy.FlushChain {
				err = sets.Flush(name)
			} else {
				err = sets.Destroy(name)
			}
			if err != nil {
				return 0, true, err
			}
		}
		return out, true, nil
	}
	return 0, false, nil
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
