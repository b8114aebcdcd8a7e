package hostnet

import (
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/policy"
)

// The parsers behind the never-ban list and the hook port check, on the
// files as Linux and resolvconf write them.
func TestParsers(t *testing.T) {
	t.Run("resolv.conf nameservers, comments and options left out", func(t *testing.T) {
		got := Nameservers([]byte("# generated\nsearch example.net\nnameserver 198.51.100.53\nnameserver fe80::1%eth0\noptions edns0\nnameserver not-an-address\n nameserver 2001:db8::53\n"))
		assert.Equal(t, []netip.Addr{netip.MustParseAddr("198.51.100.53"), netip.MustParseAddr("fe80::1"), netip.MustParseAddr("2001:db8::53")}, got)
	})
	t.Run("IPv4 default gateways from /proc/net/route", func(t *testing.T) {
		route := "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n" +
			"eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n" +
			"eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n" +
			"eth1\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0\n"
		assert.Equal(t, []netip.Addr{netip.MustParseAddr("192.0.2.1")}, GatewaysV4([]byte(route)), "a default route via 192.0.2.1; a direct one has no gateway")
	})
	t.Run("IPv6 default gateways from /proc/net/ipv6_route", func(t *testing.T) {
		route := "20010db8000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n" +
			"00000000000000000000000000000000 00 00000000000000000000000000000000 00 20010db8000000000000000000000001 00000400 00000002 00000000 00000003     eth0\n" +
			"00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n"
		assert.Equal(t, []netip.Addr{netip.MustParseAddr("2001:db8::1")}, GatewaysV6([]byte(route)))
	})
	t.Run("ip_local_port_range", func(t *testing.T) {
		got, err := ParsePortRange([]byte("32768\t60999\n"))
		require.NoError(t, err)
		assert.Equal(t, policy.PortRange{Lo: 32768, Hi: 60999}, got)
		for _, bad := range []string{"", "1", "60999 32768", "0 100", "a b", "1 70000"} {
			_, err := ParsePortRange([]byte(bad))
			assert.Error(t, err, bad)
		}
	})
}
