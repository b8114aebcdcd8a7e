package cli

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/audit"
	"github.com/f2b-shim/f2b-shim/internal/engine"
	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/lock"
	"github.com/f2b-shim/f2b-shim/internal/privilege"
	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
)

var families = []policy.Family{policy.IPv4, policy.IPv6}

// admin is what the state subcommands share: the policy, the lock, the
// state read through the policy.
type admin struct {
	pol      *policy.Policy
	ctx      policy.Context
	deadline time.Time
	deps     Deps
	stderr   io.Writer
	held     *engine.Held
	store    *state.Store // held.Store
}

// openAdmin loads the policy and takes the host-wide lock, so that no
// forced command changes the firewall or the state meanwhile.
func openAdmin(name string, args []string, stderr io.Writer, deps Deps, flags func(*flag.FlagSet)) (*admin, []string, int) {
	fs := newFlagSet(name)
	policyPath := fs.String("policy", "", "policy file (TOML)")
	if flags != nil {
		flags(fs)
	}
	if err := parseInterspersed(fs, args); err != nil {
		return nil, nil, usageError(stderr, err.Error())
	}
	pol, err := loadPolicy(*policyPath, deps)
	if err != nil {
		fmt.Fprintf(stderr, "f2b-shim: policy: %v\n", err)
		return nil, nil, ExitSetup
	}
	a, code := newAdmin(pol, stderr, deps)
	return a, fs.Args(), code
}

// newAdmin takes the policy's lock and opens its state.
func newAdmin(pol *policy.Policy, stderr io.Writer, deps Deps) (*admin, int) {
	a := &admin{pol: pol, deps: deps, stderr: stderr, deadline: deps.Now().Add(pol.LockTimeout)}
	var err error
	if a.ctx, err = deps.Context(netip.Addr{}); err != nil {
		fmt.Fprintf(stderr, "f2b-shim: %v\n", err)
		return nil, ExitSetup
	}
	if a.held, err = a.engine().Take(nil); err != nil {
		fmt.Fprintf(stderr, "f2b-shim: %v\n", err)
		var te *engine.TakeError
		switch {
		case errors.As(err, &te) && te.Step == engine.StepState:
			return nil, ExitSetup
		case !errors.Is(err, lock.ErrTimeout):
			fmt.Fprintf(stderr, "f2b-shim: hint: state_dir %s must be a directory this user can write\n", pol.StateDir)
			return nil, ExitSetup
		}
		return nil, ExitFirewall
	}
	a.store = a.held.Store
	if a.store.RenamedFrom != "" {
		fmt.Fprintf(stderr, "f2b-shim: policy %q was named %q before: its state moved to %s\n", pol.Name, a.store.RenamedFrom, state.Path(pol))
	}
	return a, ExitOK
}

func (a *admin) close() {
	if a.held != nil {
		a.held.Release()
	}
}

// journal reads the state (the name is older than the store, which
// replaced a journal file), reporting what it had to skip.
func (a *admin) journal() (*state.State, error) {
	return a.load()
}

// journalTo is journal for a command that compares the record with the
// firewall, or puts it back (reconcile, restore): first it finishes the
// record of changes that a shim started and never recorded (killed, or
// its state write failed), as the next request would, and says so on
// out and in the audit log, where the next request would have said it.
// From the bare record, an unban the firewall carried out looks missing,
// and would be put back, and a ban it made looks unexpected.
func (a *admin) journalTo(out io.Writer, command string) (*state.State, error) {
	if note := a.engine().FinishCutShort(a.store); note != "" {
		fmt.Fprintf(out, "policy %q: %s\n", a.pol.Name, note)
		rec := a.record(command, nil, "unchanged", ExitOK, nil)
		rec.State = audit.Text(note)
		a.audit(rec)
	}
	return a.load()
}

func (a *admin) load() (*state.State, error) {
	s, problems, err := a.store.Load(a.ctx)
	for _, p := range problems {
		fmt.Fprintf(a.stderr, "f2b-shim: warning: %s %s: skipped\n", state.Path(a.pol), p)
	}
	return s, err
}

