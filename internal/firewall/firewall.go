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
	"slices"
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

// ErrLimit is returned when a request would pass one of the policy's
// bounds (max_bans_per_chain, max_chains, max_hooks_per_chain). Nothing
// was changed; the shim reports it as a denial.
var ErrLimit = errors.New("limit reached")

// Backend is where the shim keeps bans: as one rule per ban in the chain
// (Sets is nil, the default), or in ipsets that the chain matches with
// one rule per target (policy backend = "ipset"), which keeps bans and
// packets O(1) at any number of bans.
type Backend struct {
	Table  Table
	Sets   Sets
	Policy *policy.Policy
	// Record, when set, is the shim's record of its chains and bans
	// (state.Store): it bounds the number of chains, and lets the rule
	// backend ban without reading the chain.
	Record Record
	// LookupPort resolves service names, to tell hooks apart by effect.
	LookupPort func(proto, name string) (uint16, bool)
	// SetsInUse, when set, remembers the sets whose rule a stream's
	// batch has found in place, so that its later bans into them skip
	// the reference count. The batch holds the lock, and a flush or
	// delete of the chain in it forgets them.
	SetsInUse map[string]bool
	// NFT, when set, is the nftables backend (policy backend =
	// "nftables"); Table and Sets are then nil. NFTQueue, when set,
	// gathers a stream batch's bans into one transaction.
	NFT      NFT
	NFTQueue *NFTQueue
	// NFTVerdicts, when set, remembers each chain part's target for a
	// stream batch, which holds the lock.
	NFTVerdicts map[string]policy.Target
}

// Record is what Apply asks of the shim's record.
type Record interface {
	// Chains counts the chains recorded for the family.
	Chains(fam policy.Family) (int, error)
	HasChain(fam policy.Family, chain policy.Chain) (bool, error)
	// Synced reports whether the chain's recorded bans are what the live
	// chain holds; Learn makes them so.
	Synced(fam policy.Family, chain policy.Chain) (bool, error)
	Learn(fam policy.Family, chain policy.Chain, bans []policy.Operation) error
	HasBan(op policy.Operation) (bool, error)
	BanCount(fam policy.Family, chain policy.Chain) (int, error)
	// Unsettled reports whether a change to this ban may have reached the
	// firewall after the record was made: its shim was killed while its
	// iptables call still ran. Recording the ban settles it.
	Unsettled(op policy.Operation) (bool, error)
}

// Apply carries out op. The caller holds the policy's lock, so the check
// and the change that follows it cannot race with another shim.
func Apply(b Backend, op policy.Operation) (Outcome, error) {
	if b.NFT != nil {
		return applyNFT(b, op)
	}
	t := b.Table
	chain, spec := string(op.Chain), op.RuleSpec()
	if b.Sets != nil {
		if out, done, err := applySet(b, op); done {
			return out, err
		}
	}
	switch op.Kind {
	case policy.CreateChain:
		ok, err := t.ChainExists(chain)
		if err != nil || ok {
			return Unchanged, err
		}
		if err := checkChainLimit(b, op); err != nil {
			return 0, err
		}
		return Applied, t.NewChain(chain)
	case policy.FlushChain:
		return ifPresent(t, chain, func() error { return t.FlushChain(chain) })
	case policy.DeleteChain:
		return ifPresent(t, chain, func() error { return t.DeleteChain(chain) })
	case policy.AddReturn:
		return addRule(t, chain, spec, func() error { return t.Append(chain, spec...) })
	case policy.AddHook, policy.DeleteHook, policy.CheckHook:
		return applyHook(b, op)
	case policy.AddBan:
		if b.Record != nil {
			return addBanRecorded(b, op)
		}
		return addBanRule(t, chain, spec, b.Policy.MaxBansPerChain)
	case policy.DeleteBan:
		return deleteBan(t, chain, spec)
	case policy.CheckReturn, policy.CheckBan:
		found, err := t.Exists(chain, spec...)
		return checkOutcome(found, err)
	case policy.CheckHookListed:
		found, err := jumpsTo(t, chain, string(op.Jump))
		return checkOutcome(found, err)
	}
	return 0, fmt.Errorf("operation %v is not implemented", op.Kind)
}

// checkChainLimit refuses a new chain past max_chains. The record counts
// the chains: listing the live table would cost as much as every rule in it.
func checkChainLimit(b Backend, op policy.Operation) error {
	if b.Record == nil {
		return nil
	}
	known, err := b.Record.HasChain(op.Family, op.Chain)
	if err != nil || known {
		return err
	}
	n, err := b.Record.Chains(op.Family)
	if err != nil {
		return err
	}
	if n >= b.Policy.MaxChains {
		return fmt.Errorf("chain %w: there are already %d %s chains (max_chains); delete one, or raise the limit in the policy", ErrLimit, n, op.Family)
	}
	return nil
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
		return 0, banLimit(chain, bans)
	}
	return Applied, t.Insert(chain, 1, spec...)
}

