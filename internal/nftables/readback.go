package nftables

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/google/nftables"

	"github.com/f2b-shim/f2b-shim/policy"
)

// Element is a ban as the kernel holds it.
type Element struct {
	Prefix netip.Prefix
	// Timeout is the ban's whole timeout, Expires what is left of it;
	// both 0 for a ban without one.
	Timeout, Expires time.Duration
}

// ChainState is one ban chain as read back.
type ChainState struct {
	// Verdicts holds the target of each family's rule.
	Verdicts map[policy.Family]policy.Target
	// Bans holds each family's set, sorted; a family whose set is missing
	// has no key.
	Bans map[policy.Family][]Element
}

// Returns answers fail2ban's "-C CHAIN -j RETURN" for the family: the
// rule is implicit in nftables (a regular chain returns at its end), so
// it holds exactly while the family's part of the chain, its set, exists.
func (cs *ChainState) Returns(fam policy.Family) bool {
	_, ok := cs.Bans[fam]
	return ok
}

// Snapshot is the table as the kernel holds it, in typed values, for
// reconcile to compare with the state. What the package does not write
// (a rule, set or chain added by hand, a range that is no prefix) is
// listed in Foreign rather than guessed at.
type Snapshot struct {
	Exists    bool // the table exists
	BaseChain bool // its base chain exists, on the input hook at priority filter - 1
	Hooks     []Hook
	Chains    map[policy.Chain]*ChainState
	Foreign   []string
}

// ReadBack lists the table. A missing table is an empty Snapshot, not an
// error: after "nft flush ruleset" reconcile sees drift, not a failure.
func (t *Table) ReadBack() (*Snapshot, error) {
	snap := &Snapshot{Chains: map[policy.Chain]*ChainState{}}
	chains, err := t.chains()
	if err != nil {
		return nil, err
	}
	exists, err := t.tableExists()
	if err != nil || !exists {
		return snap, err
	}
	snap.Exists = true
	for _, c := range chains {
		if c.Name == BaseChain {
			snap.BaseChain = isBaseChain(c)
			if !snap.BaseChain {
				snap.Foreign = append(snap.Foreign, fmt.Sprintf("chain %q is not a filter chain on the input hook at priority filter - 1", BaseChain))
			}
			continue
		}
		snap.Chains[policy.Chain(c.Name)] = &ChainState{Verdicts: map[policy.Family]policy.Target{}, Bans: map[policy.Family][]Element{}}
	}
	if err := t.readSets(snap); err != nil {
		return nil, err
	}
	t.readOthers(snap)
	if slices.ContainsFunc(chains, func(c *nftables.Chain) bool { return c.Name == BaseChain }) {
		hooks, err := t.hooks()
		if err != nil {
			return nil, err
		}
		for _, h := range hooks {
			if h.ok {
				snap.Hooks = append(snap.Hooks, h.hook)
			} else {
				snap.Foreign = append(snap.Foreign, fmt.Sprintf("rule handle %d in chain %q", h.rule.Handle, BaseChain))
			}
		}
	}
	for name, cs := range snap.Chains {
		rules, err := t.rules(name)
		if err != nil {
			return nil, err
		}
		seen := map[string]bool{}
		for _, r := range rules {
			// One rule per set; a family's rules (one per set of the
			// layout) say the same target.
			fam, set, target, ok := decodeVerdict(name, r.Exprs)
			prev, had := cs.Verdicts[fam]
			if !ok || seen[set] || had && prev != target {
				snap.Foreign = append(snap.Foreign, fmt.Sprintf("rule handle %d in chain %q", r.Handle, name))
				continue
			}
			seen[set] = true
			cs.Verdicts[fam] = target
		}
	}
	slices.Sort(snap.Foreign)
	return snap, nil
}

