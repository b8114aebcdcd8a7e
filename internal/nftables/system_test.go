package nftables

import (
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/policy"
	"github.com/f2b-shim/f2b-shim/test/nstest"
)

// nsTable opens the shim's table in a fresh network namespace, which the
// test deletes when it ends: nothing here touches the host's firewall.
func nsTable(t testing.TB, opts ...Option) (*Table, *nstest.Netns) {
	t.Helper()
	nstest.RequireRoot(t, "nft")
	ns := nstest.NewNetns(t)
	f, err := os.Open(filepath.Join("/var/run/netns", ns.Name))
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	tbl, err := Open("", append(opts, WithNetNS(int(f.Fd())))...)
	require.NoError(t, err)
	t.Cleanup(func() { tbl.Close() })
	return tbl, ns
}

// layouts are the two ways a table can keep bans; the system tests that
// do not depend on where an element goes run in both.
var layouts = []struct {
	name, golden string
	opts         []Option
}{
	{"interval sets", "golden", nil},
	{"address sets", "golden-addr", []Option{WithAddressSets()}},
}

var expiresRE = regexp.MustCompile(` expires [0-9hmsd]+`)

// listTable is "nft list table inet f2b_shim" with what changes by the
// second (an element's time left) cut out.
func listTable(t testing.TB, ns *nstest.Netns) string {
	t.Helper()
	return expiresRE.ReplaceAllString(ns.MustRun(t, "nft", "list", "table", "inet", DefaultTable), "")
}

// assertGolden compares the table with testdata/NAME.nft, line by line.
// F2B_SHIM_UPDATE_GOLDEN=1 rewrites the file instead.
func assertGolden(t *testing.T, ns *nstest.Netns, name string) {
	t.Helper()
	got := listTable(t, ns)
	path := filepath.Join("testdata", name+".nft")
	if os.Getenv("F2B_SHIM_UPDATE_GOLDEN") != "" {
		require.NoError(t, os.WriteFile(path, []byte(got), 0o644))
	}
	want, err := os.ReadFile(path)
	require.NoError(t, err)
	// assert.Equal prints a unified diff of the two listings.
	assert.Equal(t, strings.Split(string(want), "\n"), strings.Split(got, "\n"), "nft list table inet %s", DefaultTable)
}

var (
	reject4 = policy.Target{Kind: policy.Reject, RejectWith: "icmp-port-unreachable"}
	reject6 = policy.Target{Kind: policy.Reject, RejectWith: "icmp6-port-unreachable"}
	drop    = policy.Target{Kind: policy.Drop}
)

func pr(lo, hi uint16) policy.PortRange { return policy.PortRange{Lo: lo, Hi: hi} }

// ensureBoth makes a ban chain for both families, as fail2ban's actions do.
func ensureBoth(b *Batch, chain policy.Chain) {
	b.EnsureChain(chain, policy.IPv4)
	b.EnsureChain(chain, policy.IPv6)
}

func bans(timeout time.Duration, prefixes ...string) []Ban {
	out := make([]Ban, len(prefixes))
	for i, p := range prefixes {
		out[i] = Ban{Prefix: netip.MustParsePrefix(p), Timeout: timeout}
	}
	return out
}

func TestSystemGolden(t *testing.T) {
	for _, layout := range layouts {
		t.Run(layout.name, func(t *testing.T) { testSystemGolden(t, layout.golden, layout.opts...) })
	}
}

func testSystemGolden(t *testing.T, golden string, opts ...Option) {
	tbl, ns := nsTable(t, opts...)
	require.NoError(t, tbl.Do(func(b *Batch) {
		ensureBoth(b, "mail-remote-f2b-sshd")
		ensureBoth(b, "mail-remote-f2b-postfix")
		b.SetVerdict("mail-remote-f2b-sshd", policy.IPv4, reject4)
		b.SetVerdict("mail-remote-f2b-sshd", policy.IPv6, reject6)
		b.SetVerdict("mail-remote-f2b-postfix", policy.IPv4, drop)
		b.EnsureHook(Hook{Family: policy.IPv4, Chain: "mail-remote-f2b-sshd", Proto: "tcp", Ports: []policy.PortRange{pr(22, 22)}})
		b.EnsureHook(Hook{Family: policy.IPv6, Chain: "mail-remote-f2b-sshd", Proto: "tcp", Ports: []policy.PortRange{pr(22, 22)}})
		b.EnsureHook(Hook{Family: policy.IPv4, Chain: "mail-remote-f2b-postfix", Proto: "tcp", Ports: []policy.PortRange{pr(25, 25), pr(465, 465), pr(587, 587)}})
		b.EnsureHook(Hook{Family: policy.IPv4, Chain: "mail-remote-f2b-postfix", Proto: "udp", Ports: []policy.PortRange{pr(1000, 2000)}})
		b.EnsureHook(Hook{Family: policy.IPv6, Chain: "mail-remote-f2b-sshd", Proto: "sctp"})
		b.AddBans("mail-remote-f2b-sshd", bans(0, "192.0.2.7/32", "2001:db8::7/128", "2001:db8:1:2::/64", "198.51.100.0/24"))
		b.AddBans("mail-remote-f2b-postfix", bans(time.Hour, "203.0.113.9/32"))
	}))
	assertGolden(t, ns, golden)
}

func prefixes(ps ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(ps))
	for i, p := range ps {
		out[i] = netip.MustParsePrefix(p)
	}
	return out
}

// TestSystemHooksNftWroteReadBack: nft writes "tcp dport { 143, 993 }" as
// a plain set of single ports, not the interval set the package writes;
// read as interval starts, each port would run to 65535.
func TestSystemHooksNftWroteReadBack(t *testing.T) {
	tbl, ns := nsTable(t)
	const chain = "mail-remote-f2b-imap"
	require.NoError(t, tbl.Do(func(b *Batch) { b.EnsureChain(chain, policy.IPv4) }))
	ns.MustRun(t, "nft", "add", "rule", "inet", DefaultTable, BaseChain, "meta", "nfproto", "ipv4", "tcp", "dport", "{ 993, 143, 144 }", "jump", chain)
	ns.MustRun(t, "nft", "add", "rule", "inet", DefaultTable, BaseChain, "meta", "nfproto", "ipv4", "udp", "dport", "{ 1000-2000, 53 }", "jump", chain)
	hooks, err := tbl.Hooks()
	require.NoError(t, err)
	assert.ElementsMatch(t, []Hook{
		{Family: policy.IPv4, Chain: chain, Proto: "tcp", Ports: []policy.PortRange{{Lo: 143, Hi: 144}, {Lo: 993, Hi: 993}}},
		{Family: policy.IPv4, Chain: chain, Proto: "udp", Ports: []policy.PortRange{{Lo: 53, Hi: 53}, {Lo: 1000, Hi: 2000}}},
	}, hooks)
}
