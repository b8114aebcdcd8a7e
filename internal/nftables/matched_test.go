package nftables

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/policy"
)

// TestSystemMatched: Matched answers whether each set of a family's part
// has its verdict rule. "nft flush chain" takes the rules of both
// families and leaves the sets with their bans, which then stop
// nothing; Part alone still answers that the parts are there.
func TestSystemMatched(t *testing.T) {
	for _, layout := range layouts {
		t.Run(layout.name, func(t *testing.T) {
			tbl, ns := nsTable(t, layout.opts...)
			require.NoError(t, tbl.Do(func(b *Batch) {
				ensureBoth(b, "mail-remote-f2b-imap")
				b.SetVerdict("mail-remote-f2b-imap", policy.IPv4, reject4)
				b.SetVerdict("mail-remote-f2b-imap", policy.IPv6, drop)
				b.AddBans("mail-remote-f2b-imap", bans(time.Hour, "192.0.2.7/32", "2001:db8::/64"))
			}))
			for _, fam := range []policy.Family{policy.IPv4, policy.IPv6} {
				part, ok, err := tbl.Matched("mail-remote-f2b-imap", fam)
				require.NoError(t, err)
				assert.True(t, part, "%s: the part is there", fam)
				assert.True(t, ok, "%s: each set has its verdict", fam)
			}
			ns.MustRun(t, "nft", "flush", "chain", "inet", DefaultTable, "mail-remote-f2b-imap")
			for _, fam := range []policy.Family{policy.IPv4, policy.IPv6} {
				part, err := tbl.Part("mail-remote-f2b-imap", fam)
				require.NoError(t, err)
				assert.True(t, part, "%s: the sets are still there", fam)
				part, ok, err := tbl.Matched("mail-remote-f2b-imap", fam)
				require.NoError(t, err)
				assert.True(t, part, "%s: Matched says so too", fam)
				assert.False(t, ok, "%s: their verdict rules are not", fam)
			}
			require.NoError(t, tbl.Do(func(b *Batch) { b.SetVerdict("mail-remote-f2b-imap", policy.IPv6, drop) }))
			_, ok, err := tbl.Matched("mail-remote-f2b-imap", policy.IPv6)
			require.NoError(t, err)
			assert.True(t, ok, "SetVerdict puts them back")
			if layout.opts != nil {
				// The hash set deleted by hand, with its rule first: the
				// next single-address ban would fail its transaction.
				rules := ns.MustRun(t, "nft", "-a", "list", "chain", "inet", DefaultTable, "mail-remote-f2b-imap")
				for _, line := range strings.Split(rules, "\n") {
					if strings.Contains(line, "@mail-remote-f2b-imap-v6-addr") {
						_, handle, _ := strings.Cut(line, "# handle ")
						ns.MustRun(t, "nft", "delete", "rule", "inet", DefaultTable, "mail-remote-f2b-imap", "handle", strings.TrimSpace(handle))
					}
				}
				ns.MustRun(t, "nft", "delete", "set", "inet", DefaultTable, "mail-remote-f2b-imap-v6-addr")
				part, ok, err := tbl.Matched("mail-remote-f2b-imap", policy.IPv6)
				require.NoError(t, err)
				assert.True(t, part)
				assert.False(t, ok, "a set of the layout is missing")
				part, ok, err = tbl.Whole("mail-remote-f2b-imap", policy.IPv6)
				require.NoError(t, err)
				assert.True(t, part)
				assert.False(t, ok, "Whole says so too")
				part, ok, err = tbl.Whole("mail-remote-f2b-imap", policy.IPv4)
				require.NoError(t, err)
				assert.True(t, part && ok, "the other family's part is whole")
			}
			require.NoError(t, tbl.Do(func(b *Batch) { b.DeleteChain("mail-remote-f2b-imap", policy.IPv6) }))
			part, _, err := tbl.Matched("mail-remote-f2b-imap", policy.IPv6)
			require.NoError(t, err)
			assert.False(t, part, "a part that is gone is no part")
		})
	}
}
