package cli

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
)

// healsFirst reports whether a request of this kind first puts its chain
// back when the firewall lost it. A stop (unhook, flush, delete) does
// not: rebuilding what it is about to take away would only cost time.
func healsFirst(k policy.Kind) bool {
	switch k {
	case policy.DeleteHook, policy.FlushChain, policy.DeleteChain:
		return false
	}
	return true
}

// healOnContact checks, cheaply, that the live firewall still holds the
// chain the state records: its return rule ("-C", which also fails when
// the chain is gone) and each recorded hook, in one iptables-restore. A chain the record does not hold costs nothing. When something
// is missing (a firewall reload, a flush by hand), what the chain lacks
// is put back from the record before the request is carried out; and
// since a reload rarely takes one chain alone, every other recorded
// chain of the policy, in both families, is checked and put back too
// (those in checked, which a stream's batch has already seen, are
// skipped, and those checked here are added). The returned note says
// what was missing and what was put back, for the request's audit line;
// status shows the last one. Only the request's own chain failing to
// come back fails the request: another chain that cannot be put back
// (ip6tables broken, say) is named in the note, for the timer to retry.
//
// The check is what makes an "unchanged" answer true of the firewall and
// not only of the record: a chain flushed behind the shim's back loses
// its return rule too.
func healOnContact(store *state.Store, b firewall.Backend, pol *policy.Policy, ctx policy.Context, fam policy.Family, chain policy.Chain, deadline time.Time, deps Deps, checked map[famChain]bool, probe *policy.Operation) (string, error) {
	note, err := healChain(store, b, pol, ctx, fam, chain, deadline, deps, probe)
	if err != nil || note == "" {
		return note, err
	}
	notes := []string{note}
	for _, f := range families {
		names, err := store.ChainNames(f)
		if err != nil {
			return "", err
		}
		var other firewall.Backend
		opened := false
		for _, n := range names {
			fc := famChain{f, n}
			if fc == (famChain{fam, chain}) || checked[fc] {
				continue
			}
			if checked != nil {
				checked[fc] = true
			}
			if !opened {
				other, err = openBackend(pol, f, deadline, deps)
				if err != nil {
					// The request's own chain is back: another that
					// cannot be is said, and left to the timer.
					notes = append(notes, fmt.Sprintf("%s chains not checked: %v", f, err))
					break
				}
				other.LookupPort, opened = ctx.LookupPort, true
			}
			n, err := healChain(store, other, pol, ctx, f, n, deadline, deps, nil)
			if err != nil {
				n = "not repaired: " + err.Error()
			}
			if n != "" {
				notes = append(notes, n)
			}
		}
	}
	note = strings.Join(notes, "; ")
	if err := store.NoteRepair(deps.Now(), note); err != nil {
		note += "; not noted for status: " + err.Error()
	}
	return note, nil
}

// healChain checks one chain and puts back what it lacks.
func healChain(store *state.Store, b firewall.Backend, pol *policy.Policy, ctx policy.Context, fam policy.Family, chain policy.Chain, deadline time.Time, deps Deps, probe *policy.Operation) (string, error) {
	shape, err := store.ChainShape(fam, chain)
	if err != nil || !shape.Recorded {
		return "", err
	}
	missing, err := missingParts(b, pol, ctx, fam, chain, shape, deadline, deps, probe)
	if err != nil || len(missing) == 0 {
		return "", err
	}
	put, err := repairChain(store, b, pol, ctx, fam, chain, deadline, deps)
	if err != nil {
		return "", fmt.Errorf("%s %s lost its %s, and putting it back failed: %w", fam, chain, strings.Join(missing, ", "), err)
	}
	return fmt.Sprintf("repaired: %s %s had lost its %s; put back %s", fam, chain, strings.Join(missing, ", "), put), nil
}

// fullCheckMaxBans bounds the rule backend's chains whose return rule is
// checked on every request: iptables-nft reads the whole chain for any
// "-C" in it (and for a "-C" of a jump into it), so the check that costs
// 3.5 ms per request at 1,000 bans costs 26 ms at 10,000 (scripts/bench
// --only heal). Past it only the hooks are checked, in the parent chains'
// listings, which stay small; a flush of the ban chain alone then heals
// by the timer (f2b-shim-reconcile.timer, every minute). The set backend's
// chain holds one rule per target, so its check is always whole.
const fullCheckMaxBans = 1000

