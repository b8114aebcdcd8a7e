// Package state keeps what the shim has put into the firewall, so that it
// can be restored after a reboot or a flush, listed and reconciled.
//
// The journal is a file of JSON lines in state_dir, each holding the
// canonical command line of one change the shim applied and when. Every
// line is judged again by the policy when the journal is read, so a
// journal edited by someone else can never put anything into the firewall
// that the policy would refuse from the mail host.
package state

import (
	"fmt"
	"slices"
	"time"

	"github.com/f2b-shim/f2b-shim/policy"
)

// State is the firewall as the journal describes it.
type State struct {
	Tables map[policy.Family]*Table
}

// Table is one family's part of the state.
type Table struct {
	Chains map[policy.Chain]*Chain
	Hooks  []Hook
}

// Chain is one ban chain.
type Chain struct {
	Return bool
	Bans   []Ban // oldest first
	// banned indexes Bans by banKey: a restore replays tens of thousands.
	banned map[string]bool
}

// Ban is one ban and when it was put in place.
type Ban struct {
	Op    policy.Operation
	Since time.Time
}

// Hook is one jump from a parent chain into a ban chain.
type Hook struct {
	Op    policy.Operation
	Since time.Time
}

// New returns an empty state.
func New() *State {
	return &State{Tables: map[policy.Family]*Table{
		policy.IPv4: {Chains: map[policy.Chain]*Chain{}},
		policy.IPv6: {Chains: map[policy.Chain]*Chain{}},
	}}
}

// Changes reports whether an operation of this kind changes the firewall
// and so belongs in the journal.
func Changes(k policy.Kind) bool {
	switch k {
	case policy.CreateChain, policy.FlushChain, policy.DeleteChain, policy.AddReturn,
		policy.AddHook, policy.DeleteHook, policy.AddBan, policy.DeleteBan:
		return true
	}
	return false
}

// banKey identifies a ban within its chain.
func banKey(op policy.Operation) string { return op.Source.String() + " " + op.Target.String() }

// hookKey identifies a hook within its family.
func hookKey(op policy.Operation) string {
	return fmt.Sprint(op.Chain, op.RuleSpec())
}

// Apply records one change, with the same idempotent meaning the
// firewall gives it.
func (s *State) Apply(op policy.Operation, at time.Time) {
	t := s.Tables[op.Family]
	chain := func() *Chain {
		c, ok := t.Chains[op.BanChain()]
		if !ok {
			c = &Chain{banned: map[string]bool{}}
			t.Chains[op.BanChain()] = c
		}
		return c
	}
	switch op.Kind {
	case policy.CreateChain:
		chain()
	case policy.FlushChain:
		if c, ok := t.Chains[op.Chain]; ok {
			c.Return, c.Bans, c.banned = false, nil, map[string]bool{}
		}
	case policy.DeleteChain:
		delete(t.Chains, op.Chain)
		t.Hooks = slices.DeleteFunc(t.Hooks, func(h Hook) bool { return h.Op.Jump == op.Chain })
	case policy.AddReturn:
		chain().Return = true
	case policy.AddHook:
		op.Kind = policy.AddHook
		if !slices.ContainsFunc(t.Hooks, func(h Hook) bool { return hookKey(h.Op) == hookKey(op) }) {
			t.Hooks = append(t.Hooks, Hook{Op: op, Since: at})
		}
	case policy.DeleteHook:
		t.Hooks = slices.DeleteFunc(t.Hooks, func(h Hook) bool { return hookKey(h.Op) == hookKey(op) })
	case policy.AddBan:
		c, key := chain(), banKey(op)
		if !c.banned[key] {
			c.banned[key] = true
			c.Bans = append(c.Bans, Ban{Op: op, Since: at})
		}
	case policy.DeleteBan:
		if c, ok := t.Chains[op.Chain]; ok && c.banned[banKey(op)] {
			delete(c.banned, banKey(op))
			c.Bans = slices.DeleteFunc(c.Bans, func(b Ban) bool { return banKey(b.Op) == banKey(op) })
		}
	}
}

// Entry is one change with its time, as the journal stores it.
type Entry struct {
	Time    time.Time
	Command string
}

// Entries is the shortest list of changes that rebuilds the state from
// an empty firewall: chains, their bans oldest first, return rules, hooks.
func (s *State) Entries() []Entry {
	var out []Entry
	for _, fam := range []policy.Family{policy.IPv4, policy.IPv6} {
		t := s.Tables[fam]
		for _, name := range sortedChains(t) {
			c := t.Chains[name]
			out = append(out, Entry{Command: fam.Binary() + " -w -N " + string(name)})
			for _, b := range c.Bans {
				out = append(out, Entry{Time: b.Since, Command: b.Op.CommandLine()})
			}
			if c.Return {
				out = append(out, Entry{Command: fam.Binary() + " -w -A " + string(name) + " -j RETURN"})
			}
		}
		for _, h := range t.Hooks {
			out = append(out, Entry{Time: h.Since, Command: h.Op.CommandLine()})
		}
	}
	return out
}

func sortedChains(t *Table) []policy.Chain {
	names := make([]policy.Chain, 0, len(t.Chains))
	for n := range t.Chains {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// KeepTimes copies the times of bans and hooks from an older view of the
// same firewall (the journal) into s (read from the live firewall).
func (s *State) KeepTimes(old *State) {
	for fam, t := range s.Tables {
		ot := old.Tables[fam]
		for name, c := range t.Chains {
			oc, ok := ot.Chains[name]
			if !ok {
				continue
			}
			for i, b := range c.Bans {
				for _, ob := range oc.Bans {
					if banKey(ob.Op) == banKey(b.Op) {
						c.Bans[i].Since = ob.Since
					}
				}
			}
		}
		for i, h := range t.Hooks {
			for _, oh := range ot.Hooks {
				if HookKey(oh.Op) == HookKey(h.Op) {
					t.Hooks[i].Since = oh.Since
				}
			}
		}
	}
}

// ChainNames lists a family's chains in name order.
func (t *Table) ChainNames() []policy.Chain { return sortedChains(t) }
