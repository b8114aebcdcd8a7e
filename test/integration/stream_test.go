package integration

import (
	"bufio"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/test/hostile"
	"github.com/f2b-shim/f2b-shim/test/nstest"
)

// banLines are n ban requests for distinct addresses (firewall rules
// only: no packet is ever sent to them).
func banLines(fam string, n int) []string {
	lines := make([]string, n)
	for i := range n {
		if fam == "ip6tables" {
			lines[i] = fmt.Sprintf("ip6tables -w -I %s 1 -s 2001:db8:%x:%x::1 -j DROP", chain, i>>16, i&0xffff)
		} else {
			lines[i] = fmt.Sprintf("iptables -w -I %s 1 -s 10.%d.%d.%d -j DROP", chain, i>>16&255, i>>8&255, i&255)
		}
	}
	return lines
}

// startedJail is setup with fail2ban's jail started on the proxy.
func startedJail(t *testing.T, backend, extra string) (*nstest.Netns, string, string) {
	ns, pol, audit := setup(t, backend, extra)
	runAll(t, ns, pol, jailStart...)
	return ns, pol, audit
}

// TestStreamTenThousandBans sends 10,000 bans in one stream session: all
// land, each has its reply and its audit line, and the time is logged
// (scripts/bench measures it; no test asserts a time).
func TestStreamTenThousandBans(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			ns, pol, audit := startedJail(t, backend, "max_new_bans_per_minute = 20000\n")
			lines := banLines("iptables", 10000)
			start := time.Now()
			r := ns.Stream(t, shim, pol, strings.Join(lines, "\n")+"\n")
			took := time.Since(start)
			require.Equal(t, 0, r.Code, r.Stderr)
			replies := strings.Split(strings.TrimSuffix(r.Stdout, "\n"), "\n")
			require.Len(t, replies, len(lines))
			for i, rep := range replies {
				require.Equal(t, fmt.Sprintf("%d 0 applied", i+1), rep)
			}
			t.Logf("%s: 10,000 bans through one stream in %s (%.0f bans/s)", backend, took.Round(time.Millisecond), 10000/took.Seconds())
			assert.Len(t, banned(t, ns, backend, "iptables", chain), 10000+2)
			allowed, sessions := 0, map[any]bool{}
			for _, rec := range auditLines(t, audit) {
				if rec["session"] != nil && rec["decision"] == "allow" && rec["result"] == "applied" {
					allowed++
					sessions[rec["session"]] = true
				}
			}
			assert.Equal(t, 10000, allowed, "one allow line per ban")
			assert.Len(t, sessions, 1)
		})
	}
}

