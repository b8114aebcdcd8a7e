package integration

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/test/hostile"
	"github.com/f2b-shim/f2b-shim/test/nstest"
)

// tables are every table a hostile line might try to reach.
var tables = []string{"filter", "nat", "mangle", "raw", "security"}

// snapshot lists every table of both families.
func snapshot(t *testing.T, ns *nstest.Netns, backend string) string {
	var b strings.Builder
	for _, bin := range []string{"iptables", "ip6tables"} {
		for _, table := range tables {
			b.WriteString("## " + bin + " -t " + table + "\n")
			b.WriteString(ns.MustRun(t, bin+"-"+ipt(backend), "-t", table, "-S"))
		}
	}
	b.WriteString("## ipset\n" + ns.MustRun(t, "ipset", "list"))
	return b.String()
}

// startJail puts a started jail with one ban of each family in place, as
// fail2ban would have before an attacker takes over the mail host.
func startJail(t *testing.T, ns *nstest.Netns, pol string) {
	for _, line := range []string{
		"iptables -w -N " + chain, "iptables -w -A " + chain + " -j RETURN",
		"iptables -w -I INPUT -p tcp -m multiport --dports 143,993 -j " + chain,
		"iptables -w -I " + chain + " 1 -s 203.0.113.99 -j REJECT --reject-with icmp-port-unreachable",
		"ip6tables -w -N " + chain, "ip6tables -w -A " + chain + " -j RETURN",
		"ip6tables -w -I INPUT -p tcp -m multiport --dports 143,993 -j " + chain,
		"ip6tables -w -I " + chain + " 1 -s 2001:db8:99::1 -j DROP",
	} {
		r := ns.Shim(t, shim, pol, line)
		require.Equal(t, 0, r.Code, "%s: %s", line, r.Stderr)
	}
}

// proxyAddrs gives the namespace the proxy's own addresses, which no ban
// may touch.
func proxyAddrs(t *testing.T, ns *nstest.Netns) {
	ns.MustRun(t, "ip", "link", "add", "px0", "type", "veth", "peer", "name", "px1")
	ns.MustRun(t, "ip", "addr", "add", "192.0.2.7/24", "dev", "px0")
	ns.MustRun(t, "ip", "addr", "add", "2001:db8:7::1/64", "dev", "px0", "nodad")
}

// TestHostileCorpus sends every line of test/hostile/corpus.txt, plus
// oversize ones, through the binary as SSH_ORIGINAL_COMMAND.
func TestHostileCorpus(t *testing.T) {
	entries, err := hostile.Load()
	require.NoError(t, err)
	entries = append(entries,
		hostile.Entry{Category: "oversize", Line: "iptables -N " + chain + " " + strings.Repeat("A", 4097)},
		hostile.Entry{Category: "oversize", Line: strings.Repeat("iptables -F INPUT; ", 100<<10/19)},
	)
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			ns, pol, audit := setup(t, backend, "")
			proxyAddrs(t, ns)
			startJail(t, ns, pol)
			before := snapshot(t, ns, backend)
			require.Contains(t, banned(t, ns, backend, "iptables", chain), "203.0.113.99/32")
			logged := len(auditLines(t, audit))
			sent, longest := 0, 0
			for i, e := range entries {
				if strings.ContainsRune(e.Line, 0) {
					continue // execve cannot carry NUL; policy's tests cover these lines
				}
				sent++
				// Each line from its own client: the shim coalesces one
				// client's denials within a second, and this test wants
				// each line in full. Lines aimed at the ssh client itself
				// come from it, a second apart.
				client := fmt.Sprintf("2001:db8:c11e::%x", i+1)
				if strings.Contains(e.Line, "192.0.2.10") {
					client = "192.0.2.10"
					time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(time.Second)))
				}
				r := ns.ShimFrom(t, shim, pol, e.Line, client)
				where := e.Category
				if e.Lineno > 0 {
					where = "corpus.txt:" + itoa(e.Lineno)
				}
				assert.Equal(t, 3, r.Code, "%s %q: %s", where, e.Line, r.Stderr)
				assert.True(t, strings.HasPrefix(r.Stderr, "f2b-shim: denied: ") && strings.Count(r.Stderr, "\n") == 1,
					"%s: stderr must be one denial line, got %q", where, r.Stderr)
				assert.Empty(t, r.Stdout, where)
				lines := auditLines(t, audit)
				if assert.Len(t, lines, logged+1, "%s: one audit line", where) {
					last := lines[logged]
					assert.Equal(t, "deny", last["decision"], where)
					got := loggedCommand(t, last)
					assert.Equal(t, float64(len(e.Line)), last["command_len"], where)
					if len(got) < len(e.Line) {
						sum := sha256.Sum256([]byte(e.Line))
						assert.True(t, strings.HasPrefix(e.Line, got) && len(got) >= 256, "%s: a long command is logged by its start", where)
						assert.Equal(t, hex.EncodeToString(sum[:]), last["command_sha256"], "%s: and its hash", where)
					} else {
						assert.Equal(t, e.Line, got, "%s: the audit line keeps the command's bytes", where)
					}
				}
				logged = len(lines)
				if after := snapshot(t, ns, backend); after != before {
					assert.Equal(t, before, after, "%s %q changed the firewall", where, e.Line)
					before = after
				}
			}
			raw, err := os.ReadFile(audit)
			require.NoError(t, err)
			assert.Equal(t, logged, bytes.Count(raw, []byte("\n")), "every line of the log is one record")
			for _, line := range bytes.Split(raw, []byte("\n")) {
				longest = max(longest, len(line)+1)
			}
			assert.LessOrEqual(t, longest, 4096, "no audit line is longer than 4 KiB")
			t.Logf("%d hostile lines denied, each with one audit line and no firewall change; the longest audit line is %d bytes", sent, longest)
		})
	}
}

// loggedCommand rebuilds the client's bytes from an audit line: the
// escaped text, or command_b64 when the text could not hold them.
func loggedCommand(t *testing.T, rec map[string]any) string {
	if b64, ok := rec["command_b64"].(string); ok {
		raw, err := base64.StdEncoding.DecodeString(b64)
		require.NoError(t, err)
		return string(raw)
	}
	return rec["command"].(string)
}
