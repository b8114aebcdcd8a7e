package engine

import (
	"fmt"
	"slices"
	"strings"

	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
)

// rules is the iptables backend: one rule per ban in the chain, or with
// the set backend (policy backend = "ipset") one set rule per target and
// the bans in ipsets. Changes go through package firewall; what is put
// back goes in one iptables-restore (and one ipset restore).
type rules struct {
	e   *Engine
	fam policy.Family
	b   firewall.Backend
	// batched gathers a stream batch's new bans, or expire's unbans,
	// for one iptables-restore (rule backend only).
	batched *firewall.Batched
}

func (r *rules) Apply(op policy.Operation) (firewall.Outcome, error) { return firewall.Apply(r.b, op) }

// Queue gathers new bans: their inserts go into one iptables-restore.
// (An unban is gathered only by a lift batch, whose Batched queues every
// delete.)
func (r *rules) Queue(op policy.Operation, ticket int) {
	if r.batched != nil {
		r.batched.Queue, r.batched.Ticket = op.Kind == policy.AddBan, ticket
	}
}

func (r *rules) Flush() map[int]error {
	if r.batched == nil {
		return nil
	}
	return r.batched.Flush()
}

func (r *rules) Read(live *state.State, chain policy.Chain) (Read, error) {
	var out Read
	var err error
	if chain == "" {
		if out.Foreign, err = state.FromLive(live, r.fam, r.b, r.e.Ctx); err != nil {
			return out, err
		}
		out.Duplicates, err = duplicates(r.b.Table, r.e.Pol, live.Tables[r.fam])
		return out, err
	}
	if out.Exists, err = r.b.Table.ChainExists(string(chain)); err != nil || !out.Exists {
		if err == nil {
			// No chain, and so no hook into it: iptables cannot hold a
			// jump to a missing chain.
			return out, nil
		}
		return out, err
	}
	bad, err := state.ChainFromLive(live, r.fam, chain, r.b, r.e.Ctx)
	if err != nil {
		return out, err
	}
	more, err := state.HooksFromLive(live, r.fam, r.b, r.e.Ctx, chain)
	out.Foreign = append(bad, more...)
	return out, err
}

// FullCheckMaxBans bounds the rule backend's chains whose return rule is
// checked on every request: iptables-nft reads the whole chain for any
// "-C" in it (and for a "-C" of a jump into it), so the check that costs
// 3.5 ms per request at 1,000 bans costs 26 ms at 10,000 (scripts/bench
// --only heal). Past it only the hooks are checked, in the parent chains'
// listings, which stay small; a flush of the ban chain alone then heals
// by the timer (f2b-shim-reconcile.timer, every minute). The set backend's
// chain holds one rule per target, so its check is always whole.
const FullCheckMaxBans = 1000

