package firewall

import (
	"fmt"
	"net/netip"
	"slices"

	"github.com/f2b-shim/f2b-shim/internal/nftables"
	"github.com/f2b-shim/f2b-shim/policy"
)

// NFT is the nftables backend's table (*nftables.Table): the shim's own
// inet table, changed over netlink. With it, a Backend's Table and Sets
// are nil: this backend runs no program, iptables and ipset included.
type NFT interface {
	NewBatch() *nftables.Batch
	// Part answers whether the family's part of a chain exists, reading
	// no element.
	Part(chain policy.Chain, fam policy.Family) (bool, error)
	// Whole answers Part, and whether the part has every set of its
	// layout; Matched also whether each set has its verdict rule. Neither
	// reads an element.
	Whole(chain policy.Chain, fam policy.Family) (part, whole bool, err error)
	Matched(chain policy.Chain, fam policy.Family) (part, matched bool, err error)
	// Verdict reads the target of the part's verdict rule.
	Verdict(chain policy.Chain, fam policy.Family) (policy.Target, bool, error)
	Hooks() ([]nftables.Hook, error)
	Check(chain policy.Chain, p netip.Prefix) (nftables.Element, bool, error)
	ReadBack() (*nftables.Snapshot, error)
}

// NFTQueue gathers a stream batch's bans and unbans (and expire's
// unbans) into one nftables transaction, written at Flush, or before any
// other change so that the table sees every change in the order asked.
// A transaction is all or nothing: when it fails, each queued change is
// sent in a transaction of its own, so that a ban that fails does not
// fail its neighbours, as Batched does for iptables-restore.
type NFTQueue struct {
	// Queue, when set, queues the next ban or unban under Ticket; any
	// other change is made at once, after the queue.
	Queue  bool
	Ticket int
	nft    NFT
	queue  []nftQueued
	failed map[int]error
	// named holds the chain and prefix of every queued change: a ban is
	// fresh only if the queue names its prefix nowhere before it.
	named map[chainPrefix]bool
}

type nftQueued struct {
	ticket int
	op     policy.Operation
	ban    nftables.Ban
	// fresh: the record does not hold the ban, and nothing earlier in
	// the batch names its prefix, so the set does not hold it either: a
	// plain add (AddNewBans) instead of add, delete and add again, a
	// third of the kernel's work.
	fresh bool
}

type chainPrefix struct {
	chain  policy.Chain
	prefix netip.Prefix
}

// add queues op; fresh says the record does not hold the ban. The batch
// changes each prefix once, as the last call that names it says, so a
// ban after an unban of its prefix in the same batch is not fresh: the
// set may hold it, and its timeout must be refreshed.
func (q *NFTQueue) add(b Backend, op policy.Operation, fresh bool) {
	q.nft = b.NFT
	key := chainPrefix{op.Chain, op.Source}
	if q.named == nil {
		q.named = map[chainPrefix]bool{}
	}
	fresh = fresh && !q.named[key]
	q.named[key] = true
	q.queue = append(q.queue, nftQueued{q.Ticket, op, banOf(b.Policy, op), fresh})
}

// Flush writes the queue, and returns the queued changes that failed
// since the last Flush, by ticket.
func (q *NFTQueue) Flush() map[int]error {
	q.flush()
	failed := q.failed
	q.failed = nil
	return failed
}

func (q *NFTQueue) flush() {
	queue := q.queue
	q.queue, q.named = nil, nil
	if len(queue) == 0 {
		return
	}
	b := q.nft.NewBatch()
	verdicts := map[verdictKey]bool{}
	// A run of bans (or unbans) into one chain is one call: the package
	// sends each call's elements in messages of up to a thousand, where a
	// call per ban would cost three messages and their acknowledgements
	// each (a ban is added, deleted and added again, which refreshes its
	// timeout).
	for start := 0; start < len(queue); {
		end := start + 1
		for end < len(queue) && queue[end].op.Kind == queue[start].op.Kind && queue[end].op.Chain == queue[start].op.Chain {
			end++
		}
		queueBans(b, queue[start:end], verdicts)
		start = end
	}
	if b.Commit() == nil {
		return
	}
	for _, e := range queue {
		b := q.nft.NewBatch()
		queueBans(b, []nftQueued{e}, map[verdictKey]bool{})
		if err := b.Commit(); err != nil {
			if q.failed == nil {
				q.failed = map[int]error{}
			}
			q.failed[e.ticket] = err
		}
	}
}

