package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/test/nstest"
)

// TestPurgeDeletesOnlyTheShimsTable runs the postrm's prune_tables with sh
// (dash on Debian) and the system's awk over a table the shim made and
// over copies of it with one thing added that the shim never writes.
// Purge deletes the first and keeps every other. It deleted a table whose
// comment, or a set's, held a "{" (the brace moved the awk script's
// depth, so nothing after it was looked at), a set of the shim's name
// with another type, a ban chain that was a base chain, a base chain
// "input" with policy drop, and a hook's jump with a statement its list
// of words did not name.
func TestPurgeDeletesOnlyTheShimsTable(t *testing.T) {
	nstest.RequireRoot(t, "nft", "sh", "awk")
	postrm, err := os.ReadFile("../../packaging/f2b-shim.postrm")
	require.NoError(t, err)
	fn := regexp.MustCompile(`(?ms)^prune_tables\(\) \{$.*?^\}$`).Find(postrm)
	require.NotNil(t, fn, "prune_tables is not in the postrm")

	dir := t.TempDir()
	pol := nstest.WritePolicy(t, dir, fmt.Sprintf("name = \"it-purge\"\naudit_log = %q\nstate_dir = %q\nbackend = \"nftables\"\n",
		filepath.Join(dir, "audit.jsonl"), filepath.Join(dir, "state")))
	ns := nstest.NewNetns(t)
	// One target per chain and family: jailStart's REJECT ban, not its DROP.
	runAll(t, ns, pol, jailStart[:4]...)
	runAll(t, ns, pol, jailStart[5:]...)
	runAll(t, ns, pol,
		"iptables -w -I "+chain+" 1 -s 198.51.100.0/24 -j REJECT --reject-with icmp-port-unreachable",
		"iptables -w -I INPUT -p tcp --dport 1000:1010 -j "+chain,
		"iptables -w -N mail-remote-f2b-b", "iptables -w -I INPUT -p udp --dport 53 -j mail-remote-f2b-b",
		"iptables -w -I mail-remote-f2b-b 1 -s 203.0.113.9 -j DROP",
		"ip6tables -w -N mail-remote-f2b-b", "ip6tables -w -I INPUT -p udp --dport 53 -j mail-remote-f2b-b",
		"ip6tables -w -I mail-remote-f2b-b 1 -s 2001:db8:9::/64 -j REJECT --reject-with icmp6-port-unreachable")
	// The table as nft lists it, loadable again under another name.
	listed := ns.MustRun(t, "nft", "list", "table", "inet", "f2b_shim")
	shims := regexp.MustCompile(` expires [0-9a-z]+`).ReplaceAllString(listed, "")
	shims = strings.Replace(shims, "table inet f2b_shim {", "table inet tt {", 1)
	end := strings.LastIndex(shims, "}")
	require.Positive(t, end)
	with := func(extra string) string { return shims[:end] + extra + "}\n" }
	prune := func(t *testing.T) string {
		cmd := ns.Command("sh", "-c", string(fn)+"\nprune_tables mail-remote-f2b- tt")
		cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
		r := nstest.RunCmd(t, cmd)
		require.Equal(t, 0, r.Code, r.Stderr)
		return r.Stdout
	}
	load := func(t *testing.T, table string) {
		_, _ = ns.Run("nft", "delete", "table", "inet", "tt")
		cmd := ns.Command("nft", "-f", "-")
		cmd.Stdin = strings.NewReader(table)
		r := nstest.RunCmd(t, cmd)
		require.Equal(t, 0, r.Code, "%s\n%s", r.Stderr, table)
	}

	t.Run("the shim's table, both families, hooks with ports, DROP and REJECT, is deleted", func(t *testing.T) {
		load(t, shims)
		assert.Contains(t, prune(t), "removed the nftables table inet tt")
		_, err := ns.Run("nft", "list", "table", "inet", "tt")
		assert.Error(t, err, "the table is still there")
	})
	acceptChain := "\tchain mail-remote-f2b-x {\n\t\ttcp dport 22 accept\n\t}\n"
	for _, c := range []struct{ name, table string }{
		{"a table comment with a brace before an accept rule is kept", strings.Replace(with(acceptChain), "table inet tt {\n", "table inet tt {\n\tcomment \"{\"\n", 1)},
		{"a set comment with a brace before an accept rule is kept", with("\tset mail-remote-f2b-c-v4 {\n\t\ttype ipv4_addr\n\t\tcomment \"{\"\n\t}\n" + acceptChain)},
		{"a set of the shim's name with another type is kept", with("\tset mail-remote-f2b-c-v4 {\n\t\ttype inet_service\n\t\telements = { 22 }\n\t}\n")},
		{"a set of the shim's name with a concatenated type is kept", with("\tset mail-remote-f2b-c-v6 {\n\t\ttype ipv6_addr . inet_service\n\t}\n")},
		{"a map of the shim's name is kept", with("\tmap mail-remote-f2b-c-v4 {\n\t\ttype ipv4_addr : verdict\n\t}\n")},
		{"a counter of the shim's name is kept", with("\tcounter mail-remote-f2b-c-v4 {\n\t}\n")},
		{"an accept in a chain of the shim's name is kept", with(acceptChain)},
		{"a ban verdict with a counter is kept", with("\tchain mail-remote-f2b-x {\n\t\tip saddr @mail-remote-f2b-b-v4 counter drop\n\t}\n")},
		{"a chain of the shim's name that is a base chain is kept", with("\tchain mail-remote-f2b-x {\n\t\ttype filter hook output priority filter; policy drop;\n\t}\n")},
		{"a hook's jump that also sets nftrace is kept", strings.Replace(shims, "udp dport 53 jump", "udp dport 53 meta nftrace set 1 jump", 1)},
		{"a base chain input with policy drop is kept", strings.Replace(shims, "policy accept;", "policy drop;", 1)},
		{"an input at another priority, beside a chain of the shim's name at the shim's, is kept",
			strings.Replace(with("\tchain mail-remote-f2b-x {\n\t\ttype filter hook input priority filter - 1; policy accept;\n\t}\n"),
				"chain input {\n\t\ttype filter hook input priority filter - 1; policy accept;", "chain input {\n\t\ttype filter hook input priority filter; policy drop;", 1)},
	} {
		t.Run(c.name, func(t *testing.T) {
			load(t, c.table)
			out := prune(t)
			assert.Contains(t, out, "the nftables table inet tt holds what is not the shim's")
			_, err := ns.Run("nft", "list", "table", "inet", "tt")
			assert.NoError(t, err, "purge deleted a table that is not only the shim's:\n%s", out)
		})
	}
}
