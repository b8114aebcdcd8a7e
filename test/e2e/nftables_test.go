package e2e

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/test/e2e/lab"
	"github.com/f2b-shim/f2b-shim/test/nstest"
)

// nftTools are what an nftables lab runs; iptables and ipset are not
// among them: the proxy's sshd cannot run them.
var nftTools = []string{"sshd", "ssh", "fail2ban-client", "socat", "nft", "setcap", "setpriv", "unshare", "nsenter", "python3"}

// upNFT brings up a lab on backend nftables whose proxy sshd cannot run
// iptables, ip6tables or ipset, and takes it down at the test's end,
// with its logs when the test failed.
func upNFT(t *testing.T, bin string, l *lab.Lab) *lab.Lab {
	t.Helper()
	l.Backend, l.HideFirewallPrograms = "nftables", true
	l, err := lab.UpLab(bin, l)
	require.NoError(t, err)
	t.Cleanup(l.Down)
	t.Cleanup(func() {
		if t.Failed() {
			for _, f := range []string{"fail2ban.log", "sshd.log", "log/audit.jsonl", "hidden-ran.log"} {
				t.Logf("--- %s\n%s", f, tail(l.Log(f), 60))
			}
			t.Logf("--- nft list ruleset\n%s", l.Rules(""))
		}
	})
	return l
}

// TestNftablesActionSequence runs the whole action sequence of every
// fail2ban release, with the plain action (proxy-iptables.conf) and the
// stream action (proxy-stream.py), on backend nftables, on a proxy whose
// sshd cannot run iptables, ip6tables, their -save/-restore variants or
// ipset: start, ban, unban, IPv6, stop, start (fail2ban re-bans),
// restart, reload; status and reconcile, run where the sshd runs, find
// no drift at every step, and no hidden program was ever tried.
func TestNftablesActionSequence(t *testing.T) {
	nstest.RequireRoot(t, append(nftTools, "tar")...)
	// Its own labs: it runs beside the other nftables tests.
	t.Parallel()
	bin, err := nstest.BuildShim(t.TempDir())
	require.NoError(t, err)
	trees := extractReleases(t)
	if len(trees) == 0 {
		t.Logf("%s is not set: fail2ban 0.11.2 and 1.1.1 are not tested, only Debian's 1.0.2 (CI sets it to ../shared/fail2ban)", Fail2banSrcEnv)
	}
	trees["1.0.2"] = ""
	for version, tree := range trees {
		for _, stream := range []bool{false, true} {
			action := map[bool]string{false: "plain action", true: "stream action"}[stream]
			t.Run("fail2ban "+version+", "+action, func(t *testing.T) {
				t.Parallel() // each in its own namespaces and directory
				l := upNFT(t, bin, &lab.Lab{Mode: lab.UserMode, Fail2banTree: tree, Stream: stream})
				nftActionSequence(t, l)
				assert.Contains(t, l.Log("fail2ban.log"), "Starting Fail2ban v"+version, "the release under test is the one that ran")
			})
		}
	}
}

// noDrift runs status and reconcile on the proxy: both must exit 0.
func noDrift(t *testing.T, l *lab.Lab, when string) {
	t.Helper()
	code, out := l.Admin("status")
	assert.Equal(t, 0, code, "%s: status:\n%s", when, out)
	code, out = l.Admin("reconcile")
	assert.Equal(t, 0, code, "%s: reconcile finds drift:\n%s", when, out)
}