// verdictKey is a chain's family part and the target its bans get.
type verdictKey struct {
	chain  policy.Chain
	fam    policy.Family
	target policy.Target
}

// queueBans queues a run of bans, or of unbans, into one chain; verdicts
// holds the verdicts the batch has set already: setting one reads the
// chain's rules, which would cost a netlink dump per ban.
func queueBans(b *nftables.Batch, run []nftQueued, verdicts map[verdictKey]bool) {
	chain := run[0].op.Chain
	if run[0].op.Kind == policy.DeleteBan {
		prefixes := make([]netip.Prefix, len(run))
		for i, e := range run {
			prefixes[i] = e.op.Source
		}
		b.RemoveBans(chain, prefixes)
		return
	}
	var fresh, refresh []nftables.Ban
	for _, e := range run {
		if k := (verdictKey{chain, e.op.Family, e.op.Target}); !verdicts[k] {
			verdicts[k] = true
			b.SetVerdict(chain, e.op.Family, e.op.Target)
		}
		if e.fresh {
			fresh = append(fresh, e.ban)
		} else {
			refresh = append(refresh, e.ban)
		}
	}
	// The refreshes last: a prefix in both (a ban sent twice) is then
	// refreshed, as the last call that names it says.
	if len(fresh) > 0 {
		b.AddNewBans(chain, fresh)
	}
	if len(refresh) > 0 {
		b.AddBans(chain, refresh)
	}
}

// banOf is the element of a ban: its prefix, and max_ban_time as its
// timeout, so that the kernel lifts it on time even if no f2b-shim
// process ever runs again. A re-ban adds it again, which refreshes it.
func banOf(pol *policy.Policy, op policy.Operation) nftables.Ban {
	return nftables.Ban{Prefix: op.Source, Timeout: pol.MaxBanTime}
}

// nftDo commits one change, after whatever the stream's queue holds.
func nftDo(b Backend, fill func(x *nftables.Batch)) error {
	if b.NFTQueue != nil {
		b.NFTQueue.flush()
	}
	x := b.NFT.NewBatch()
	fill(x)
	return x.Commit()
}

// NFTHook is a hook request as the nftables table holds it.
func NFTHook(op policy.Operation, lookup func(proto, name string) (uint16, bool)) (nftables.Hook, error) {
	ports, err := op.PortRanges(lookup)
	if err != nil {
		return nftables.Hook{}, err
	}
	return nftables.Hook{Family: op.Family, Chain: op.Jump, Proto: op.Proto, Ports: ports}, nil
}

