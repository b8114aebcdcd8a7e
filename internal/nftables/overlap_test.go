package nftables

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/policy"
)

func elementPrefixes(t *testing.T, tbl *Table, chain policy.Chain, fam policy.Family) []string {
	t.Helper()
	snap, err := tbl.ReadBack()
	require.NoError(t, err)
	var out []string
	if cs := snap.Chains[chain]; cs != nil {
		for _, e := range cs.Bans[fam] {
			out = append(out, e.Prefix.String())
		}
	}
	return out
}

// Interval sets hold no overlapping elements, and the kernel refuses a
// transaction that would make one (EEXIST). Commit fits the bans to the
// set instead, the wider prefix standing for the narrower.
func TestSystemOverlappingBans(t *testing.T) {
	tests := []struct {
		name     string
		before   []string // bans in the set before the batch
		add      []string // one AddBans call each
		remove   []string
		want     []string
		adjusted int
	}{
		{"an address inside a banned /24 is held by it", []string{"192.0.2.0/24"}, []string{"192.0.2.1/32"}, nil, []string{"192.0.2.0/24"}, 1},
		{"a /16 over two banned /24s replaces them", []string{"192.0.2.0/24", "192.0.3.0/24"}, []string{"192.0.0.0/16"}, nil, []string{"192.0.0.0/16"}, 1},
		{"an address and then its /24 in one batch keep the /24", nil, []string{"198.51.100.7/32", "198.51.100.0/24"}, nil, []string{"198.51.100.0/24"}, 1},
		{"an address and its /24 in one call keep the /24", nil, []string{"198.51.100.7/32,198.51.100.0/24"}, nil, []string{"198.51.100.0/24"}, 1},
		{"an unban of an address inside a banned /24 leaves the /24", []string{"192.0.2.0/24"}, nil, []string{"192.0.2.1/32"}, []string{"192.0.2.0/24"}, 1},
		{"an unban of a /24 over banned addresses leaves them", []string{"192.0.2.1/32", "192.0.2.2/32"}, nil, []string{"192.0.2.0/24"}, []string{"192.0.2.1/32", "192.0.2.2/32"}, 0},
		{"an IPv6 /64 over a banned address in it replaces it", []string{"2001:db8::7/128"}, []string{"2001:db8::/64"}, nil, []string{"2001:db8::/64"}, 1},
		{"disjoint bans go in as they are", []string{"192.0.2.0/24"}, []string{"192.0.3.0/24"}, nil, []string{"192.0.2.0/24", "192.0.3.0/24"}, 0},
	}
	tbl, _ := nsTable(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.NoError(t, tbl.Do(func(b *Batch) { b.DeleteTable() }))
			require.NoError(t, tbl.Do(func(b *Batch) { ensureBoth(b, "c"); b.AddBans("c", bans(0, tt.before...)) }))
			batch := tbl.NewBatch()
			for _, p := range tt.add {
				batch.AddBans("c", bans(0, strings.Split(p, ",")...))
			}
			if tt.remove != nil {
				batch.RemoveBans("c", prefixes(tt.remove...))
			}
			require.NoError(t, batch.Commit())
			fam := familyOf(netip.MustParsePrefix(tt.want[0]).Addr())
			assert.Equal(t, tt.want, elementPrefixes(t, tbl, "c", fam))
			assert.Len(t, batch.Adjustments, tt.adjusted, "%+v", batch.Adjustments)
		})
	}
}

// With address sets an address's ban is in the hash set and a prefix over
// it in the interval set: both are bans of their own, and a check asks
// for one of them. Check read the interval set first and answered with
// the prefix, so "iptables -C CHAIN -s ADDR" of a ban the state holds
// and the table enforces said no once a /24 over it was banned too.
func TestSystemCheckFindsAnAddressUnderABannedPrefix(t *testing.T) {
	tbl, _ := nsTable(t, WithAddressSets())
	require.NoError(t, tbl.Do(func(b *Batch) {
		ensureBoth(b, "c")
		b.AddBans("c", bans(0, "198.51.100.7/32", "198.51.100.0/24", "2001:db8::7/128", "2001:db8::/64"))
	}))
	for _, tt := range []struct{ name, check, want string }{
		{"the address finds its own ban", "198.51.100.7/32", "198.51.100.7/32"},
		{"the prefix finds its own ban", "198.51.100.0/24", "198.51.100.0/24"},
		{"another address finds the prefix over it", "198.51.100.8/32", "198.51.100.0/24"},
		{"an IPv6 address finds its own ban", "2001:db8::7/128", "2001:db8::7/128"},
		{"another IPv6 address finds the /64", "2001:db8::8/128", "2001:db8::/64"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			e, found, err := tbl.Check("c", netip.MustParsePrefix(tt.check))
			require.NoError(t, err)
			require.True(t, found)
			assert.Equal(t, tt.want, e.Prefix.String())
		})
	}
}