func nftActionSequence(t *testing.T, l *lab.Lab) {
	t.Run("0 the proxy's sshd cannot run iptables or ipset", func(t *testing.T) {
		for _, name := range []string{"iptables", "ip6tables", "iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore",
			"iptables-nft", "iptables-legacy", "iptables-nft-restore", "iptables-legacy-restore", "xtables-nft-multi", "xtables-legacy-multi", "ipset"} {
			code, out := l.ProxyExec(name, "-S")
			assert.NotEqual(t, 0, code, "%s ran: %s", name, out)
			assert.Contains(t, out, lab.HiddenMessage, name)
		}
		// The same programs outside that mount namespace are real: the
		// tripwire is what the sshd sees, not a broken host.
		_, err := l.Proxy.Run("iptables", "-S")
		require.NoError(t, err, "iptables works outside the sshd's namespace")
		require.NotEmpty(t, l.HiddenCalls(), "the tripwire logs what tried to run")
		require.NoError(t, l.ResetHiddenCalls())

		code, out := l.SSH("f2b-proxy", "iptables -w -C mail-remote-f2b-pathtest -j RETURN")
		assert.Equal(t, 1, code, "the README's path test answers 1: %s", out)
	})
	t.Run("1 the attacker reaches the mail host through the proxy", func(t *testing.T) {
		require.NoError(t, l.StartFail2ban())
		assert.Equal(t, lab.Open, l.Reach(lab.AttackerV4, lab.IMAPPort))
		assert.Equal(t, lab.Open, l.Reach(lab.AttackerV6, lab.IMAPPort))
	})
	t.Run("2 after maxretry failures the proxy bans the attacker", func(t *testing.T) {
		require.NoError(t, l.FailLogins(lab.AttackerV4, 3))
		took, err := l.WaitBan(lab.AttackerV4, true, banWait)
		require.NoError(t, err)
		t.Logf("ban in the proxy's nftables table %s after the third failure", took.Round(time.Millisecond))
		// fail2ban starts each family's action with its first ban.
		assert.Contains(t, lab.NFTChain(l.Proxy, "input"), "meta nfproto ipv4 tcp dport { 143, 993 } jump "+lab.Chain+"\n")
		assert.Equal(t, []string{"ip saddr reject with icmp port-unreachable"}, l.NFTVerdicts())
		assert.Equal(t, lab.Refused, l.Reach(lab.AttackerV4, lab.IMAPPort), "a banned attacker is refused")
		assert.Equal(t, lab.Open, l.Reach(lab.BystanderV4, lab.IMAPPort), "another source is not")
		noDrift(t, l, "after a ban")
	})
	t.Run("3 unbanip lifts the ban and the attacker gets through", func(t *testing.T) {
		_, err := l.Fail2ban("set", lab.Jail, "unbanip", lab.AttackerV4)
		require.NoError(t, err)
		_, err = l.WaitBan(lab.AttackerV4, false, banWait)
		require.NoError(t, err)
		assert.Equal(t, lab.Open, l.Reach(lab.AttackerV4, lab.IMAPPort))
		assert.Empty(t, l.ProxyBans())
		noDrift(t, l, "after an unban")
	})
	t.Run("4 banip works for both families", func(t *testing.T) {
		for _, ip := range []string{lab.AttackerV4, lab.AttackerV6} {
			_, err := l.Fail2ban("set", lab.Jail, "banip", ip)
			require.NoError(t, err)
			_, err = l.WaitBan(ip, true, banWait)
			require.NoError(t, err)
			assert.Equal(t, lab.Refused, l.Reach(ip, lab.IMAPPort), ip)
		}
		assert.Equal(t, lab.Open, l.Reach(lab.BystanderV6, lab.IMAPPort))
		assert.True(t, l.Hooked(), "both families hooked:\n%s", lab.NFTChain(l.Proxy, "input"))
		assert.Equal(t, []string{"ip saddr reject with icmp port-unreachable", "ip6 saddr reject with icmpv6 port-unreachable"}, l.NFTVerdicts())
		assert.Equal(t, []string{lab.AttackerV6, lab.AttackerV4}, l.ProxyBans())
		noDrift(t, l, "after bans of both families")
	})
	t.Run("5 stopping fail2ban clears the proxy, starting it re-bans", func(t *testing.T) {
		require.NoError(t, l.StopFail2ban())
		require.NoError(t, lab.WaitFor(banWait, func() bool { return !strings.Contains(l.Rules(""), lab.Chain) }),
			"the stop removes the jail's chain, sets and hooks")
		assert.Equal(t, lab.Open, l.Reach(lab.AttackerV4, lab.IMAPPort))
		assert.Equal(t, lab.Open, l.Reach(lab.AttackerV6, lab.IMAPPort))
		noDrift(t, l, "after the stop")

		require.NoError(t, l.StartFail2ban())
		f2b, proxy, err := l.WaitSameBans([]string{lab.AttackerV6, lab.AttackerV4}, banWait)
		require.NoError(t, err, "fail2ban holds %v, the proxy bans %v", f2b, proxy)
		assert.Equal(t, lab.Refused, l.Reach(lab.AttackerV4, lab.IMAPPort))
		assert.Equal(t, lab.Refused, l.Reach(lab.AttackerV6, lab.IMAPPort))
		noDrift(t, l, "after the start")
	})
	t.Run("6 restart and reload leave exactly the bans fail2ban holds", func(t *testing.T) {
		want := []string{lab.AttackerV6, lab.AttackerV4}
		_, err := l.Fail2ban("restart")
		require.NoError(t, err)
		require.NoError(t, l.WaitJail())
		f2b, proxy, err := l.WaitSameBans(want, banWait)
		require.NoError(t, err, "restart: fail2ban holds %v, the proxy bans %v", f2b, proxy)
		noDrift(t, l, "after a restart")
		_, err = l.Fail2ban("reload", "--restart", lab.Jail)
		require.NoError(t, err)
		require.NoError(t, l.WaitJail())
		f2b, proxy, err = l.WaitSameBans(want, banWait)
		require.NoError(t, err, "reload --restart: fail2ban holds %v, the proxy bans %v", f2b, proxy)
		assert.Equal(t, lab.Refused, l.Reach(lab.AttackerV4, lab.IMAPPort))
		noDrift(t, l, "after a reload --restart")
	})
	t.Run("7 after a reboot, restore brings every ban back", func(t *testing.T) {
		require.NoError(t, l.FlushProxy()) // a fresh boot's ruleset holds nothing of the shim's
		require.Equal(t, lab.Open, l.Reach(lab.AttackerV4, lab.IMAPPort))
		code, out := l.Admin("restore")
		require.Equal(t, 0, code, out)
		assert.Equal(t, []string{lab.AttackerV6, lab.AttackerV4}, l.ProxyBans())
		assert.True(t, l.Hooked(), "both families hooked:\n%s", lab.NFTChain(l.Proxy, "input"))
		assert.Equal(t, lab.Refused, l.Reach(lab.AttackerV4, lab.IMAPPort))
		assert.Equal(t, lab.Refused, l.Reach(lab.AttackerV6, lab.IMAPPort))
		noDrift(t, l, "after restore")
	})
	t.Run("8 the admin commands work without iptables", func(t *testing.T) {
		code, out := l.Admin("list")
		assert.Equal(t, 0, code, out)
		assert.Contains(t, out, lab.AttackerV4)
		assert.Contains(t, out, lab.AttackerV6)
		for _, ip := range []string{lab.BystanderV4, lab.BystanderV6} {
			code, out = l.Admin("ban", lab.Chain, ip)
			require.Equal(t, 0, code, "the admin's own ban: %s", out)
			assert.Equal(t, lab.Refused, l.Reach(ip, lab.IMAPPort), ip)
			code, out = l.Admin("unban", lab.Chain, ip)
			require.Equal(t, 0, code, out)
			assert.Equal(t, lab.Open, l.Reach(ip, lab.IMAPPort), ip)
		}
		code, out = l.Admin("metrics")
		assert.Equal(t, 0, code, out)
		code, out = l.Admin("expire")
		assert.Equal(t, 0, code, out)
		assert.Equal(t, []string{lab.AttackerV6, lab.AttackerV4}, l.ProxyBans(), "nothing is past max_ban_time")
		noDrift(t, l, "after the admin commands")
	})
	t.Run("9 prune retires the chain after fail2ban stops", func(t *testing.T) {
		require.NoError(t, l.StopFail2ban())
		code, out := l.Admin("prune", lab.Chain)
		require.Equal(t, 0, code, out)
		assert.NotContains(t, l.Rules(""), lab.Chain)
		code, out = l.Admin("list")
		assert.Equal(t, 0, code, out)
		assert.NotContains(t, out, lab.AttackerV4, "prune forgets the chain's bans")
		noDrift(t, l, "after prune")
	})
	t.Run("10 nothing tried to run a hidden program, and fail2ban logged no error", func(t *testing.T) {
		assert.Empty(t, l.HiddenCalls())
		log := l.Log("fail2ban.log")
		require.Contains(t, log, "Ban "+lab.AttackerV4, "the log is fail2ban's")
		for _, line := range strings.Split(log, "\n") {
			assert.NotContains(t, line, " ERROR ", "fail2ban logged an error")
		}
		recs, err := l.Audit()
		require.NoError(t, err)
		for _, r := range recs {
			assert.NotEqual(t, "error", r["result"], "%v", r)
		}
	})
}

