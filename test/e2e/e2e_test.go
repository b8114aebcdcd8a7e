// Package e2e drives the whole flow with the real programs: fail2ban (1.0,
// and 0.11.2 and 1.1.1 from source) on the mail host runs
// examples/proxy-iptables.conf, which runs ssh,
// which reaches real sshd on the proxy, which starts f2b-shim as the key's
// forced command, and the attacker is refused at the proxy.
package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/test/e2e/lab"
	"github.com/f2b-shim/f2b-shim/test/nstest"
)

// banWait bounds how long fail2ban may take to ban; the figure measured
// is logged, not asserted (this machine is shared and noisy).
const banWait = 30 * time.Second

// TestFail2banBansAtTheProxy runs the whole life cycle twice: with the
// mail host's key in root's authorized_keys, and in the least-privilege
// install, where it logs into the unprivileged f2b-shim user and the
// binary holds only cap_net_admin,cap_net_raw.
func TestFail2banBansAtTheProxy(t *testing.T) {
	nstest.RequireRoot(t, "sshd", "ssh", "fail2ban-client", "socat", "iptables", "setcap", "unshare")
	bin, err := nstest.BuildShim(t.TempDir())
	require.NoError(t, err)
	for _, run := range variants {
		t.Run("key in "+string(run.mode)+"'s authorized_keys, "+run.backend+" backend", func(t *testing.T) {
			t.Parallel() // each in its own namespaces and directory
			lifeCycle(t, bin, run.mode, run.backend)
		})
	}
}

// variants are the installs every release is tested with: both modes,
// both backends.
var variants = []struct {
	mode    lab.Mode
	backend string
}{{lab.RootMode, "rules"}, {lab.UserMode, "rules"}, {lab.UserMode, "ipset"}, {lab.RootMode, "ipset"}}

// Fail2banSrcEnv names the directory of the fail2ban release tarballs
// (../shared/fail2ban, which .ci/run sets); without it the other releases
// are not tested, and the tests say so.
const Fail2banSrcEnv = "F2B_SHIM_FAIL2BAN_SRC"

// releases are the fail2ban releases besides Debian's 1.0.2 that users
// run: Ubuntu 22.04's 0.11.2 and the newest, 1.1.1.
var releases = map[string]string{
	"0.11.2": "fail2ban-0.11.2-py3.tar.gz",
	"1.1.1":  "fail2ban-1.1.1.tar.gz",
}

// extractReleases unpacks the other fail2ban releases, version to tree;
// empty when Fail2banSrcEnv is not set.
func extractReleases(t *testing.T) map[string]string {
	t.Helper()
	trees := map[string]string{}
	src := os.Getenv(Fail2banSrcEnv)
	if src == "" {
		return trees
	}
	for version, tarball := range releases {
		dir := t.TempDir()
		require.NoError(t, os.Chmod(dir, 0o755))
		out, err := exec.Command("tar", "-xzf", filepath.Join(src, tarball), "-C", dir).CombinedOutput()
		require.NoError(t, err, "%s", out)
		trees[version] = filepath.Join(dir, strings.TrimSuffix(tarball, ".tar.gz"))
	}
	return trees
}

// TestOtherFail2banReleases runs the same life cycle and restart paths,
// with the one shipped action file, on fail2ban 0.11.2 and 1.1.1 run from
// their source trees, in both installs with both backends.
func TestOtherFail2banReleases(t *testing.T) {
	nstest.RequireRoot(t, "sshd", "ssh", "socat", "iptables", "setcap", "unshare", "tar")
	src := os.Getenv(Fail2banSrcEnv)
	if src == "" {
		t.Skipf("%s is not set: fail2ban 0.11.2 and 1.1.1 are not tested (CI sets it to ../shared/fail2ban)", Fail2banSrcEnv)
	}
	bin, err := nstest.BuildShim(t.TempDir())
	require.NoError(t, err)
	for version, tree := range extractReleases(t) {
		for _, run := range variants {
			t.Run("fail2ban "+version+", key in "+string(run.mode)+"'s authorized_keys, "+run.backend+" backend", func(t *testing.T) {
				t.Parallel() // each in its own namespaces and directory
				l := lifeCycleWith(t, func() (*lab.Lab, error) { return lab.UpWithFail2ban(bin, run.mode, run.backend, tree) }, run.mode)
				assert.Contains(t, l.Log("fail2ban.log"), "Starting Fail2ban v"+version, "the release under test is the one that ran")
			})
		}
	}
}