// engine is the admin command's engine: its policy, context, deadline
// and side effects.
func (a *admin) engine() *engine.Engine {
	return &engine.Engine{Pol: a.pol, Ctx: a.ctx, Deadline: a.deadline, Ports: a.deps.Ports}
}

// backend opens a family's backend, with the record.
func (a *admin) backend(fam policy.Family) (engine.Backend, error) {
	return a.backendFor(fam, engine.NoBatch)
}

func (a *admin) backendFor(fam policy.Family, batch engine.BatchKind) (engine.Backend, error) {
	if err := a.deps.PrepareExec(); err != nil {
		return nil, err
	}
	return a.engine().Open(fam, a.store, batch)
}

// runRestore puts the state's chains, bans and hooks back, one
// iptables-restore per family: for one policy, or with --all for every
// policy file in a directory (at boot).
func runRestore(args []string, stdout, stderr io.Writer, deps Deps) int {
	// Every policy is restored even when one fails: a boot that loses one
	// tenant's bans must not lose the others'.
	var setsOnly bool
	flags := func(f *flag.FlagSet) {
		f.BoolVar(&setsOnly, "sets-only", false, "make only the set backend's ipsets, with their bans (before saved rules that name them load)")
	}
	return forPoliciesWith("restore", args, stderr, deps, flags, func(pol *policy.Policy) int {
		if setsOnly {
			return restoreSets(pol, stdout, stderr, deps)
		}
		return restoreOne(pol, stdout, stderr, deps)
	})
}

// restoreSets makes the ipsets a set-backend policy's state uses, with
// their bans, and touches no iptables rule: what netfilter-persistent's
// plugin runs before the iptables plugins load rules saved with
// "netfilter-persistent save", which refer to those sets and would fail
// to load without them (and with them the whole table the admin saved).
// A policy without a state file, or with the rule backend, has nothing to
// make; none is created, so that a run as root leaves no root-owned file
// in the shim user's state_dir.
func restoreSets(pol *policy.Policy, stdout, stderr io.Writer, deps Deps) int {
	if pol.Backend != "ipset" {
		return ExitOK
	}
	if _, err := os.Stat(state.Path(pol)); err != nil {
		fmt.Fprintf(stdout, "policy %q: no state (%s): no sets to make\n", pol.Name, state.Path(pol))
		return ExitOK
	}
	a, code := newAdmin(pol, stderr, deps)
	if a == nil {
		return code
	}
	defer a.close()
	s, err := a.journal()
	if err != nil {
		fmt.Fprintf(stderr, "f2b-shim: restore --sets-only: %v\n", err)
		return ExitSetup
	}
	var script strings.Builder
	for _, fam := range families {
		sets, _ := s.SetScripts(fam, pol, func(state.Hook) bool { return false })
		script.WriteString(sets)
	}
	if script.Len() == 0 {
		return ExitOK
	}
	if err := a.deps.PrepareExec(); err != nil {
		fmt.Fprintf(stderr, "f2b-shim: restore --sets-only: %v\n", err)
		return ExitSetup
	}
	text := script.String()
	if sets, err := a.deps.OpenSets(); err == nil {
		// A set that 10-ipset already made from a save, with another
		// maxelem, would fail the whole script.
		text = engine.WithoutExistingSets(text, sets)
	}
	if err := a.deps.RestoreSets(text); err != nil {
		fmt.Fprintf(stderr, "f2b-shim: restore --sets-only (policy %q): %s\n", pol.Name, oneLine.Replace(strings.TrimSpace(err.Error())))
		return ExitFirewall
	}
	fmt.Fprintf(stdout, "policy %q: made its sets in use, with their bans\n", pol.Name)
	return ExitOK
}

