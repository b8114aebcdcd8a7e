package e2e

import (
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/test/e2e/lab"
	"github.com/f2b-shim/f2b-shim/test/nstest"
)

// streamTools are what a stream lab runs.
var streamTools = []string{"sshd", "ssh", "fail2ban-client", "socat", "iptables", "setcap", "unshare", "python3"}

// burst are n addresses for "banip" (IPv6 documentation addresses: the
// bans are rules and set members; no packet goes to them).
func burst(from, n int) []string {
	out := make([]string, n)
	for i := range n {
		out[i] = netip.MustParseAddr(fmt.Sprintf("2001:db8:1:%x::%x", (from+i)>>16, (from+i)&0xffff)).String()
	}
	return out
}

// banip bans the addresses in the stream jail, in one fail2ban-client
// call, as an admin's bulk ban or a restore script would.
func banip(t *testing.T, l *lab.Lab, ips []string) {
	t.Helper()
	out, err := l.Fail2ban(append([]string{"set", lab.Jail, "banip"}, ips...)...)
	require.NoError(t, err, out)
}

// appliedBans lists, in the order of the audit log, the addresses of the
// ban requests that changed the proxy's firewall, and counts every
// allowed ban request.
func appliedBans(t *testing.T, recs []map[string]any) (order []string, allowed int) {
	t.Helper()
	for _, r := range recs {
		op, _ := r["op"].(map[string]any)
		if r["decision"] != "allow" || op == nil || op["kind"] != "ban" {
			continue
		}
		allowed++
		if r["result"] == "applied" {
			src, _ := op["source"].(string)
			order = append(order, strings.TrimSuffix(strings.TrimSuffix(src, "/128"), "/32"))
		}
	}
	return order, allowed
}

// TestStreamedBans: fail2ban with proxy-stream.py and two proxies bans at
// both; a burst of 10,000 banip lands completely on each (exactly 10,000
// bans, and 10,000 allowed ban requests in each audit log, all in stream
// sessions); and after a fail2ban restart, each proxy holds exactly the
// bans in fail2ban's database. Both backends.
func TestStreamedBans(t *testing.T) {
	nstest.RequireRoot(t, streamTools...)
	bin, err := nstest.BuildShim(t.TempDir())
	require.NoError(t, err)
	for _, backend := range []string{"rules", "ipset"} {
		t.Run(backend+" backend", func(t *testing.T) {
			t.Parallel()
			l, err := lab.UpStream(bin, backend, "", true, false)
			require.NoError(t, err)
			t.Cleanup(l.Down)
			require.NoError(t, l.SetPolicy("max_new_bans_per_minute", "20000"))
			require.NoError(t, l.StartFail2ban())

			// An attacker is banned at both proxies, and refused at the one
			// it comes through.
			require.NoError(t, l.FailLogins(lab.AttackerV4, 3))
			took, err := l.WaitBan(lab.AttackerV4, true, banWait)
			require.NoError(t, err, l.Log("fail2ban.log"))
			t.Logf("%s: banned at the proxy %s after the third failure", backend, took.Round(time.Millisecond))
			require.Error(t, l.Connect(false), "the banned attacker still reaches the mail host")
			require.NoError(t, lab.WaitFor(banWait, func() bool { return slices.Contains(l.Proxy2Bans(), lab.AttackerV4) }), "the second proxy never banned the attacker")

			ips := burst(0, 10000)
			start := time.Now()
			banip(t, l, ips)
			want := append(slices.Clone(ips), lab.AttackerV4)
			slices.Sort(want)
			err = lab.WaitFor(3*time.Minute, func() bool {
				return slices.Equal(l.ProxyBans(), want) && slices.Equal(l.Proxy2Bans(), want)
			})
			require.NoError(t, err, "%d and %d bans at the proxies\n%s", len(l.ProxyBans()), len(l.Proxy2Bans()), tail(l.Log("fail2ban.log"), 30))
			t.Logf("%s: 10,000 banip at both proxies %s after the first", backend, time.Since(start).Round(time.Millisecond))
			for name, read := range map[string]func() ([]map[string]any, error){"proxy": l.Audit, "proxy2": l.Audit2} {
				recs, err := read()
				require.NoError(t, err)
				order, allowed := appliedBans(t, recs)
				assert.Equal(t, 10001, allowed, "%s: one allowed request per ban, none sent twice", name)
				assert.Len(t, order, 10001, name)
				assert.Equal(t, ips, order[1:], "%s: in fail2ban's order", name)
				sessions := map[any]bool{}
				for _, r := range recs {
					if op, _ := r["op"].(map[string]any); op != nil && op["kind"] == "ban" && r["session"] == nil {
						t.Errorf("%s: a ban outside a stream session: %v", name, r)
					}
					sessions[r["session"]] = true
				}
			}

			// A restart: the stop flushes and deletes the chains, the start
			// re-bans from fail2ban's database; each proxy ends with exactly
			// those bans.
			require.NoError(t, l.StopFail2ban())
			require.NoError(t, lab.WaitFor(banWait, func() bool {
				return !strings.Contains(l.Rules("iptables"), lab.Chain) && len(l.Proxy2Bans()) == 0
			}), "the stop did not remove the chains:\n%s", l.Rules("iptables"))
			require.NoError(t, l.StartFail2ban())
			f2b, proxy, err := l.WaitSameBans(want, 3*time.Minute)
			require.NoError(t, err, "fail2ban has %d, the proxy %d", len(f2b), len(proxy))
			require.NoError(t, lab.WaitFor(time.Minute, func() bool { return slices.Equal(l.Proxy2Bans(), want) }), "the second proxy has %d", len(l.Proxy2Bans()))
		})
	}
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

var _ = exec.Command
var _ = syscall.Kill
