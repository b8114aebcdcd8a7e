package state

import (
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/policy"
)

// FromLive reads the shim's part of a family's live firewall: the chains
// with the policy's prefix, their rules, and the hooks into them from the
// parent chains. Each rule is read back through the policy, as if the mail
// host had sent it; rules it refuses are returned as foreign.
func FromLive(s *State, fam policy.Family, t firewall.Table, pol *policy.Policy, ctx policy.Context) (foreign []string, err error) {
	chains, err := t.ListChains()
	if err != nil {
		return nil, err
	}
	judge := func(line string) (policy.Operation, bool) {
		op, err := policy.Decide(pol, line, ctx)
		return op, err == nil
	}
	for _, name := range chains {
		if !strings.HasPrefix(name, pol.ChainPrefix) {
			continue
		}
		op, ok := judge(fam.Binary() + " -N " + name)
		if !ok {
			foreign = append(foreign, "-N "+name)
			continue
		}
		s.Apply(op, time.Time{})
		rules, err := t.List(name)
		if err != nil {
			return nil, err
		}
		rules = ruleLines(rules, name)
		slices.Reverse(rules) // bans are inserted at the top: the last is the oldest
		for _, r := range rules {
			rest := strings.TrimPrefix(r, "-A "+name+" ")
			cmd := fam.Binary() + " -I " + name + " 1 " + rest
			if rest == "-j RETURN" {
				cmd = fam.Binary() + " -A " + name + " -j RETURN"
			}
			if op, ok := judge(cmd); ok {
				s.Apply(op, time.Time{})
			} else {
				foreign = append(foreign, r)
			}
		}
	}
	for _, parent := range pol.ParentChains {
		rules, err := t.List(parent)
		if err != nil {
			continue // a parent chain that does not exist holds no hooks
		}
		for _, r := range ruleLines(rules, parent) {
			f := strings.Fields(r)
			if len(f) < 2 || !strings.HasPrefix(f[len(f)-1], pol.ChainPrefix) {
				continue // not ours
			}
			if op, ok := judge(fam.Binary() + " -I " + strings.TrimPrefix(r, "-A ")); ok {
				s.Apply(op, time.Time{})
			} else {
				foreign = append(foreign, r)
			}
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

// HookKey identifies a hook by what it matches, with service names
// resolved through /etc/services, as iptables itself does: the journal
// keeps "imap,imaps" where the live firewall shows "143,993".
func HookKey(op policy.Operation) string {
	ports := make([]string, len(op.Ports))
	for i, p := range op.Ports {
		ports[i] = p.String()
		if p.Name != "" {
			if n, err := net.LookupPort(op.Proto, p.Name); err == nil {
				ports[i] = strconv.Itoa(n)
			}
		}
	}
	return fmt.Sprintf("%s %s %s %s %s", op.Chain, op.Proto, op.Match, strings.Join(ports, ","), op.Jump)
}

// RestoreScript is the iptables-restore input that puts the family's
// chains, bans and return rules back, and the hooks that missing says
// are missing. Declaring a chain flushes it, so running it twice leaves
// the same firewall.
func (s *State) RestoreScript(fam policy.Family, missing func(Hook) bool) string {
	t := s.Tables[fam]
	var b strings.Builder
	b.WriteString("*filter\n")
	names := t.ChainNames()
	for _, n := range names {
		fmt.Fprintf(&b, ":%s - [0:0]\n", n)
	}
	for _, n := range names {
		c := t.Chains[n]
		for i := len(c.Bans) - 1; i >= 0; i-- { // newest first, as -I 1 leaves them
			fmt.Fprintf(&b, "-A %s %s\n", n, strings.Join(c.Bans[i].Op.RuleSpec(), " "))
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
