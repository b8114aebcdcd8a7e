// Package state keeps what the shim has put into the firewall, so that it
// can be restored after a reboot or a flush, listed and reconciled.
//
// The record of truth is Store, an embedded transactional database
// (go.etcd.io/bbolt) in state_dir, one file per policy. Every record read
// back is judged by the policy again, so a state file edited by someone
// else can never put anything into the firewall that the policy would
// refuse from the mail host. State is the in-memory view of it that
// restore, list and reconcile work on.
package state

import (
	"cmp"
	"maps"
	"slices"
	"time"

	"github.com/f2b-shim/f2b-shim/policy"
)

// State is the firewall as the record describes it.
type State struct {
	Tables map[policy.Family]*Table
	// lookup resolves service names, to tell hooks apart by effect.
	lookup func(proto, name string) (uint16, bool)
	seq    int
}

// Table is one family's part of the state.
type Table struct {
	Chains map[policy.Chain]*Chain
	Hooks  []Hook
}

// Chain is one ban chain.
type Chain struct {
	Return bool
	// bans maps banKey to the ban: every change is O(1), so replaying any
	// history costs what its length costs, never its square.
	bans map[string]Ban
}

// Ban is one ban and when it was put in place.
type Ban struct {
	Op    policy.Operation
	Since time.Time
	// Last is when it was last made: a re-ban refreshes it, and
	// max_ban_time counts from it.
	Last time.Time
	// seq orders bans with the same time (those read from the firewall
	// have none) in the order they were added.
	seq int
}

// Hook is one jump from a parent chain into a ban chain.
type Hook struct {
	Op    policy.Operation
	Since time.Time
}

// New returns an empty state; lookup resolves service names in hooks.
func New(lookup func(proto, name string) (uint16, bool)) *State {
	return &State{lookup: lookup, Tables: map[policy.Family]*Table{
		policy.IPv4: {Chains: map[policy.Chain]*Chain{}},
		policy.IPv6: {Chains: map[policy.Chain]*Chain{}},
	}}
}

// Changes reports whether an operation of this kind changes the firewall
// and so belongs in the record.
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

// HookKey identifies a hook by its effect (policy.HookEffect), or by its
// spelling when a service name in it cannot be resolved.
func (s *State) HookKey(op policy.Operation) string {
	if e, err := policy.HookEffect(op, s.lookup); err == nil {
		return e
	}
	return op.CommandLine()
}

// Bans lists the chain's bans, oldest first.
func (c *Chain) Bans() []Ban {
	out := make([]Ban, 0, len(c.bans))
	for _, b := range c.bans {
		out = append(out, b)
	}
	slices.SortFunc(out, func(a, b Ban) int {
		if c := a.Since.Compare(b.Since); c != 0 {
			return c
		}
		return cmp.Compare(a.seq, b.seq)
	})
	return out
}

// has reports whether the chain holds the ban with this key.
func (c *Chain) has(key string) bool { _, ok := c.bans[key]; return ok }

// Len is the number of bans in the chain.
func (c *Chain) Len() int { return len(c.bans) }

