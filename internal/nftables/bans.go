package nftables

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/google/nftables"

	"github.com/f2b-shim/f2b-shim/policy"
)

// banStep is one AddBans or RemoveBans call of one family, checked.
type banStep struct {
	chain  policy.Chain
	fam    policy.Family
	addr   bool // single addresses in the hash set (WithAddressSets)
	remove bool
	// fresh bans are not elements (AddNewBans): a plain add.
	fresh bool
	bans  []Ban
}

type setKey struct {
	chain policy.Chain
	fam   policy.Family
}

// Adjustment is a ban that Commit changed because another ban of its
// chain overlaps it: interval sets hold disjoint elements, and prefixes
// are either disjoint or nested, so the wider one stands for both.
type Adjustment struct {
	Chain  policy.Chain
	Prefix netip.Prefix
	// Within is set when Prefix was not added (or removed) on its own
	// because the wider ban Within holds it: it is enforced as long as
	// Within is. Removing it removes nothing, as "iptables -D" of it
	// leaves Within's rule.
	Within netip.Prefix
	// Replaced lists the narrower bans that Prefix, added, took the place
	// of: they stay enforced while Prefix is, and reconcile adds them
	// back (from the state) when Prefix is lifted.
	Replaced []netip.Prefix
}

// AddBans adds the prefixes to the chain's sets. A prefix that is there
// already gets the new timeout: each element is added, deleted and added
// again in the transaction, which refreshes it on every kernel (only
// 6.10 and later update a timeout on a plain add), and cannot fail on a
// missing element. The chain must exist, or be ensured earlier in the
// batch.
func (b *Batch) AddBans(chain policy.Chain, bans []Ban) { b.banStep(chain, bans, false, false) }

// AddNewBans adds bans that the caller knows are no elements of the
// chain's sets (its record of them, read under its lock, says so): a
// plain add, without the delete and add again by which AddBans refreshes
// an element's timeout. A transaction that deletes an element makes the
// process wait, when it closes its netlink socket (at exit at the
// latest), until the kernel has freed what was deleted, an RCU grace
// period (nf_tables flushes its destroy work on NETLINK_URELEASE): 9 to
// 10 ms a process on the benchmark machine, which a one-shot ban would
// pay and a raw "nft add element" does not. A ban that is an element
// after all keeps its timeout; one that overlaps another in an interval
// set is fitted as by AddBans.
func (b *Batch) AddNewBans(chain policy.Chain, bans []Ban) { b.banStep(chain, bans, false, true) }

// RemoveBans removes the prefixes from the chain's sets. A prefix that is
// not there is no error: each element is added and then deleted, since a
// delete of a missing element would fail the whole transaction.
func (b *Batch) RemoveBans(chain policy.Chain, prefixes []netip.Prefix) {
	bans := make([]Ban, len(prefixes))
	for i, p := range prefixes {
		bans[i] = Ban{Prefix: p}
	}
	b.banStep(chain, bans, true, false)
}

func (b *Batch) banStep(chain policy.Chain, bans []Ban, remove, fresh bool) {
	if err := checkChain(chain); err != nil {
		b.fail(err)
		return
	}
	b.bans += len(bans)
	if b.bans > maxBansPerTransaction {
		b.fail(fmt.Errorf("f2b-shim: a batch of %d bans is more than one nftables transaction holds (%d); split it", b.bans, maxBansPerTransaction))
		return
	}
	byKind := map[setKind][]Ban{}
	type position struct {
		kind  setKind
		index int
	}
	seen := map[netip.Prefix]position{}
	for _, ban := range bans {
		p := ban.Prefix
		if !p.IsValid() || p.Addr().Zone() != "" || p.Addr().Is4In6() {
			b.fail(fmt.Errorf("f2b-shim: %q is not a plain IPv4 or IPv6 prefix; unmap IPv4-mapped addresses first", p))
			return
		}
		if ban.Timeout < 0 || ban.Timeout > 0 && ban.Timeout < time.Millisecond {
			b.fail(fmt.Errorf("f2b-shim: ban of %s has timeout %s; use 0 (none) or at least 1ms, the kernel's unit", p, ban.Timeout))
			return
		}
		ban.Prefix = p.Masked()
		// A prefix twice in one message would be deleted twice, and the
		// second delete fail the transaction: the last one counts.
		if i, dup := seen[ban.Prefix]; dup {
			byKind[i.kind][i.index] = ban
			continue
		}
		k := setKind{familyOf(p.Addr()), b.t.addrSets && p.Bits() == p.Addr().BitLen()}
		seen[ban.Prefix] = position{k, len(byKind[k])}
		byKind[k] = append(byKind[k], ban)
	}
	for _, fam := range []policy.Family{policy.IPv4, policy.IPv6} {
		for _, addr := range []bool{false, true} {
			if bans := byKind[setKind{fam, addr}]; len(bans) > 0 {
				b.steps = append(b.steps, step{bans: &banStep{chain: chain, fam: fam, addr: addr, remove: remove, fresh: fresh, bans: bans}})
			}
		}
	}
}