// restoreOne restores one policy's state.
func restoreOne(pol *policy.Policy, stdout, stderr io.Writer, deps Deps) int {
	a, code := newAdmin(pol, stderr, deps)
	if a == nil {
		return code
	}
	defer a.close()
	start := deps.Now()
	s, err := a.journalTo(stdout, "f2b-shim restore")
	if err != nil {
		fmt.Fprintf(stderr, "f2b-shim: restore: %v\n", err)
		return ExitSetup
	}
	// What max_ban_time has lifted while the proxy was down does not come
	// back: it leaves the state, audited as expired, before the restore.
	if n, _ := a.expireIn(s, false); n > 0 {
		fmt.Fprintf(stdout, "policy %q: %s expired while the proxy was down; not restored\n", pol.Name, plural(n, "ban"))
	}
	rec := audit.Record{Time: start.UTC(), Policy: a.pol.Name, UID: os.Getuid(), Decision: audit.Allow}
	rec.SetCommand("f2b-shim restore")
	var summary []string
	code = ExitOK
	for _, fam := range families {
		t := s.Tables[fam]
		if len(t.Chains) == 0 && len(t.Hooks) == 0 {
			continue
		}
		b, err := a.backend(fam)
		if err == nil {
			err = restoreFamily(a, s, fam, b)
		}
		if err != nil {
			fmt.Fprintf(stderr, "f2b-shim: restore %s (policy %q): %s\n", fam, pol.Name, oneLine.Replace(strings.TrimSpace(err.Error())))
			rec.Reason = audit.Text(err.Error())
			code = ExitFirewall
			if errors.Is(err, privilege.ErrMissing) {
				code = ExitSetup
			}
			continue
		}
		bans := 0
		for _, c := range t.Chains {
			bans += c.Len()
		}
		summary = append(summary, fmt.Sprintf("%s: %s, %s, %s", fam, plural(len(t.Chains), "chain"), plural(bans, "ban"), plural(len(t.Hooks), "hook")))
	}
	rec.Result, rec.Exit = "applied", code
	if code != ExitOK {
		rec.Result = "failed"
	}
	rec.DurationMS = float64(deps.Now().Sub(start).Microseconds()) / 1000
	// A restore at boot puts the bans back even when it cannot be
	// audited: losing bans is the worse failure. It says so.
	log, err := audit.Open(a.pol.AuditLog)
	if err == nil {
		err = log.Write(rec)
		log.Close()
	}
	if err != nil {
		fmt.Fprintf(stderr, "f2b-shim: warning: the restore was not audited: %v\n", err)
	}
	switch {
	case code != ExitOK:
		fmt.Fprintf(stdout, "policy %q: restore failed; see above\n", pol.Name)
	case len(summary) == 0:
		fmt.Fprintf(stdout, "policy %q: restored nothing: its state (%s) holds no chains\n", pol.Name, state.Path(pol))
	default:
		fmt.Fprintf(stdout, "policy %q: restored %s\n", pol.Name, strings.Join(summary, "; "))
	}
	return code
}

// restoreFamily puts back one family's record, and marks the record in
// sync with the firewall it has just rebuilt.
func restoreFamily(a *admin, s *state.State, fam policy.Family, b engine.Backend) error {
	if _, err := b.PutBack(s, nil); err != nil {
		return err
	}
	return a.store.MarkSynced(fam)
}

// listEntry is one object of "f2b-shim list --json": a chain, a hook, a
// ban or a return rule, with fields named for what they hold. Times are
// RFC 3339 with their zone.
type listEntry struct {
	Family string `json:"family"`
	Chain  string `json:"chain"`
	Type   string `json:"type"` // chain, hook, ban, return
	// A hook's parent chain, protocol and ports ("" for every port).
	Parent   string `json:"parent,omitempty"`
	Protocol string `json:"protocol,omitempty"`
	Ports    string `json:"ports,omitempty"`
	// A ban's address or prefix, its target, the address a widened ban
	// stands for, and the ipset it is in (set backend).
	Address string `json:"address,omitempty"`
	Target  string `json:"target,omitempty"`
	Set     string `json:"set,omitempty"`
	Since   string `json:"since,omitempty"`
	// Last is when a ban was last made (max_ban_time counts from it).
	Last string `json:"last,omitempty"`
}