// TestActionTypesAndLists: the one action file's type=oneport and its
// lists of chains and protocols (chain="INPUT,FORWARD",
// protocol="tcp,udp", as fail2ban 1.1 takes them) make one hook per
// chain and protocol, on every release, and stop removes them all.
func TestActionTypesAndLists(t *testing.T) {
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
			l, err := lab.UpWithAction(bin, lab.UserMode, "rules", tree, `port="143", protocol="tcp,udp", chain="INPUT,FORWARD", type=oneport`)
			require.NoError(t, err)
			t.Cleanup(l.Down)
			require.NoError(t, l.SetPolicy("parent_chains", `["INPUT", "FORWARD"]`))
			require.NoError(t, l.StartFail2ban())
			hooks := func() int {
				n := 0
				for _, bin := range []string{"iptables", "ip6tables"} {
					rules := l.Rules(bin)
					for _, c := range []string{"INPUT", "FORWARD"} {
						for _, p := range []string{"tcp", "udp"} {
							if strings.Contains(rules, "-A "+c+" -p "+p+" -m "+p+" --dport 143 -j "+lab.Chain) {
								n++
							}
						}
					}
				}
				return n
			}
			// fail2ban starts each family's action with its first ban.
			for _, ip := range []string{lab.AttackerV4, lab.AttackerV6} {
				_, err = l.Fail2ban("set", lab.Jail, "banip", ip)
				require.NoError(t, err)
				_, err = l.WaitBan(ip, true, banWait)
				require.NoError(t, err)
			}
			assert.Equal(t, 8, hooks(), "two chains × two protocols × two families:\n%s%s", l.Rules("iptables"), l.Rules("ip6tables"))
			require.NoError(t, l.StopFail2ban())
			assert.Equal(t, 0, hooks(), "stop removes every hook")
			for _, bin := range []string{"iptables", "ip6tables"} {
				assert.NotContains(t, l.Rules(bin), lab.Chain, bin)
			}
			if t.Failed() {
				t.Logf("--- fail2ban.log\n%s", l.Log("fail2ban.log"))
			}
		})
	}
}

func lifeCycle(t *testing.T, bin string, mode lab.Mode, backend string) {
	lifeCycleWith(t, func() (*lab.Lab, error) { return lab.Up(bin, mode, backend) }, mode)
}