// readOthers lists the table's named objects (counters, quotas, limits,
// ct helpers, …) and flowtables as foreign: the shim makes none, and a
// table that holds one is not only the shim's, so DropEmptyTable keeps
// it. One that cannot be listed is said so, and counts as foreign too:
// reading must not fail the heal, and must not let the table go.
func (t *Table) readOthers(snap *Snapshot) {
	libraryMu.Lock()
	defer libraryMu.Unlock()
	objs, err := t.conn.GetNamedObjects(t.table)
	if err != nil {
		snap.Foreign = append(snap.Foreign, fmt.Sprintf("named objects that could not be listed (%v)", err))
	}
	for _, o := range objs {
		if n, ok := o.(*nftables.NamedObj); ok {
			snap.Foreign = append(snap.Foreign, fmt.Sprintf("object %q", n.Name))
		} else {
			snap.Foreign = append(snap.Foreign, "a named object")
		}
	}
	fts, err := t.conn.ListFlowtables(t.table)
	if err != nil {
		snap.Foreign = append(snap.Foreign, fmt.Sprintf("flowtables that could not be listed (%v)", err))
	}
	for _, f := range fts {
		snap.Foreign = append(snap.Foreign, fmt.Sprintf("flowtable %q", f.Name))
	}
}

// isBaseChain says whether the chain is the base chain Open describes:
// hooks in a chain that is not on the input hook are never reached.
func isBaseChain(c *nftables.Chain) bool {
	return c.Type == nftables.ChainTypeFilter && c.Hooknum != nil && *c.Hooknum == *nftables.ChainHookInput &&
		c.Priority != nil && *c.Priority == basePriority
}

func (t *Table) tableExists() (bool, error) {
	libraryMu.Lock()
	defer libraryMu.Unlock()
	tables, err := t.conn.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return false, t.readErr("the inet tables", err)
	}
	for _, tb := range tables {
		if tb.Name == t.table.Name {
			return true, nil
		}
	}
	return false, nil
}

// readSets reads every named set of the table and files its elements
// under its chain.
func (t *Table) readSets(snap *Snapshot) error {
	libraryMu.Lock()
	defer libraryMu.Unlock()
	sets, err := t.conn.GetSets(t.table)
	if err != nil {
		return t.readErr("the sets", err)
	}
	for _, s := range sets {
		if s.Anonymous {
			continue // a hook's ports, read with its rule
		}
		chain, fam, addr, ok := chainOfSet(s.Name)
		cs := snap.Chains[chain]
		if !ok || cs == nil || s.Interval == addr || !s.HasTimeout {
			snap.Foreign = append(snap.Foreign, fmt.Sprintf("set %q", s.Name))
			continue
		}
		bans, foreign, err := t.setBans(s, addr)
		if err != nil {
			return err
		}
		// The set exists, even empty: Returns says so.
		cs.Bans[fam] = append(cs.Bans[fam], bans...)
		if cs.Bans[fam] == nil {
			cs.Bans[fam] = []Element{}
		}
		slices.SortFunc(cs.Bans[fam], func(a, b Element) int {
			if c := a.Prefix.Addr().Compare(b.Prefix.Addr()); c != 0 {
				return c
			}
			return a.Prefix.Bits() - b.Prefix.Bits()
		})
		for _, f := range foreign {
			snap.Foreign = append(snap.Foreign, fmt.Sprintf("set %q: %s", s.Name, f))
		}
	}
	return nil
}

// setBans reads a set's elements as bans; the caller holds libraryMu.
func (t *Table) setBans(s *nftables.Set, addr bool) (bans []Element, foreign []string, err error) {
	elems, err := t.conn.GetSetElements(s)
	if err != nil {
		return nil, nil, t.readErr(fmt.Sprintf("set %q", s.Name), err)
	}
	if !addr {
		bans, foreign = intervals(elems)
		return bans, foreign, nil
	}
	for _, e := range elems {
		a, err := addrOf(e.Key)
		if err != nil {
			foreign = append(foreign, err.Error())
			continue
		}
		bans = append(bans, Element{Prefix: netip.PrefixFrom(a, a.BitLen()), Timeout: e.Timeout, Expires: e.Expires})
	}
	return bans, foreign, nil
}