func runList(args []string, stdout, stderr io.Writer, deps Deps) int {
	var asJSON bool
	a, rest, code := openAdmin("list", args, stderr, deps, func(f *flag.FlagSet) { f.BoolVar(&asJSON, "json", false, "print JSON") })
	if a == nil {
		return code
	}
	defer a.close()
	if len(rest) > 1 {
		return usageError(stderr, "list takes at most one CHAIN")
	}
	s, err := a.journal()
	if err != nil {
		fmt.Fprintf(stderr, "f2b-shim: list: %v\n", err)
		return ExitSetup
	}
	rfc := func(t time.Time) string {
		if t.IsZero() {
			return ""
		}
		return t.Local().Format(time.RFC3339)
	}
	var rows []listEntry
	var text strings.Builder
	w := tabwriter.NewWriter(&text, 0, 0, 2, ' ', 0)
	for _, fam := range families {
		t := s.Tables[fam]
		for _, name := range t.ChainNames() {
			if len(rest) == 1 && string(name) != rest[0] {
				continue
			}
			c := t.Chains[name]
			head := listEntry{Family: fam.String(), Chain: string(name)}
			row := head
			row.Type = "chain"
			rows = append(rows, row)
			bans := c.Bans()
			sets := map[string]bool{}
			for _, b := range bans {
				if a.pol.Backend == "ipset" {
					sets[firewall.SetName(fam, name, b.Op.Target)+" ("+shortTarget(b.Op.Target)+")"] = true
				}
			}
			fmt.Fprintf(w, "%s %s: %s%s%s\n", fam, name, plural(len(bans), "ban"), map[bool]string{true: ", return rule"}[c.Return], setNote(sets))
			for _, h := range t.Hooks {
				if h.Op.Jump != name {
					continue
				}
				row := head
				row.Type, row.Parent, row.Protocol, row.Ports, row.Since = "hook", string(h.Op.Chain), h.Op.Proto, portsOf(h.Op), rfc(h.Since)
				rows = append(rows, row)
				ports := row.Ports
				if ports == "" {
					ports = "every port"
				}
				fmt.Fprintf(w, "  hook\t%s %s %s\t\t%s\n", row.Parent, row.Protocol, cutTo(ports, 40), short(h.Since))
			}
			for i := len(bans) - 1; i >= 0; i-- {
				b := bans[i]
				row := head
				row.Type, row.Address, row.Target, row.Since, row.Last = "ban", b.Op.Source.String(), b.Op.Target.String(), rfc(b.Since), rfc(b.Last)
				if a.pol.Backend == "ipset" {
					row.Set = firewall.SetName(fam, name, b.Op.Target)
				}
				rows = append(rows, row)
				fmt.Fprintf(w, "  ban\t%s\t%s\t%s\n", row.Address, shortTarget(b.Op.Target), short(b.Since))
			}
			if c.Return {
				row := head
				row.Type = "return"
				rows = append(rows, row)
			}
		}
	}
	if asJSON {
		if rows == nil {
			rows = []listEntry{}
		}
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(rows)
		return ExitOK
	}
	w.Flush()
	if rows == nil {
		fmt.Fprintf(stdout, "the state (%s) holds no chains\n", state.Path(a.pol))
	}
	fmt.Fprint(stdout, text.String())
	fmt.Fprintln(stdout, liveNote(a, s))
	return ExitOK
}

// liveNote says, in one line, whether the live firewall holds what the
// state says.
func liveNote(a *admin, s *state.State) string {
	kinds := map[string]int{}
	for _, fam := range families {
		b, err := a.backend(fam)
		var ds []drift
		if err == nil {
			ds, err = compare(s, fam, b, a.pol, a.ctx, a.deps.Now())
		}
		if err != nil {
			return "live firewall: not read (" + oneLine.Replace(err.Error()) + ")"
		}
		for _, d := range ds {
			kinds[d.kind]++
		}
	}
	if len(kinds) == 0 {
		return "live firewall: as the state says"
	}
	return fmt.Sprintf("live firewall: DIFFERS: %d missing, %d unexpected, %d duplicate; see \"f2b-shim reconcile\"", kinds["missing"], kinds["unexpected"], kinds["duplicate"])
}

