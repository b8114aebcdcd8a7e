package nftables

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"syscall"
	"time"

	"github.com/google/nftables"

	"github.com/f2b-shim/f2b-shim/policy"
)

// maxElementsPerMessage bounds the elements of one netlink message. The
// library puts all elements of a call into one attribute, whose length is
// 16 bits and wraps silently; at most 40 bytes per element (an IPv6 start
// with its timeout) times 1000 stays well under 64 KiB. CrowdSec's bouncer
// sends 200; larger messages mean fewer acknowledgements. A test checks
// 100,000 IPv6 bans.
const maxElementsPerMessage = 1000

// maxBansPerTransaction bounds one batch: 150,000 IPv6 prefixes, each
// added, deleted and added again as two elements (76 bytes a pair), stay
// within maxTransactionBytes (a transaction is one sendmsg, and the
// kernel copies it whole). A stream's batch is far smaller; restore
// splits larger ones.
const maxBansPerTransaction = 150_000

// Ban is one prefix of a ban chain. A Timeout other than 0 makes the
// kernel lift the ban after it (max_ban_time), whether or not any f2b-shim
// process ever runs again.
type Ban struct {
	Prefix  netip.Prefix
	Timeout time.Duration
}

// Batch queues changes to the table, all applied by Commit as one netlink
// transaction: the kernel applies every change or none. Reads happen when
// a change is queued, so a caller holds the shim's lock from the first
// call to Commit.
type Batch struct {
	t     *Table
	steps []step
	// rules is set once a rule is inserted or deleted: a replay after
	// ENOBUFS could then add a rule twice, so such a batch is not replayed.
	rules  bool
	bans   int
	setIDs uint32
	err    error
	// tableEnsured is set once the table and its base chain are ensured.
	tableEnsured bool
	// Reads see the kernel, not the batch: what the batch itself queued
	// is remembered, so that ensuring a hook twice adds it once, and the
	// last verdict set for a chain's family is the one it gets.
	hooks    []Hook
	unhooked []Hook
	deleted  map[uint64]bool // handles of rules the batch deletes
	verdicts map[setKey]*verdictStep
	// Adjustments lists the bans that Commit changed to fit the sets'
	// no-overlap rule, after it commits; see Adjustment.
	Adjustments []Adjustment
}

// NewBatch starts an empty batch.
func (t *Table) NewBatch() *Batch { return &Batch{t: t} }

// Do runs fill on a new batch and commits it.
func (t *Table) Do(fill func(b *Batch)) error {
	b := t.NewBatch()
	fill(b)
	return b.Commit()
}

// step is one queued change: a library call, or a change of bans, which
// Commit turns into library calls (see bans.go).
type step struct {
	op   func(c *nftables.Conn) error
	bans *banStep
	// empties lists the families whose sets the op leaves empty (a flush
	// or a delete of the chain's family part).
	empties []setKey
}

func (b *Batch) queue(op func(c *nftables.Conn) error) { b.steps = append(b.steps, step{op: op}) }

// withID gives a set the batch's next set ID. The kernel uses the ID to
// find a set made earlier in the same transaction; the library would
// take one from its unsynchronised package counter (allocSetID) when
// the ID is 0, so the batch numbers its sets itself: the same batch sends
// the same bytes, in any process and on a replay.
func (b *Batch) withID(s *nftables.Set) *nftables.Set {
	b.setIDs++
	s.ID = b.setIDs
	return s
}

// verdictStep is a queued SetVerdict: its step, and the kernel's rules it
// deletes, which a later SetVerdict, FlushChain or DeleteChain of the
// same chain and family in the batch must still delete.
type verdictStep struct {
	index int
	stale []*nftables.Rule
}

// unsetVerdict turns a queued SetVerdict into the deletion of the rules
// it replaced: a flush or delete later in the batch removes the verdict.
func (b *Batch) unsetVerdict(key setKey) {
	v, ok := b.verdicts[key]
	if !ok {
		return
	}
	stale := v.stale
	b.steps[v.index].op = func(c *nftables.Conn) error {
		var errs []error
		for _, r := range stale {
			errs = append(errs, c.DelRule(r))
		}
		return errors.Join(errs...)
	}
	delete(b.verdicts, key)
}

