package policy

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/test/hostile"
)

// decide is parse + authorize under the default policy, as the shim does.
func decide(t testing.TB, line string) (Operation, error) {
	t.Helper()
	return Decide(Default(), line, testContext())
}

// testContext is a proxy at 192.0.2.7 and 2001:db8:7::1, reached from
// the mail host 192.0.2.10, with resolver 192.0.2.53 and gateway
// 192.0.2.1, and a few /etc/services names.
func testContext() Context {
	return Context{
		Client:         netip.MustParseAddr("192.0.2.10"),
		LocalAddrs:     []netip.Addr{netip.MustParseAddr("192.0.2.7"), netip.MustParseAddr("2001:db8:7::1")},
		Infrastructure: []netip.Addr{netip.MustParseAddr("192.0.2.53"), netip.MustParseAddr("192.0.2.1")},
		LocalPorts:     PortRange{32768, 60999},
		LookupPort:     testServices,
	}
}

func testServices(proto, name string) (uint16, bool) {
	n, ok := map[string]uint16{"smtp": 25, "pop3": 110, "imap": 143, "imaps": 993, "pop3s": 995, "sieve": 4190, "submission": 587}[name]
	return n, ok
}

const chain = "mail-remote-f2b-imap"

func TestAcceptedForms(t *testing.T) {
	tests := []struct {
		name string
		line string
		kind Kind
		// canon is the expected canonical command line.
		canon string
	}{
		{"create chain", "iptables -w -N " + chain, CreateChain, "iptables -w -N " + chain},
		{"create chain without -w", "iptables -N " + chain, CreateChain, "iptables -w -N " + chain},
		{"create chain with -w 5", "iptables -w 5 -N " + chain, CreateChain, "iptables -w -N " + chain},
		{"create chain with --wait", "iptables --wait -N " + chain, CreateChain, "iptables -w -N " + chain},
		{"create chain with --wait 10", "iptables --wait 10 -N " + chain, CreateChain, "iptables -w -N " + chain},
		{"create chain with --wait=3", "iptables --wait=3 -N " + chain, CreateChain, "iptables -w -N " + chain},
		{"create v6 chain", "ip6tables -w -N " + chain, CreateChain, "ip6tables -w -N " + chain},
		{"flush chain", "iptables -w -F " + chain, FlushChain, "iptables -w -F " + chain},
		{"delete chain v6", "ip6tables -X " + chain, DeleteChain, "ip6tables -w -X " + chain},
		{"add return", "iptables -w -A " + chain + " -j RETURN", AddReturn, "iptables -w -A " + chain + " -j RETURN"},
		{"check return v6", "ip6tables -w -C " + chain + " -j RETURN", CheckReturn, "ip6tables -w -C " + chain + " -j RETURN"},
		{"hook multiport", "iptables -w -I INPUT -p tcp -m multiport --dports pop3,pop3s,imap,imaps,sieve -j " + chain, AddHook,
			"iptables -w -I INPUT -p tcp -m multiport --dports pop3,pop3s,imap,imaps,sieve -j " + chain},
		{"hook multiport with numbers and a range", "iptables -I INPUT -p tcp -m multiport --dports 110,143,993:995 -j " + chain, AddHook,
			"iptables -w -I INPUT -p tcp -m multiport --dports 110,143,993:995 -j " + chain},
		{"hook oneport", "iptables -w -I INPUT -p tcp --dport imap -j " + chain, AddHook, "iptables -w -I INPUT -p tcp --dport imap -j " + chain},
		{"check an allports hook", "iptables -w -C INPUT -p udp -j " + chain, CheckHook, "iptables -w -C INPUT -p udp -j " + chain},
		{"unhook v6", "ip6tables -w -D INPUT -p tcp -m multiport --dports 143,993 -j " + chain, DeleteHook,
			"ip6tables -w -D INPUT -p tcp -m multiport --dports 143,993 -j " + chain},
		{"check hook", "iptables -w -C INPUT -p tcp --dport 143 -j " + chain, CheckHook, "iptables -w -C INPUT -p tcp --dport 143 -j " + chain},
		{"ban with position", "iptables -w -I " + chain + " 1 -s 203.0.113.45 -j REJECT --reject-with icmp-port-unreachable", AddBan,
			"iptables -w -I " + chain + " 1 -s 203.0.113.45/32 -j REJECT --reject-with icmp-port-unreachable"},
		{"ban without position, bare REJECT", "iptables -I " + chain + " -s 203.0.113.45 -j REJECT", AddBan,
			"iptables -w -I " + chain + " 1 -s 203.0.113.45/32 -j REJECT --reject-with icmp-port-unreachable"},
		{"ban a /24 with DROP", "iptables -w -I " + chain + " 1 -s 198.51.100.0/24 -j DROP", AddBan,
			"iptables -w -I " + chain + " 1 -s 198.51.100.0/24 -j DROP"},
		{"ban v6", "ip6tables -w -I " + chain + " 1 -s 2001:db8:45::1 -j REJECT --reject-with icmp6-port-unreachable", AddBan,
			"ip6tables -w -I " + chain + " 1 -s 2001:db8:45::1/128 -j REJECT --reject-with icmp6-port-unreachable"},
		{"ban v6 bare REJECT gets the v6 default", "ip6tables -I " + chain + " 1 -s 2001:db8:45::/64 -j REJECT", AddBan,
			"ip6tables -w -I " + chain + " 1 -s 2001:db8:45::/64 -j REJECT --reject-with icmp6-port-unreachable"},
		{"ban an IPv4-mapped address as IPv4", "iptables -w -I " + chain + " 1 -s ::ffff:203.0.113.45 -j DROP", AddBan,
			"iptables -w -I " + chain + " 1 -s 203.0.113.45/32 -j DROP"},
		{"ban a non-canonical CIDR is masked", "iptables -w -I " + chain + " 1 -s 203.0.113.45/24 -j DROP", AddBan,
			"iptables -w -I " + chain + " 1 -s 203.0.113.0/24 -j DROP"},
		{"unban", "iptables -w -D " + chain + " -s 203.0.113.45 -j REJECT --reject-with icmp-host-prohibited", DeleteBan,
			"iptables -w -D " + chain + " -s 203.0.113.45/32 -j REJECT --reject-with icmp-host-prohibited"},
		{"check ban v6", "ip6tables -w -C " + chain + " -s 2001:db8:45::1 -j DROP", CheckBan,
			"ip6tables -w -C " + chain + " -s 2001:db8:45::1/128 -j DROP"},
		{"0.11 actioncheck", "iptables -w -n -L INPUT | grep -q '" + chain + `[ \t]'`, CheckHookListed,
			"iptables -w -n -L INPUT | grep -q '" + chain + `[ \t]'`},
		{"0.11 actioncheck, -L first", "ip6tables -L INPUT -n | grep -q '" + chain + `[ \t]'`, CheckHookListed,
			"ip6tables -w -n -L INPUT | grep -q '" + chain + `[ \t]'`},
		{"quoted words are still words", `'iptables' "-N" ` + chain, CreateChain, "iptables -w -N " + chain},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			op, err := decide(t, tt.line)
			require.NoError(t, err)
			assert.Equal(t, tt.kind, op.Kind)
			assert.Equal(t, tt.canon, op.CommandLine())
			again, err := decide(t, op.CommandLine())
			require.NoError(t, err, "the canonical form must parse again")
			assert.Equal(t, op, again)
		})
	}
}