// chainOfSet maps a set name back to its chain, family and kind. Every
// name ends in exactly one of the suffixes, so no two chains share one.
func chainOfSet(name string) (chain policy.Chain, fam policy.Family, addr bool, ok bool) {
	name, addr = strings.CutSuffix(name, "-addr")
	if c, ok := strings.CutSuffix(name, "-v4"); ok {
		return policy.Chain(c), policy.IPv4, addr, true
	}
	if c, ok := strings.CutSuffix(name, "-v6"); ok {
		return policy.Chain(c), policy.IPv6, addr, true
	}
	return "", 0, false, false
}

// intervals pairs an interval set's elements back into prefixes: each
// start with the end element just above it, or open to the top when it is
// the last and has none.
func intervals(elems []nftables.SetElement) (bans []Element, foreign []string) {
	slices.SortFunc(elems, compareElements)
	for i := 0; i < len(elems); i++ {
		e := elems[i]
		if e.IntervalEnd {
			// An end without its start closes nothing and matches no
			// packet. nft writes one at the family's zero address before
			// a set's first interval, and the kernel leaves one behind
			// when an interval's timeout is up (the start element holds
			// the timeout, the end none) until the set's next garbage
			// collection: that is a ban lifted as asked, not drift.
			if _, err := addrOf(e.Key); err != nil {
				foreign = append(foreign, err.Error())
			}
			continue
		}
		start, err := addrOf(e.Key)
		if err != nil {
			foreign = append(foreign, err.Error())
			continue
		}
		var end netip.Addr
		open := true
		if i+1 < len(elems) && elems[i+1].IntervalEnd {
			if end, err = addrOf(elems[i+1].Key); err != nil {
				foreign = append(foreign, err.Error())
				continue
			}
			open = false
			i++
		}
		p, ok := rangePrefix(start, end, open)
		if !ok {
			foreign = append(foreign, fmt.Sprintf("range %s-%s is no prefix", start, end))
			continue
		}
		bans = append(bans, Element{Prefix: p, Timeout: e.Timeout, Expires: e.Expires})
	}
	return bans, foreign
}

// compareElements orders interval elements by key, and at one key the
// end of an interval before the start of the next: adjacent prefixes
// share that key (192.0.2.0/24 ends where 192.0.3.0/24 starts).
func compareElements(a, b nftables.SetElement) int {
	if c := bytes.Compare(a.Key, b.Key); c != 0 {
		return c
	}
	switch {
	case a.IntervalEnd == b.IntervalEnd:
		return 0
	case a.IntervalEnd:
		return -1
	}
	return 1
}

// Check reports the ban of the chain that covers p: p itself, or else a
// wider prefix that holds it. p itself wins wherever it is: with address
// sets an address is banned in the hash set and may also be covered by a
// prefix in the interval set, which is read first, and a check of the
// address, which asks for its own ban, would not find it. It reads the
// family's whole set, so it costs as much as the set is large; the
// shim's checks are rare (fail2ban's actioncheck asks about hooks, not
// bans).
func (t *Table) Check(chain policy.Chain, p netip.Prefix) (Element, bool, error) {
	if err := checkChain(chain); err != nil {
		return Element{}, false, err
	}
	fam := familyOf(p.Addr())
	exists, err := t.chainExists(chain)
	if err != nil || !exists {
		return Element{}, false, err
	}
	libraryMu.Lock()
	defer libraryMu.Unlock()
	sets, err := t.conn.GetSets(t.table)
	if err != nil {
		return Element{}, false, t.readErr("the sets", err)
	}
	var wider Element
	var found bool
	for _, s := range sets {
		c, f, addr, ok := chainOfSet(s.Name)
		if !ok || c != chain || f != fam || addr && p.Bits() != p.Addr().BitLen() {
			continue
		}
		bans, _, err := t.setBans(s, addr)
		if err != nil {
			return Element{}, false, err
		}
		for _, b := range bans {
			if b.Prefix == p {
				return b, true, nil
			}
			if !found && b.Prefix.Bits() <= p.Bits() && b.Prefix.Contains(p.Addr()) {
				wider, found = b, true
			}
		}
	}
	return wider, found, nil
}