// Missing costs, in the ordinary case, one iptables-restore of "-C"
// lines (the return rule, every hook and the probe), which changes
// nothing and fails when one of them is not there; only then is each
// asked for on its own, to name what is missing.
//
// The probe matters for the rule backend: a restore of a file saved
// after the jail started leaves the chain, its return rule and its
// hooks, and not the later bans; without it a re-ban would answer
// "unchanged" from the record while the firewall lacks it.
func (r *rules) Missing(chain policy.Chain, shape state.Shape, hooks []policy.Operation, probe *policy.Operation) ([]string, error) {
	b, restore := r.b, r.e.Ports.Restore
	if b.Sets == nil && shape.Bans > FullCheckMaxBans && len(hooks) > 0 {
		return r.missingHooks(chain, hooks)
	}
	if shape.Return && restore != nil {
		script := fmt.Sprintf("*filter\n-C %s -j RETURN\n", chain)
		for _, h := range hooks {
			script += fmt.Sprintf("-C %s %s\n", h.Chain, strings.Join(h.RuleSpec(), " "))
		}
		if probe != nil {
			script += fmt.Sprintf("-C %s %s\n", chain, strings.Join(probe.RuleSpec(), " "))
		}
		if restore(r.fam, r.e.Pol.IptablesBackend, r.e.wait(), script+"COMMIT\n") == nil {
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
			if gone, err := r.parentGone(h); err != nil || gone {
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

// missingHooks checks only the hooks, from "iptables -S PARENT" of each
// parent they are in: a hook in place also means its chain exists.
func (r *rules) missingHooks(chain policy.Chain, hooks []policy.Operation) ([]string, error) {
	parents := *r.e.Pol
	parents.ParentChains = nil
	for _, h := range hooks {
		if !slices.Contains(parents.ParentChains, string(h.Chain)) {
			parents.ParentChains = append(parents.ParentChains, string(h.Chain))
		}
	}
	pb := r.b
	pb.Policy = &parents
	live := state.New(r.e.Ctx.LookupPort)
	if _, err := state.HooksFromLive(live, r.fam, pb, r.e.Ctx, chain); err != nil {
		return nil, err
	}
	have := map[string]bool{}
	for _, h := range live.Tables[r.fam].Hooks {
		have[live.HookKey(h.Op)] = true
	}
	var missing []string
	for _, h := range hooks {
		if !have[live.HookKey(h)] {
			if gone, err := r.parentGone(h); err != nil || gone {
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

// parentGone reports whether a hook's parent chain is missing from the
// live firewall (the admin deleted their own chain, or docker's
// DOCKER-USER went with docker). Such a hook cannot be put back:
// iptables-restore would refuse the whole repair, and every request
// into the chain would fail with it, though its other hooks still lead
// to it. It stays recorded, as drift that status and reconcile report.
func (r *rules) parentGone(h policy.Operation) (bool, error) {
	ok, err := r.b.Table.ChainExists(string(h.Chain))
	return !ok, err
}

func (r *rules) PutBack(s *state.State, chains []policy.Chain) (string, error) {
	if len(chains) == 0 {
		return r.putBackAll(s)
	}
	var said []string
	for _, c := range chains {
		what, err := r.putBackChain(s, c)
		if err != nil {
			return strings.Join(said, "; "), err
		}
		said = append(said, what)
	}
	return strings.Join(said, "; "), nil
}

// putBackAll feeds the family's whole record (restore at boot): hooks
// are compared by effect with what the parents hold, so only the missing
// ones are added and none is doubled.
func (r *rules) putBackAll(s *state.State) (string, error) {
	fam, b := r.fam, r.b
	live := state.New(r.e.Ctx.LookupPort)
	if _, err := state.HooksFromLive(live, fam, b, r.e.Ctx, ""); err != nil {
		return "", err
	}
	have := map[string]bool{}
	for _, h := range live.Tables[fam].Hooks {
		have[live.HookKey(h.Op)] = true
	}
	missing := func(h state.Hook) bool {
		if have[s.HookKey(h.Op)] {
			return false
		}
		// A hook from a parent chain that is gone would fail the whole
		// family's restore: every chain's bans, for one hook.
		gone, err := r.parentGone(h.Op)
		return err != nil || !gone
	}
	restore, restoreSets := r.e.Ports.Restore, r.e.Ports.RestoreSets
	if b.Sets == nil {
		return "the family's record", restore(fam, r.e.Pol.IptablesBackend, r.e.wait(), s.RestoreScript(fam, missing))
	}
	// The sets first: the chains' rules refer to them.
	sets, script := s.SetScripts(fam, r.e.Pol, missing)
	if err := restoreSets(withoutExistingSets(sets, b.Sets)); err != nil {
		return "", err
	}
	return "the family's record", restore(fam, r.e.Pol.IptablesBackend, r.e.wait(), script)
}

// putBackChain puts back what the live chain lacks of the record,
// exactly: the chain, its missing bans (or its sets, their members and
// rules), its return rule, and the hooks its parents lack; one
// iptables-restore (and one ipset restore), so the chain is never seen
// half built.
func (r *rules) putBackChain(all *state.State, chain policy.Chain) (string, error) {
	fam, b, pol := r.fam, r.b, r.e.Pol
	only := all.Only(fam, chain)
	c := only.Tables[fam].Chains[chain]
	if c == nil {
		return "nothing: the record holds no such chain", nil
	}
	var liveRules []string
	exists, err := b.Table.ChainExists(string(chain))
	if err == nil && exists {
		liveRules, err = b.Table.List(string(chain))
	}
	if err != nil {
		return "", err
	}
	live := state.New(r.e.Ctx.LookupPort)
	if _, err := state.HooksFromLive(live, fam, b, r.e.Ctx, chain); err != nil {
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
		if gone, err := r.parentGone(h.Op); err == nil && gone {
			return false
		}
		hooks++
		return true
	}
	sets, script := only.RepairScripts(fam, chain, pol, liveRules, missing)
	sets = withoutExistingSets(sets, b.Sets)
	restore, restoreSets := r.e.Ports.Restore, r.e.Ports.RestoreSets
	switch {
	case restore == nil || sets != "" && restoreSets == nil:
		err = fmt.Errorf("cannot run iptables-restore or ipset restore here")
	case sets != "":
		// The sets first: the chain's rules refer to them.
		if err = restoreSets(sets); err == nil {
			err = restore(fam, pol.IptablesBackend, r.e.wait(), script)
		}
	default:
		err = restore(fam, pol.IptablesBackend, r.e.wait(), script)
	}
	if err != nil {
		return "", err
	}
	what := "the chain"
	if exists {
		what = "the missing rules of the chain"
	}
	what += fmt.Sprintf(" (%s in the record", bans(c.Len()))
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

// WithoutExistingSets is withoutExistingSets for "restore --sets-only",
// which runs before any backend is opened.
func WithoutExistingSets(script string, sets firewall.Sets) string {
	return withoutExistingSets(script, sets)
}

// duplicates finds rules that stand more than once in the shim's chains
// and in the parent chains' jumps to them.
func duplicates(t firewall.Table, pol *policy.Policy, live *state.Table) ([]string, error) {
	chains := append([]string{}, pol.ParentChains...)
	for _, n := range live.ChainNames() {
		chains = append(chains, string(n))
	}
	var out []string
	for _, c := range chains {
		rules, err := t.List(c)
		if err != nil {
			continue
		}
		seen := map[string]int{}
		for _, r := range rules {
			if strings.HasPrefix(r, "-A ") && (strings.HasPrefix(c, pol.ChainPrefix) || strings.Contains(r, "-j "+pol.ChainPrefix)) {
				seen[r]++
			}
		}
		for _, r := range rules {
			if seen[r] > 1 {
				out = append(out, fmt.Sprintf("%s (%d times)", r, seen[r]))
				seen[r] = 0
			}
		}
	}
	return out, nil
}

// bans says how many bans, for the notes of a repair.
func bans(n int) string {
	if n == 1 {
		return "1 ban"
	}
	return fmt.Sprintf("%d bans", n)
}