func TestDeniedForms(t *testing.T) {
	long := "iptables -N " + chain + " " + strings.Repeat("x", MaxCommandLen)
	tests := []struct {
		name string
		line string
		// want is a part of the reason that names what is wrong.
		want string
	}{
		// The input itself.
		{"empty command is refused", "", "empty"},
		{"oversize input is refused", long, "bytes long"},
		{"invalid UTF-8 is refused", "iptables -N " + chain + "\xff", "UTF-8"},
		{"NUL is refused", "iptables -N " + chain + "\x00", "control character"},
		{"newline is refused", "iptables -N " + chain + "\nid", "control character"},
		{"carriage return is refused", "iptables -N " + chain + "\r", "control character"},
		{"tab is refused", "iptables\t-N " + chain, "control character"},
		{"escape is refused", "iptables -N " + chain + "\x1b[2J", "control character"},
		{"C1 control is refused", "iptables -N " + chain + "\u009b", "control character"},
		{"a comment is refused, not truncated", "iptables -N " + chain + " #; rm -rf /", `"#"`},
		{"an unterminated quote is refused", "iptables -N '" + chain, "split"},
		// Other programs.
		{"a shell is refused", "sh -c 'iptables -F INPUT'", `program "sh"`},
		{"id is refused", "id", `program "id"`},
		{"a path to iptables is refused", "/usr/sbin/iptables -N " + chain, `program "/usr/sbin/iptables"`},
		{"sudo is refused", "sudo iptables -N " + chain, `program "sudo"`},
		{"an environment prefix is refused", "XTABLES_LOCKFILE=/tmp/x iptables -N " + chain, "program"},
		{"env is refused", "env iptables -N " + chain, `program "env"`},
		{"exec is refused", "exec iptables -N " + chain, `program "exec"`},
		{"a homoglyph binary is refused", "iptаbles -N " + chain, "program"},
		{"iptables-restore is refused", "iptables-restore", "program"},
		{"scp is refused", "scp -t /root", `program "scp"`},
		// Chaining and substitution.
		{"a semicolon is refused", "iptables -N " + chain + " ; id", `";"`},
		{"a glued semicolon is refused", "iptables -N " + chain + ";id", "may only hold"},
		{"&& is refused", "iptables -N " + chain + " && id", `"&&"`},
		{"|| is refused", "iptables -N " + chain + " || id", `"||"`},
		{"a pipe is refused", "iptables -N " + chain + " | sh", `"|"`},
		{"a background & is refused", "iptables -N " + chain + " &", `"&"`},
		{"command substitution is refused", "iptables -N $(id)", "may only hold"},
		{"backticks are refused", "iptables -N `id`", "may only hold"},
		{"a redirection is refused", "iptables -N " + chain + " > /etc/passwd", `">"`},
		// Other tables, chains and commands.
		{"-t nat is refused", "iptables -t nat -N " + chain, `"-t"`},
		{"a policy change is refused", "iptables -P INPUT ACCEPT", `"-P"`},
		{"renaming is refused", "iptables -E " + chain + " INPUT", `"-E"`},
		{"replace is refused", "iptables -R " + chain + " 1 -s 203.0.113.1 -j ACCEPT", `"-R"`},
		{"zeroing is refused", "iptables -Z", `"-Z"`},
		{"flush of everything is refused", "iptables -F", "ends"},
		{"flush of INPUT is refused", "iptables -F INPUT", "outside the allowed prefix"},
		{"delete of every chain is refused", "iptables -w -X", "ends"},
		{"--modprobe is refused", "iptables --modprobe=/tmp/x -N " + chain, `"--modprobe=/tmp/x"`},
		{"-S listing is refused", "iptables -S", `"-S"`},
		{"a bare -L listing is refused", "iptables -n -L INPUT", "ends"},
		{"a chain outside the prefix is refused", "iptables -N f2b-imap", "outside the allowed prefix"},
		{"the bare prefix is refused", "iptables -N mail-remote-f2b-", "outside the allowed prefix"},
		{"a chain over 28 characters is refused", "iptables -N mail-remote-f2b-0123456789abcdef", "1 to 28"},
		{"append to INPUT is refused", "iptables -A INPUT -j RETURN", "outside the allowed prefix"},
		// Jump targets.
		{"ACCEPT is refused", "iptables -I " + chain + " 1 -s 203.0.113.1 -j ACCEPT", `target "ACCEPT"`},
		{"LOG is refused", "iptables -I " + chain + " 1 -s 203.0.113.1 -j LOG", `target "LOG"`},
		{"a jump to another chain from a ban is refused", "iptables -I " + chain + " 1 -s 203.0.113.1 -j INPUT", `target "INPUT"`},
		{"a jump between own chains is refused", "iptables -I mail-remote-f2b-a -p tcp -j mail-remote-f2b-b", "not a parent chain"},
		{"a hook to a chain outside the prefix is refused", "iptables -I INPUT -p tcp -j ACCEPT", "outside the allowed prefix"},
		{"a hook into FORWARD is refused", "iptables -I FORWARD -p tcp -j " + chain, "not a parent chain"},
		{"a RETURN ban is refused", "iptables -I " + chain + " 1 -s 203.0.113.1 -j RETURN", `target "RETURN"`},
		{"a reject type of the other family is refused", "iptables -I " + chain + " 1 -s 203.0.113.1 -j REJECT --reject-with icmp6-port-unreachable", "reject type"},
		{"tcp-reset is refused", "iptables -I " + chain + " 1 -s 203.0.113.1 -j REJECT --reject-with tcp-reset", "reject type"},
		{"a reject alias is refused", "iptables -I " + chain + " 1 -s 203.0.113.1 -j REJECT --reject-with port-unreach", "reject type"},
		// Extra matches and options.
		{"-m comment is refused", "iptables -I " + chain + " 1 -s 203.0.113.1 -m comment --comment x -j DROP", `"-m"`},
		{"-d is refused", "iptables -I " + chain + " 1 -s 203.0.113.1 -d 192.0.2.7 -j DROP", `"-d"`},
		{"-i is refused", "iptables -I INPUT -i lo -p tcp -j " + chain, `"-i"`},
		{"negation is refused", "iptables -I " + chain + " 1 ! -s 203.0.113.1 -j DROP", `"!"`},
		{"negated protocol is refused", "iptables -I INPUT -p ! tcp -j " + chain, "protocol"},
		{"a protocol outside the policy is refused", "iptables -I INPUT -p icmp -j " + chain, `protocol "icmp"`},
		{"a match other than multiport is refused", "iptables -I INPUT -p tcp -m state --state NEW -j " + chain, `"state"`},
		{"16 ports are refused", "iptables -I INPUT -p tcp -m multiport --dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16 -j " + chain, "more than 15"},
		{"port 0 is refused", "iptables -I INPUT -p tcp --dport 0 -j " + chain, "1 to 65535"},
		{"a port over 65535 is refused", "iptables -I INPUT -p tcp --dport 65536 -j " + chain, "1 to 65535"},
		{"a reversed range is refused", "iptables -I INPUT -p tcp --dport 995:993 -j " + chain, "low:high"},
		{"trailing words are refused", "iptables -N " + chain + " extra", `"extra"`},
		{"-w with a non-number is refused", "iptables --wait=x -N " + chain, "wait value"},
		{"-w after the command is refused", "iptables -N " + chain + " -w", `"-w"`},
		// Rule positions.
		{"position 2 is refused", "iptables -I " + chain + " 2 -s 203.0.113.1 -j DROP", `"2"`},
		{"position 0 is refused", "iptables -I " + chain + " 0 -s 203.0.113.1 -j DROP", `"0"`},
		{"a position on -D is refused", "iptables -D " + chain + " 1", `"1"`},
		{"a hook position is refused", "iptables -I INPUT 1 -p tcp -j " + chain, `"-p"`},
		// Addresses.
		{"/0 is refused", "iptables -I " + chain + " 1 -s 0.0.0.0/0 -j DROP", "wider"},
		{"a /16 is refused", "iptables -I " + chain + " 1 -s 203.0.0.0/16 -j DROP", "wider"},
		{"a v6 /48 is refused", "ip6tables -I " + chain + " 1 -s 2001:db8::/48 -j DROP", "wider"},
		{"::/0 is refused", "ip6tables -I " + chain + " 1 -s ::/0 -j DROP", "wider"},
		{"loopback is refused", "iptables -I " + chain + " 1 -s 127.0.0.1 -j DROP", "never banned: loopback, built in"},
		{"v6 loopback is refused", "ip6tables -I " + chain + " 1 -s ::1 -j DROP", "never banned: loopback, built in"},
		{"link-local is refused", "ip6tables -I " + chain + " 1 -s fe80::1 -j DROP", "never banned: link-local, built in"},
		{"multicast is refused", "iptables -I " + chain + " 1 -s 224.0.0.1 -j DROP", "never banned: multicast, built in"},
		{"the ssh client itself is refused", "iptables -I " + chain + " 1 -s 192.0.2.10 -j DROP", "never banned: the ssh client, the mail host itself"},
		{"a /24 around the ssh client is refused", "iptables -I " + chain + " 1 -s 192.0.2.0/24 -j DROP", "never banned: the ssh client"},
		{"the proxy's own v4 address is refused, naming the PROXY protocol", "iptables -I " + chain + " 1 -s 192.0.2.7 -j DROP", "overlaps 192.0.2.7/32, which is never banned: an address of this proxy"},
		{"the proxy's nameserver is refused", "iptables -I " + chain + " 1 -s 192.0.2.53 -j DROP", "never banned: a nameserver or default gateway of this proxy"},
		{"the proxy's gateway is refused", "iptables -I " + chain + " 1 -s 192.0.2.1 -j DROP", "never banned: a nameserver or default gateway of this proxy"},
		{"the proxy's own v6 address is refused", "ip6tables -I " + chain + " 1 -s 2001:db8:7::1 -j DROP", "never banned: an address of this proxy; a mail server that logs it instead of the client's address needs the PROXY protocol"},
		{"a hostname is refused", "iptables -I " + chain + " 1 -s evil.example -j DROP", "not an IP"},
		{"a comma list is refused", "iptables -I " + chain + " 1 -s 203.0.113.1,0.0.0.0/0 -j DROP", "not an IP"},
		{"octal is refused", "iptables -I " + chain + " 1 -s 0310.0.0.1 -j DROP", "not an IP"},
		{"hex is refused", "iptables -I " + chain + " 1 -s 0xcb007101 -j DROP", "not an IP"},
		{"an integer is refused", "iptables -I " + chain + " 1 -s 3405803777 -j DROP", "not an IP"},
		{"shorthand is refused", "iptables -I " + chain + " 1 -s 203.113 -j DROP", "not an IP"},
		{"a zone is refused", "ip6tables -I " + chain + " 1 -s 2001:db8::1%eth0 -j DROP", "zone"},
		{"a mapped loopback is refused", "iptables -I " + chain + " 1 -s ::ffff:127.0.0.1 -j DROP", "never banned: loopback, built in"},
		{"a mapped address through ip6tables is refused", "ip6tables -I " + chain + " 1 -s ::ffff:203.0.113.1 -j DROP", "use iptables"},
		{"a v6 address through iptables is refused", "iptables -I " + chain + " 1 -s 2001:db8::1 -j DROP", "use ip6tables"},
		{"a v4 address through ip6tables is refused", "ip6tables -I " + chain + " 1 -s 203.0.113.1 -j DROP", "use iptables"},
		{"a leading-zero prefix length is refused", "iptables -I " + chain + " 1 -s 203.0.113.0/024 -j DROP", "not an IP"},
		// The check pipeline misused.
		{"a check piped to sh is refused", "iptables -n -L INPUT | sh", `"sh"`},
		{"grep -f is refused", "iptables -n -L INPUT | grep -f /etc/shadow", `"-f"`},
		{"grep -r is refused", "iptables -n -L INPUT | grep -r x /etc", `"-r"`},
		{"a trailing word after grep is refused", "iptables -n -L INPUT | grep -q '" + chain + `[ \t]' /etc/shadow`, `"/etc/shadow"`},
		{"a grep for another chain is refused", "iptables -n -L INPUT | grep -q 'INPUT[ \\t]'", "outside the allowed prefix"},
		{"a grep pattern that is a regex is refused", "iptables -n -L INPUT | grep -q '.*'", "grep pattern"},
		{"listing a chain that is not a parent is refused", "iptables -n -L FORWARD | grep -q '" + chain + `[ \t]'`, "not a parent"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := decide(t, tt.line)
			require.Error(t, err)
			var d *Denial
			require.ErrorAs(t, err, &d)
			assert.Contains(t, d.Reason, tt.want)
			assert.NotContains(t, d.Reason, "\n", "a reason is one line")
		})
	}
}

