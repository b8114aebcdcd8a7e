package policy

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestHookPorts(t *testing.T) {
	withHookPorts := Default()
	withHookPorts.HookPorts = []Port{{Lo: 143, Hi: 143}, {Name: "imaps"}, {Lo: 1, Hi: 65535}}
	onlyMail := Default()
	onlyMail.HookPorts = []Port{{Name: "imap"}, {Name: "imaps"}}
	tests := []struct {
		name string
		pol  *Policy
		line string
		want string // "" for allowed
	}{
		{"a hook on the mail ports is allowed", Default(), "iptables -I INPUT -p tcp -m multiport --dports pop3,pop3s,imap,imaps,sieve -j " + chain, ""},
		{"a hook on every udp port is refused (the resolver's replies come back there)", Default(), "iptables -I INPUT -p udp -j " + chain, "hook_ports"},
		{"a hook on every tcp port is refused", Default(), "ip6tables -I INPUT -p tcp -j " + chain, "every tcp port"},
		{"a range overlapping the local port range is refused", Default(), "iptables -I INPUT -p udp --dport 30000:40000 -j " + chain, "local port range 32768:60999"},
		{"one ephemeral port in a multiport list is refused", Default(), "iptables -I INPUT -p tcp -m multiport --dports 143,50000 -j " + chain, "local port range"},
		{"an unknown service name is refused", Default(), "iptables -I INPUT -p tcp --dport nosuchservice -j " + chain, "/etc/services"},
		{"removing an allports hook still works", Default(), "iptables -D INPUT -p udp -j " + chain, ""},
		{"checking an allports hook still works", Default(), "iptables -C INPUT -p udp -j " + chain, ""},
		{"hook_ports can allow every port", withHookPorts, "iptables -I INPUT -p udp -j " + chain, ""},
		{"hook_ports lists what is allowed", onlyMail, "iptables -I INPUT -p tcp -m multiport --dports 143,993 -j " + chain, ""},
		{"a port outside hook_ports is refused", onlyMail, "iptables -I INPUT -p tcp -m multiport --dports 143,25 -j " + chain, "outside the policy's hook_ports"},
		{"every port is refused when hook_ports does not cover it", onlyMail, "iptables -I INPUT -p tcp -j " + chain, "outside the policy's hook_ports"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Decide(tt.pol, tt.line, testContext())
			if tt.want == "" {
				assert.NoError(t, err)
				return
			}
			var d *Denial
			require.ErrorAs(t, err, &d)
			assert.Contains(t, d.Reason, tt.want)
		})
	}
	t.Run("the proxy's own local port range is used", func(t *testing.T) {
		ctx := testContext()
		ctx.LocalPorts = PortRange{1024, 2000}
		_, err := Decide(Default(), "iptables -I INPUT -p tcp --dport 1500 -j "+chain, ctx)
		assert.ErrorContains(t, err, "1024:2000")
		_, err = Decide(Default(), "iptables -I INPUT -p tcp --dport 40000 -j "+chain, ctx)
		assert.NoError(t, err)
	})
}

func TestHookEffectIgnoresSpelling(t *testing.T) {
	effect := func(line string) string {
		c, err := ParseCommand(line)
		require.NoError(t, err)
		e, err := HookEffect(Operation{Command: c}, testServices)
		require.NoError(t, err)
		return e
	}
	same := effect("iptables -I INPUT -p tcp -m multiport --dports imap,imaps -j " + chain)
	for _, l := range []string{
		"iptables -I INPUT -p tcp -m multiport --dports 143,993 -j " + chain,
		"iptables -D INPUT -p tcp -m multiport --dports 993,imap -j " + chain,
		"iptables -C INPUT -p tcp -m multiport --dports 993,143,143 -j " + chain,
	} {
		assert.Equal(t, same, effect(l), l)
	}
	assert.Equal(t, effect("iptables -I INPUT -p tcp --dport 143 -j "+chain), effect("iptables -I INPUT -p tcp -m multiport --dports imap -j "+chain))
	assert.Equal(t, effect("iptables -I INPUT -p tcp -j "+chain), effect("iptables -I INPUT -p tcp --dport 1:65535 -j "+chain))
	assert.Equal(t, effect("iptables -I INPUT -p tcp -m multiport --dports 10:20,21 -j "+chain), effect("iptables -I INPUT -p tcp --dport 10:21 -j "+chain))
	for _, l := range []string{
		"iptables -I INPUT -p udp -m multiport --dports 143,993 -j " + chain,
		"iptables -I INPUT -p tcp -m multiport --dports 143,995 -j " + chain,
		"iptables -I INPUT -p tcp -m multiport --dports 143,993 -j " + chain + "x",
	} {
		assert.NotEqual(t, same, effect(l), l)
	}
}

