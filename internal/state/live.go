package state

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/policy"
)

// FromLive reads the shim's part of a family's live firewall: the chains
// with the policy's prefix, their rules, and the hooks into them from the
// parent chains. Each rule is read back through the policy, as if the mail
// host had sent it; rules it refuses are returned as foreign.
//
// With the set backend (b.Sets set), a chain's "-m set --match-set NAME
// src -j TARGET" rules are read as the bans in that set, provided NAME is
// the set the shim itself would use for that chain and target.
func FromLive(s *State, fam policy.Family, b firewall.Backend, ctx policy.Context) (foreign []string, err error) {
	t, pol := b.Table, b.Policy
	chains, err := t.ListChains()
	if err != nil {
		return nil, err
	}
	for _, name := range chains {
		if !strings.HasPrefix(name, pol.ChainPrefix) {
			continue
		}
		bad, err := ChainFromLive(s, fam, policy.Chain(name), b, ctx)
		if err != nil {
			return nil, err
		}
		foreign = append(foreign, bad...)
	}
	bad, err := HooksFromLive(s, fam, b, ctx, "")
	return append(foreign, bad...), err
}

// ChainFromLive reads one ban chain and its rules (or sets) into s.
func ChainFromLive(s *State, fam policy.Family, name policy.Chain, b firewall.Backend, ctx policy.Context) (foreign []string, err error) {
	op, err := policy.Decide(b.Policy, fam.Binary()+" -N "+string(name), ctx)
	if err != nil {
		return []string{"-N " + string(name)}, nil
	}
	rules, err := b.Table.List(string(name))
	if err != nil {
		return nil, err
	}
	s.Apply(op, time.Time{})
	rules = ruleLines(rules, string(name))
	slices.Reverse(rules) // bans are inserted at the top: the last is the oldest
	for _, r := range rules {
		rest := strings.TrimPrefix(r, "-A "+string(name)+" ")
		if b.Sets != nil && strings.HasPrefix(rest, "-m set --match-set ") {
			bad, err := fromSet(s, fam, name, rest, b, ctx)
			if err != nil {
				return nil, err
			}
			foreign = append(foreign, bad...)
			continue
		}
		if op, ok := judgeSaved(b.Policy, fam, r, ctx); ok && op.Kind != policy.AddHook {
			s.Apply(op, time.Time{})
		} else {
			foreign = append(foreign, r)
		}
	}
	return foreign, nil
}

// HooksFromLive reads the jumps from the policy's parent chains into its
// ban chains (into only, when it is set).
func HooksFromLive(s *State, fam policy.Family, b firewall.Backend, ctx policy.Context, only policy.Chain) (foreign []string, err error) {
	for _, parent := range b.Policy.ParentChains {
		rules, err := b.Table.List(parent)
		if err != nil {
			continue // a parent chain that does not exist holds no hooks
		}
		for _, r := range ruleLines(rules, parent) {
			f := strings.Fields(r)
			if len(f) < 2 || !strings.HasPrefix(f[len(f)-1], b.Policy.ChainPrefix) || only != "" && f[len(f)-1] != string(only) {
				continue // not ours
			}
			if op, ok := judgeSaved(b.Policy, fam, r, ctx); ok && op.Kind == policy.AddHook {
				s.Apply(op, time.Time{})
			} else {
				foreign = append(foreign, r)
			}
		}
	}
	return foreign, nil
}

// judgeSaved reads an "iptables -S" line back through the policy, as if
// the mail host had sent it.
func judgeSaved(pol *policy.Policy, fam policy.Family, line string, ctx policy.Context) (policy.Operation, bool) {
	c, err := policy.ParseSaved(fam, line)
	if err != nil {
		return policy.Operation{}, false
	}
	op, err := policy.Authorize(pol, c, ctx)
	return op, err == nil
}

