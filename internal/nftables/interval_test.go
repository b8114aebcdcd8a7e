package nftables

import (
	"net/netip"
	"testing"

	"github.com/google/nftables"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/policy"
)

func TestPrefixRange(t *testing.T) {
	tests := []struct {
		name, prefix, start, end string // end "" means open to the top
	}{
		{"one IPv4 address ends at the next address", "192.0.2.7/32", "192.0.2.7", "192.0.2.8"},
		{"an IPv4 /24 ends after its broadcast address", "192.0.2.0/24", "192.0.2.0", "192.0.3.0"},
		{"an unmasked prefix is masked first", "198.51.100.77/24", "198.51.100.0", "198.51.101.0"},
		{"the last IPv4 address has no end", "255.255.255.255/32", "255.255.255.255", ""},
		{"the whole IPv4 space has no end", "0.0.0.0/0", "0.0.0.0", ""},
		{"the upper half of IPv4 has no end", "128.0.0.0/1", "128.0.0.0", ""},
		{"the lower half of IPv4 ends at the upper half", "0.0.0.0/1", "0.0.0.0", "128.0.0.0"},
		{"an IPv4 range carries into the next octet", "203.0.113.255/32", "203.0.113.255", "203.0.114.0"},
		{"one IPv6 address ends at the next address", "2001:db8::1/128", "2001:db8::1", "2001:db8::2"},
		{"an IPv6 /64 is one interval", "2001:db8:1:2::/64", "2001:db8:1:2::", "2001:db8:1:3::"},
		{"an IPv6 range carries across groups", "2001:db8:ffff:ffff::/64", "2001:db8:ffff:ffff::", "2001:db9::"},
		{"the last IPv6 address has no end", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", ""},
		{"the whole IPv6 space has no end", "::/0", "::", ""},
		{"the lower half of IPv6 ends at the upper half", "::/1", "::", "8000::"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := netip.MustParsePrefix(tt.prefix)
			start, end, open := prefixRange(p)
			assert.Equal(t, tt.start, start.String())
			if tt.end == "" {
				assert.True(t, open)
				assert.False(t, end.IsValid())
			} else {
				assert.False(t, open)
				assert.Equal(t, tt.end, end.String())
			}
			back, ok := rangePrefix(start, end, open)
			assert.True(t, ok, "the range reads back as a prefix")
			assert.Equal(t, p.Masked(), back)
		})
	}
}

func TestRangePrefixRefusesWhatIsNoPrefix(t *testing.T) {
	tests := []struct {
		name, start, end string
	}{
		{"a range of three addresses", "192.0.2.1", "192.0.2.4"},
		{"a range that starts off its boundary", "192.0.2.1", "192.0.2.3"},
		{"an IPv6 range of two /64s that is no /63", "2001:db8:0:1::", "2001:db8:0:3::"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, ok := rangePrefix(netip.MustParseAddr(tt.start), netip.MustParseAddr(tt.end), false)
			assert.False(t, ok)
		})
	}
	t.Run("an open range from an address that starts no prefix to the top", func(t *testing.T) {
		_, ok := rangePrefix(netip.MustParseAddr("192.0.2.1"), netip.Addr{}, true)
		assert.False(t, ok)
	})
}

func FuzzPrefixRange(f *testing.F) {
	f.Add([]byte{192, 0, 2, 7}, uint8(32))
	f.Add([]byte{0, 0, 0, 0}, uint8(0))
	f.Add(netip.MustParseAddr("2001:db8::").AsSlice(), uint8(64))
	f.Add(netip.MustParseAddr("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff").AsSlice(), uint8(128))
	f.Fuzz(func(t *testing.T, raw []byte, bits uint8) {
		a, ok := netip.AddrFromSlice(raw)
		if !ok || int(bits) > a.BitLen() {
			return
		}
		p := netip.PrefixFrom(a, int(bits)).Masked()
		start, end, open := prefixRange(p)
		if start != p.Addr() {
			t.Fatalf("%s starts at %s", p, start)
		}
		if open != !lastAddr(p).Next().IsValid() {
			t.Fatalf("%s: open %v", p, open)
		}
		if !open && (p.Contains(end) || end.Prev() != lastAddr(p)) {
			t.Fatalf("%s: end %s is not just past the prefix", p, end)
		}
		back, ok := rangePrefix(start, end, open)
		if !ok || back != p {
			t.Fatalf("%s reads back as %s (%v)", p, back, ok)
		}
	})
}

func TestIntervalsReadBack(t *testing.T) {
	el := func(a string, end bool) nftables.SetElement {
		return nftables.SetElement{Key: keyOf(netip.MustParseAddr(a)), IntervalEnd: end}
	}
	tests := []struct {
		name    string
		elems   []nftables.SetElement
		want    []string
		foreign int
	}{
		{"adjacent prefixes share a key, the end first", []nftables.SetElement{el("192.0.3.0", false), el("192.0.4.0", true), el("192.0.2.0", false), el("192.0.3.0", true)}, []string{"192.0.2.0/24", "192.0.3.0/24"}, 0},
		{"nft's leading end element at zero closes nothing", []nftables.SetElement{el("0.0.0.0", true), el("192.0.2.7", false), el("192.0.2.8", true)}, []string{"192.0.2.7/32"}, 0},
		{"a last start without an end runs to the top", []nftables.SetElement{el("::", false)}, []string{"::/0"}, 0},
		{"a range that is no prefix is foreign", []nftables.SetElement{el("192.0.2.1", false), el("192.0.2.4", true)}, nil, 1},
		{"an end without its start (an expired interval's) matches nothing and is no ban", []nftables.SetElement{el("192.0.2.9", true)}, nil, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, foreign := intervals(tt.elems)
			var ps []string
			for _, e := range got {
				ps = append(ps, e.Prefix.String())
			}
			assert.Equal(t, tt.want, ps)
			assert.Len(t, foreign, tt.foreign)
		})
	}
}

func TestFit(t *testing.T) {
	live := map[setKey][]netip.Prefix{{"c", policy.IPv4}: {netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("198.51.100.7/32")}}
	b := &Batch{}
	f := b.fit(&banStep{chain: "c", fam: policy.IPv4, bans: bans(0, "192.0.2.9/32", "198.51.100.0/24", "203.0.113.1/32", "192.0.2.0/24")}, live)
	assert.Equal(t, bans(0, "192.0.2.0/24"), f.there, "the exact ban is refreshed")
	assert.Equal(t, bans(0, "198.51.100.0/24", "203.0.113.1/32"), f.added)
	assert.Equal(t, prefixes("198.51.100.7/32"), f.replaced)
	assert.Equal(t, prefixes("192.0.2.0/24", "198.51.100.0/24", "203.0.113.1/32"), live[setKey{"c", policy.IPv4}])
	require.Len(t, b.Adjustments, 2)
	assert.Equal(t, netip.MustParsePrefix("192.0.2.0/24"), b.Adjustments[1].Within)
}
