package e2e

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/test/e2e/lab"
	"github.com/f2b-shim/f2b-shim/test/nstest"
)

// healBans is how many bans the proxy holds when its firewall is wiped,
// as in the trials: 40 IPv4 and 10 IPv6, both families' chains.
const healBans = 50

// healWait bounds each wait for the firewall to come back; the time it
// took is logged ("heal:" lines), not asserted.
const healWait = 60 * time.Second

// TestBansStayEnforcedAfterAWipe wipes the proxy's firewall behind the
// shim's back, each of the ways a firewall reload does, with 50 bans in
// place, for both actions (plain and stream) and both backends. After
// each wipe:
//   - status exits non-zero right away;
//   - what f2b-shim-reconcile.timer runs, with no other activity, brings
//     back every ban and the hooks;
//   - after the same wipe again, one new ban through fail2ban brings back
//     every old ban and the hooks, and the attacker is refused;
//   - the state still holds every ban;
//   - later bans land (the stream's relay is not stuck behind a failure).
func TestBansStayEnforcedAfterAWipe(t *testing.T) {
	nstest.RequireRoot(t, "sshd", "ssh", "fail2ban-client", "socat", "iptables", "ipset", "nft", "setcap", "setpriv", "unshare")
	bin, err := nstest.BuildShim(t.TempDir())
	require.NoError(t, err)
	for _, action := range []string{"plain", "stream"} {
		for _, backend := range []string{"rules", "ipset"} {
			t.Run(action+" action, "+backend+" backend", func(t *testing.T) {
				t.Parallel() // each in its own namespaces and directory
				up := func() (*lab.Lab, error) { return lab.Up(bin, lab.UserMode, backend) }
				if action == "stream" {
					up = func() (*lab.Lab, error) { return lab.UpStream(bin, backend, "", false, false) }
				}
				wipeAndHeal(t, up)
			})
		}
	}
}

func wipeAndHeal(t *testing.T, up func() (*lab.Lab, error)) {
	l, err := up()
	require.NoError(t, err)
	t.Cleanup(l.Down)
	t.Cleanup(func() {
		if t.Failed() {
			for _, f := range []string{"fail2ban.log", "log/audit.jsonl"} {
				t.Logf("--- %s\n%s", f, l.Log(f))
			}
		}
	})
	// What netfilter-persistent would have saved: the firewall before
	// fail2ban ran.
	wipes := lab.WipesFor(l.Backend)
	if l.Backend != "nftables" {
		require.NoError(t, l.SaveFirewall())
	}
	require.NoError(t, l.StartFail2ban())
	var old []string
	for i := range healBans {
		if i < 40 {
			old = append(old, fmt.Sprintf("198.51.100.%d", i+1))
		} else {
			old = append(old, fmt.Sprintf("2001:db8:100::%x", i+1))
		}
	}
	slices.Sort(old)
	_, err = l.Fail2ban(append([]string{"set", lab.Jail, "banip"}, old...)...)
	require.NoError(t, err)
	require.NoError(t, lab.WaitFor(healWait, func() bool { return slices.Equal(l.ProxyBans(), old) && l.Hooked() }), "the 50 bans are in place: %v", l.ProxyBans())

	// enforced reports whether every old ban (and those in also) is in
	// the proxy's firewall, once, and hooked.
	enforced := func(also ...string) bool {
		want := slices.Sorted(slices.Values(append(slices.Clone(old), also...)))
		return slices.Equal(l.ProxyBans(), want) && l.Hooked()
	}
	for round, w := range wipes {
		t.Run(w.Name, func(t *testing.T) {
			require.NoError(t, w.Run(l))
			require.False(t, enforced(), "the wipe took something away")
			code, out := l.Admin("status")
			assert.NotEqual(t, 0, code, "status sees the wipe at once:\n%s", out)

			// No activity: the timer's command puts everything back.
			start := time.Now()
			code, out = l.AdminAll("reconcile", "--fix", "--quiet")
			took := time.Since(start)
			assert.Equal(t, 0, code, out)
			assert.True(t, enforced(), "the timer's command put every ban and the hooks back: %v", l.ProxyBans())
			t.Logf("heal: %s, %s backend: %q by the timer's command in %s", actionName(l), l.Backend, w.Name, took.Round(time.Millisecond))

			// Contact: the same wipe, then one new ban through fail2ban.
			require.NoError(t, w.Run(l))
			require.False(t, enforced())
			attacker := fmt.Sprintf("203.0.113.%d", 100+round)
			start = time.Now()
			require.NoError(t, l.FailLogins(attacker, 3))
			if why := w.BansWaitForTheTimer(); why != "" {
				// By design the contact puts back the chains and hooks, not
				// bans the sets lost (why): the new ban lands, the timer's
				// command brings the old ones back.
				_, err := l.WaitBan(attacker, true, healWait)
				require.NoError(t, err, why)
				code, out := l.AdminAll("reconcile", "--fix", "--quiet")
				assert.Equal(t, 0, code, out)
			}
			err := lab.WaitFor(healWait, func() bool { return enforced(attacker) })
			took = time.Since(start)
			require.NoError(t, err, "one new ban brought every old ban and the hooks back: %v\n%s", l.ProxyBans(), l.Rules("iptables"))
			t.Logf("heal: %s, %s backend: %q on contact (3 failed logins to all %d bans back) in %s", actionName(l), l.Backend, w.Name, healBans+1, took.Round(time.Millisecond))

			// The state holds every ban, and says when it repaired what.
			code, out = l.Admin("list", "--json")
			require.Equal(t, 0, code, out)
			assert.Equal(t, healBans+1+round, strings.Count(out, `"type": "ban"`), "the state still holds every ban")
			code, out = l.Admin("status")
			assert.Equal(t, 0, code, "healed: status is all well:\n%s", out)
			assert.Contains(t, out, "repaired:")

			// Later bans land: the stream's relay is not stuck.
			next := fmt.Sprintf("203.0.113.%d", 150+round)
			_, err = l.Fail2ban("set", lab.Jail, "banip", next)
			require.NoError(t, err)
			_, err = l.WaitBan(next, true, healWait)
			require.NoError(t, err)
			_, err = l.Fail2ban("set", lab.Jail, "unbanip", next)
			require.NoError(t, err)
			_, err = l.WaitBan(next, false, healWait)
			require.NoError(t, err)
			old = append(old, attacker)
			slices.Sort(old)
		})
	}
	t.Run("the attacker is refused after the last wipe and its heal", func(t *testing.T) {
		require.NoError(t, wipes[2].Run(l))
		require.NoError(t, l.FailLogins(lab.AttackerV4, 3))
		_, err := l.WaitBan(lab.AttackerV4, true, healWait)
		require.NoError(t, err)
		assert.Error(t, l.Connect(false), "the attacker is refused")
		assert.True(t, enforced(lab.AttackerV4))
		assert.NotContains(t, l.Log("fail2ban.log"), "Invariant check failed", "fail2ban never had to repair anything")
	})
}