// TestNftablesEnforcement: a real TCP connection from a banned source is
// refused (REJECT: at once, "connection refused") or dropped (DROP: the
// connection times out), from a source that is not banned it gets
// through, and the unban restores it; IPv4 and IPv6; with the hooks of
// type multiport (imap,imaps), oneport (imap) and allports, where a
// port outside the hook stays open to the banned source except with
// allports. The jail runs the stream action: its blocktype6 sets DROP for
// IPv6 too, which proxy-iptables.conf's blocktype does not (fail2ban's
// [Init?family=inet6] wins over the jail's parameter, as in fail2ban's
// own iptables.conf).
func TestNftablesEnforcement(t *testing.T) {
	nstest.RequireRoot(t, nftTools...)
	// Its own labs: it runs beside the other nftables tests.
	t.Parallel()
	bin, err := nstest.BuildShim(t.TempDir())
	require.NoError(t, err)
	hooks := []struct {
		name, params, match string
		otherPortBanned     bool
	}{
		{"multiport", `port="imap,imaps", protocol=tcp, type=multiport`, "tcp dport { 143, 993 }", false},
		{"oneport", `port="imap", protocol=tcp, type=oneport`, "tcp dport 143", false},
		{"allports", `port="1:65535", protocol=tcp, type=allports`, "meta l4proto tcp", true},
	}
	targets := []struct {
		name, params string
		verdicts     []string
		banned       string
	}{
		{"REJECT", ``, []string{"ip saddr reject with icmp port-unreachable", "ip6 saddr reject with icmpv6 port-unreachable"}, lab.Refused},
		{"DROP", `, blocktype=DROP, blocktype6=DROP`, []string{"ip saddr drop", "ip6 saddr drop"}, lab.TimedOut},
	}
	for _, h := range hooks {
		t.Run(h.name+" hook", func(t *testing.T) {
			t.Parallel() // each in its own namespaces and directory
			l := upNFT(t, bin, &lab.Lab{Mode: lab.UserMode, ActionParams: h.params, Stream: true})
			// The policy refuses a hook on every port unless hook_ports
			// allows them all (the proxy's own replies arrive there).
			require.NoError(t, l.SetPolicy("hook_ports", `["1:65535"]`))
			for _, target := range targets {
				t.Run(target.name, func(t *testing.T) {
					require.NoError(t, l.SetActionParams(h.params+target.params))
					require.NoError(t, l.StartFail2ban())
					defer func() { require.NoError(t, l.StopFail2ban()) }()
					for _, ip := range []string{lab.AttackerV4, lab.AttackerV6} {
						_, err := l.Fail2ban("set", lab.Jail, "banip", ip)
						require.NoError(t, err)
						_, err = l.WaitBan(ip, true, banWait)
						require.NoError(t, err)
					}
					require.True(t, l.NFTHooked(h.match), "hooked with %q:\n%s", h.match, lab.NFTChain(l.Proxy, "input"))
					assert.Equal(t, target.verdicts, l.NFTVerdicts())
					otherBanned := lab.Open
					if h.otherPortBanned {
						otherBanned = target.banned
					}
					for _, c := range []struct{ name, src, port, want string }{
						{"the banned IPv4 source, on the jail's port", lab.AttackerV4, lab.IMAPPort, target.banned},
						{"the banned IPv6 source, on the jail's port", lab.AttackerV6, lab.IMAPPort, target.banned},
						{"the banned IPv4 source, on another port", lab.AttackerV4, lab.OtherPort, otherBanned},
						{"the banned IPv6 source, on another port", lab.AttackerV6, lab.OtherPort, otherBanned},
						{"another IPv4 source", lab.BystanderV4, lab.IMAPPort, lab.Open},
						{"another IPv6 source", lab.BystanderV6, lab.IMAPPort, lab.Open},
					} {
						assert.Equal(t, c.want, l.Reach(c.src, c.port), c.name)
					}
					for _, ip := range []string{lab.AttackerV4, lab.AttackerV6} {
						_, err := l.Fail2ban("set", lab.Jail, "unbanip", ip)
						require.NoError(t, err)
						_, err = l.WaitBan(ip, false, banWait)
						require.NoError(t, err)
						assert.Equal(t, lab.Open, l.Reach(ip, lab.IMAPPort), "the unban of %s restores it", ip)
						assert.Equal(t, lab.Open, l.Reach(ip, lab.OtherPort), ip)
					}
					noDrift(t, l, h.name+", "+target.name)
				})
			}
			assert.Empty(t, l.HiddenCalls())
		})
	}
}