// Apply records one change, with the same idempotent meaning the
// firewall gives it.
func (s *State) Apply(op policy.Operation, at time.Time) {
	t := s.Tables[op.Family]
	chain := func() *Chain {
		c, ok := t.Chains[op.BanChain()]
		if !ok {
			c = &Chain{bans: map[string]Ban{}}
			t.Chains[op.BanChain()] = c
		}
		return c
	}
	switch op.Kind {
	case policy.CreateChain:
		chain()
	case policy.FlushChain:
		if c, ok := t.Chains[op.Chain]; ok {
			c.Return, c.bans = false, map[string]Ban{}
		}
	case policy.DeleteChain:
		delete(t.Chains, op.Chain)
		t.Hooks = slices.DeleteFunc(t.Hooks, func(h Hook) bool { return h.Op.Jump == op.Chain })
	case policy.AddReturn:
		chain().Return = true
	case policy.AddHook:
		key := s.HookKey(op)
		if !slices.ContainsFunc(t.Hooks, func(h Hook) bool { return s.HookKey(h.Op) == key }) {
			t.Hooks = append(t.Hooks, Hook{Op: op, Since: at})
		}
	case policy.DeleteHook:
		key := s.HookKey(op)
		t.Hooks = slices.DeleteFunc(t.Hooks, func(h Hook) bool { return s.HookKey(h.Op) == key })
	case policy.AddBan:
		c, key := chain(), banKey(op)
		if _, ok := c.bans[key]; !ok {
			s.seq++
			op.Kind = policy.AddBan
			c.bans[key] = Ban{Op: op, Since: at, Last: at, seq: s.seq}
		} else if b := c.bans[key]; at.After(b.Last) {
			b.Last = at
			c.bans[key] = b
		}
	case policy.DeleteBan:
		if c, ok := t.Chains[op.Chain]; ok {
			delete(c.bans, banKey(op))
		}
	}
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
// same firewall (the record) into s (read from the live firewall).
func (s *State) KeepTimes(old *State) {
	for fam, t := range s.Tables {
		ot := old.Tables[fam]
		for name, c := range t.Chains {
			oc, ok := ot.Chains[name]
			if !ok {
				continue
			}
			for key, b := range c.bans {
				if ob, ok := oc.bans[key]; ok {
					b.Since = ob.Since
					c.bans[key] = b
				}
			}
		}
		since := map[string]time.Time{}
		for _, oh := range ot.Hooks {
			since[old.HookKey(oh.Op)] = oh.Since
		}
		for i, h := range t.Hooks {
			if at, ok := since[s.HookKey(h.Op)]; ok {
				t.Hooks[i].Since = at
			}
		}
	}
}

// refresh sets when the ban with the given key was last made.
func (s *State) refresh(fam policy.Family, chain policy.Chain, key string, last time.Time) {
	if c, ok := s.Tables[fam].Chains[chain]; ok {
		if b, ok := c.bans[key]; ok && !last.IsZero() {
			b.Last = last
			c.bans[key] = b
		}
	}
}

// Expired lists the bans last made before cutoff, oldest first.
func (s *State) Expired(cutoff time.Time) []Ban {
	var out []Ban
	for _, fam := range []policy.Family{policy.IPv4, policy.IPv6} {
		t := s.Tables[fam]
		for _, name := range t.ChainNames() {
			for _, b := range t.Chains[name].Bans() {
				if !b.Last.IsZero() && b.Last.Before(cutoff) {
					out = append(out, b)
				}
			}
		}
	}
	return out
}

// Stamp gives every ban that has no time the time at. A firewall does not
// say when a ban was made, so a ban read from it has none; max_ban_time
// counts from the time a ban was last made, and a ban without one would
// never be due for expire, and would be put back with a whole
// max_ban_time by every heal. Read back, it counts from when it was found.
func (s *State) Stamp(at time.Time) {
	for _, t := range s.Tables {
		for _, c := range t.Chains {
			for key, b := range c.bans {
				if b.Since.IsZero() && b.Last.IsZero() {
					b.Since, b.Last = at, at
					c.bans[key] = b
				}
			}
		}
	}
}

// ChainNames lists a family's chains in name order.
func (t *Table) ChainNames() []policy.Chain { return sortedChains(t) }

// ReadBack is the record of one chain after changes to it were cut short
// (cut: the intents of a shim that was killed, or of a request that
// failed): what the record holds, plus what the live chain holds (live,
// read only when liveChain says it exists), minus only what a cut-short
// change itself took away and the firewall no longer has.
//
// It never drops a recorded chain, hook or ban because the live firewall
// lacks it: a reload or a flush behind the shim's back wipes the live
// chain, and the record is what puts it back. Only an unban, a flush, a
// delete of the chain or of a hook that was asked for explains an absence.
func ReadBack(recorded, live *State, fam policy.Family, chain policy.Chain, liveChain bool, cut []policy.Operation) *State {
	out := New(recorded.lookup)
	out.seq = recorded.seq
	ot, rt, lt := out.Tables[fam], recorded.Tables[fam], live.Tables[fam]
	if rc, ok := rt.Chains[chain]; ok {
		ot.Chains[chain] = &Chain{Return: rc.Return, bans: maps.Clone(rc.bans)}
	}
	for _, h := range rt.Hooks {
		if h.Op.Jump == chain {
			ot.Hooks = append(ot.Hooks, h)
		}
	}
	lc := lt.Chains[chain]
	if !liveChain || lc == nil {
		liveChain, lc = false, &Chain{bans: map[string]Ban{}}
	}
	liveHooks := map[string]bool{}
	if liveChain {
		oc := ot.Chains[chain]
		if oc == nil {
			oc = &Chain{bans: map[string]Ban{}}
			ot.Chains[chain] = oc
		}
		oc.Return = oc.Return || lc.Return
		for _, b := range lc.Bans() {
			if _, ok := oc.bans[banKey(b.Op)]; !ok {
				out.seq++
				b.seq = out.seq
				oc.bans[banKey(b.Op)] = b
			}
		}
		for _, h := range lt.Hooks {
			if h.Op.Jump != chain {
				continue
			}
			liveHooks[live.HookKey(h.Op)] = true
			if !slices.ContainsFunc(ot.Hooks, func(o Hook) bool { return out.HookKey(o.Op) == live.HookKey(h.Op) }) {
				ot.Hooks = append(ot.Hooks, h)
			}
		}
	}
	for _, op := range cut {
		if op.Family != fam || op.BanChain() != chain {
			continue
		}
		oc := ot.Chains[chain]
		switch op.Kind {
		case policy.DeleteBan:
			_, there := lc.bans[banKey(op)]
			// A widened unban lifts its prefix only when no other address
			// is behind it; without the live chain that cannot be told.
			if oc != nil && !there && (liveChain || !op.Member.IsValid()) {
				delete(oc.bans, banKey(op))
			}
		case policy.FlushChain:
			if oc != nil {
				oc.Return, oc.bans = lc.Return, maps.Clone(lc.bans)
			}
		case policy.DeleteChain:
			if !liveChain {
				delete(ot.Chains, chain)
				ot.Hooks = nil
			}
		case policy.DeleteHook:
			key := out.HookKey(op)
			if !liveHooks[key] {
				ot.Hooks = slices.DeleteFunc(ot.Hooks, func(h Hook) bool { return out.HookKey(h.Op) == key })
			}
		}
	}
	return out
}

// Only is the part of s that one chain makes up: the chain, its bans and
// return rule, and the hooks into it; for rebuilding that chain alone.
func (s *State) Only(fam policy.Family, chain policy.Chain) *State {
	out := New(s.lookup)
	out.seq = s.seq
	t, ot := s.Tables[fam], out.Tables[fam]
	if c, ok := t.Chains[chain]; ok {
		ot.Chains[chain] = c
	}
	for _, h := range t.Hooks {
		if h.Op.Jump == chain {
			ot.Hooks = append(ot.Hooks, h)
		}
	}
	return out
}