// applyNFT carries out op on the nftables table, with fail2ban's iptables
// semantics: creating what exists, deleting what is absent and banning
// twice succeed and change nothing (a re-ban refreshes its timeout).
func applyNFT(b Backend, op policy.Operation) (Outcome, error) {
	chain, fam := op.BanChain(), op.Family
	// Queued bans never make or remove a chain's part, so it is read
	// without writing the queue first.
	part := func() (bool, error) { return nftPart(b, chain, fam) }
	switch op.Kind {
	case policy.CreateChain:
		ok, err := part()
		if err != nil || ok {
			return Unchanged, err
		}
		if err := checkChainLimit(b, op); err != nil {
			return 0, err
		}
		return Applied, nftDo(b, func(x *nftables.Batch) { x.EnsureChain(chain, fam) })
	case policy.FlushChain, policy.DeleteChain:
		ok, err := part()
		if err != nil || !ok {
			return Unchanged, err
		}
		delete(b.SetsInUse, string(chain)+" "+fam.String())
		delete(b.NFTVerdicts, string(chain)+" "+fam.String())
		return Applied, nftDo(b, func(x *nftables.Batch) {
			if op.Kind == policy.FlushChain {
				x.FlushChain(chain, fam)
			} else {
				x.DeleteChain(chain, fam)
			}
		})
	case policy.AddReturn, policy.CheckReturn:
		// The return rule is implicit: a regular chain returns at its
		// end. It holds exactly while the family's part of the chain does.
		ok, err := part()
		switch {
		case err != nil:
			return 0, err
		case op.Kind == policy.CheckReturn:
			return checkOutcome(ok, nil)
		case !ok:
			return 0, noChain(chain, fam)
		}
		return Unchanged, nil
	case policy.AddHook, policy.DeleteHook, policy.CheckHook, policy.CheckHookListed:
		return applyNFTHook(b, op)
	case policy.AddBan:
		return addBanNFT(b, op)
	case policy.DeleteBan:
		// A removal of an element that is not there changes nothing
		// (the package adds it first): the record says which it was.
		if ok, err := part(); err != nil || !ok {
			return Unchanged, err
		}
		was := true
		if b.Record != nil {
			var err error
			if was, err = b.Record.HasBan(op); err != nil {
				return 0, err
			}
		}
		if !was {
			// The part's bans all have its verdict's target: an unban
			// with another matches none of them, as "iptables -D" with
			// it matches no rule. Removing the element lifted a ban the
			// record keeps.
			if other, err := otherTarget(b, op); err != nil || other {
				return Unchanged, err
			}
		}
		if b.NFTQueue != nil && b.NFTQueue.Queue {
			b.NFTQueue.add(b, op, false)
		} else if err := nftDo(b, func(x *nftables.Batch) { x.RemoveBans(chain, []netip.Prefix{op.Source}) }); err != nil {
			return 0, err
		}
		if !was {
			return Unchanged, nil
		}
		return Applied, nil
	case policy.CheckBan:
		if b.NFTQueue != nil {
			b.NFTQueue.flush()
		}
		el, ok, err := b.NFT.Check(chain, op.Source)
		// A check asks for this ban, not for a wider one that covers it,
		// nor for one with another target, as "iptables -C" does.
		if err == nil && ok && el.Prefix == op.Source {
			var other bool
			if other, err = otherTarget(b, op); other {
				ok = false
			}
		}
		return checkOutcome(ok && el.Prefix == op.Source, err)
	}
	return 0, fmt.Errorf("operation %v is not supported by the nftables backend", op.Kind)
}

// nftPart reads whether the family's part of the chain exists, once per
// stream batch for a part that is there (SetsInUse): the batch holds the
// lock, and its own flush or delete of the chain forgets it.
func nftPart(b Backend, chain policy.Chain, fam policy.Family) (bool, error) {
	key := string(chain) + " " + fam.String()
	if b.SetsInUse[key] {
		return true, nil
	}
	ok, err := b.NFT.Part(chain, fam)
	if ok && err == nil && b.SetsInUse != nil {
		b.SetsInUse[key] = true
	}
	return ok, err
}

// oneTarget refuses a ban whose target differs from the one the chain's
// bans of the family already have: a chain part has one verdict rule (all
// its bans are in one set), so the new target would change every ban's.
// fail2ban bans a jail's addresses with one blocktype; changing it means
// a restart, whose stop flushes the chain, after which any target goes.
func oneTarget(b Backend, op policy.Operation) error {
	chain, fam := op.Chain, op.Family
	key := string(chain) + " " + fam.String()
	cur, ok := b.NFTVerdicts[key]
	if !ok {
		var err error
		if cur, ok, err = b.NFT.Verdict(chain, fam); err != nil {
			return err
		}
	}
	if ok && cur != op.Target && b.Record != nil {
		n, err := b.Record.BanCount(fam, chain)
		if err != nil {
			return err
		}
		if n > 0 {
			return fmt.Errorf("the %s bans of chain %q have the target %s, and the nftables backend keeps one target per chain and family (%w); to change it, restart the jail (its stop flushes the chain), or use backend \"ipset\"", fam, chain, cur, ErrLimit)
		}
	}
	if b.NFTVerdicts != nil {
		b.NFTVerdicts[key] = op.Target
	}
	return nil
}

// otherTarget reports whether the chain part's verdict has another
// target than op's (and so none of its bans is op's ban).
func otherTarget(b Backend, op policy.Operation) (bool, error) {
	cur, ok := b.NFTVerdicts[string(op.Chain)+" "+op.Family.String()]
	if !ok {
		var err error
		if cur, ok, err = b.NFT.Verdict(op.Chain, op.Family); err != nil {
			return false, err
		}
	}
	return ok && cur != op.Target, nil
}