// TestNftablesOneExecvePerBan: with the nftables backend a ban, an unban
// and a hook change run no program: strace -f on the shim sees one
// execve per one-shot session, the shim's own, and one per stream
// session however many bans it carries. (The key logs into root here:
// an unprivileged tracer would strip the binary's file capabilities.)
func TestNftablesOneExecvePerBan(t *testing.T) {
	nstest.RequireRoot(t, append(nftTools, "strace")...)
	// Its own labs: it runs beside the other nftables tests.
	t.Parallel()
	bin, err := nstest.BuildShim(t.TempDir())
	require.NoError(t, err)
	shimExec := func(t *testing.T, l *lab.Lab, execs []string) {
		t.Helper()
		if assert.Len(t, execs, 1, "one execve: %v", execs) {
			assert.Contains(t, execs[0], `execve("`+l.Shim+`"`)
		}
	}
	t.Run("plain action", func(t *testing.T) {
		t.Parallel()
		l := upNFT(t, bin, &lab.Lab{Mode: lab.RootMode, Strace: true})
		require.NoError(t, l.StartFail2ban())
		// The first ban of each family starts the action for it (chain,
		// return, hook): each of its sessions runs the shim alone too.
		for _, ip := range []string{lab.AttackerV4, lab.AttackerV6} {
			_, err := l.Fail2ban("set", lab.Jail, "banip", ip)
			require.NoError(t, err)
			_, err = l.WaitBan(ip, true, banWait)
			require.NoError(t, err)
		}
		execs, err := l.StraceExecs()
		require.NoError(t, err)
		require.GreaterOrEqual(t, len(execs), 8, "the start's sessions and the ban's were traced: %v", execs)
		for name, e := range execs {
			t.Run("start session "+name, func(t *testing.T) { shimExec(t, l, e) })
		}
		for _, step := range []struct{ name, cmd, ip string }{
			{"a ban", "banip", "203.0.113.61"},
			{"an IPv6 ban", "banip", "2001:db8:203::61"},
			{"an unban", "unbanip", "203.0.113.61"},
		} {
			t.Run(step.name, func(t *testing.T) {
				require.NoError(t, l.ClearStrace())
				_, err := l.Fail2ban("set", lab.Jail, step.cmd, step.ip)
				require.NoError(t, err)
				_, err = l.WaitBan(step.ip, step.cmd == "banip", banWait)
				require.NoError(t, err)
				// The session's log is complete once its shim has exited:
				// fail2ban waits for the action, so by now it has.
				execs, err := l.StraceExecs()
				require.NoError(t, err)
				require.Len(t, execs, 1, "one ssh session: %v", execs)
				for _, e := range execs {
					shimExec(t, l, e)
				}
			})
		}
		assert.Empty(t, l.HiddenCalls())
	})
	t.Run("stream action", func(t *testing.T) {
		t.Parallel()
		l := upNFT(t, bin, &lab.Lab{Mode: lab.RootMode, Strace: true, Stream: true})
		require.NoError(t, l.StartFail2ban())
		var ips []string
		for i := range 50 {
			ips = append(ips, fmt.Sprintf("198.51.100.%d", i+1))
		}
		banip(t, l, ips)
		require.NoError(t, lab.WaitFor(banWait, func() bool { return slices.Equal(l.ProxyBans(), slices.Sorted(slices.Values(ips))) }),
			"the 50 bans land: %v", l.ProxyBans())
		_, err := l.Fail2ban(append([]string{"set", lab.Jail, "unbanip"}, ips[:25]...)...)
		require.NoError(t, err)
		require.NoError(t, lab.WaitFor(banWait, func() bool { return len(l.ProxyBans()) == 25 }))
		execs, err := l.StraceExecs()
		require.NoError(t, err)
		require.NotEmpty(t, execs)
		for name, e := range execs {
			t.Run("session "+filepath.Base(name), func(t *testing.T) { shimExec(t, l, e) })
		}
		assert.Empty(t, l.HiddenCalls())
	})
}