type setKind struct {
	fam  policy.Family
	addr bool
}

func familyOf(a netip.Addr) policy.Family {
	if a.Is4() {
		return policy.IPv4
	}
	return policy.IPv6
}

func (b *Batch) hasBans() bool { return len(b.banSets()) > 0 }

// banSets lists the sets the batch's bans change.
func (b *Batch) banSets() []setKey {
	var out []setKey
	for _, s := range b.steps {
		if s.bans != nil && !s.bans.addr && !slices.Contains(out, setKey{s.bans.chain, s.bans.fam}) {
			out = append(out, setKey{s.bans.chain, s.bans.fam})
		}
	}
	return out
}

// banOps turns a ban step into library calls, in messages of at most
// maxElementsPerMessage elements. With live (the sets' elements, kept up
// to date as the batch goes) it first fits the bans to what is there.
func (b *Batch) banOps(s *banStep, live map[setKey][]netip.Prefix, empty bool) []func(c *nftables.Conn) error {
	set := b.t.set(s.chain, s.fam)
	toElements := elementsOf
	if s.addr {
		// A hash set holds no overlaps to fit, and no interval ends.
		set, toElements, live = b.t.addrSet(s.chain, s.fam), addrElementsOf, nil
	}
	var ops []func(c *nftables.Conn) error
	emit := func(bans []Ban, calls func(c *nftables.Conn, chunk []nftables.SetElement) error) {
		elems := toElements(bans)
		for start := 0; start < len(elems); start += maxElementsPerMessage {
			chunk := elems[start:min(start+maxElementsPerMessage, len(elems))]
			ops = append(ops, func(c *nftables.Conn) error { return calls(c, chunk) })
		}
	}
	add := func(c *nftables.Conn, chunk []nftables.SetElement) error { return c.SetAddElements(set, chunk) }
	del := func(c *nftables.Conn, chunk []nftables.SetElement) error { return c.SetDeleteElements(set, chunk) }
	addDel := func(c *nftables.Conn, chunk []nftables.SetElement) error {
		return errors.Join(add(c, chunk), del(c, chunk))
	}
	addDelAdd := func(c *nftables.Conn, chunk []nftables.SetElement) error {
		return errors.Join(add(c, chunk), del(c, chunk), add(c, chunk))
	}
	switch {
	case empty && s.remove:
	case empty && live == nil:
		emit(s.bans, add)
	case live == nil && s.remove:
		emit(s.bans, addDel)
	case live == nil && s.fresh:
		emit(s.bans, add)
	case live == nil:
		emit(s.bans, addDelAdd)
	default:
		f := b.fit(s, live)
		// The narrower elements a wider ban replaces were read a moment
		// ago: a plain delete. The wider ban is new, so a plain add: the
		// kernel's rbtree (6.18) cannot delete an element added in the
		// same transaction after other elements were deleted (ENOENT).
		emit(bansOf(f.replaced), del)
		emit(f.added, add)
		if s.remove {
			emit(f.there, addDel)
		} else {
			emit(f.there, addDelAdd)
		}
	}
	return ops
}

// fitted is a ban step fitted to the live set.
type fitted struct {
	there    []Ban          // bans that are elements: refreshed or removed
	added    []Ban          // new bans, none of them there
	replaced []netip.Prefix // narrower elements that added bans replace
}

