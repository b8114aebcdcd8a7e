package integration

import (
	"fmt"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/test/nstest"
)

// nftBothFamilies starts the jail in both families, one REJECT ban each.
var nftBothFamilies = []string{
	"iptables -w -N " + chain, "iptables -w -A " + chain + " -j RETURN",
	"iptables -w -I INPUT -p tcp -m multiport --dports imap,imaps -j " + chain,
	"iptables -w -I " + chain + " 1 -s 203.0.113.45 -j REJECT --reject-with icmp-port-unreachable",
	"ip6tables -w -N " + chain, "ip6tables -w -A " + chain + " -j RETURN",
	"ip6tables -w -I INPUT -p tcp -m multiport --dports imap,imaps -j " + chain,
	"ip6tables -w -I " + chain + " 1 -s 2001:db8:45::1 -j REJECT --reject-with icmp6-port-unreachable",
}

// TestNftablesWipesFoundByTheEndToEndTests are the reproductions of what
// test/e2e's nftables heal test found (lab.NFTWipes), one namespace each:
// a wipe behind the shim's back, then what must put everything back, and
// "reconcile" must then find no drift.
func TestNftablesWipesFoundByTheEndToEndTests(t *testing.T) {
	nstest.RequireRoot(t, "nft")
	for _, c := range []struct {
		name string
		wipe [][]string
		// heal is a request line, or an admin command ("reconcile --fix").
		heal     string
		healCode int
	}{
		{
			name:     "after the jail's chain is flushed, reconcile --fix puts its verdict rules back and exits 0",
			wipe:     [][]string{{"flush", "chain", "inet", "f2b_shim", chain}},
			heal:     "reconcile --fix",
			healCode: 0,
		},
		{
			name:     "after the jail's chain is flushed, an IPv4 ban puts back the IPv6 verdict rules too",
			wipe:     [][]string{{"flush", "chain", "inet", "f2b_shim", chain}},
			heal:     "iptables -w -I " + chain + " 1 -s 203.0.113.46 -j REJECT --reject-with icmp-port-unreachable",
			healCode: 0,
		},
		{
			name: "a hook that nft itself wrote with the jail's ports is the shim's own, not a foreign one",
			wipe: [][]string{
				{"flush", "chain", "inet", "f2b_shim", "input"},
				{"add", "rule", "inet", "f2b_shim", "input", "meta", "nfproto", "ipv4", "tcp", "dport", "{ 143, 993 }", "jump", chain},
				{"add", "rule", "inet", "f2b_shim", "input", "meta", "nfproto", "ipv6", "tcp", "dport", "{ 143, 993 }", "jump", chain},
			},
			heal:     "iptables -w -I " + chain + " 1 -s 203.0.113.46 -j REJECT --reject-with icmp-port-unreachable",
			healCode: 0,
		},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel() // each in its own namespace
			dir := t.TempDir()
			pol := nstest.WritePolicy(t, dir, fmt.Sprintf("name = \"it-nft-wipe\"\naudit_log = %q\nstate_dir = %q\nbackend = \"nftables\"\n",
				filepath.Join(dir, "audit.jsonl"), filepath.Join(dir, "state")))
			ns := nstest.NewNetns(t)
			runAll(t, ns, pol, nftBothFamilies...)
			for _, w := range c.wipe {
				ns.MustRun(t, "nft", w...)
			}
			if c.heal == "reconcile --fix" {
				r := admin(t, ns, pol, "reconcile", "--fix")
				assert.Equal(t, c.healCode, r.Code, "reconcile --fix:\n%s%s", r.Stdout, r.Stderr)
			} else {
				r := ns.Shim(t, shim, pol, c.heal)
				require.Equal(t, c.healCode, r.Code, r.Stderr)
			}
			r := admin(t, ns, pol, "reconcile")
			assert.Equal(t, 0, r.Code, "drift left:\n%s%s\n%s", r.Stdout, r.Stderr, ns.MustRun(t, "nft", "list", "table", "inet", "f2b_shim"))
		})
	}
}