// TestNftablesBansStayEnforcedAfterAWipe is TestBansStayEnforcedAfterAWipe
// on backend nftables, with lab.NFTWipes, on a proxy whose sshd cannot
// run iptables or ipset (status and the timer's reconcile run there too),
// for both actions.
func TestNftablesBansStayEnforcedAfterAWipe(t *testing.T) {
	nstest.RequireRoot(t, nftTools...)
	// Its own labs: it runs beside the other nftables tests.
	t.Parallel()
	bin, err := nstest.BuildShim(t.TempDir())
	require.NoError(t, err)
	for _, stream := range []bool{false, true} {
		t.Run(map[bool]string{false: "plain action", true: "stream action"}[stream], func(t *testing.T) {
			t.Parallel() // each in its own namespaces and directory
			// wipeAndHeal takes the lab down and logs what it needs.
			wipeAndHeal(t, func() (*lab.Lab, error) {
				return lab.UpLab(bin, &lab.Lab{Mode: lab.UserMode, Stream: stream, Backend: "nftables", HideFirewallPrograms: true})
			})
		})
	}
}

// TestNftablesKernelExpiry: with backend nftables, max_ban_time is the
// ban element's timeout in the kernel. A ban that fail2ban holds for an
// hour is lifted by the kernel after max_ban_time with no f2b-shim
// process running in between (the audit log gains no line), and the
// attacker gets through; a re-ban before then refreshes the timeout.
func TestNftablesKernelExpiry(t *testing.T) {
	nstest.RequireRoot(t, nftTools...)
	// Its own labs: it runs beside the other nftables tests.
	t.Parallel()
	bin, err := nstest.BuildShim(t.TempDir())
	require.NoError(t, err)
	l := upNFT(t, bin, &lab.Lab{Mode: lab.UserMode})
	// Long enough for the steps below, short enough to wait for.
	require.NoError(t, l.SetPolicy("max_ban_time", `"12s"`))
	require.NoError(t, l.StartFail2ban())
	set := lab.Chain + "-v4-addr"
	_, err = l.Fail2ban("set", lab.Jail, "banip", lab.AttackerV4)
	require.NoError(t, err)
	_, err = l.WaitBan(lab.AttackerV4, true, banWait)
	require.NoError(t, err)
	require.Equal(t, lab.Refused, l.Reach(lab.AttackerV4, lab.IMAPPort))

	t.Run("a re-ban refreshes the element's timeout", func(t *testing.T) {
		first, ok := lab.NFTExpires(l.Proxy, set, lab.AttackerV4)
		require.True(t, ok)
		require.NoError(t, lab.WaitFor(banWait, func() bool {
			left, ok := lab.NFTExpires(l.Proxy, set, lab.AttackerV4)
			return ok && left <= first-2*time.Second
		}), "the timeout runs down")
		before, _ := lab.NFTExpires(l.Proxy, set, lab.AttackerV4)
		// What fail2ban sends again after a restart or with
		// bantime.increment: the same ban line.
		code, out := l.SSH("f2b-proxy", "iptables -w -I "+lab.Chain+" 1 -s "+lab.AttackerV4+" -j REJECT --reject-with icmp-port-unreachable")
		require.Equal(t, 0, code, out)
		after, ok := lab.NFTExpires(l.Proxy, set, lab.AttackerV4)
		require.True(t, ok)
		assert.Greater(t, after, before, "the re-ban set the timeout back to max_ban_time")
	})
	t.Run("the kernel lifts the ban with no f2b-shim running", func(t *testing.T) {
		recs, err := l.Audit()
		require.NoError(t, err)
		require.NoError(t, lab.WaitFor(time.Minute, func() bool {
			_, ok := lab.NFTExpires(l.Proxy, set, lab.AttackerV4)
			return !ok
		}), "the element expires")
		assert.Equal(t, lab.Open, l.Reach(lab.AttackerV4, lab.IMAPPort))
		bans, err := l.Fail2banBans()
		require.NoError(t, err)
		assert.Equal(t, []string{lab.AttackerV4}, bans, "fail2ban still holds the ban: only the kernel lifted it")
		after, err := l.Audit()
		require.NoError(t, err)
		assert.Len(t, after, len(recs), "no f2b-shim request ran meanwhile")
		assert.Empty(t, l.PidsIn(l.Proxy, l.Shim), "no f2b-shim process is running")
	})
}