func TestPolicyNarrowsTheGrammar(t *testing.T) {
	pol := Default()
	pol.Targets = []string{"DROP"}
	pol.MinPrefixV4 = 32
	pol.NeverBan = []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")}
	pol.RejectWith = []string{"icmp-port-unreachable"}
	tests := []struct {
		name, line, want string
	}{
		{"a target the policy leaves out is refused", "iptables -I " + chain + " 1 -s 203.0.113.1 -j REJECT", `target "REJECT"`},
		{"a prefix under the policy's minimum is refused", "iptables -I " + chain + " 1 -s 203.0.113.0/31 -j DROP", "wider"},
		{"an address in never_ban is refused", "iptables -I " + chain + " 1 -s 198.51.100.9 -j DROP", "never banned: the policy's never_ban"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := ParseCommand(tt.line)
			require.NoError(t, err)
			_, err = Authorize(pol, c, Context{})
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
	t.Run("an address outside never_ban is allowed", func(t *testing.T) {
		c, err := ParseCommand("iptables -I " + chain + " 1 -s 198.51.101.9 -j DROP")
		require.NoError(t, err)
		_, err = Authorize(pol, c, Context{})
		assert.NoError(t, err)
	})
}

func BenchmarkParseAndAuthorize(b *testing.B) {
	lines := map[string]string{
		"ban":   "iptables -w -I " + chain + " 1 -s 203.0.113.45 -j REJECT --reject-with icmp-port-unreachable",
		"hook":  "iptables -w -I INPUT -p tcp -m multiport --dports pop3,pop3s,imap,imaps,sieve -j " + chain,
		"deny":  "iptables -w -I " + chain + " 1 -s 192.0.2.10 -j DROP",
		"check": "iptables -w -n -L INPUT | grep -q '" + chain + `[ \t]'`,
	}
	for name, line := range lines {
		b.Run(name, func(b *testing.B) {
			for b.Loop() {
				_, _ = decide(b, line)
			}
		})
	}
}

// TestWireFormsOfTheExampleActions checks the exact lines that the shipped
// action files make ssh send, after the mail host's shell has removed its
// own quoting (fail2ban runs actions with sh -c).
func TestWireFormsOfTheExampleActions(t *testing.T) {
	for _, line := range []string{
		// The actioncheck of the 0.11 action file that earlier versions
		// shipped (still in use on upgraded mail hosts): the pipeline is
		// quoted locally with double quotes, so ssh sends it whole.
		"iptables -w -n -L INPUT | grep -q 'mail-remote-f2b-dovecot[ \\t]'",
		"ip6tables -w -n -L INPUT | grep -q 'mail-remote-f2b-dovecot[ \\t]'",
		// proxy-iptables.conf's actionstart hook for one protocol.
		"iptables -w -I INPUT -p tcp -m multiport --dports pop3,pop3s,imap,imaps,sieve -j mail-remote-f2b-dovecot",
	} {
		_, err := decide(t, line)
		assert.NoError(t, err, line)
	}
}

// TestHostileCorpusIsDenied runs every line of test/hostile/corpus.txt
// through parse + authorize; the namespace test runs them through the
// binary as well.
func TestHostileCorpusIsDenied(t *testing.T) {
	entries, err := hostile.Load()
	require.NoError(t, err)
	require.GreaterOrEqual(t, len(entries), 200)
	for _, e := range entries {
		_, err := decide(t, e.Line)
		var d *Denial
		if assert.ErrorAs(t, err, &d, "corpus.txt:%d %q (%s) was allowed", e.Lineno, e.Line, e.Category) {
			assert.NotContains(t, d.Reason, "\n")
		}
	}
}