// forget filters out the rules that the batch already deletes, and
// marks the rest as deleted: two calls that read the same rule (a flush
// and a delete of one chain) delete it once.
func (b *Batch) forget(rules []*nftables.Rule) []*nftables.Rule {
	if b.deleted == nil {
		b.deleted = map[uint64]bool{}
	}
	var out []*nftables.Rule
	for _, r := range rules {
		if !b.deleted[r.Handle] {
			b.deleted[r.Handle] = true
			out = append(out, r)
		}
	}
	return out
}

func (b *Batch) fail(err error) {
	if b.err == nil {
		b.err = err
	}
}

// Err is the first error a queued change met; Commit returns it too.
func (b *Batch) Err() error { return b.err }

// ensureTable queues the table and its base chain, where they are
// missing. What exists is not sent again: an add of an existing table
// sets its flags (the library sends none, so a dormant table wakes up),
// and an add of an existing base chain sets its policy, so that a chain
// "input" on the same hook and priority with policy drop, in a table
// that is someone else's, would accept every packet its rules do not
// drop. Such a chain is refused: the table is not the shim's.
func (b *Batch) ensureTable() {
	if b.tableEnsured {
		return
	}
	b.tableEnsured = true
	t := b.t
	chains, err := t.chains()
	if err != nil {
		b.fail(err)
		return
	}
	for _, c := range chains {
		if c.Name != BaseChain {
			continue
		}
		if !isBaseChain(c) || c.Policy == nil || *c.Policy != nftables.ChainPolicyAccept {
			b.fail(fmt.Errorf("f2b-shim: chain %q of the nftables table inet %q is not the shim's (a filter chain on the input hook at priority filter - 1, policy accept), so the table is not the shim's own\nf2b-shim: hint: set nftables_table to a name of the shim's own; the shim does not change another's chain", BaseChain, t.table.Name))
		}
		return
	}
	exists := len(chains) > 0
	if !exists {
		if exists, err = t.tableExists(); err != nil {
			b.fail(err)
			return
		}
	}
	b.queue(func(c *nftables.Conn) error {
		if !exists {
			c.AddTable(t.table)
		}
		c.AddChain(t.base)
		return nil
	})
}

func (t *Table) chain(name policy.Chain) *nftables.Chain {
	return &nftables.Chain{Name: string(name), Table: t.table}
}

func (t *Table) set(chain policy.Chain, fam policy.Family) *nftables.Set {
	key := nftables.TypeIPAddr
	if fam == policy.IPv6 {
		key = nftables.TypeIP6Addr
	}
	return &nftables.Set{Table: t.table, Name: SetName(chain, fam), KeyType: key, Interval: true, HasTimeout: true}
}

// addrSet is the family's hash set of single addresses (WithAddressSets).
func (t *Table) addrSet(chain policy.Chain, fam policy.Family) *nftables.Set {
	s := t.set(chain, fam)
	s.Name, s.Interval = AddrSetName(chain, fam), false
	return s
}

// sets lists the family's sets of a chain in this table's layout.
func (t *Table) sets(chain policy.Chain, fam policy.Family) []*nftables.Set {
	if t.addrSets {
		return []*nftables.Set{t.set(chain, fam), t.addrSet(chain, fam)}
	}
	return []*nftables.Set{t.set(chain, fam)}
}

// EnsureChain makes the ban chain and the family's set, if they are
// missing: what "iptables -N CHAIN" (or ip6tables) asks for. The nft
// chain is shared by both families; each family has its own set, verdict
// rule and hooks, so that one family's requests never change the other's,
// as with iptables and ip6tables.
//
// A packet that no rule of the chain matches returns to the base chain,
// which is what fail2ban's "-A CHAIN -j RETURN" says; that rule is
// implicit here, and the chain keeps its meaning by construction.
func (b *Batch) EnsureChain(chain policy.Chain, fam policy.Family) {
	if err := errors.Join(checkChain(chain), checkFamily(fam)); err != nil {
		b.fail(err)
		return
	}
	b.ensureTable()
	t := b.t
	b.queue(func(c *nftables.Conn) error {
		c.AddChain(t.chain(chain))
		for _, s := range t.sets(chain, fam) {
			if err := c.AddSet(b.withID(s), nil); err != nil {
				return err
			}
		}
		return nil
	})
}