func setNote(sets map[string]bool) string {
	if len(sets) == 0 {
		return ""
	}
	names := make([]string, 0, len(sets))
	for n := range sets {
		names = append(names, n)
	}
	slices.Sort(names)
	return ", in set " + strings.Join(names, ", ")
}

func portsOf(op policy.Operation) string {
	ps := make([]string, len(op.Ports))
	for i, p := range op.Ports {
		ps[i] = p.String()
	}
	return strings.Join(ps, ",")
}

// short is a time for the table: to the second, in local time.
func short(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.Local().Format("2006-01-02 15:04:05")
}

// shortTarget keeps a ban's target in one short column.
func shortTarget(t policy.Target) string {
	if t.Kind == policy.Drop {
		return "DROP"
	}
	return "REJECT " + t.RejectWith
}

func cutTo(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n-1] + "…"
}

// drift is one difference between the state and the live firewall.
type drift struct {
	kind string // missing, unexpected, duplicate
	fam  policy.Family
	what string
	fix  *policy.Operation // for missing: what puts it back
}

// runReconcile compares the state with the live firewall, for one
// policy or with --all for every policy in a directory (what
// f2b-shim-reconcile.timer runs). Exit status 0: no drift (or all of it
// fixed); 1: drift; 4: the firewall could not be read or fixed.
func runReconcile(args []string, stdout, stderr io.Writer, deps Deps) int {
	var fix, quiet bool
	flags := func(f *flag.FlagSet) {
		f.BoolVar(&fix, "fix", false, "put back what is missing from the firewall")
		f.BoolVar(&quiet, "quiet", false, "print nothing when there is no drift (for the timer)")
	}
	return forPoliciesWith("reconcile", args, stderr, deps, flags, func(pol *policy.Policy) int {
		a, code := newAdmin(pol, stderr, deps)
		if a == nil {
			return code
		}
		defer a.close()
		return reconcileOne(a, fix, quiet, stdout, stderr)
	})
}