func banLimit(chain string, n int) error {
	return fmt.Errorf("ban %w: chain %q already holds %d bans (max_bans_per_chain); unban some or raise the limit in the policy", ErrLimit, chain, n)
}

// addBanRecorded bans with one iptables call: the record says whether
// the ban is there and how many the chain holds. A chain the record does
// not hold in sync (made before the record, or cut short by a crash) is
// read once to learn it.
func addBanRecorded(b Backend, op policy.Operation) (Outcome, error) {
	t, chain := b.Table, string(op.Chain)
	synced, err := b.Record.Synced(op.Family, op.Chain)
	if err != nil {
		return 0, err
	}
	if !synced {
		rules, err := t.List(chain)
		if err != nil {
			return 0, err
		}
		var bans []policy.Operation
		for _, r := range rules {
			c, err := policy.ParseSaved(op.Family, r)
			if err != nil || c.Kind != policy.AddBan || c.Chain != op.Chain {
				continue
			}
			if ban, err := policy.Authorize(b.Policy, c, policy.Context{LookupPort: b.LookupPort}); err == nil {
				bans = append(bans, ban)
			}
		}
		if err := b.Record.Learn(op.Family, op.Chain, bans); err != nil {
			return 0, err
		}
	}
	unsettled, err := b.Record.Unsettled(op)
	if err != nil {
		return 0, err
	}
	if unsettled {
		// Ask the chain itself, once: the record may be behind.
		rules, err := t.List(chain)
		if err != nil {
			return 0, err
		}
		if slices.Contains(rules, "-A "+chain+" "+strings.Join(op.RuleSpec(), " ")) {
			return Unchanged, nil
		}
	} else if has, err := b.Record.HasBan(op); err != nil || has {
		return Unchanged, err
	}
	n, err := b.Record.BanCount(op.Family, op.Chain)
	if err != nil {
		return 0, err
	}
	if n >= b.Policy.MaxBansPerChain {
		return 0, banLimit(chain, n)
	}
	if err := t.Insert(chain, 1, op.RuleSpec()...); err != nil {
		return 0, err
	}
	return Applied, nil
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
		// The ordinary ban is two netlink messages and no process: the
		// set says itself when it is missing, and its reference count
		// when its rule is gone (a flush behind the shim's back), and only
		// then is the chain read. A chain that is gone fails the ban, so
		// that fail2ban's actioncheck notices and repairs the proxy.
		name := SetName(op.Family, op.Chain, op.Target)
		added, err := sets.Add(name, op.Source.String())
		if errors.Is(err, ErrNoSet) {
			if err := sets.Create(name, op.Family, b.Policy.MaxBansPerChain); err != nil {
				return 0, true, err
			}
			added, err = sets.Add(name, op.Source.String())
		}
		if errors.Is(err, ErrSetFull) {
			return 0, true, fmt.Errorf("ban %w: set %s of chain %q already holds max_bans_per_chain (%d) bans with target %q; unban some or raise the limit", ErrLimit, name, chain, b.Policy.MaxBansPerChain, op.Target)
		}
		if err != nil {
			return 0, true, err
		}
		if !b.SetsInUse[name] {
			refs, err := sets.References(name)
			if err != nil {
				return 0, true, err
			}
			if refs == 0 {
				if err := ensureSetRule(b, op, name); err != nil {
					return 0, true, err
				}
			}
			if b.SetsInUse != nil {
				b.SetsInUse[name] = true
			}
		}
		if !added {
			return Unchanged, true, nil
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
			delete(b.SetsInUse, name)
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

// ensureSetRule makes sure the chain matches the set: "-m set
// --match-set NAME src -j TARGET", at the top, where fail2ban's bans go.
// It reads the chain, never "-C", which ip6tables-legacy answers without
// looking at the match.
func ensureSetRule(b Backend, op policy.Operation, name string) error {
	chain := string(op.Chain)
	match := append([]string{"-m", "set", "--match-set", name, "src"}, op.Target.Args()...)
	rules, err := b.Table.List(chain)
	if err != nil {
		return errors.Join(err, fmt.Errorf("chain %q: fail2ban creates it at actionstart", chain))
	}
	if slices.Contains(rules, "-A "+chain+" "+strings.Join(match, " ")) {
		return nil
	}
	return b.Table.Insert(chain, 1, match...)
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