// fromSet reads the bans of one set rule, "-m set --match-set NAME src -j T".
func fromSet(s *State, fam policy.Family, chain policy.Chain, rule string, b firewall.Backend, ctx policy.Context) ([]string, error) {
	f := strings.Fields(rule)
	whole := "-A " + string(chain) + " " + rule
	if len(f) < 7 || f[4] != "src" || f[5] != "-j" {
		return []string{whole}, nil
	}
	name, target := f[3], strings.Join(f[6:], " ")
	judge := func(src string) (policy.Operation, bool) {
		op, err := policy.Decide(b.Policy, fmt.Sprintf("%s -I %s 1 -s %s -j %s", fam.Binary(), chain, src, target), ctx)
		return op, err == nil
	}
	probe, ok := judge(map[policy.Family]string{policy.IPv4: "192.0.2.1", policy.IPv6: "2001:db8::1"}[fam])
	if !ok || firewall.SetName(fam, chain, probe.Target) != name {
		return []string{whole}, nil
	}
	members, err := b.Sets.Members(name)
	if err != nil {
		return nil, err
	}
	var foreign []string
	for _, m := range members {
		if op, ok := judge(m); ok {
			s.Apply(op, time.Time{})
		} else {
			foreign = append(foreign, fmt.Sprintf("%s in set %s of %s", m, name, chain))
		}
	}
	return foreign, nil
}

func ruleLines(rules []string, chain string) []string {
	var out []string
	for _, r := range rules {
		if strings.HasPrefix(r, "-A "+chain+" ") {
			out = append(out, r)
		}
	}
	return out
}

// SetScripts are the restore inputs for the set backend: an "ipset
// restore" script that makes each set hold exactly the state's bans, and
// the iptables-restore script with one set rule per target in use.
func (s *State) SetScripts(fam policy.Family, pol *policy.Policy, missing func(Hook) bool) (ipsetScript, iptablesScript string) {
	t := s.Tables[fam]
	family := map[policy.Family]string{policy.IPv4: "inet", policy.IPv6: "inet6"}[fam]
	var sets strings.Builder
	for _, n := range t.ChainNames() {
		// Only the sets in use: a set the chain's rules do not refer to
		// would be one more name for the admin to wonder about (and one
		// more that netfilter-persistent's saved rules never need).
		made := map[string]bool{}
		sizes := setSizes(fam, n, t.Chains[n], pol)
		for _, b := range t.Chains[n].Bans() {
			name := firewall.SetName(fam, n, b.Op.Target)
			if !made[name] {
				made[name] = true
				fmt.Fprintf(&sets, "create %s hash:net family %s maxelem %d -exist\nflush %s\n", name, family, sizes[name], name)
			}
		}
		for _, b := range t.Chains[n].Bans() {
			fmt.Fprintf(&sets, "add %s %s -exist\n", firewall.SetName(fam, n, b.Op.Target), b.Op.Source)
		}
	}
	return sets.String(), s.iptablesScript(fam, missing, func(n policy.Chain, c *Chain) []string {
		var inUse []policy.Target
		for _, b := range c.Bans() {
			if !slices.Contains(inUse, b.Op.Target) {
				inUse = append(inUse, b.Op.Target)
			}
		}
		// Each target's rule went in at the top when its first ban came:
		// the newest target stands first.
		slices.Reverse(inUse)
		var rules []string
		for _, tgt := range inUse {
			rules = append(rules, fmt.Sprintf("-m set --match-set %s src %s", firewall.SetName(fam, n, tgt), strings.Join(tgt.Args(), " ")))
		}
		return rules
	})
}

// RestoreScript is the iptables-restore input that puts the family's
// chains, bans and return rules back, and the hooks that missing says
// are missing.
func (s *State) RestoreScript(fam policy.Family, missing func(Hook) bool) string {
	return s.iptablesScript(fam, missing, func(_ policy.Chain, c *Chain) []string {
		var rules []string
		bans := c.Bans()
		for i := len(bans) - 1; i >= 0; i-- { // newest first, as -I 1 leaves them
			rules = append(rules, strings.Join(bans[i].Op.RuleSpec(), " "))
		}
		return rules
	})
}