func noChain(chain policy.Chain, fam policy.Family) error {
	return fmt.Errorf("chain %q does not exist in the %s part of the nftables table; fail2ban creates it (-N) when the jail starts", chain, fam)
}

// addBanNFT bans without reading the set: the record says whether the
// ban is there and how many the chain holds. The element is added either
// way, which refreshes its timeout on a re-ban.
func addBanNFT(b Backend, op policy.Operation) (Outcome, error) {
	chain, fam := op.Chain, op.Family
	had := false
	if b.Record != nil {
		var err error
		if had, err = b.Record.HasBan(op); err != nil {
			return 0, err
		}
		if !had {
			n, err := b.Record.BanCount(fam, chain)
			if err != nil {
				return 0, err
			}
			if n >= b.Policy.MaxBansPerChain {
				return 0, banLimit(string(chain), n)
			}
		}
	}
	// The chain must be there, as "iptables -I" needs it: a set that is
	// missing would fail the stream's whole transaction.
	if ok, err := nftPart(b, chain, fam); err != nil || !ok {
		if err == nil {
			err = noChain(chain, fam)
		}
		return 0, err
	}
	if !had {
		if err := oneTarget(b, op); err != nil {
			return 0, err
		}
	}
	if b.NFTQueue != nil && b.NFTQueue.Queue {
		b.NFTQueue.add(b, op, b.Record != nil && !had)
	} else {
		ban := banOf(b.Policy, op)
		err := nftDo(b, func(x *nftables.Batch) {
			x.SetVerdict(chain, fam, op.Target)
			if b.Record != nil && !had {
				// A new ban needs no refresh, and a transaction without
				// a delete spares the process a wait for the kernel at
				// exit (AddNewBans): 9 to 10 ms of a one-shot ban.
				x.AddNewBans(chain, []nftables.Ban{ban})
			} else {
				x.AddBans(chain, []nftables.Ban{ban})
			}
		})
		if err != nil {
			return 0, err
		}
	}
	if had {
		return Unchanged, nil
	}
	return Applied, nil
}

// applyNFTHook adds, removes or checks a hook by what it does: a hook
// with the same protocol and ports into the same chain is that hook.
func applyNFTHook(b Backend, op policy.Operation) (Outcome, error) {
	if b.NFTQueue != nil {
		b.NFTQueue.flush()
	}
	chain, fam := op.Jump, op.Family
	ok, err := b.NFT.Part(chain, fam)
	if err != nil {
		return 0, err
	}
	if !ok {
		switch op.Kind {
		case policy.CheckHook, policy.CheckHookListed:
			return CheckFalse, nil
		case policy.DeleteHook:
			return Unchanged, nil
		}
		return 0, noChain(chain, fam)
	}
	live, err := b.NFT.Hooks()
	if err != nil {
		return 0, err
	}
	var into []nftables.Hook
	for _, h := range live {
		if h.Chain == chain && h.Family == fam {
			into = append(into, h)
		}
	}
	if op.Kind == policy.CheckHookListed {
		// "iptables -n -L INPUT | grep -q 'CHAIN[ \t]'": any jump to it.
		return checkOutcome(len(into) > 0, nil)
	}
	want, err := NFTHook(op, b.LookupPort)
	if err != nil {
		return 0, err
	}
	same := slices.ContainsFunc(into, func(h nftables.Hook) bool { return nftables.SameHook(h, want) })
	switch op.Kind {
	case policy.CheckHook:
		return checkOutcome(same, nil)
	case policy.DeleteHook:
		if !same {
			return Unchanged, nil
		}
		return Applied, nftDo(b, func(x *nftables.Batch) { x.DeleteHook(want) })
	}
	if same {
		return Unchanged, nil
	}
	if len(into) >= b.Policy.MaxHooksPerChain {
		return 0, fmt.Errorf("hook %w: %d rules already jump to %s chain %q (max_hooks_per_chain); remove one, or raise the limit in the policy", ErrLimit, len(into), fam, chain)
	}
	return Applied, nftDo(b, func(x *nftables.Batch) { x.EnsureHook(want) })
}