func TestNAT64AddressesAreJudgedAsIPv4(t *testing.T) {
	pol := Default()
	pol.NeverBan = []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")}
	pol.NAT64Prefixes = []netip.Prefix{netip.MustParsePrefix("2001:db8:64::/96"), netip.MustParsePrefix("2001:db8:6400::/48")}
	tests := []struct {
		name, source, want string
	}{
		{"a /64 over the well-known prefix is every IPv4 host", "64:ff9b::/64", "whole NAT64 prefix"},
		{"the well-known /96 itself is every IPv4 host", "64:ff9b::/96", "whole NAT64 prefix"},
		{"a /120 there is an IPv4 /24, the widest allowed", "64:ff9b::cb00:7100/120", ""},
		{"a /112 there is an IPv4 /16, too wide", "64:ff9b::cb00:0/112", "IPv4 range 203.0.0.0/16"},
		{"a /120 carrying a never_ban /24 is refused", "64:ff9b::c633:6400/120", "overlaps 198.51.100.0/24, never banned: the policy's never_ban"},
		{"one host carrying a never_ban address is refused", "64:ff9b::c633:6409", "overlaps 198.51.100.0/24"},
		{"the ssh client behind NAT64 is never banned", "64:ff9b::c000:20a", "overlaps 192.0.2.10/32, never banned: the ssh client, the mail host itself"},
		{"loopback behind NAT64 is never banned", "64:ff9b::7f00:1", "overlaps 127.0.0.0/8, never banned: loopback, built in"},
		{"a host in the local-use /48 is judged too", "64:ff9b:1::c633:6409", "198.51.100.0/24"},
		{"the local-use /48 at /64 is every IPv4 host", "64:ff9b:1::/64", "whole NAT64 prefix"},
		{"a /96 in the local-use /48 is every IPv4 host", "64:ff9b:1:abcd::/96", "whole NAT64 prefix"},
		{"a host of a /96 carved from the local-use /48 is allowed", "64:ff9b:1:abcd::cb00:7105", ""},
		{"a policy nat64_prefixes /96 is judged", "2001:db8:64::c633:6400/120", "overlaps 198.51.100.0/24"},
		{"a policy nat64_prefixes /48 uses RFC 6052's layout", "2001:db8:6400:c633:64:900::/96", "overlaps 198.51.100.0/24"},
		{"an ordinary IPv6 /64 is still allowed", "2001:db8:45::/64", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Decide(pol, "ip6tables -I "+chain+" 1 -s "+tt.source+" -j DROP", testContext())
			if tt.want == "" {
				assert.NoError(t, err)
				return
			}
			assert.ErrorContains(t, err, tt.want)
		})
	}
	t.Run("RFC 6052's examples embed 192.0.2.33 at every prefix length", func(t *testing.T) {
		for _, ex := range []struct {
			prefix, addr string
		}{
			{"2001:db8::/32", "2001:db8:c000:221::"},
			{"2001:db8:100::/40", "2001:db8:1c0:2:21::"},
			{"2001:db8:122::/48", "2001:db8:122:c000:2:2100::"},
			{"2001:db8:122:300::/56", "2001:db8:122:3c0:0:221::"},
			{"2001:db8:122:344::/64", "2001:db8:122:344:c0:2:2100:0"},
			{"2001:db8:122:344::/96", "2001:db8:122:344::192.0.2.33"},
		} {
			p := netip.MustParsePrefix(ex.prefix)
			v4, all := nat64Layout{p, p.Bits()}.embeddedV4(netip.PrefixFrom(netip.MustParseAddr(ex.addr), 128))
			require.False(t, all)
			assert.Equal(t, "192.0.2.33/32", v4.String(), ex.prefix)
		}
	})
}

