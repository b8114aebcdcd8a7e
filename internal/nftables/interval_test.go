package nftables

import (
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
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