// TestNftablesWidenedBan: with ban_prefix_v6 = 64 a ban of one IPv6
// address is one interval element for its /64 in the kernel, which
// refuses every address of the /64 and no other; a second ban in it adds
// nothing; the /64 is lifted only when the last of its banned members is
// unbanned. (The attacker's side gets a /64 of its own, routed through
// it: the link's /64 holds the proxy's own address, which is never
// banned.)
func TestNftablesWidenedBan(t *testing.T) {
	nstest.RequireRoot(t, nftTools...)
	t.Parallel()
	bin, err := nstest.BuildShim(t.TempDir())
	require.NoError(t, err)
	l := upNFT(t, bin, &lab.Lab{Mode: lab.UserMode})
	const (
		prefix  = "2001:db8:204::/64"
		member  = "2001:db8:204::45" // banned, connects
		sibling = "2001:db8:204::46" // never banned itself, connects
		member2 = "2001:db8:204::99" // banned, sends nothing
	)
	for _, a := range []string{member, sibling} {
		_, err := l.Attacker.Run("ip", "addr", "add", a+"/64", "dev", "att0", "nodad")
		require.NoError(t, err)
	}
	_, err = l.Proxy.Run("ip", "-6", "route", "add", prefix, "via", lab.AttackerV6)
	require.NoError(t, err)
	require.NoError(t, l.SetPolicy("ban_prefix_v6", "64"))
	require.NoError(t, l.StartFail2ban())
	require.Equal(t, lab.Open, l.Reach(member, lab.IMAPPort))

	elements := func() []string {
		sets, err := lab.NFTSets(l.Proxy)
		require.NoError(t, err)
		return append(sets[lab.Chain+"-v6"], sets[lab.Chain+"-v6-addr"]...)
	}
	step := func(cmd, ip string) {
		t.Helper()
		_, err := l.Fail2ban("set", lab.Jail, cmd, ip)
		require.NoError(t, err)
		kind := map[string]string{"banip": "ban", "unbanip": "unban"}[cmd]
		require.NoError(t, lab.WaitFor(banWait, func() bool {
			recs, err := l.Audit()
			return err == nil && slices.ContainsFunc(recs, func(r map[string]any) bool {
				op, _ := r["op"].(map[string]any)
				return op != nil && op["kind"] == kind && op["member"] == ip+"/128" && r["result"] != nil
			})
		}), "the shim carried out the %s of %s as a member of its /64", kind, ip)
	}
	t.Run("a ban of one address is one element for its /64", func(t *testing.T) {
		step("banip", member)
		require.NoError(t, lab.WaitFor(banWait, func() bool { return len(elements()) > 0 }))
		assert.Equal(t, []string{prefix}, elements())
		assert.Equal(t, lab.Refused, l.Reach(member, lab.IMAPPort))
		assert.Equal(t, lab.Refused, l.Reach(sibling, lab.IMAPPort), "the whole /64 is refused")
		assert.Equal(t, lab.Open, l.Reach(lab.AttackerV6, lab.IMAPPort), "another /64 is not")
		noDrift(t, l, "after the widened ban")
	})
	t.Run("a second ban in the /64 adds no element", func(t *testing.T) {
		step("banip", member2)
		assert.Equal(t, []string{prefix}, elements())
		noDrift(t, l, "after a second member")
	})
	t.Run("the /64 stays while a member is banned", func(t *testing.T) {
		step("unbanip", member)
		assert.Equal(t, []string{prefix}, elements())
		assert.Equal(t, lab.Refused, l.Reach(member, lab.IMAPPort))
		noDrift(t, l, "after one member's unban")
	})
	t.Run("the last member's unban lifts the /64", func(t *testing.T) {
		step("unbanip", member2)
		require.NoError(t, lab.WaitFor(banWait, func() bool { return len(elements()) == 0 }), "%v", elements())
		assert.Equal(t, lab.Open, l.Reach(member, lab.IMAPPort))
		assert.Equal(t, lab.Open, l.Reach(sibling, lab.IMAPPort))
		noDrift(t, l, "after the last member's unban")
	})
	assert.Empty(t, l.HiddenCalls())
}