// fit adjusts a step to the live set: a ban held by a wider element is
// left out; an added ban that holds narrower elements deletes them
// first; a removal of what is no element of its own is left out. live is
// updated to what the set holds after the step.
func (b *Batch) fit(s *banStep, live map[setKey][]netip.Prefix) fitted {
	key := setKey{s.chain, s.fam}
	elems := live[key]
	// Widest first: a narrower ban of the same step is then held by it,
	// instead of being added and replaced in one message. A narrower ban
	// of an earlier step is in the transaction by now, so deleting it
	// works like deleting one the kernel held.
	bans := slices.Clone(s.bans)
	slices.SortStableFunc(bans, func(a, b Ban) int { return a.Prefix.Bits() - b.Prefix.Bits() })
	var f fitted
	for _, ban := range bans {
		p := ban.Prefix
		i, exact, within := findPrefix(elems, p)
		switch {
		case exact && s.remove:
			f.there = append(f.there, ban)
			elems = slices.Delete(elems, i, i+1)
		case exact:
			f.there = append(f.there, ban)
		case within.IsValid():
			b.Adjustments = append(b.Adjustments, Adjustment{Chain: s.chain, Prefix: p, Within: within})
		case s.remove:
			// No element of its own: nothing to remove, as "iptables -D"
			// of a rule that is not there; narrower bans inside it stay.
		default:
			j := i
			last := lastAddr(p)
			for j < len(elems) && !last.Less(elems[j].Addr()) {
				j++
			}
			if j > i {
				replaced := slices.Clone(elems[i:j])
				f.replaced = append(f.replaced, replaced...)
				b.Adjustments = append(b.Adjustments, Adjustment{Chain: s.chain, Prefix: p, Replaced: replaced})
			}
			elems = slices.Replace(elems, i, j, p)
			f.added = append(f.added, ban)
		}
	}
	live[key] = elems
	return f
}

// findPrefix looks p up in sorted, disjoint prefixes: i is where p is or
// would go; exact says it is there; within is the wider element that
// holds it, if any.
func findPrefix(elems []netip.Prefix, p netip.Prefix) (i int, exact bool, within netip.Prefix) {
	i, _ = slices.BinarySearchFunc(elems, p, func(e, p netip.Prefix) int { return e.Addr().Compare(p.Addr()) })
	if i < len(elems) && elems[i] == p {
		return i, true, netip.Prefix{}
	}
	for _, k := range []int{i - 1, i} {
		if k >= 0 && k < len(elems) && elems[k].Bits() < p.Bits() && elems[k].Contains(p.Addr()) {
			return i, false, elems[k]
		}
	}
	return i, false, netip.Prefix{}
}

func bansOf(ps []netip.Prefix) []Ban {
	out := make([]Ban, len(ps))
	for i, p := range ps {
		out[i] = Ban{Prefix: p}
	}
	return out
}

// elementsOf turns bans into interval elements, each prefix's start next
// to its end.
func elementsOf(bans []Ban) []nftables.SetElement {
	out := make([]nftables.SetElement, 0, 2*len(bans))
	for _, ban := range bans {
		start, end, open := prefixRange(ban.Prefix)
		out = append(out, nftables.SetElement{Key: keyOf(start), Timeout: ban.Timeout})
		if !open {
			// The kernel refuses a timeout on an interval end (EINVAL):
			// the start element's timeout is the interval's.
			out = append(out, nftables.SetElement{Key: keyOf(end), IntervalEnd: true})
		}
	}
	return out
}

// addrElementsOf turns single-address bans into hash set elements.
func addrElementsOf(bans []Ban) []nftables.SetElement {
	out := make([]nftables.SetElement, len(bans))
	for i, ban := range bans {
		out[i] = nftables.SetElement{Key: keyOf(ban.Prefix.Addr()), Timeout: ban.Timeout}
	}
	return out
}

// liveBans reads the sets' elements as sorted prefixes.
func (t *Table) liveBans(keys []setKey) (map[setKey][]netip.Prefix, error) {
	libraryMu.Lock()
	defer libraryMu.Unlock()
	sets, err := t.conn.GetSets(t.table)
	if err != nil {
		return nil, t.readErr("the sets", err)
	}
	out := map[setKey][]netip.Prefix{}
	for _, k := range keys {
		for _, s := range sets {
			if s.Name != SetName(k.chain, k.fam) {
				continue
			}
			elems, err := t.conn.GetSetElements(s)
			if err != nil {
				return nil, t.readErr(fmt.Sprintf("set %q", s.Name), err)
			}
			bans, _ := intervals(elems)
			for _, ban := range bans {
				out[k] = append(out[k], ban.Prefix)
			}
		}
	}
	return out, nil
}
