package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/test/e2e/lab"
	"github.com/f2b-shim/f2b-shim/test/netns"
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

// banInBackground bans ips in calls of n addresses each, while the test
// goes on; the channel closes when the last call returns.
func banInBackground(t *testing.T, l *lab.Lab, ips []string, n int) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < len(ips); i += n {
			banip(t, l, ips[i:min(i+n, len(ips))])
		}
	}()
	return done
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
	for _, backend := range []string{"rules", "ipset", "nftables"} {
		t.Run(backend+" backend", func(t *testing.T) {
			t.Parallel()
			l := upStream(t, bin, backend, "", true, false)
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

// firstApplied is the order in which addresses were first banned.
func firstApplied(order []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, a := range order {
		if !seen[a] {
			seen[a] = true
			out = append(out, a)
		}
	}
	return out
}

// only keeps the addresses in keep, in their order.
func only(order []string, keep []string) []string {
	return slices.DeleteFunc(slices.Clone(order), func(a string) bool { return !slices.Contains(keep, a) })
}

// TestStreamOneProxyDown: with two proxies, one proxy's sshd is stopped
// (its sessions killed) during a burst of 2,000 bans. The live proxy gets
// all of them; the other gets every ban, in fail2ban's order, once its
// sshd is back; nothing is lost or doubled, and an unban made during the
// outage is not resurrected.
func TestStreamOneProxyDown(t *testing.T) {
	nstest.RequireRoot(t, streamTools...)
	bin, err := nstest.BuildShim(t.TempDir())
	require.NoError(t, err)
	l := upStream(t, bin, "rules", "", true, false)
	require.NoError(t, l.StartFail2ban())

	ips := burst(0, 2000)
	done := banInBackground(t, l, ips, 200)
	// Stop the second proxy once it has some of the burst.
	require.NoError(t, lab.WaitFor(time.Minute, func() bool { return len(l.Proxy2Bans()) >= 100 }))
	require.NoError(t, l.StopProxy2())
	had := len(l.Proxy2Bans())
	<-done
	unbanned := []string{ips[5], ips[1500], ips[1999]}
	for _, ip := range unbanned {
		out, err := l.Fail2ban("set", lab.Jail, "unbanip", ip)
		require.NoError(t, err, out)
	}
	want := slices.DeleteFunc(slices.Clone(ips), func(a string) bool { return slices.Contains(unbanned, a) })
	slices.Sort(want)
	f2b, proxy, err := l.WaitSameBans(want, 2*time.Minute)
	require.NoError(t, err, "fail2ban has %d, the live proxy %d", len(f2b), len(proxy))
	assert.Less(t, len(l.Proxy2Bans()), len(want), "the stopped proxy got bans while it was down")
	t.Logf("the second proxy had %d of 2,000 bans when it went down", had)

	require.NoError(t, l.StartProxy2())
	require.NoError(t, lab.WaitFor(2*time.Minute, func() bool { return slices.Equal(l.Proxy2Bans(), want) }),
		"the second proxy has %d bans, fail2ban %d\n%s", len(l.Proxy2Bans()), len(want), tail(l.Log("fail2ban.log"), 20))
	log := l.Log("fail2ban.log")
	assert.Contains(t, log, "proxy f2b-proxy2:", "the outage is in fail2ban's log")
	assert.Contains(t, log, "f2b-proxy2 is back: ", "the end of the outage is in fail2ban's log")
	// One line when it went down (two if the kill of its sessions and
	// the refused connections are told apart), none per retry.
	assert.LessOrEqual(t, strings.Count(log, "proxy f2b-proxy2:"), 2, tail(log, 30))

	recs1, err := l.Audit()
	require.NoError(t, err)
	recs2, err := l.Audit2()
	require.NoError(t, err)
	order1, _ := appliedBans(t, recs1)
	order2, _ := appliedBans(t, recs2)
	// The kill of the second proxy's sessions can land between a batch's
	// firewall change and its audit lines (the stream shim audits a batch
	// after applying it), and those bans come back "unchanged": compare
	// the order of what both audit logs show applied.
	first1, first2 := firstApplied(order1), firstApplied(order2)
	common := only(only(first1, first2), want)
	assert.Equal(t, common, only(first2, common), "both proxies banned in fail2ban's order")
	assert.Greater(t, len(common), len(want)/2, "most bans are in both audit logs")
}

// TestStreamLocalJailKeepsItsPace: a jail that bans on the mail host
// itself, with fail2ban's own iptables action, is not held up while the
// proxy is unreachable (its packets dropped, so ssh waits for its
// ConnectTimeout): its ban is in place before the relay even gives up on
// the proxy, and the proxy gets its ban once it is reachable again.
func TestStreamLocalJailKeepsItsPace(t *testing.T) {
	nstest.RequireRoot(t, streamTools...)
	bin, err := nstest.BuildShim(t.TempDir())
	require.NoError(t, err)
	l := upStream(t, bin, "rules", "", false, true)
	// The proxy closes the relay's session after a second without
	// requests, so the next ban dials, into the blocked proxy.
	require.NoError(t, l.SetPolicy("stream_idle_timeout", `"1s"`))
	require.NoError(t, l.StartFail2ban())
	require.NoError(t, lab.WaitFor(banWait, func() bool { return strings.Contains(l.Rules("iptables"), "-j "+lab.Chain) }), "the proxy jail never started")
	require.NoError(t, lab.WaitFor(banWait, func() bool { return len(l.PidsIn(l.Proxy, l.Shim)) == 0 }), "the idle session was not closed")

	require.NoError(t, l.BlockProxy())
	require.NoError(t, l.FailLogins(lab.AttackerV4, 3))
	require.NoError(t, lab.WaitFor(banWait, func() bool { return strings.Contains(l.Log("fail2ban.log"), "[imap] Ban "+lab.AttackerV4) }))
	const local = "192.0.2.99"
	start := time.Now()
	require.NoError(t, l.FailLoginsLocal(local, 3))
	require.NoError(t, lab.WaitFor(banWait, func() bool { return l.LocalBanned(local) }), "the local jail never banned")
	t.Logf("the local jail banned %s after %s while the proxy was unreachable", local, time.Since(start).Round(time.Millisecond))
	assert.NotContains(t, l.Log("fail2ban.log"), "Connection timed out", "the local ban waited for ssh's ConnectTimeout")
	assert.False(t, l.Banned(lab.AttackerV4), "the blocked proxy got the ban")
	// The proxy was unreachable all along: ssh gives up on it only now.
	require.NoError(t, lab.WaitFor(time.Minute, func() bool { return strings.Contains(l.Log("fail2ban.log"), "Connection timed out") }), tail(l.Log("fail2ban.log"), 20))

	require.NoError(t, l.UnblockProxy())
	_, err = l.WaitBan(lab.AttackerV4, true, 2*time.Minute)
	require.NoError(t, err, tail(l.Log("fail2ban.log"), 20))
}

// TestStreamKilledMidBatch: the shim of a stream session (on the proxy)
// and the relay (on the mail host) are each killed with SIGKILL in the
// middle of a burst. Nothing is lost: the outbox replays, and the proxy
// ends equal to fail2ban's ban list, each ban once.
func TestStreamKilledMidBatch(t *testing.T) {
	nstest.RequireRoot(t, streamTools...)
	bin, err := nstest.BuildShim(t.TempDir())
	require.NoError(t, err)
	for _, backend := range []string{"rules", "ipset", "nftables"} {
		t.Run(backend+" backend", func(t *testing.T) {
			t.Parallel()
			l := upStream(t, bin, backend, "", false, false)
			require.NoError(t, l.StartFail2ban())
			ips := burst(0, 3000)
			done := banInBackground(t, l, ips, 100)
			killed := map[string]int{}
			kill := func(ns *netns.NS, what string, after int) {
				require.NoError(t, lab.WaitFor(time.Minute, func() bool { return len(l.ProxyBans()) >= after }))
				for _, pid := range l.PidsIn(ns, what) {
					if syscall.Kill(pid, syscall.SIGKILL) == nil {
						killed[what]++
					}
				}
			}
			kill(l.Proxy, l.Shim+" --policy", 500)
			kill(l.Mail, "f2b-shim relay", 1500)
			<-done
			require.NotZero(t, killed[l.Shim+" --policy"], "no stream shim was running to kill")
			require.NotZero(t, killed["f2b-shim relay"], "no relay was running to kill")
			want := slices.Clone(ips)
			slices.Sort(want)
			f2b, proxy, err := l.WaitSameBans(want, 2*time.Minute)
			require.NoError(t, err, "fail2ban has %d, the proxy %d\n%s", len(f2b), len(proxy), tail(l.Log("fail2ban.log"), 20))
			assert.Contains(t, l.Log("fail2ban.log"), "f2b-shim relay exited", "the action started the killed relay again")
		})
	}
}

// TestStreamKeptOverReload: "fail2ban-client reload" (what "systemctl
// reload fail2ban" runs) keeps the stream action and its one relay, and
// bans go on reaching the proxy. Once an upgrade has put a new binary in
// the relay's place, a reload starts the relay again from the new one.
func TestStreamKeptOverReload(t *testing.T) {
	nstest.RequireRoot(t, streamTools...)
	bin, err := nstest.BuildShim(t.TempDir())
	require.NoError(t, err)
	l := upStream(t, bin, "rules", "", false, false)
	require.NoError(t, l.StartFail2ban())
	relays := func() []int { return l.PidsIn(l.Mail, "f2b-shim relay") }
	reaches := func(ip string) {
		t.Helper()
		banip(t, l, []string{ip})
		require.NoError(t, lab.WaitFor(banWait, func() bool { return slices.Contains(l.ProxyBans(), ip) }),
			"%s never reached the proxy\n%s", ip, tail(l.Log("fail2ban.log"), 20))
	}
	reload := func() {
		t.Helper()
		out, err := l.Fail2ban("reload")
		require.NoError(t, err, out)
		out, err = l.Fail2ban("get", lab.Jail, "actions")
		require.NoError(t, err, out)
		require.Contains(t, out, "proxy-stream", "the reload dropped the action\n%s", tail(l.Log("fail2ban.log"), 20))
	}

	reaches("2001:db8:2::1")
	before := relays()
	require.Len(t, before, 1, "one relay for the jail")
	reload()
	reaches("2001:db8:2::2")
	assert.Equal(t, before, relays(), "a reload leaves the relay alone")

	// An upgrade: a new file takes the binary's name, as dpkg does.
	data, err := os.ReadFile(l.Shim)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(l.Shim+".new", data, 0o755))
	out, err := exec.Command("setcap", "cap_net_admin,cap_net_raw+ep", l.Shim+".new").CombinedOutput()
	require.NoError(t, err, string(out))
	require.NoError(t, os.Rename(l.Shim+".new", l.Shim))
	reload()
	reaches("2001:db8:2::3")
	after := relays()
	require.Len(t, after, 1, "one relay for the jail")
	assert.NotEqual(t, before, after, "the reload started the relay again from the new binary")
}

// TestStreamOnOtherFail2banReleases: proxy-stream.py on fail2ban 0.11.2
// and 1.1.1, from their source trees: a ban reaches the proxy, a reload
// keeps the action, an unban lifts it, a stop removes the chain, and a restart puts fail2ban's bans
// back.
func TestStreamOnOtherFail2banReleases(t *testing.T) {
	nstest.RequireRoot(t, append(streamTools, "tar")...)
	if os.Getenv(Fail2banSrcEnv) == "" {
		t.Skipf("%s is not set: proxy-stream.py is not tested on fail2ban 0.11.2 and 1.1.1 (CI sets it to ../shared/fail2ban)", Fail2banSrcEnv)
	}
	bin, err := nstest.BuildShim(t.TempDir())
	require.NoError(t, err)
	for version, tree := range extractReleases(t) {
		t.Run("fail2ban "+version, func(t *testing.T) {
			t.Parallel()
			l := upStream(t, bin, "ipset", tree, true, false)
			require.NoError(t, l.StartFail2ban())
			require.NoError(t, l.FailLogins(lab.AttackerV4, 3))
			_, err = l.WaitBan(lab.AttackerV4, true, banWait)
			require.NoError(t, err, tail(l.Log("fail2ban.log"), 30))
			require.Error(t, l.Connect(false))
			ips := burst(0, 300)
			banip(t, l, ips)
			want := append(slices.Clone(ips), lab.AttackerV4)
			slices.Sort(want)
			_, _, err = l.WaitSameBans(want, time.Minute)
			require.NoError(t, err)
			require.NoError(t, lab.WaitFor(time.Minute, func() bool { return slices.Equal(l.Proxy2Bans(), want) }))

			// A reload keeps the action (TestStreamKeptOverReload on 1.0).
			out, err := l.Fail2ban("reload")
			require.NoError(t, err, out)
			out, err = l.Fail2ban("get", lab.Jail, "actions")
			require.NoError(t, err, out)
			require.Contains(t, out, "proxy-stream", "the reload dropped the action\n%s", tail(l.Log("fail2ban.log"), 20))

			out, err = l.Fail2ban("set", lab.Jail, "unbanip", lab.AttackerV4)
			require.NoError(t, err, out)
			_, err = l.WaitBan(lab.AttackerV4, false, banWait)
			require.NoError(t, err)
			require.NoError(t, l.Connect(false), "the unbanned attacker is still refused")

			require.NoError(t, l.StopFail2ban())
			require.NoError(t, lab.WaitFor(banWait, func() bool { return !strings.Contains(l.Rules("iptables"), lab.Chain) }), "the stop left the chain:\n%s", l.Rules("iptables"))
			require.NoError(t, l.StartFail2ban())
			want = slices.DeleteFunc(want, func(a string) bool { return a == lab.AttackerV4 })
			_, _, err = l.WaitSameBans(want, time.Minute)
			require.NoError(t, err, tail(l.Log("fail2ban.log"), 30))
			require.NoError(t, lab.WaitFor(time.Minute, func() bool { return slices.Equal(l.Proxy2Bans(), want) }))
			assert.Contains(t, l.Log("fail2ban.log"), "Starting Fail2ban v"+version, "the release under test is the one that ran")
		})
	}
}

// upStream brings a stream lab up, and down at the test's end.
func upStream(t *testing.T, bin, backend, tree string, two, local bool) *lab.Lab {
	t.Helper()
	l, err := lab.UpStream(bin, backend, tree, two, local)
	require.NoError(t, err)
	t.Cleanup(l.Down)
	return l
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