func TestInfrastructureIsNeverBanned(t *testing.T) {
	for _, src := range []string{"192.0.2.53", "192.0.2.1", "192.0.2.0/24"} {
		_, err := decide(t, "iptables -I "+chain+" 1 -s "+src+" -j DROP")
		assert.ErrorContains(t, err, "never banned", src)
	}
}

func TestChainPrefixValidation(t *testing.T) {
	for _, bad := range []string{"FORW", "FORWARD", "INPUT", "PREROUT", "f2b-", "f2b-mail-", "f2b", "DOCKER-mail", "mail-f", "KUBE-mail-", "ufw-user-", "mail-remote-f2b-abcdefghijkl"} {
		_, err := Parse([]byte(fmt.Sprintf("chain_prefix = %q", bad)))
		assert.ErrorContains(t, err, "chain_prefix", bad)
	}
	for _, good := range []string{"mail-remote-f2b-", "mx2-f2b-", "INPUT-mail-f2b-"} {
		_, err := Parse([]byte(fmt.Sprintf("chain_prefix = %q", good)))
		assert.NoError(t, err, good)
	}
	assert.True(t, Nests("mail-remote-f2b-", "mail-remote-f2b-mx2-"))
	assert.True(t, Nests("mail-remote-f2b-", "mail-remote-f2b-"))
	assert.False(t, Nests("mail-remote-f2b-", "mail-remote-mx2-"))
}

func TestNewPolicyKeys(t *testing.T) {
	pol, err := Parse([]byte(`
max_chains = 4
max_hooks_per_chain = 2
hook_ports = ["imap", "993", "1000:2000"]
nat64_prefixes = ["2001:db8:64::/96"]
`))
	require.NoError(t, err)
	assert.Equal(t, 4, pol.MaxChains)
	assert.Equal(t, 2, pol.MaxHooksPerChain)
	assert.Equal(t, []Port{{Name: "imap"}, {Lo: 993, Hi: 993}, {Lo: 1000, Hi: 2000}}, pol.HookPorts)
	assert.Equal(t, []netip.Prefix{netip.MustParsePrefix("2001:db8:64::/96")}, pol.NAT64Prefixes)
	for _, bad := range []string{`max_chains = 0`, `max_hooks_per_chain = 1000`, `hook_ports = ["0"]`, `nat64_prefixes = ["2001:db8::/80"]`, `nat64_prefixes = ["192.0.2.0/24"]`} {
		_, err := Parse([]byte(bad))
		assert.Error(t, err, bad)
	}
}

func TestReasonsQuoteAtMostAShortPrefixOfAWord(t *testing.T) {
	long := strings.Repeat("A", 4000)
	for _, line := range []string{
		"iptables -N " + long,
		"iptables -I INPUT -p tcp --dport " + long + " -j " + chain,
		"iptables -I " + chain + " 1 -s " + long + " -j DROP",
		"iptables -N " + chain + " " + long,
		long,
		"iptables -I " + chain + " 1 -s 203.0.113.1 -j " + long,
		strings.Repeat("é", 2000),
	} {
		_, err := decide(t, line)
		require.Error(t, err)
		assert.LessOrEqual(t, len(err.Error()), 300, "%.40q...", line)
	}
}

// TestParseSavedReadsWhatIptablesPrints lists the forms "iptables -S"
// prints for each rule the grammar makes (seen on iptables 1.8.9, nft
// and legacy, both families); test/integration checks them against the
// real programs.
func TestParseSavedReadsWhatIptablesPrints(t *testing.T) {
	tests := []struct {
		fam         Family
		saved, want string
	}{
		{IPv4, "-A INPUT -p tcp -m tcp --dport 25 -j " + chain, "iptables -w -I INPUT -p tcp --dport 25 -j " + chain},
		{IPv4, "-A INPUT -p udp -m udp --dport 1000:2000 -j " + chain, "iptables -w -I INPUT -p udp --dport 1000:2000 -j " + chain},
		{IPv6, "-A INPUT -p tcp -m multiport --dports 110,995,143,993,4190 -j " + chain, "ip6tables -w -I INPUT -p tcp -m multiport --dports 110,995,143,993,4190 -j " + chain},
		{IPv4, "-A INPUT -p tcp -j " + chain, "iptables -w -I INPUT -p tcp -j " + chain},
		{IPv4, "-A " + chain + " -s 203.0.113.4/32 -j REJECT --reject-with icmp-port-unreachable", "iptables -w -I " + chain + " 1 -s 203.0.113.4/32 -j REJECT --reject-with icmp-port-unreachable"},
		{IPv6, "-A " + chain + " -s 2001:db8::/64 -j DROP", "ip6tables -w -I " + chain + " 1 -s 2001:db8::/64 -j DROP"},
		{IPv4, "-A " + chain + " -j RETURN", "iptables -w -A " + chain + " -j RETURN"},
	}
	for _, tt := range tests {
		c, err := ParseSaved(tt.fam, tt.saved)
		require.NoError(t, err, tt.saved)
		assert.Equal(t, tt.want, Operation{Command: c}.CommandLine())
	}
	for _, bad := range []string{"-N " + chain, "-P INPUT ACCEPT", "-A INPUT -p tcp -m tcp --sport 25 -j " + chain, "-A INPUT -p tcp -m udp --dport 25 -j " + chain, "-A " + chain + " -s 0.0.0.0/0 -j ACCEPT", "", "-A"} {
		_, err := ParseSaved(IPv4, bad)
		assert.Error(t, err, bad)
	}
}