// SetVerdict makes the family's rule of the ban chain say target: "ip
// saddr @CHAIN-v4 reject with icmp type port-unreachable", or drop. The
// chain must exist, or be ensured earlier in the batch. A rule with
// another target is replaced in the same transaction.
func (b *Batch) SetVerdict(chain policy.Chain, fam policy.Family, target policy.Target) {
	if err := errors.Join(checkChain(chain), checkTarget(fam, target)); err != nil {
		b.fail(err)
		return
	}
	rules, err := b.t.rules(chain)
	if err != nil {
		b.fail(err)
		return
	}
	key := setKey{chain, fam}
	want := map[string]bool{} // the layout's sets, each with one rule saying target
	for _, s := range b.t.sets(chain, fam) {
		want[s.Name] = true
	}
	var live []*nftables.Rule
	matches := 0
	for _, r := range rules {
		f, set, tg, ok := decodeVerdict(chain, r.Exprs)
		if !ok || f != fam || b.deleted[r.Handle] {
			continue
		}
		live = append(live, r)
		if tg == target && want[set] {
			matches++
			delete(want, set)
		}
	}
	if _, queued := b.verdicts[key]; !queued && len(want) == 0 && matches == len(live) {
		return
	}
	b.rules = true
	t := b.t
	stale := b.forget(live)
	if v, ok := b.verdicts[key]; ok {
		stale = append(v.stale, stale...)
	}
	op := func(c *nftables.Conn) error {
		var errs []error
		for _, r := range stale {
			errs = append(errs, c.DelRule(r))
		}
		for _, s := range t.sets(chain, fam) {
			c.AddRule(&nftables.Rule{Table: t.table, Chain: t.chain(chain), Exprs: verdictExprs(s.Name, fam, target)})
		}
		return errors.Join(errs...)
	}
	if v, ok := b.verdicts[key]; ok {
		b.steps[v.index].op = op
		v.stale = stale
		return
	}
	if b.verdicts == nil {
		b.verdicts = map[setKey]*verdictStep{}
	}
	b.verdicts[key] = &verdictStep{index: len(b.steps), stale: stale}
	b.queue(op)
}

// EnsureHook adds the hook's rule to the base chain unless a rule with the
// same effect is there: "meta l4proto tcp th dport { 25, 465 } jump
// CHAIN". The ban chain must exist, or be ensured earlier in the batch.
func (b *Batch) EnsureHook(h Hook) {
	if err := h.check(); err != nil {
		b.fail(err)
		return
	}
	hooks, err := b.t.hooks()
	if err != nil {
		b.fail(err)
		return
	}
	for _, live := range hooks {
		if live.ok && sameHook(live.hook, h) {
			return
		}
	}
	for _, queued := range b.hooks {
		if sameHook(queued, h) {
			return
		}
	}
	b.hooks = append(b.hooks, h)
	b.ensureTable()
	b.rules = true
	t := b.t
	b.queue(func(c *nftables.Conn) error {
		set, elems := hookSet(t.table, h)
		if set != nil {
			// The kernel names an anonymous set from the pattern.
			set.Name = "__set%d"
			if err := c.AddSet(b.withID(set), elems); err != nil {
				return err
			}
		}
		c.InsertRule(&nftables.Rule{Table: t.table, Chain: t.base, Exprs: hookExprs(h, set)})
		return nil
	})
}

// DeleteHook removes every base chain rule with the hook's effect; none
// is no error, as with fail2ban's own "-D" at actionstop.
func (b *Batch) DeleteHook(h Hook) {
	if err := h.check(); err != nil {
		b.fail(err)
		return
	}
	hooks, err := b.t.hooks()
	if err != nil {
		b.fail(err)
		return
	}
	for _, live := range hooks {
		if !live.ok || !sameHook(live.hook, h) || len(b.forget([]*nftables.Rule{live.rule})) == 0 {
			continue
		}
		b.rules = true
		r := live.rule
		b.queue(func(c *nftables.Conn) error { return c.DelRule(r) })
	}
	b.unhooked = append(b.unhooked, h)
	b.hooks = slices.DeleteFunc(b.hooks, func(q Hook) bool { return sameHook(q, h) })
}

func sameHook(a, b Hook) bool {
	if a.Family != b.Family || a.Chain != b.Chain || a.Proto != b.Proto || (a.Ports == nil) != (b.Ports == nil) || len(a.Ports) != len(b.Ports) {
		return false
	}
	for i := range a.Ports {
		if a.Ports[i] != b.Ports[i] {
			return false
		}
	}
	return true
}