// Part reports whether the family's part of a ban chain exists: its set,
// which the chain's bans go into. It answers fail2ban's "-C CHAIN -j
// RETURN" (see ChainState.Returns) without reading any element, so it
// costs the same at any number of bans.
func (t *Table) Part(chain policy.Chain, fam policy.Family) (bool, error) {
	if err := errors.Join(checkChain(chain), checkFamily(fam)); err != nil {
		return false, err
	}
	// Its sets alone: the rules familyPart also reads would cost two
	// more dumps (the chains, the chain's rules) on every request.
	sets, err := t.familySets(chain, fam)
	return len(sets) > 0, err
}

// Matched reports whether the family's part of a ban chain exists (as
// Part does) and whether it is whole: each set of the layout there, each
// with its verdict rule. A set without one holds bans that stop nothing ("nft flush chain inet
// f2b_shim CHAIN" takes both families' rules and leaves the sets). A part
// that never held a ban has no verdict rule either: ask for a part the
// record says holds bans. One read of the sets and the chain's rules, no
// element, where Part and then a read of the rules would read the sets
// twice.
func (t *Table) Matched(chain policy.Chain, fam policy.Family) (part, matched bool, err error) {
	if err := errors.Join(checkChain(chain), checkFamily(fam)); err != nil {
		return false, false, err
	}
	verdicts, sets, err := t.familyPart(chain, fam)
	if err != nil || len(sets) == 0 {
		return false, false, err
	}
	if !t.whole(chain, fam, sets) {
		return true, false, nil
	}
	for _, name := range sets {
		if !slices.ContainsFunc(verdicts, func(r *nftables.Rule) bool {
			_, set, _, ok := decodeVerdict(chain, r.Exprs)
			return ok && set == name
		}) {
			return true, false, nil
		}
	}
	return true, true, nil
}

// Verdict reads the target of the family's verdict rule of a chain;
// found is false when the part has no verdict rule (no ban yet, or
// flushed). It reads the chain's rules, not its elements.
func (t *Table) Verdict(chain policy.Chain, fam policy.Family) (target policy.Target, found bool, err error) {
	if err := errors.Join(checkChain(chain), checkFamily(fam)); err != nil {
		return policy.Target{}, false, err
	}
	// The rules alone: the sets familyPart also reads would cost two
	// more dumps (the tables, the sets) on every new ban.
	rules, err := t.rules(chain)
	if err != nil {
		return policy.Target{}, false, err
	}
	for _, r := range rules {
		if f, _, tg, ok := decodeVerdict(chain, r.Exprs); ok && f == fam {
			return tg, true, nil
		}
	}
	return policy.Target{}, false, nil
}

// Whole reports whether the family's part of a ban chain exists (as Part
// does) and has every set of its layout: a ban into a set deleted by hand
// fails its whole transaction. It reads what Part reads.
func (t *Table) Whole(chain policy.Chain, fam policy.Family) (part, whole bool, err error) {
	if err := errors.Join(checkChain(chain), checkFamily(fam)); err != nil {
		return false, false, err
	}
	sets, err := t.familySets(chain, fam)
	if err != nil || len(sets) == 0 {
		return false, false, err
	}
	return true, t.whole(chain, fam, sets), nil
}

// whole reports whether sets holds each set the layout keeps bans in.
func (t *Table) whole(chain policy.Chain, fam policy.Family, sets []string) bool {
	want := []string{SetName(chain, fam)}
	if t.addrSets {
		want = append(want, AddrSetName(chain, fam))
	}
	for _, name := range want {
		if !slices.Contains(sets, name) {
			return false
		}
	}
	return true
}

// Hooks reads the hooks of the base chain; rules it does not recognise
// are left out (ReadBack lists them as foreign).
func (t *Table) Hooks() ([]Hook, error) {
	live, err := t.hooks()
	var out []Hook
	for _, h := range live {
		if h.ok {
			out = append(out, h.hook)
		}
	}
	return out, err
}

// SameHook reports whether two hooks have the same effect.
func SameHook(a, b Hook) bool { return sameHook(a, b) }