// missingHooks checks only the hooks, from "iptables -S PARENT" of each
// parent they are in: a hook in place also means its chain exists.
func missingHooks(b firewall.Backend, pol *policy.Policy, ctx policy.Context, fam policy.Family, chain policy.Chain, hooks []policy.Operation) ([]string, error) {
	parents := *pol
	parents.ParentChains = nil
	for _, h := range hooks {
		if !slices.Contains(parents.ParentChains, string(h.Chain)) {
			parents.ParentChains = append(parents.ParentChains, string(h.Chain))
		}
	}
	pb := b
	pb.Policy = &parents
	live := state.New(ctx.LookupPort)
	if _, err := state.HooksFromLive(live, fam, pb, ctx, chain); err != nil {
		return nil, err
	}
	have := map[string]bool{}
	for _, h := range live.Tables[fam].Hooks {
		have[live.HookKey(h.Op)] = true
	}
	var missing []string
	for _, h := range hooks {
		if !have[live.HookKey(h)] {
			if gone, err := parentGone(b, h); err != nil || gone {
				if err != nil {
					return nil, err
				}
				continue
			}
			missing = append(missing, "hook from "+string(h.Chain))
		}
	}
	return missing, nil
}

// missingParts names what the live firewall lacks of the chain's shape.
// The ordinary answer, nothing, costs one iptables-restore of "-C" lines
// (the return rule and every hook), which changes nothing and fails when
// one of them is not there; only then is each asked for on its own, to
// name what is missing.
//
// probe, when not nil, is a recorded ban the request names (rule
// backend): it is checked in the same iptables-restore. A restore of a
// file saved after the jail started leaves the chain, its return rule
// and its hooks, and not the later bans; without the probe a re-ban
// would answer "unchanged" from the record while the firewall lacks it.
func missingParts(b firewall.Backend, pol *policy.Policy, ctx policy.Context, fam policy.Family, chain policy.Chain, shape state.Shape, deadline time.Time, deps Deps, probe *policy.Operation) ([]string, error) {
	var hooks []policy.Operation
	for _, line := range shape.Hooks {
		if h, err := policy.Decide(pol, line, ctx); err == nil {
			hooks = append(hooks, h) // a record the policy refuses is never put back
		}
	}
	if b.NFT != nil {
		return missingNFT(b, ctx, fam, chain, hooks)
	}
	if b.Sets == nil && shape.Bans > fullCheckMaxBans && len(hooks) > 0 {
		return missingHooks(b, pol, ctx, fam, chain, hooks)
	}
	if shape.Return && deps.Restore != nil {
		script := fmt.Sprintf("*filter\n-C %s -j RETURN\n", chain)
		for _, h := range hooks {
			script += fmt.Sprintf("-C %s %s\n", h.Chain, strings.Join(h.RuleSpec(), " "))
		}
		if probe != nil {
			script += fmt.Sprintf("-C %s %s\n", chain, strings.Join(probe.RuleSpec(), " "))
		}
		if deps.Restore(fam, pol.IptablesBackend, max(time.Until(deadline), time.Second), script+"COMMIT\n") == nil {
			return nil, nil
		}
	}
	var ok bool
	var err error
	if shape.Return {
		ok, err = b.Table.Exists(string(chain), "-j", "RETURN")
	} else {
		ok, err = b.Table.ChainExists(string(chain))
	}
	if err != nil {
		return nil, err
	}
	if !ok {
		// Gone or flushed: either way the whole chain is rebuilt, and
		// its hooks (a jump to a missing chain cannot be checked).
		return []string{"chain or return rule"}, nil
	}
	var missing []string
	for _, h := range hooks {
		there, err := b.Table.Exists(string(h.Chain), h.RuleSpec()...)
		if err != nil {
			return nil, err
		}
		if !there {
			if gone, err := parentGone(b, h); err != nil || gone {
				if err != nil {
					return nil, err
				}
				continue
			}
			missing = append(missing, "hook from "+string(h.Chain))
		}
	}
	if probe != nil && len(missing) == 0 {
		there, err := b.Table.Exists(string(chain), probe.RuleSpec()...)
		if err != nil {
			return nil, err
		}
		if !there {
			missing = append(missing, "ban of "+probe.Source.String())
		}
	}
	return missing, nil
}

// recordedBan is the probe for missingParts: op when it is a ban the
// record holds, with the rule backend; nil otherwise.
func recordedBan(store *state.Store, pol *policy.Policy, op policy.Operation) (*policy.Operation, error) {
	if op.Kind != policy.AddBan || pol.Backend != "rules" {
		return nil, nil
	}
	has, err := store.HasBan(op)
	if err != nil || !has {
		return nil, err
	}
	return &op, nil
}