func lifeCycleWith(t *testing.T, up func() (*lab.Lab, error), mode lab.Mode) *lab.Lab {
	l, err := up()
	require.NoError(t, err)
	t.Cleanup(l.Down)
	t.Cleanup(func() {
		if t.Failed() {
			for _, f := range []string{"fail2ban.log", "sshd.log", "log/audit.jsonl"} {
				t.Logf("--- %s\n%s", f, l.Log(f))
			}
		}
	})

	t.Run("0 the README's path test answers 1: it works, and touches nothing", func(t *testing.T) {
		before := l.Rules("iptables") + l.Rules("ip6tables")
		code, out := l.SSH("f2b-proxy", "iptables -w -C mail-remote-f2b-pathtest -j RETURN")
		assert.Equal(t, 1, code, out)
		assert.Equal(t, before, l.Rules("iptables")+l.Rules("ip6tables"))
	})
	t.Run("1 the attacker reaches the mail host through the proxy", func(t *testing.T) {
		require.NoError(t, l.StartFail2ban())
		require.NoError(t, l.Connect(false))
		require.NoError(t, l.Connect(true))
	})
	t.Run("2 after maxretry failures the proxy bans the attacker", func(t *testing.T) {
		require.NoError(t, l.FailLogins(lab.AttackerV4, 3))
		took, err := l.WaitBan(lab.AttackerV4, true, banWait)
		require.NoError(t, err)
		t.Logf("ban in the proxy's firewall %s after the third failure", took.Round(time.Millisecond))
		assert.Contains(t, l.Rules("iptables"), "-A INPUT -p tcp -m multiport --dports 143,993 -j "+lab.Chain)
		assert.Error(t, l.Connect(false), "a banned attacker is refused")
	})
	t.Run("3 unbanip removes the rule and the attacker gets through", func(t *testing.T) {
		_, err := l.Fail2ban("set", lab.Jail, "unbanip", lab.AttackerV4)
		require.NoError(t, err)
		_, err = l.WaitBan(lab.AttackerV4, false, banWait)
		require.NoError(t, err)
		assert.NoError(t, l.Connect(false))
	})
	t.Run("4 banip works, and an IPv6 attacker is banned with ip6tables", func(t *testing.T) {
		_, err := l.Fail2ban("set", lab.Jail, "banip", lab.AttackerV4)
		require.NoError(t, err)
		_, err = l.WaitBan(lab.AttackerV4, true, banWait)
		require.NoError(t, err)
		assert.Error(t, l.Connect(false))

		require.NoError(t, l.Connect(true), "IPv6 is not banned yet")
		_, err = l.Fail2ban("set", lab.Jail, "banip", lab.AttackerV6)
		require.NoError(t, err)
		_, err = l.WaitBan(lab.AttackerV6, true, banWait)
		require.NoError(t, err)
		assert.Error(t, l.Connect(true))
	})
	t.Run("5 stopping fail2ban clears the proxy, starting it restores the bans", func(t *testing.T) {
		require.NoError(t, l.StopFail2ban())
		for _, bin := range []string{"iptables", "ip6tables"} {
			assert.NotContains(t, l.Rules(bin), lab.Chain, bin)
		}
		require.NoError(t, l.Connect(false))

		require.NoError(t, l.StartFail2ban())
		_, err := l.WaitBan(lab.AttackerV4, true, banWait)
		require.NoError(t, err)
		_, err = l.WaitBan(lab.AttackerV6, true, banWait)
		require.NoError(t, err)
		assert.Error(t, l.Connect(false))
	})
	t.Run("6 fail2ban's log shows no action errors in the normal flow", func(t *testing.T) {
		log := l.Log("fail2ban.log")
		require.Contains(t, log, "Ban "+lab.AttackerV4, "the log is fail2ban's")
		for _, line := range strings.Split(log, "\n") {
			assert.NotContains(t, line, " ERROR ", "fail2ban logged an error")
		}
	})
	t.Run("7 the key runs nothing else, and the audit log shows the denials", func(t *testing.T) {
		before := l.Rules("iptables") + l.Rules("ip6tables")
		noMux := []string{"-o", "ControlPath=none"}
		attacks := []struct {
			name string
			run  func() (int, string)
			// want is a part of what the client sees, where it sees anything.
			want string
		}{
			{"id", func() (int, string) { return l.SSH(append(noMux, "f2b-proxy", "id")...) }, `program "id" is not allowed`},
			{"iptables -F INPUT", func() (int, string) { return l.SSH(append(noMux, "f2b-proxy", "iptables -F INPUT")...) }, `chain "INPUT" is outside the allowed prefix`},
			{"an interactive login", func() (int, string) { return l.SSH(append(noMux, "f2b-proxy")...) }, "an interactive login is not allowed"},
			{"an interactive login with a forced pty", func() (int, string) { return l.SSH(append(noMux, "-tt", "f2b-proxy")...) }, ""},
			{"a shell pipeline", func() (int, string) {
				return l.SSH(append(noMux, "f2b-proxy", "iptables -w -N "+lab.Chain+"x; cat /etc/shadow")...)
			}, "denied"},
			{"scp", func() (int, string) {
				return l.MailCommand("scp", "-F", l.Dir+"/ssh_config", "-o", "ControlPath=none", "-O", "/etc/hostname", "f2b-proxy:/tmp/f2b-shim-e2e")
			}, ""},
			{"sftp", func() (int, string) {
				return l.MailCommand("sftp", "-F", l.Dir+"/ssh_config", "-o", "ControlPath=none", "-b", "/dev/null", "f2b-proxy")
			}, ""},
			{"remote port forwarding", func() (int, string) {
				return l.SSH(append(noMux, "-o", "ClearAllForwardings=no", "-o", "ExitOnForwardFailure=yes",
					"-R", "127.0.0.1:10143:127.0.0.1:22", "f2b-proxy", "iptables -w -C "+lab.Chain+" -j RETURN")...)
			}, "remote port forwarding failed"},
			{"local port forwarding", func() (int, string) {
				// The client may listen locally; the proxy must refuse to
				// carry the connection, so no greeting comes through.
				fwd := l.Mail.Command("ssh", append(noMux, "-F", l.Dir+"/ssh_config", "-o", "ClearAllForwardings=no",
					"-N", "-L", "127.0.0.1:10143:"+lab.MailV4+":143", "f2b-proxy")...)
				require.NoError(t, fwd.Start())
				defer func() { _ = fwd.Process.Kill(); _ = fwd.Wait() }()
				var out string
				for range 20 {
					o, err := l.Mail.Run("socat", "-T1", "-u", "TCP4:127.0.0.1:10143,connect-timeout=1", "STDOUT")
					if err == nil && o != "" {
						return 0, o
					}
					out = o
					time.Sleep(100 * time.Millisecond)
				}
				return 1, out
			}, ""},
		}
		for _, a := range attacks {
			// One probe a second: the shim writes the first denial of a
			// client in a second in full and only counts the rest (a
			// flood's bound, tested in test/integration); here each
			// probe's own line is what is checked.
			time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(time.Second)))
			code, out := a.run()
			assert.NotEqual(t, 0, code, "%s succeeded: %s", a.name, out)
			assert.Contains(t, out, a.want, a.name)
		}
		_, err := os.Stat("/tmp/f2b-shim-e2e")
		assert.True(t, os.IsNotExist(err), "scp wrote a file on the proxy")
		assert.Equal(t, before, l.Rules("iptables")+l.Rules("ip6tables"), "the attacks changed the firewall")

		recs, err := l.Audit()
		require.NoError(t, err)
		denied := map[string]bool{}
		for _, r := range recs {
			if r["decision"] == "deny" {
				denied[r["command"].(string)] = true
			}
		}
		for _, cmd := range []string{"id", "iptables -F INPUT", "", "internal-sftp"} {
			assert.True(t, denied[cmd], "the audit log shows the denial of %q; denied: %v", cmd, denied)
		}
		assert.True(t, denied["scp -t /tmp/f2b-shim-e2e"], "scp's denial is audited; denied: %v", denied)
	})
	t.Run("8 the next ban puts back a proxy firewall flushed behind its back", func(t *testing.T) {
		require.NoError(t, l.FlushProxy())
		require.NoError(t, l.Connect(false), "the flush lifted the ban")
		// The next ban finds its chain gone: the shim puts the chain back
		// from its state, with every ban and the hook, then bans. fail2ban
		// sees a ban that worked, and never has to repair anything.
		require.NoError(t, l.FailLogins("203.0.113.46", 3))
		_, err := l.WaitBan("203.0.113.46", true, banWait)
		require.NoError(t, err)
		assert.Contains(t, l.Rules("iptables"), "-A INPUT -p tcp -m multiport --dports 143,993 -j "+lab.Chain)
		assert.True(t, l.Banned(lab.AttackerV4), "the attacker's older ban is back with it")
		assert.Error(t, l.Connect(false))
		assert.NotContains(t, l.Log("fail2ban.log"), "Invariant check failed")
	})
	t.Run("9 after a reboot, restore brings every ban back", func(t *testing.T) {
		require.NoError(t, l.FlushProxy()) // a fresh boot's firewall holds nothing of ours
		require.NoError(t, l.Connect(false))
		code, out := l.Admin("restore")
		require.Equal(t, 0, code, out)
		for _, ip := range []string{lab.AttackerV4, lab.AttackerV6, "203.0.113.46"} {
			assert.True(t, l.Banned(ip), ip)
		}
		for _, bin := range []string{"iptables", "ip6tables"} {
			assert.Contains(t, l.Rules(bin), "-A INPUT -p tcp -m multiport --dports 143,993 -j "+lab.Chain)
		}
		assert.Error(t, l.Connect(false), "the attacker is refused again")
		assert.Error(t, l.Connect(true))
		code, out = l.Admin("reconcile")
		assert.Equal(t, 0, code, "no drift after restore: %s", out)
	})
	t.Run("10 every request ran as the account the key logs into", func(t *testing.T) {
		want := 0
		if mode == lab.UserMode {
			want = lab.UserID
		}
		recs, err := l.Audit()
		require.NoError(t, err)
		require.NotEmpty(t, recs)
		for _, r := range recs {
			require.Equal(t, float64(want), r["uid"], "%v", r["command"])
		}
	})
	t.Run("11 every restart path leaves exactly the bans fail2ban holds, none doubled", func(t *testing.T) {
		want, err := l.Fail2banBans()
		require.NoError(t, err)
		require.Len(t, want, 3, "the bans of the steps before")
		same := func(path string) {
			t.Helper()
			f2b, proxy, err := l.WaitSameBans(want, banWait)
			assert.NoError(t, err, "%s: fail2ban holds %v, the proxy bans %v, both should be %v", path, f2b, proxy, want)
		}
		same("before")
		_, err = l.Fail2ban("restart")
		require.NoError(t, err)
		require.NoError(t, l.WaitJail())
		same("restart")
		_, err = l.Fail2ban("reload", "--restart", lab.Jail)
		require.NoError(t, err)
		require.NoError(t, l.WaitJail())
		same("reload --restart " + lab.Jail)
		require.NoError(t, l.KillFail2ban())
		require.NoError(t, l.StartFail2ban())
		same("SIGKILL, then start")
		// A ban that runs out: fail2ban unbans it, and so does the proxy.
		_, err = l.Fail2ban("set", lab.Jail, "bantime", "3")
		require.NoError(t, err)
		_, err = l.Fail2ban("set", lab.Jail, "banip", "203.0.113.88")
		require.NoError(t, err)
		_, err = l.WaitBan("203.0.113.88", true, banWait)
		require.NoError(t, err)
		_, err = l.WaitBan("203.0.113.88", false, banWait)
		require.NoError(t, err, "the ban expired by bantime is lifted on the proxy")
		same("a ban expired by bantime")
	})
	return l
}