// TestNftablesFail2banRepairKeepsTheBans is TestFail2banRepairKeepsTheBans
// on backend nftables: fail2ban's actioncheck ("iptables -C INPUT …")
// finds the IPv4 hook gone from the shim's table, its actionrepair puts
// it back without a flush, and every ban stays enforced, on every
// release.
func TestNftablesFail2banRepairKeepsTheBans(t *testing.T) {
	nstest.RequireRoot(t, append(nftTools, "tar")...)
	t.Parallel()
	bin, err := nstest.BuildShim(t.TempDir())
	require.NoError(t, err)
	trees := extractReleases(t)
	if len(trees) == 0 {
		t.Logf("%s is not set: only Debian's fail2ban is tested here", Fail2banSrcEnv)
	}
	trees["1.0.2"] = ""
	v4Hook := "meta nfproto ipv4 tcp dport { 143, 993 } jump " + lab.Chain + "\n"
	for version, tree := range trees {
		t.Run("fail2ban "+version, func(t *testing.T) {
			t.Parallel()
			l := upNFT(t, bin, &lab.Lab{Mode: lab.UserMode, Fail2banTree: tree})
			require.NoError(t, l.StartFail2ban())
			var old []string
			for i := range healBans {
				old = append(old, fmt.Sprintf("198.51.100.%d", i+1))
			}
			slices.Sort(old)
			_, err := l.Fail2ban(append([]string{"set", lab.Jail, "banip"}, old...)...)
			require.NoError(t, err)
			require.NoError(t, lab.WaitFor(healWait, func() bool { return slices.Equal(l.ProxyBans(), old) }))

			require.NoError(t, l.NFTDeleteHooks("ipv4"))
			require.NoError(t, l.ForgetHooks())
			_, _ = l.Fail2ban("set", lab.Jail, "banip", lab.ProxyInV4) // refused by the proxy: the ban fails
			err = lab.WaitFor(healWait, func() bool { return strings.Contains(lab.NFTChain(l.Proxy, "input"), v4Hook) })
			require.NoError(t, err, "fail2ban's repair put the hook back:\n%s", lab.NFTChain(l.Proxy, "input"))
			assert.Equal(t, old, l.ProxyBans(), "every ban is still enforced")
			log := l.Log("fail2ban.log")
			assert.Contains(t, log, "Invariant check failed. Trying to restore a sane environment", "fail2ban ran its repair")
			assert.NotContains(t, log, "Unable to restore environment")
			assert.Empty(t, l.HiddenCalls())
		})
	}
}