func actionName(l *lab.Lab) string {
	if l.Stream {
		return "stream action"
	}
	return "plain action"
}

// TestFail2banRepairKeepsTheBans: when a ban fails and fail2ban's check
// then finds a hook missing, fail2ban runs the action's actionrepair,
// which puts the chain, its return rule and its hooks back without
// flushing: every ban stays enforced, on every release. (Without an
// actionrepair fail2ban stops and starts the action, and the stop
// flushes and deletes the chain.) The shim would put the hook back by
// itself on contact; the test takes the hook out of its state too, so
// that only fail2ban's repair can, and makes the ban fail with an address
// the proxy never bans (its own).
func TestFail2banRepairKeepsTheBans(t *testing.T) {
	nstest.RequireRoot(t, "sshd", "ssh", "fail2ban-client", "socat", "iptables", "setcap", "unshare", "tar")
	bin, err := nstest.BuildShim(t.TempDir())
	require.NoError(t, err)
	trees := extractReleases(t)
	if len(trees) == 0 {
		t.Logf("%s is not set: only Debian's fail2ban is tested here", Fail2banSrcEnv)
	}
	trees["1.0.2"] = ""
	for version, tree := range trees {
		t.Run("fail2ban "+version, func(t *testing.T) {
			t.Parallel()
			l, err := lab.UpWithFail2ban(bin, lab.UserMode, "rules", tree)
			require.NoError(t, err)
			t.Cleanup(l.Down)
			t.Cleanup(func() {
				if t.Failed() {
					t.Logf("--- fail2ban.log\n%s", l.Log("fail2ban.log"))
				}
			})
			require.NoError(t, l.StartFail2ban())
			var old []string
			for i := range healBans {
				old = append(old, fmt.Sprintf("198.51.100.%d", i+1))
			}
			slices.Sort(old)
			_, err = l.Fail2ban(append([]string{"set", lab.Jail, "banip"}, old...)...)
			require.NoError(t, err)
			require.NoError(t, lab.WaitFor(healWait, func() bool { return slices.Equal(l.ProxyBans(), old) }))

			_, err = l.Proxy.Run("iptables", "-F", "INPUT")
			require.NoError(t, err)
			require.NoError(t, l.ForgetHooks())
			_, _ = l.Fail2ban("set", lab.Jail, "banip", lab.ProxyInV4) // refused by the proxy: the ban fails
			err = lab.WaitFor(healWait, func() bool {
				return strings.Contains(l.Rules("iptables"), "-A INPUT -p tcp -m multiport --dports 143,993 -j "+lab.Chain)
			})
			require.NoError(t, err, "fail2ban's repair put the hook back:\n%s", l.Rules("iptables"))
			assert.Equal(t, old, l.ProxyBans(), "every ban is still enforced")
			log := l.Log("fail2ban.log")
			assert.Contains(t, log, "Invariant check failed. Trying to restore a sane environment", "fail2ban ran its repair")
			assert.NotContains(t, log, "Unable to restore environment")
		})
	}
}
