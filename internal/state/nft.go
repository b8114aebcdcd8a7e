package state

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/nftables"
	"github.com/f2b-shim/f2b-shim/policy"
)

// FromNFT reads one family's part of the nftables backend's table into
// s, as FromLive reads iptables: each chain part, ban and hook is turned
// into the command fail2ban would have sent for it and judged by the
// policy, as if the mail host had sent it; what the policy refuses is
// returned as foreign, with what the table holds besides (snap.Foreign).
// The return rule is implicit in nftables, so a chain part always has
// one. only, when set, reads that chain and the hooks into it alone.
func FromNFT(s *State, fam policy.Family, snap *nftables.Snapshot, pol *policy.Policy, ctx policy.Context, only policy.Chain) (foreign []string) {
	judge := func(line string) (policy.Operation, bool) {
		op, err := policy.Decide(pol, fam.Binary()+" "+line, ctx)
		return op, err == nil
	}
	names := make([]string, 0, len(snap.Chains))
	for name := range snap.Chains {
		names = append(names, string(name))
	}
	sort.Strings(names)
	for _, name := range names {
		chain := policy.Chain(name)
		cs := snap.Chains[chain]
		if only != "" && chain != only || !cs.Returns(fam) {
			continue
		}
		create, ok := judge("-N " + name)
		if !ok {
			foreign = append(foreign, fmt.Sprintf("chain %s (%s)", name, fam))
			continue
		}
		s.Apply(create, time.Time{})
		if ret, ok := judge("-A " + name + " -j RETURN"); ok {
			s.Apply(ret, time.Time{})
		}
		target, hasVerdict := cs.Verdicts[fam]
		for _, el := range cs.Bans[fam] {
			if !hasVerdict {
				foreign = append(foreign, fmt.Sprintf("%s in the %s set of %s, which no rule matches", el.Prefix, fam, name))
				continue
			}
			line := fmt.Sprintf("-I %s 1 -s %s %s", name, el.Prefix, strings.Join(target.Args(), " "))
			if op, ok := judge(line); ok {
				s.Apply(op, time.Time{})
			} else {
				foreign = append(foreign, fmt.Sprintf("%s in the %s set of %s", el.Prefix, fam, name))
			}
		}
	}
	for _, h := range snap.Hooks {
		if h.Family != fam || only != "" && h.Chain != only {
			continue
		}
		line := HookLine(h)
		if op, ok := judge(line); ok && op.Kind == policy.AddHook {
			s.Apply(op, time.Time{})
		} else {
			foreign = append(foreign, "hook "+h.String())
		}
	}
	return append(foreign, snap.Foreign...)
}

// HookLine is the iptables command, after the binary, that makes the hook
// h: "-I INPUT -p tcp -m multiport --dports 25,465 -j CHAIN".
func HookLine(h nftables.Hook) string {
	line := "-I INPUT -p " + h.Proto
	var ports []string
	for _, r := range h.Ports {
		if r.Lo == r.Hi {
			ports = append(ports, fmt.Sprint(r.Lo))
		} else {
			ports = append(ports, fmt.Sprintf("%d:%d", r.Lo, r.Hi))
		}
	}
	switch {
	case len(ports) == 1:
		line += " --dport " + ports[0]
	case len(ports) > 1:
		line += " -m multiport --dports " + strings.Join(ports, ",")
	}
	return line + " -j " + string(h.Chain)
}

// NFTBans are the recorded bans of a chain as nftables elements, each
// with what is left of max_ban_time as its timeout, counted from when it
// was last made; a ban whose time is up is left out: the kernel would
// have lifted it, and "f2b-shim expire" lifts it from the record. With
// max_ban_time 0 no element has a timeout.
func NFTBans(c *Chain, maxBanTime time.Duration, now time.Time) (bans []nftables.Ban, target policy.Target) {
	for _, b := range c.Bans() {
		timeout := time.Duration(0)
		if maxBanTime > 0 {
			last := b.Last
			if last.IsZero() {
				last = b.Since
			}
			if last.IsZero() {
				// Read from the firewall, with no time of its own.
				last = now
			}
			if timeout = maxBanTime - now.Sub(last); timeout <= 0 {
				continue
			}
			// The kernel counts in milliseconds.
			timeout = max(timeout.Round(time.Millisecond), time.Millisecond)
		}
		bans = append(bans, nftables.Ban{Prefix: b.Op.Source, Timeout: timeout})
		target = b.Op.Target
	}
	return bans, target
}