func reconcileOne(a *admin, fix, quiet bool, stdout, stderr io.Writer) int {
	want, err := a.journalTo(stdout, "f2b-shim reconcile")
	if err != nil {
		fmt.Fprintf(stderr, "f2b-shim: reconcile: %v\n", err)
		return ExitSetup
	}
	var drifts []drift
	backends := map[policy.Family]engine.Backend{}
	for _, fam := range families {
		b, err := a.backend(fam)
		if err != nil {
			fmt.Fprintf(stderr, "f2b-shim: reconcile %s: %v\n", fam, err)
			return ExitFirewall
		}
		backends[fam] = b
		d, err := compare(want, fam, b, a.pol, a.ctx, a.deps.Now())
		if err != nil {
			fmt.Fprintf(stderr, "f2b-shim: reconcile %s: %s\n", fam, oneLine.Replace(err.Error()))
			return ExitFirewall
		}
		drifts = append(drifts, d...)
	}
	if len(drifts) == 0 {
		if quiet {
			return ExitOK
		}
		fmt.Fprintf(stdout, "policy %q: no drift: the firewall holds exactly what the state says\n", a.pol.Name)
		return ExitOK
	}
	w := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	for _, d := range drifts {
		fmt.Fprintf(w, "%s\t%s\t%s\n", d.kind, d.fam, d.what)
	}
	w.Flush()
	if !fix {
		return ExitCheckFalse
	}
	// Each chain that lost anything gets what it lacks back from the
	// state with one iptables-restore, never half built (one ban at a
	// time would cost a process per ban); what it holds besides stays.
	fixed, left := 0, 0
	var rebuilt []engine.FamChain
	for _, d := range drifts {
		switch {
		case d.fix == nil:
			left++
		case !slices.Contains(rebuilt, engine.FamChain{Fam: d.fam, Chain: d.fix.BanChain()}):
			rebuilt = append(rebuilt, engine.FamChain{Fam: d.fam, Chain: d.fix.BanChain()})
			fallthrough
		default:
			fixed++
		}
	}
	var recs []audit.Record
	var notes []string
	for _, fc := range rebuilt {
		b := backends[fc.Fam]
		put, err := a.engine().Repair(a.store, b, fc.Fam, fc.Chain)
		create, _ := policy.Decide(a.pol, fc.Fam.Binary()+" -N "+string(fc.Chain), a.ctx)
		if err != nil {
			fmt.Fprintf(stderr, "f2b-shim: reconcile --fix: %s %s: %s\n", fc.Fam, fc.Chain, oneLine.Replace(err.Error()))
			recs = append(recs, a.record("f2b-shim reconcile --fix", &create, "failed", ExitFirewall, err))
			a.audit(recs...)
			return ExitFirewall
		}
		note := fmt.Sprintf("repaired: %s %s; put back %s", fc.Fam, fc.Chain, put)
		rec := a.record("f2b-shim reconcile --fix", &create, "applied", ExitOK, nil)
		rec.State = audit.Text(note)
		recs = append(recs, rec)
		notes = append(notes, note)
	}
	a.audit(recs...)
	if len(notes) > 0 {
		if err := a.store.NoteRepair(a.deps.Now(), strings.Join(notes, "; ")); err != nil {
			fmt.Fprintf(stderr, "f2b-shim: warning: the repair was not noted for status: %v\n", err)
		}
	}
	fmt.Fprintf(stdout, "fixed: re-applied %d missing rules or chains (%d chain(s) rebuilt from the state)\n", fixed, len(rebuilt))
	if left > 0 && len(rebuilt) > 0 {
		// A chain put back can clear drift that was not named as
		// missing: bans in an nftables set whose verdict rule had gone
		// read as foreign until the rule is back. What is left is what
		// the firewall holds now.
		var again []drift
		for _, fam := range families {
			d, err := compare(want, fam, backends[fam], a.pol, a.ctx, a.deps.Now())
			if err != nil {
				fmt.Fprintf(stderr, "f2b-shim: reconcile %s: %s\n", fam, oneLine.Replace(err.Error()))
				return ExitFirewall
			}
			again = append(again, d...)
		}
		drifts, left = again, 0
		for _, d := range drifts {
			if d.fix != nil {
				fmt.Fprintf(stdout, "still missing: %s %s\n", d.fam, d.what)
			}
			left++
		}
	}
	if left > 0 {
		fmt.Fprintf(stdout, "left: %d unexpected or duplicate rules, for you to check; what clears each:\n", left)
		nftTable := ""
		if a.pol.Backend == "nftables" {
			nftTable = a.pol.NftablesTable
		}
		printLeftAdvice(stdout, drifts, nftTable)
		return ExitCheckFalse
	}
	return ExitOK
}

