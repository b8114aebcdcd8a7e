package policy

import (
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/test/hostile"
)

// FuzzDecide feeds arbitrary text through parse + authorize and checks the
// properties the shim's safety rests on. Each can fail: a grammar bug that
// let a foreign chain, target or address through would trip it.
func FuzzDecide(f *testing.F) {
	seeds := []string{
		"iptables -w -N " + chain,
		"ip6tables -w -X " + chain,
		"iptables -w -A " + chain + " -j RETURN",
		"iptables -w -C " + chain + " -j RETURN",
		"iptables -w -I INPUT -p tcp -m multiport --dports pop3,pop3s,imap,imaps,sieve -j " + chain,
		"iptables -w -D INPUT -p tcp --dport 143 -j " + chain,
		"ip6tables -w -C INPUT -p udp -j " + chain,
		"iptables -w -I " + chain + " 1 -s 203.0.113.45 -j REJECT --reject-with icmp-port-unreachable",
		"ip6tables -w -D " + chain + " -s 2001:db8::1/64 -j DROP",
		"iptables -w -C " + chain + " -s ::ffff:203.0.113.9 -j REJECT",
		"iptables -w -n -L INPUT | grep -q '" + chain + `[ \t]'`,
		"iptables -N " + chain + " #",
		"iptables -F INPUT",
		"iptables -I " + chain + " 1 -s 0.0.0.0/0 -j ACCEPT",
		"sh -c id",
	}
	for _, s := range seeds {
		f.Add(s)
	}
	corpus, err := hostile.Load()
	require.NoError(f, err)
	for _, e := range corpus {
		f.Add(e.Line)
	}
	pol := Default()
	protected := pol.NeverBanReasons(testContext())
	f.Fuzz(func(t *testing.T, line string) {
		op, err := decide(t, line)
		if err != nil {
			var d *Denial
			require.ErrorAs(t, err, &d, "every refusal is a *Denial")
			require.NotContains(t, d.Reason, "\n")
			// A refusal to ban a protected address names the rule
			// that protects it.
			if _, why, ok := strings.Cut(d.Reason, "never banned"); ok {
				require.True(t, slices.ContainsFunc(protected, func(p Protected) bool { return strings.HasSuffix(why, ": "+p.Why) }), "%q names no reason", d.Reason)
			}
			return
		}
		// Anything allowed names only a chain inside the prefix...
		banChain := string(op.BanChain())
		require.True(t, strings.HasPrefix(banChain, pol.ChainPrefix) && len(banChain) > len(pol.ChainPrefix) && len(banChain) <= maxChainLen, "chain %q", banChain)
		if op.isHook() {
			require.Contains(t, pol.ParentChains, string(op.Chain))
			require.NotEqual(t, op.Chain, op.Jump)
		} else {
			require.Equal(t, op.Chain, op.BanChain())
		}
		// ...an allowed target and an address inside the limits...
		if op.isBan() {
			require.Contains(t, []TargetKind{Drop, Reject}, op.Target.Kind)
			if op.Target.Kind == Reject {
				require.True(t, slices.Contains(pol.RejectWith, op.Target.RejectWith))
				require.Equal(t, op.Family, rejectTypes[op.Target.RejectWith])
			}
			require.Equal(t, op.Family, familyOf(op.Source.Addr()))
			minBits := map[Family]int{IPv4: pol.MinPrefixV4, IPv6: pol.MinPrefixV6}[op.Family]
			require.GreaterOrEqual(t, op.Source.Bits(), minBits)
			require.Equal(t, op.Source.Masked(), op.Source)
			require.Empty(t, op.Source.Addr().Zone())
			for _, p := range protected {
				require.False(t, op.Source.Overlaps(p.Prefix), "%s overlaps %s (%s)", op.Source, p.Prefix, p.Why)
			}
		}
		// ...and the rule it builds holds no word the policy did not make.
		for _, w := range op.RuleSpec() {
			require.NotContains(t, w, " ")
			require.False(t, strings.HasPrefix(w, "--") && !slices.Contains([]string{"--dport", "--dports", "--reject-with"}, w), "option %q", w)
		}
		// A hook that goes in stays off the proxy's local port range and
		// never covers every port (hook_ports is empty by default).
		if op.Kind == AddHook {
			ports, err := op.hookPorts(testServices)
			require.NoError(t, err)
			for _, r := range ports {
				require.False(t, r.Lo <= DefaultLocalPorts.Hi && DefaultLocalPorts.Lo <= r.Hi, "hook on %v", ports)
			}
		}
		// It round-trips through its canonical command line.
		again, err := decide(t, op.CommandLine())
		require.NoError(t, err, "canonical form %q", op.CommandLine())
		assert.Equal(t, op, again)
	})
}

// FuzzParseSaved feeds arbitrary "iptables -S" lines to the reader that
// restore, reconcile and crash recovery use: whatever it accepts is a
// rule the grammar makes, and round-trips through its canonical form.
func FuzzParseSaved(f *testing.F) {
	for _, s := range []string{
		"-A INPUT -p tcp -m tcp --dport 25 -j " + chain,
		"-A INPUT -p tcp -m multiport --dports 110,995,143,993,4190 -j " + chain,
		"-A " + chain + " -s 203.0.113.4/32 -j REJECT --reject-with icmp-port-unreachable",
		"-A " + chain + " -j RETURN",
		"-A " + chain + " -m set --match-set f2b-0123456789ab src -j DROP",
		"-A INPUT -p tcp -m tcp --dport 25 -m comment --comment x -j " + chain,
		"-N " + chain,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, line string) {
		c, err := ParseSaved(IPv4, line)
		if err != nil {
			var d *Denial
			require.ErrorAs(t, err, &d)
			return
		}
		require.Contains(t, []Kind{AddHook, AddBan, AddReturn}, c.Kind)
		again, err := ParseCommand(Operation{Command: c}.CommandLine())
		require.NoError(t, err)
		assert.Equal(t, c, again)
	})
}