// TestHostileLinesInAStream sends the hostile corpus, with its NUL bytes
// and oversize lines, as one stream session: each line gets its own
// reply, a denial (exit 3), in order; every denial is in the audit log
// (written in full, or counted on a "coalesced" line, as one-shot mode
// coalesces a client's denials within a second); nothing in any table
// changes; and the session still serves the good line after them.
func TestHostileLinesInAStream(t *testing.T) {
	entries, err := hostile.Load()
	require.NoError(t, err)
	// A line break inside an entry ends a request in a stream: what comes
	// after it is a request of its own, and is judged as one.
	lines := []string{}
	for _, e := range entries {
		lines = append(lines, strings.Split(e.Line, "\n")...)
	}
	benign := "iptables -N " + chain // what "iptables -N CHAIN\nid" starts with
	lines = append(lines,
		"iptables -N "+chain+" "+strings.Repeat("A", 4097),
		strings.Repeat("iptables -F INPUT; ", 100<<10/19),
		"f2b-shim stream",
		"iptables -w -I "+chain+" 1 -s 203.0.113.98 -j DROP\r",
	)
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			ns, pol, audit := setup(t, backend, "")
			proxyAddrs(t, ns)
			startJail(t, ns, pol)
			before := snapshot(t, ns, backend)
			logged := len(auditLines(t, audit))
			good := "iptables -w -I " + chain + " 1 -s 203.0.113.98 -j REJECT --reject-with icmp-port-unreachable"
			r := ns.Stream(t, shim, pol, strings.Join(lines, "\n")+"\n"+good+"\n")
			require.Equal(t, 0, r.Code, r.Stderr)
			replies := strings.Split(strings.TrimSuffix(r.Stdout, "\n"), "\n")
			require.Len(t, replies, len(lines)+1, "one reply per line")
			wantDenials := 0
			for i, rep := range replies[:len(lines)] {
				if lines[i] == benign {
					assert.Equal(t, fmt.Sprintf("%d 0 unchanged", i+1), rep)
					continue
				}
				wantDenials++
				assert.True(t, strings.HasPrefix(rep, fmt.Sprintf("%d 3 denied denied: ", i+1)), "line %d %q: %q", i+1, lines[i], rep)
			}
			assert.Equal(t, fmt.Sprintf("%d 0 applied", len(lines)+1), replies[len(lines)])
			// The next line of the log writes out the last second's count.
			time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(time.Second)))
			require.Equal(t, 0, ns.Shim(t, shim, pol, "iptables -w -N "+chain).Code)
			recs := auditLines(t, audit)[logged:]
			denials, full := 0, 0
			for _, rec := range recs {
				switch {
				case rec["result"] == "coalesced" && rec["decision"] == "deny":
					// Repeats of the benign line are counted too, as allowed.
					denials += int(rec["count"].(float64))
				case rec["decision"] == "deny":
					denials++
					full++
					n := int(rec["line"].(float64))
					assert.NotEmpty(t, rec["session"])
					got := loggedCommand(t, rec)
					if len(got) < len(lines[n-1]) {
						assert.True(t, strings.HasPrefix(lines[n-1], got), "line %d is logged by its start", n)
					} else {
						assert.Equal(t, lines[n-1], got, "line %d keeps its bytes", n)
					}
				}
			}
			assert.Equal(t, wantDenials, denials, "every denial is in the audit log")
			assert.GreaterOrEqual(t, full, 1)
			after := snapshot(t, ns, backend)
			assert.NotEqual(t, before, after, "the good line was applied")
			ns.MustRun(t, shim, "unban", "--policy", pol, chain, "203.0.113.98")
			assert.Equal(t, before, snapshot(t, ns, backend), "no hostile line changed any table")
			t.Logf("%d hostile lines in one session: %d denials, %d of them in audit lines of their own", len(lines), denials, full)
		})
	}
}

// TestStreamKilledMidBatchIsReadBack kills a stream session's shim with
// SIGKILL while it applies a batch. The batch's state transaction never
// commits, but its intents were written first: the next request reads
// the touched chain back from the firewall, so the state and the
// firewall agree (reconcile finds no drift), and sending every ban again
// leaves each exactly once.
func TestStreamKilledMidBatchIsReadBack(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			ns, pol, _ := startedJail(t, backend, "max_new_bans_per_minute = 50000\nstream_max_batch = 5000\n")
			lines := banLines("iptables", 5000)
			cmd := ns.Command(shim, "--policy", pol)
			cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "SSH_ORIGINAL_COMMAND=f2b-shim stream", "SSH_CONNECTION=192.0.2.10 50022 192.0.2.7 22"}
			stdin, err := cmd.StdinPipe()
			require.NoError(t, err)
			stdout, err := cmd.StdoutPipe()
			require.NoError(t, err)
			require.NoError(t, cmd.Start())
			// One batch of 1,000 is answered; then 4,000 more go in as one
			// batch, and the shim is killed while it applies them.
			_, err = io.WriteString(stdin, strings.Join(lines[:1000], "\n")+"\n")
			require.NoError(t, err)
			replies := bufio.NewScanner(stdout)
			for range 1000 {
				require.True(t, replies.Scan())
			}
			_, err = io.WriteString(stdin, strings.Join(lines[1000:], "\n")+"\n")
			require.NoError(t, err)
			require.NoError(t, nstest.WaitFor(10*time.Second, func() bool { return len(banned(t, ns, backend, "iptables", chain)) > 1002 }))
			require.NoError(t, cmd.Process.Kill())
			_ = cmd.Wait()
			inFirewall := len(banned(t, ns, backend, "iptables", chain))
			t.Logf("killed with %d of 5,000 bans in the firewall", inFirewall-2)

			r := ns.Shim(t, shim, pol, "iptables -w -N "+chain)
			require.Equal(t, 0, r.Code, r.Stderr)
			r = admin(t, ns, pol, "reconcile")
			assert.Equal(t, 0, r.Code, "the state agrees with the firewall after the read-back:\n%s%s", r.Stdout, r.Stderr)
			r = ns.Stream(t, shim, pol, strings.Join(lines, "\n")+"\n")
			require.Equal(t, 0, r.Code, r.Stderr)
			assert.Len(t, banned(t, ns, backend, "iptables", chain), 5000+2, "each ban once")
		})
	}
}