// compare lists the drift of one family, missing things first in the
// order that fixes them (chains, bans, return rules, hooks).
func compare(want *state.State, fam policy.Family, b engine.Backend, pol *policy.Policy, ctx policy.Context, now time.Time) ([]drift, error) {
	live := state.New(ctx.LookupPort)
	got, err := b.Read(live, "")
	if err != nil {
		return nil, err
	}
	due := func(state.Ban) bool { return false }
	if pol.Backend == "nftables" && pol.MaxBanTime > 0 {
		// The kernel lifts a ban when its timeout is up; the record keeps
		// it until "f2b-shim expire" runs. Such a ban is not missing.
		cutoff := now.Add(-pol.MaxBanTime)
		due = func(b state.Ban) bool { return !b.Last.IsZero() && !b.Last.After(cutoff) }
	}
	var out []drift
	add := func(kind, what string, fix *policy.Operation) {
		out = append(out, drift{kind: kind, fam: fam, what: what, fix: fix})
	}
	wt, lt := want.Tables[fam], live.Tables[fam]
	mk := func(line string) *policy.Operation {
		op, err := policy.Decide(pol, line, ctx)
		if err != nil {
			return nil
		}
		return &op
	}
	for _, name := range wt.ChainNames() {
		if _, ok := lt.Chains[name]; !ok {
			add("missing", "chain "+string(name), mk(fam.Binary()+" -N "+string(name)))
		}
	}
	for _, name := range wt.ChainNames() {
		wc, lc := wt.Chains[name], lt.Chains[name]
		if lc == nil {
			lc = &state.Chain{}
		}
		liveBans := map[string]bool{}
		for _, b := range lc.Bans() {
			liveBans[strings.Join(b.Op.RuleSpec(), " ")] = true
		}
		for _, b := range wc.Bans() {
			if !liveBans[strings.Join(b.Op.RuleSpec(), " ")] && !due(b) {
				op := b.Op
				add("missing", fmt.Sprintf("ban %s in %s (%s)", op.Source, name, op.Target), &op)
			}
		}
		if wc.Return && !lc.Return {
			add("missing", "return rule of "+string(name), mk(fam.Binary()+" -A "+string(name)+" -j RETURN"))
		}
	}
	liveHooks := map[string]bool{}
	for _, h := range lt.Hooks {
		liveHooks[live.HookKey(h.Op)] = true
	}
	wantHooks := map[string]bool{}
	for _, h := range wt.Hooks {
		wantHooks[want.HookKey(h.Op)] = true
		if !liveHooks[want.HookKey(h.Op)] {
			op := h.Op
			add("missing", "hook "+string(op.Chain)+" "+strings.Join(op.RuleSpec(), " "), &op)
		}
	}
	for _, name := range lt.ChainNames() {
		wc, ok := wt.Chains[name]
		if !ok {
			add("unexpected", "chain "+string(name)+" (not in the state)", nil)
			continue
		}
		wantBans := map[string]bool{}
		for _, b := range wc.Bans() {
			wantBans[strings.Join(b.Op.RuleSpec(), " ")] = true
		}
		for _, b := range lt.Chains[name].Bans() {
			if !wantBans[strings.Join(b.Op.RuleSpec(), " ")] {
				add("unexpected", fmt.Sprintf("ban %s in %s (%s)", b.Op.Source, name, b.Op.Target), nil)
			}
		}
	}
	for _, h := range lt.Hooks {
		if !wantHooks[live.HookKey(h.Op)] {
			add("unexpected", "hook "+string(h.Op.Chain)+" "+strings.Join(h.Op.RuleSpec(), " "), nil)
		}
	}
	for _, f := range got.Foreign {
		add("unexpected", "rule "+f+" (not one the policy allows)", nil)
	}
	for _, d := range got.Duplicates {
		add("duplicate", d, nil)
	}
	return out, nil
}