// parentGone reports whether a hook's parent chain is missing from the
// live firewall (the admin deleted their own chain, or docker's
// DOCKER-USER went with docker). Such a hook cannot be put back:
// iptables-restore would refuse the whole repair, and every request
// into the chain would fail with it, though its other hooks still lead
// to it. It stays recorded, as drift that status and reconcile report.
func parentGone(b firewall.Backend, h policy.Operation) (bool, error) {
	ok, err := b.Table.ChainExists(string(h.Chain))
	return !ok, err
}

// repairChain puts back what the live chain lacks of the record, exactly:
// the chain, its missing bans (or its sets, their members and rules), its
// return rule, and the hooks its parents lack; one iptables-restore (and
// one ipset restore), so the chain is never seen half built. What the
// live chain holds besides is left alone (reconcile reports it). It says
// what it put back.
func repairChain(store *state.Store, b firewall.Backend, pol *policy.Policy, ctx policy.Context, fam policy.Family, chain policy.Chain, deadline time.Time, deps Deps) (string, error) {
	if b.NFT != nil {
		return repairNFT(store, b, pol, ctx, fam, chain, deps.Now())
	}
	all, _, err := store.Load(ctx)
	if err != nil {
		return "", err
	}
	only := all.Only(fam, chain)
	c := only.Tables[fam].Chains[chain]
	if c == nil {
		return "nothing: the record holds no such chain", nil
	}
	var rules []string
	exists, err := b.Table.ChainExists(string(chain))
	if err == nil && exists {
		rules, err = b.Table.List(string(chain))
	}
	if err != nil {
		return "", err
	}
	live := state.New(ctx.LookupPort)
	if _, err := state.HooksFromLive(live, fam, b, ctx, chain); err != nil {
		return "", err
	}
	have := map[string]bool{}
	for _, h := range live.Tables[fam].Hooks {
		have[live.HookKey(h.Op)] = true
	}
	hooks := 0
	missing := func(h state.Hook) bool {
		if have[only.HookKey(h.Op)] {
			return false
		}
		if gone, err := parentGone(b, h.Op); err == nil && gone {
			return false
		}
		hooks++
		return true
	}
	sets, script := only.RepairScripts(fam, chain, pol, rules, missing)
	sets = withoutExistingSets(sets, b.Sets)
	wait := max(time.Until(deadline), time.Second)
	switch {
	case deps.Restore == nil || sets != "" && deps.RestoreSets == nil:
		err = fmt.Errorf("cannot run iptables-restore or ipset restore here")
	case sets != "":
		// The sets first: the chain's rules refer to them.
		if err = deps.RestoreSets(sets); err == nil {
			err = deps.Restore(fam, pol.IptablesBackend, wait, script)
		}
	default:
		err = deps.Restore(fam, pol.IptablesBackend, wait, script)
	}
	if err != nil {
		return "", err
	}
	if err := store.MarkChainSynced(fam, chain); err != nil {
		return "", err
	}
	what := "the chain"
	if exists {
		what = "the missing rules of the chain"
	}
	what += fmt.Sprintf(" (%d bans in the record", c.Len())
	if c.Return {
		what += ", with its return rule"
	}
	return fmt.Sprintf("%s) and %d hook(s)", what, hooks), nil
}

// withoutExistingSets drops from an "ipset restore" script the "create"
// of each set that exists already: "create -exist" fails when the live
// set was made with another maxelem (max_bans_per_chain changed since),
// and with it the whole repair, on every request, and the timer's too.
// The existing set is kept as it is, and filled.
func withoutExistingSets(script string, sets firewall.Sets) string {
	if script == "" || sets == nil {
		return script
	}
	var out strings.Builder
	for _, line := range strings.SplitAfter(script, "\n") {
		if f := strings.Fields(line); len(f) > 1 && f[0] == "create" {
			if _, err := sets.References(f[1]); err == nil {
				continue
			}
		}
		out.WriteString(line)
	}
	return out.String()
}

// joinNotes joins the notes of an audit line's state field.
func joinNotes(notes ...string) string {
	var out []string
	for _, n := range notes {
		if n != "" {
			out = append(out, n)
		}
	}
	return strings.Join(out, "; ")
}

// lastRepair says, for status, when the firewall was last put back from
// the state and what was put back.
func lastRepair(store *state.Store, now time.Time) string {
	at, what, err := store.LastRepair()
	switch {
	case err != nil:
		return "unknown: " + err.Error()
	case at.IsZero():
		return "none: the firewall has never had to be put back"
	}
	return fmt.Sprintf("last at %s (%s ago): %s", at.Local().Format(time.RFC3339), max(now.Sub(at), 0).Round(time.Second), what)
}