// FlushChain empties the family's part of the ban chain, as "iptables -F":
// its bans and its verdict rule go; the chain and the set stay. A chain
// or set that is not there is no error.
func (b *Batch) FlushChain(chain policy.Chain, fam policy.Family) {
	if err := errors.Join(checkChain(chain), checkFamily(fam)); err != nil {
		b.fail(err)
		return
	}
	verdicts, sets, err := b.t.familyPart(chain, fam)
	if err != nil {
		b.fail(err)
		return
	}
	t := b.t
	b.rules = true
	verdicts = b.forget(verdicts)
	b.queue(func(c *nftables.Conn) error {
		var errs []error
		for _, r := range verdicts {
			errs = append(errs, c.DelRule(r))
		}
		for _, s := range sets {
			c.FlushSet(&nftables.Set{Table: t.table, Name: s})
		}
		return errors.Join(errs...)
	})
	b.steps[len(b.steps)-1].empties = []setKey{{chain, fam}}
	b.unsetVerdict(setKey{chain, fam})
}

// DeleteChain removes the family's part of the ban chain, as "iptables
// -X": its verdict rule and its set, and the nft chain itself once no
// family has a set in it. Like iptables, it refuses while a hook of the
// family still jumps to the chain. A chain that is not there is no error.
func (b *Batch) DeleteChain(chain policy.Chain, fam policy.Family) {
	if err := errors.Join(checkChain(chain), checkFamily(fam)); err != nil {
		b.fail(err)
		return
	}
	hooks, err := b.t.hooks()
	if err != nil {
		b.fail(err)
		return
	}
	for _, h := range hooks {
		gone := slices.ContainsFunc(b.unhooked, func(u Hook) bool { return sameHook(u, h.hook) })
		if h.ok && h.hook.Chain == chain && h.hook.Family == fam && !gone {
			b.fail(fmt.Errorf("f2b-shim: chain %q still has an %s hook (%s); delete the hook first, as fail2ban does at actionstop", chain, fam, h.hook))
			return
		}
	}
	verdicts, sets, err := b.t.familyPart(chain, fam)
	if err != nil {
		b.fail(err)
		return
	}
	other := policy.IPv6
	if fam == policy.IPv6 {
		other = policy.IPv4
	}
	_, otherSets, err := b.t.familyPart(chain, other)
	if err != nil {
		b.fail(err)
		return
	}
	exists, err := b.t.chainExists(chain)
	if err != nil {
		b.fail(err)
		return
	}
	t := b.t
	b.rules = true
	verdicts = b.forget(verdicts)
	b.queue(func(c *nftables.Conn) error {
		var errs []error
		for _, r := range verdicts {
			errs = append(errs, c.DelRule(r))
		}
		for _, s := range sets {
			c.DelSet(&nftables.Set{Table: t.table, Name: s})
		}
		if exists && len(otherSets) == 0 {
			// Rules of the chain that are not ours would keep it in
			// use; the chain is the shim's, so they go with it.
			c.FlushChain(t.chain(chain))
			c.DelChain(t.chain(chain))
		}
		return errors.Join(errs...)
	})
	b.steps[len(b.steps)-1].empties = []setKey{{chain, fam}}
	b.unsetVerdict(setKey{chain, fam})
}

// familyPart reads the family's verdict rules of a chain and which of
// its sets (of either layout) exist.
func (t *Table) familyPart(chain policy.Chain, fam policy.Family) (verdicts []*nftables.Rule, sets []string, err error) {
	rules, err := t.rules(chain)
	if err != nil {
		return nil, nil, err
	}
	for _, r := range rules {
		if f, _, _, ok := decodeVerdict(chain, r.Exprs); ok && f == fam {
			verdicts = append(verdicts, r)
		}
	}
	sets, err = t.familySets(chain, fam)
	if err != nil {
		return nil, nil, err
	}
	return verdicts, sets, nil
}

// familySets lists the family's sets of the chain that the table holds,
// reading no rule and no element.
func (t *Table) familySets(chain policy.Chain, fam policy.Family) (sets []string, err error) {
	exists, err := t.tableExists()
	if err != nil || !exists {
		return nil, err
	}
	libraryMu.Lock()
	defer libraryMu.Unlock()
	all, err := t.conn.GetSets(t.table)
	if err != nil {
		return nil, t.readErr("the sets", err)
	}
	for _, s := range all {
		if slices.Contains(setNames(chain, fam), s.Name) {
			sets = append(sets, s.Name)
		}
	}
	return sets, nil
}

func checkFamily(fam policy.Family) error {
	if fam != policy.IPv4 && fam != policy.IPv6 {
		return fmt.Errorf("f2b-shim: family %d is neither IPv4 nor IPv6", fam)
	}
	return nil
}