func TestSafeguardKeys(t *testing.T) {
	pol, err := Parse(nil)
	require.NoError(t, err)
	assert.Equal(t, 30*24*time.Hour, pol.MaxBanTime, "30 days by default")
	assert.Equal(t, 10000, pol.MaxNewBansPerMinute)
	assert.Equal(t, 128, pol.BanPrefixV6)
	assert.False(t, pol.DryRun)
	pol, err = Parse([]byte("max_ban_time = \"1d12h\"\nban_prefix_v6 = 64\nban_prefix_v4 = 28\nmax_new_bans_per_minute = 5\ndry_run = true\nmin_prefix_v4 = 24\n"))
	require.NoError(t, err)
	assert.Equal(t, 36*time.Hour, pol.MaxBanTime)
	assert.Equal(t, 64, pol.BanPrefixV6)
	assert.Equal(t, 28, pol.BanPrefixV4)
	assert.True(t, pol.DryRun)
	pol, err = Parse([]byte(`max_ban_time = "0"`))
	require.NoError(t, err)
	assert.Zero(t, pol.MaxBanTime, "0 keeps bans")
	for _, bad := range []string{`max_ban_time = "soon"`, `max_ban_time = "-1h"`, "ban_prefix_v6 = 48", "ban_prefix_v4 = 33", "max_new_bans_per_minute = 0"} {
		_, err := Parse([]byte(bad))
		assert.Error(t, err, bad)
	}
}

func TestBanPrefixWidensOneAddress(t *testing.T) {
	pol := Default()
	pol.BanPrefixV6 = 64
	op, err := Decide(pol, "ip6tables -I "+chain+" 1 -s 2001:db8:1:2::10 -j DROP", testContext())
	require.NoError(t, err)
	assert.Equal(t, "2001:db8:1:2::/64", op.Source.String())
	assert.Equal(t, "2001:db8:1:2::10/128", op.Member.String())
	op, err = Decide(pol, "ip6tables -I "+chain+" 1 -s 2001:db8:1:3::/64 -j DROP", testContext())
	require.NoError(t, err)
	assert.False(t, op.Member.IsValid(), "a prefix is banned as it is")
	_, err = Decide(pol, "ip6tables -I "+chain+" 1 -s 2001:db8:7::99 -j DROP", testContext())
	assert.ErrorContains(t, err, "widened", "the /64 holds the proxy's own address")
	op, err = Decide(pol, "iptables -I "+chain+" 1 -s 203.0.113.9 -j DROP", testContext())
	require.NoError(t, err)
	assert.False(t, op.Member.IsValid(), "IPv4 is not widened unless ban_prefix_v4 says so")
}

func TestMessagesSayWhatToDo(t *testing.T) {
	_, err := decide(t, "iptables -N mail-remote-f2b-roundcube-auth")
	assert.ErrorContains(t, err, "set a shorter name= in the jail's action", "a jail name too long for iptables' 28 characters")
	_, err = decide(t, "iptables -I "+chain+" 1 -s 203.0.113.1 -j REJECT --reject-with port-unreach")
	require.Error(t, err)
	assert.NotContains(t, err.Error(), "not a iptables", "the policy, not iptables, refuses it")
	assert.Contains(t, err.Error(), "f2b-shim knows")
}