// iptablesScript declares every chain, which flushes it, so that running
// the script twice leaves the same firewall; then it fills each chain
// with banRules, its return rule, and adds the missing hooks.
func (s *State) iptablesScript(fam policy.Family, missing func(Hook) bool, banRules func(policy.Chain, *Chain) []string) string {
	t := s.Tables[fam]
	var b strings.Builder
	b.WriteString("*filter\n")
	names := t.ChainNames()
	for _, n := range names {
		fmt.Fprintf(&b, ":%s - [0:0]\n", n)
	}
	for _, n := range names {
		c := t.Chains[n]
		for _, r := range banRules(n, c) {
			fmt.Fprintf(&b, "-A %s %s\n", n, r)
		}
		if c.Return {
			fmt.Fprintf(&b, "-A %s -j RETURN\n", n)
		}
	}
	for _, h := range t.Hooks {
		if missing(h) {
			fmt.Fprintf(&b, "-I %s %s\n", h.Op.Chain, strings.Join(h.Op.RuleSpec(), " "))
		}
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

// RepairScripts are the restore inputs that put back what one live chain
// lacks of the record, and nothing else: the chain when it is gone, each
// missing ban (or, with the set backend, each set and its rule, and each
// member with "-exist"; a set whose rule is gone is flushed first),
// the return rule, and the hooks that missing
// says are missing. What the live chain holds besides stays, for
// reconcile to report: a repair reconciles, it never flushes and
// reloads. live is the chain's rules as "iptables -S CHAIN" prints them,
// nil when the chain is gone; rules go in with "-I CHAIN 1", oldest
// first, so the newest stands first as fail2ban's own inserts leave it.
func (s *State) RepairScripts(fam policy.Family, chain policy.Chain, pol *policy.Policy, live []string, missing func(Hook) bool) (ipsetScript, iptablesScript string) {
	t := s.Tables[fam]
	c := t.Chains[chain]
	have := map[string]bool{}
	for _, r := range live {
		have[r] = true
	}
	var rules, sets strings.Builder
	rules.WriteString("*filter\n")
	if live == nil {
		fmt.Fprintf(&rules, ":%s - [0:0]\n", chain)
	}
	insert := func(spec string) {
		if !have["-A "+string(chain)+" "+spec] {
			have["-A "+string(chain)+" "+spec] = true
			fmt.Fprintf(&rules, "-I %s 1 %s\n", chain, spec)
		}
	}
	if c != nil {
		family := map[policy.Family]string{policy.IPv4: "inet", policy.IPv6: "inet6"}[fam]
		made := map[string]bool{}
		sizes := setSizes(fam, chain, c, pol)
		for _, b := range c.Bans() {
			if pol.Backend != "ipset" {
				insert(strings.Join(b.Op.RuleSpec(), " "))
				continue
			}
			name := firewall.SetName(fam, chain, b.Op.Target)
			if !made[name] {
				made[name] = true
				fmt.Fprintf(&sets, "create %s hash:net family %s maxelem %d -exist\n", name, family, sizes[name])
				rule := fmt.Sprintf("-m set --match-set %s src %s", name, strings.Join(b.Op.Target.Args(), " "))
				if !have["-A "+string(chain)+" "+rule] {
					// No rule uses the set: what a set left behind by a
					// wipe holds is in force nowhere, and may be what the
					// policy refuses now (an address that became the
					// proxy's own since). It gets the record's bans
					// exactly, as restore makes it.
					fmt.Fprintf(&sets, "flush %s\n", name)
				}
				insert(rule)
			}
			fmt.Fprintf(&sets, "add %s %s -exist\n", name, b.Op.Source)
		}
		if c.Return && !have["-A "+string(chain)+" -j RETURN"] {
			fmt.Fprintf(&rules, "-A %s -j RETURN\n", chain)
		}
	}
	for _, h := range t.Hooks {
		if h.Op.Jump == chain && missing(h) {
			fmt.Fprintf(&rules, "-I %s %s\n", h.Op.Chain, strings.Join(h.Op.RuleSpec(), " "))
		}
	}
	rules.WriteString("COMMIT\n")
	return sets.String(), rules.String()
}

// setSizes is the maxelem of each set of a chain: max_bans_per_chain, or
// the bans the record holds with that target when there are more (the
// admin lowered the limit since): a set too small for them would make
// "ipset restore" refuse the whole repair, and put back none of them.
// New bans still stop at the limit (firewall.Apply counts them).
func setSizes(fam policy.Family, chain policy.Chain, c *Chain, pol *policy.Policy) map[string]int {
	sizes := map[string]int{}
	for _, b := range c.Bans() {
		sizes[firewall.SetName(fam, chain, b.Op.Target)]++
	}
	for name, n := range sizes {
		sizes[name] = max(n, pol.MaxBansPerChain)
	}
	return sizes
}
