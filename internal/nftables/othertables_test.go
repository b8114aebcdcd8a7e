package nftables

import (
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"github.com/mdlayher/netlink"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/f2b-shim/f2b-shim/policy"
)

// lifecycle runs everything the shim does to its table, from the first
// ban to the uninstall: chains, hooks, verdicts, bans, a re-ban, unbans,
// a flush, a delete and the whole table's removal, each its own batch.
func lifecycle(t *testing.T, tbl *Table) {
	t.Helper()
	hook := Hook{Family: policy.IPv4, Chain: "mail-remote-f2b-imap", Proto: "tcp", Ports: []policy.PortRange{pr(143, 143), pr(993, 993)}}
	hook6 := hook
	hook6.Family = policy.IPv6
	steps := []func(b *Batch){
		func(b *Batch) {
			ensureBoth(b, hook.Chain)
			b.EnsureHook(hook)
			b.EnsureHook(hook6)
			b.SetVerdict(hook.Chain, policy.IPv4, reject4)
			b.SetVerdict(hook.Chain, policy.IPv6, drop)
			b.AddBans(hook.Chain, bans(time.Hour, "192.0.2.7/32", "198.51.100.0/24", "2001:db8::7/128", "2001:db8:1:2::/64"))
		},
		func(b *Batch) { b.AddBans(hook.Chain, bans(2*time.Hour, "192.0.2.7/32")) },
		func(b *Batch) { b.RemoveBans(hook.Chain, prefixes("192.0.2.7/32", "2001:db8:1:2::/64")) },
		func(b *Batch) { b.SetVerdict(hook.Chain, policy.IPv4, drop) },
		func(b *Batch) { b.FlushChain(hook.Chain, policy.IPv6) },
		func(b *Batch) { b.DeleteHook(hook6); b.DeleteChain(hook.Chain, policy.IPv6) },
		func(b *Batch) {
			b.DeleteHook(hook)
			b.FlushChain(hook.Chain, policy.IPv4)
			b.DeleteChain(hook.Chain, policy.IPv4)
		},
		func(b *Batch) { b.DeleteTable() },
	}
	for _, step := range steps {
		require.NoError(t, tbl.Do(step))
		_, err := tbl.ReadBack()
		require.NoError(t, err)
		_, _, err = tbl.Check(hook.Chain, netip.MustParsePrefix("198.51.100.1/32"))
		require.NoError(t, err)
	}
}

// TestEveryMessageNamesTheShimsTable shows, byte by byte, that the
// backend addresses nothing but its own table: every message of every
// batch of the lifecycle is of family inet and names the table f2b_shim
// (attribute 1 of a table, chain, rule, set or element message is its
// table's name).
func TestEveryMessageNamesTheShimsTable(t *testing.T) {
	tbl, rec := recordedTable(t)
	lifecycle(t, tbl)
	txs := rec.transactions()
	require.NotEmpty(t, txs)
	n := 0
	for _, tx := range txs {
		for _, m := range tx {
			switch m.Header.Type {
			case netlink.HeaderType(unix.NFNL_MSG_BATCH_BEGIN), netlink.HeaderType(unix.NFNL_MSG_BATCH_END):
				continue
			}
			n++
			require.GreaterOrEqual(t, len(m.Data), 4, "%s has no nfgenmsg", msgName(m))
			assert.Equal(t, byte(unix.NFPROTO_INET), m.Data[0], "%s is not of family inet", msgName(m))
			ad, err := netlink.NewAttributeDecoder(m.Data[4:])
			require.NoError(t, err)
			table := ""
			for ad.Next() {
				if ad.Type() == 1 {
					table = ad.String()
				}
			}
			require.NoError(t, ad.Err())
			assert.Equal(t, DefaultTable, table, "%s names another table", msgName(m))
		}
	}
	assert.Greater(t, n, 20, "the lifecycle sent its changes")
}

// adminRuleset is a host's own firewall as nft -f loads it: Debian's
// inet filter with rules and a set, a nat table, and what iptables-nft
// makes (ip filter with an INPUT chain), each with a chain on the input
// hook, one at the shim's own priority.
const adminRuleset = `
table inet filter {
	set allowed { type ipv4_addr; flags interval; elements = { 192.0.2.0/24 } }
	chain input {
		type filter hook input priority filter; policy accept;
		ip saddr @allowed tcp dport 22 accept
		tcp dport { 143, 993 } counter accept
	}
	chain forward { type filter hook forward priority filter; policy drop; }
}
table ip nat {
	chain postrouting { type nat hook postrouting priority srcnat; policy accept; masquerade; }
}
table ip filter {
	chain INPUT { type filter hook input priority filter - 1; policy accept; ip saddr 203.0.113.9 drop; }
	chain mail-remote-f2b-imap { ip saddr 203.0.113.10 reject; }
}
`

var countersRE = regexp.MustCompile(`counter packets \d+ bytes \d+`)

// TestSystemOtherTablesAreUntouched runs the whole lifecycle in a
// namespace that holds a host's own ruleset, with a chain of the same
// name as the shim's in iptables-nft's table: the ruleset lists the same
// before and after, and the shim's table is gone at the end.
func TestSystemOtherTablesAreUntouched(t *testing.T) {
	for _, layout := range layouts {
		t.Run(layout.name, func(t *testing.T) {
			tbl, ns := nsTable(t, layout.opts...)
			path := filepath.Join(t.TempDir(), "admin.nft")
			require.NoError(t, os.WriteFile(path, []byte(adminRuleset), 0o644))
			ns.MustRun(t, "nft", "-f", path)
			ruleset := func() string {
				return countersRE.ReplaceAllString(ns.MustRun(t, "nft", "list", "ruleset"), "counter")
			}
			before := ruleset()
			lifecycle(t, tbl)
			assert.Equal(t, before, ruleset())
			assert.NotContains(t, ns.MustRun(t, "nft", "list", "tables"), DefaultTable)
		})
	}
}