// TestNftablesStreamBatchIsATransaction: the stream action's bans reach
// the kernel in transactions of many bans ("nft monitor" shows each
// committed transaction), all the shim's, and none is lost: a batch is
// one transaction, not one per line.
func TestNftablesStreamBatchIsATransaction(t *testing.T) {
	nstest.RequireRoot(t, nftTools...)
	t.Parallel()
	bin, err := nstest.BuildShim(t.TempDir())
	require.NoError(t, err)
	l := upNFT(t, bin, &lab.Lab{Mode: lab.UserMode, Stream: true})
	require.NoError(t, l.StartFail2ban())
	// The first ban starts the action (chain, hooks): not counted.
	banip(t, l, []string{lab.AttackerV4})
	_, err = l.WaitBan(lab.AttackerV4, true, banWait)
	require.NoError(t, err)

	stop, err := l.NFTMonitor()
	require.NoError(t, err)
	const n = 2000
	ips := burst(0, n)
	banip(t, l, ips)
	want := slices.Sorted(slices.Values(append(slices.Clone(ips), lab.AttackerV4)))
	require.NoError(t, lab.WaitFor(2*time.Minute, func() bool { return slices.Equal(l.ProxyBans(), want) }), "%d bans", len(l.ProxyBans()))
	txs, err := stop()
	require.NoError(t, err)
	var added []string
	most := 0
	for _, tx := range txs {
		assert.Equal(t, "f2b-shim", tx.Program, "only the shim changes the table")
		added = append(added, tx.Added...)
		most = max(most, len(tx.Added))
	}
	t.Logf("%d bans in %d transactions, the largest of %d", n, len(txs), most)
	slices.Sort(added)
	assert.Equal(t, slices.Sorted(slices.Values(ips)), added, "every ban added, in one transaction each")
	assert.Less(t, len(txs), n, "fewer transactions than bans")
	assert.Greater(t, most, 1, "a transaction carried a batch of bans")
	assert.Empty(t, l.HiddenCalls())
}