// runAudit reviews the audit log and its rotations.
func runAudit(args []string, stdout, stderr io.Writer, deps Deps) int {
	fs := newFlagSet("audit")
	policyPath := fs.String("policy", "", "policy file (TOML)")
	since := fs.String("since", "", "only entries since (\"2h\", \"2026-11-25 14:00\")")
	until := fs.String("until", "", "only entries until")
	var f audit.Filter
	fs.StringVar(&f.Client, "client", "", "only this client (policy name or ssh client address)")
	fs.BoolVar(&f.Denied, "denied", false, "only denied requests")
	ip := fs.String("ip", "", "only operations on this address")
	fs.StringVar(&f.Chain, "chain", "", "only operations on this chain")
	summary := fs.Bool("summary", false, "print counts instead of entries")
	asJSON := fs.Bool("json", false, "print the matching lines as they are")
	verify := fs.Bool("verify", false, "check the hash chain through the log and its rotations")
	if err := parseInterspersed(fs, args); err != nil {
		return usageError(stderr, err.Error())
	}
	if fs.NArg() > 0 {
		return usageError(stderr, "audit takes no arguments besides its flags")
	}
	if *summary && *asJSON {
		return usageError(stderr, "choose --summary or --json, not both")
	}
	var err error
	now := deps.Now()
	for _, w := range []struct {
		in  string
		out *time.Time
	}{{*since, &f.Since}, {*until, &f.Until}} {
		if w.in != "" {
			if *w.out, err = audit.ParseWhen(w.in, now); err != nil {
				return usageError(stderr, err.Error())
			}
		}
	}
	if *ip != "" {
		if f.IP, err = netip.ParseAddr(*ip); err != nil {
			return usageError(stderr, fmt.Sprintf("--ip %q is not an IP address", *ip))
		}
		f.IP = f.IP.Unmap()
	}
	pol, err := loadPolicy(*policyPath, deps)
	if err != nil {
		fmt.Fprintf(stderr, "f2b-shim: policy: %v\n", err)
		return ExitSetup
	}
	if *verify {
		return verifyAudit(pol.AuditLog, stdout, stderr)
	}
	entries, bad, err := audit.Read(pol.AuditLog)
	if errors.Is(err, os.ErrNotExist) && !*asJSON {
		printNoAuditRecords(stdout, pol.AuditLog, false)
		return ExitOK
	}
	if err != nil {
		fmt.Fprintf(stderr, "f2b-shim: audit: %v\n", err)
		return ExitSetup
	}
	for _, b := range bad {
		fmt.Fprintf(stderr, "f2b-shim: warning: %s: skipped\n", b)
	}
	var match []audit.Entry
	for _, e := range entries {
		if f.Match(e) {
			match = append(match, e)
		}
	}
	switch {
	case *asJSON:
		for _, e := range match {
			stdout.Write(append(e.Raw, '\n'))
		}
	case len(match) == 0:
		// "audit --since 1d --denied" on a quiet day: one clear line,
		// not a table's header alone.
		printNoAuditRecords(stdout, pol.AuditLog, len(entries) > 0)
	case *summary:
		audit.WriteSummary(stdout, match)
	default:
		audit.WriteTable(stdout, match)
	}
	if !*asJSON {
		notePending(pol.AuditLog, f.Denied, stderr)
	}
	return ExitOK
}

// notePending says how many repeated requests the log has counted and
// not yet written: an admin who looks right after an attack would
// otherwise see too few. They go out on a "coalesced" line with the next
// request of a later second.
func notePending(path string, deniedOnly bool, stderr io.Writer) {
	pending, err := audit.Pending(path)
	if err != nil {
		return
	}
	for _, d := range []string{audit.Deny, audit.Allow} {
		if n := pending[d]; n > 0 && (d == audit.Deny || !deniedOnly) {
			fmt.Fprintf(stderr, "f2b-shim: note: %d more %s request(s) of the last second are counted and not yet written; the next request writes them on a \"coalesced\" line\n", n, d)
		}
	}
}

// verifyAudit checks the audit log's hash chain: exit 0 when it holds, 1
// with the first line that breaks it, 5 when the log cannot be read.
func verifyAudit(path string, stdout, stderr io.Writer) int {
	brk, checked, err := audit.Verify(path)
	if err != nil {
		fmt.Fprintf(stderr, "f2b-shim: audit --verify: %v\n", err)
		return ExitSetup
	}
	if brk != nil {
		fmt.Fprintf(stdout, "broken: %s\n", brk)
		fmt.Fprintf(stderr, "f2b-shim: the audit log's hash chain breaks at %s:%d; compare it with the copy in syslog, if any\n", brk.File, brk.Line)
		return ExitCheckFalse
	}
	fmt.Fprintf(stdout, "the chain holds: %d lines checked in %s and its rotations\n", checked, path)
	return ExitOK
}

// parseInterspersed parses flags that may stand before or after the
// positional arguments ("list CHAIN --json" as well as "list --json CHAIN").
func parseInterspersed(fs *flag.FlagSet, args []string) error {
	var rest []string
	for {
		if err := fs.Parse(args); err != nil {
			return err
		}
		if fs.NArg() == 0 {
			break
		}
		rest = append(rest, fs.Arg(0))
		args = fs.Args()[1:]
	}
	return fs.Parse(rest)
}