// DeleteTable removes the whole table, the shim's every hook, chain and
// ban with it (prune, uninstall). A missing table is no error.
func (b *Batch) DeleteTable() {
	t := b.t
	b.rules = true
	b.queue(func(c *nftables.Conn) error {
		c.AddTable(t.table)
		c.DelTable(t.table)
		return nil
	})
}

// Commit sends the batch as one transaction. On an error nothing of it was
// applied, except where the error says its outcome is unknown.
//
// Interval sets hold no overlapping elements, and the kernel refuses the
// whole transaction (EEXIST) when a ban overlaps another ban of its chain
// without being the same prefix. Commit then reads the sets the batch
// changes, adjusts its bans (see Adjustments) and sends it once more.
func (b *Batch) Commit() error {
	if b.err != nil {
		return b.err
	}
	if len(b.steps) == 0 {
		return nil
	}
	err := b.t.flush(b.replay(nil), !b.rules)
	if errors.Is(err, syscall.EEXIST) && b.hasBans() {
		live, rerr := b.t.liveBans(b.banSets())
		if rerr != nil {
			return errors.Join(explain(err), rerr)
		}
		err = b.t.flush(b.replay(live), !b.rules)
	}
	if err != nil {
		return explain(err)
	}
	return nil
}

// replay is the batch as library calls; live, when set, holds the sets'
// elements, against which the bans are adjusted.
//
// Each prefix of a set is changed once per transaction, by the batch's
// last call that names it: the kernel's rbtree cannot delete an element
// that the same transaction deleted and added before (ENOENT), so a ban
// and an unban of one address in one stream batch, sent as they come,
// would fail the whole batch. After a flush or delete of the family's
// part, its sets are known to be empty: bans are plain adds, and unbans
// nothing.
func (b *Batch) replay(live map[setKey][]netip.Prefix) func(c *nftables.Conn) error {
	b.Adjustments = nil
	type touch struct {
		set    setKind
		chain  policy.Chain
		prefix netip.Prefix
	}
	last := map[touch]int{}
	for i, s := range b.steps {
		if s.bans != nil {
			for _, ban := range s.bans.bans {
				last[touch{setKind{s.bans.fam, s.bans.addr}, s.bans.chain, ban.Prefix}] = i
			}
		}
	}
	empty := map[setKey]bool{}
	var ops []func(c *nftables.Conn) error
	for i, s := range b.steps {
		for _, k := range s.empties {
			empty[k] = true
			if live != nil {
				live[k] = nil
			}
		}
		if s.op != nil {
			ops = append(ops, s.op)
			continue
		}
		step := *s.bans
		step.bans = nil
		for _, ban := range s.bans.bans {
			if last[touch{setKind{step.fam, step.addr}, step.chain, ban.Prefix}] == i {
				step.bans = append(step.bans, ban)
			}
		}
		ops = append(ops, b.banOps(&step, live, empty[setKey{step.chain, step.fam}])...)
	}
	return func(c *nftables.Conn) error {
		b.setIDs = 0
		var errs []error
		for _, op := range ops {
			errs = append(errs, op(c))
		}
		return errors.Join(errs...)
	}
}

// explain turns the kernel's answer into what happened and what to do.
func explain(err error) error {
	// A failed transaction reports an error for the message that failed
	// and often others for those after it (ENOENT for what it would have
	// made): the most telling errno wins.
	var hint string
	errno := syscall.Errno(0)
	for _, n := range []syscall.Errno{syscall.EPERM, syscall.ENOBUFS, syscall.EMSGSIZE, syscall.EEXIST, syscall.ENOTEMPTY, syscall.EBUSY, syscall.EOPNOTSUPP, syscall.EAFNOSUPPORT, syscall.ENOENT} {
		if errors.Is(err, n) {
			errno = n
			break
		}
	}
	switch errno {
	case syscall.EPERM:
		hint = "run as root or with CAP_NET_ADMIN"
	case syscall.ENOENT:
		hint = "a chain or set the batch uses is missing (flushed behind the shim's back?); ensure the chain in the batch, or reconcile"
	case syscall.EBUSY:
		hint = "a hook still jumps to the chain, or its set is in use; delete the hooks first, as fail2ban does at actionstop"
	case syscall.EEXIST, syscall.ENOTEMPTY:
		hint = "a ban overlaps another ban of the chain, and the table changed while the batch was fitted to it (send the batch again); or a set of the table was made by hand with other flags (read back lists it as foreign: delete it and let reconcile remake it)"
	case syscall.EMSGSIZE:
		hint = "the transaction is larger than the socket buffer; split the batch"
	case syscall.ENOBUFS:
		return fmt.Errorf("f2b-shim: nftables did not acknowledge the transaction (ENOBUFS), and it may or may not have been applied: %w\nf2b-shim: hint: read the table back (reconcile) before retrying", err)
	case syscall.EOPNOTSUPP, syscall.EAFNOSUPPORT:
		hint = "the table's base chain was changed (another hook, type or priority), which the kernel cannot change back, or the table is not the shim's own: if \"nft list table inet NAME\" shows nothing but the shim's chains (input and the ban chains), delete it and let reconcile remake it; if it holds chains of yours, set nftables_table to a name of the shim's own; or the kernel lacks an nf_tables feature the shim needs (inet tables, interval sets with timeouts, reject): use backend = \"ipset\" or \"rules\""
	default:
		hint = "see the kernel's answer above; nothing of the batch was applied"
	}
	return fmt.Errorf("f2b-shim: nftables refused the transaction: %w\nf2b-shim: hint: %s", err, hint)
}

// rules lists a chain's rules; none for a chain that does not exist.
func (t *Table) rules(chain policy.Chain) ([]*nftables.Rule, error) {
	exists, err := t.chainExists(chain)
	if err != nil || !exists {
		return nil, err
	}
	libraryMu.Lock()
	defer libraryMu.Unlock()
	rules, err := t.conn.GetRules(t.table, t.chain(chain))
	if err != nil {
		return nil, t.readErr(fmt.Sprintf("the rules of chain %q", chain), err)
	}
	return rules, nil
}

type liveHook struct {
	rule *nftables.Rule
	hook Hook
	ok   bool
}

// hooks reads the base chain's rules and decodes them.
func (t *Table) hooks() ([]liveHook, error) {
	exists, err := t.chainExists(BaseChain)
	if err != nil || !exists {
		return nil, err
	}
	libraryMu.Lock()
	defer libraryMu.Unlock()
	rules, err := t.conn.GetRules(t.table, t.base)
	if err != nil {
		return nil, t.readErr("the base chain's rules", err)
	}
	out := make([]liveHook, 0, len(rules))
	for _, r := range rules {
		h, ok, err := decodeHook(r.Exprs, t.portSet)
		if err != nil {
			return nil, err
		}
		out = append(out, liveHook{rule: r, hook: h, ok: ok})
	}
	return out, nil
}

// portSet reads an anonymous port set; the caller holds libraryMu.
//
// The shim writes an interval set; nft itself writes "dport { 143, 993 }"
// as a plain set of single ports, whose elements read as interval starts
// would each run to 65535. The set's flags say which it is.
func (t *Table) portSet(name string) ([]policy.PortRange, error) {
	set, err := t.conn.GetSetByName(t.table, name)
	if err != nil {
		return nil, t.readErr(fmt.Sprintf("port set %q", name), err)
	}
	elems, err := t.conn.GetSetElements(set)
	if err != nil {
		return nil, t.readErr(fmt.Sprintf("port set %q", name), err)
	}
	if !set.Interval {
		return singlePorts(elems)
	}
	return portRanges(elems)
}

// chainExists reads the table's chains: a dump, which answers for a
// missing table too, where a get would fail with an error whose errno
// the library (v0.3.0) does not keep.
func (t *Table) chainExists(chain policy.Chain) (bool, error) {
	chains, err := t.chains()
	if err != nil {
		return false, err
	}
	for _, c := range chains {
		if c.Name == string(chain) {
			return true, nil
		}
	}
	return false, nil
}

func (t *Table) chains() ([]*nftables.Chain, error) {
	libraryMu.Lock()
	defer libraryMu.Unlock()
	all, err := t.conn.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, t.readErr("the inet chains", err)
	}
	var out []*nftables.Chain
	for _, c := range all {
		if c.Table != nil && c.Table.Name == t.table.Name {
			out = append(out, c)
		}
	}
	return out, nil
}

func (t *Table) readErr(what string, err error) error {
	return fmt.Errorf("f2b-shim: cannot read %s of nftables table %q: %w\nf2b-shim: hint: the nftables backend needs CAP_NET_ADMIN and a kernel with nf_tables", what, t.table.Name, err)
}
