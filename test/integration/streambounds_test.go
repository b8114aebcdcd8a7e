package integration

// System tests of issue 19: stream mode keeps every promise one-shot
// mode keeps. Each test performs the attack of one finding; run with
// F2B_SHIM_BINARY set to a build of 2cad799 they fail.

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/test/nstest"
)

// liveSession is a stream session the test talks to line by line.
type liveSession struct {
	cmd     *exec.Cmd
	in      io.WriteCloser
	replies chan string
	stderr  bytes.Buffer
	exited  chan error
}

func startSession(t *testing.T, ns *nstest.Netns, pol string) *liveSession {
	t.Helper()
	return startSessionReading(t, ns, pol, true)
}

// startSessionReading starts a session; with read false nothing ever
// reads its replies, as a client that stopped reading.
func startSessionReading(t *testing.T, ns *nstest.Netns, pol string, read bool) *liveSession {
	t.Helper()
	s := &liveSession{replies: make(chan string, 1<<16), exited: make(chan error, 1)}
	s.cmd = ns.Command(shim, "--policy", pol)
	s.cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "SSH_ORIGINAL_COMMAND=f2b-shim stream", "SSH_CONNECTION=192.0.2.10 50022 192.0.2.7 22"}
	s.cmd.Stderr = &s.stderr
	var err error
	s.in, err = s.cmd.StdinPipe()
	require.NoError(t, err)
	out, err := s.cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, s.cmd.Start())
	go func() {
		if read {
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				s.replies <- sc.Text()
			}
			close(s.replies)
		}
		s.exited <- s.cmd.Wait()
	}()
	t.Cleanup(func() {
		if s.cmd.ProcessState == nil {
			_ = s.cmd.Process.Kill() // our own child, by its pid
		}
	})
	return s
}

// send writes one line and waits for its reply.
func (s *liveSession) send(t *testing.T, line string) string {
	t.Helper()
	_, err := io.WriteString(s.in, line+"\n")
	require.NoError(t, err)
	select {
	case r, ok := <-s.replies:
		require.True(t, ok, "the session ended: %s", s.stderr.String())
		return r
	case <-time.After(30 * time.Second):
		t.Fatalf("no reply to %q", line)
	}
	return ""
}

// wait waits for the session's end and returns its exit code, or -1 when
// it did not end within limit (or died by a signal).
func (s *liveSession) wait(limit time.Duration) int {
	select {
	case <-s.exited:
		return s.cmd.ProcessState.ExitCode()
	case <-time.After(limit):
		return -1
	}
}

func verifyAudit(t *testing.T, ns *nstest.Netns, pol string) nstest.Result {
	t.Helper()
	return admin(t, ns, pol, "audit", "--verify")
}

// TestStreamBatchOnAFullAuditFilesystem: with about 100 KiB free on the
// audit log's filesystem, a stream of 508 new bans must not put a ban in
// the firewall without its audit line, and the log must end with a whole
// line, so that --verify passes once space is freed and more is written.
func TestStreamBatchOnAFullAuditFilesystem(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			logDir, out := filepath.Join(dir, "log"), filepath.Join(dir, "out")
			require.NoError(t, os.MkdirAll(logDir, 0o750))
			require.NoError(t, os.MkdirAll(out, 0o750))
			ns, pol, _ := setup(t, backend, "")
			bans := "rules"
			if usesSets(backend) {
				bans = "ipset"
			}
			pol = nstest.WritePolicy(t, filepath.Dir(pol), fmt.Sprintf("name = \"it-%s\"\naudit_log = %q\nstate_dir = %q\niptables_backend = %q\nbackend = %q\n",
				ipt(backend), filepath.Join(logDir, "audit.jsonl"), filepath.Join(dir, "state"), ipt(backend), bans))
			in := filepath.Join(dir, "in")
			lines := append([]string{"iptables -w -N " + chain}, banLines("iptables", 508)...)
			require.NoError(t, os.WriteFile(in, []byte(strings.Join(lines, "\n")+"\n"), 0o644))
			require.NoError(t, os.WriteFile(filepath.Join(dir, "more"), []byte("iptables -w -I "+chain+" 1 -s 203.0.113.9 -j DROP\n"), 0o644))
			// The tmpfs lives in the script's private mount namespace: the
			// log is copied out before it ends.
			code, stdout, stderr := runPrivate(t, ns, pol, fmt.Sprintf(`D=%s; O=%s; I=%s
mount -t tmpfs -o size=256k none "$D"
dd if=/dev/zero of="$D/fill" bs=4k count=39 2>/dev/null
set +e
SSH_ORIGINAL_COMMAND='f2b-shim stream' "$SHIM" --policy "$POLICY" <"$I/in" >"$O/replies" 2>"$O/stderr"
cp "$D/audit.jsonl" "$O/full.jsonl"
rm "$D/fill"
SSH_ORIGINAL_COMMAND='f2b-shim stream' "$SHIM" --policy "$POLICY" <"$I/more" >>"$O/replies" 2>>"$O/stderr"
"$SHIM" audit --verify --policy "$POLICY"; echo "verify=$?"
cp "$D/audit.jsonl" "$O/after.jsonl"
`, logDir, out, dir))
			require.Equal(t, 0, code, stderr)
			assert.Contains(t, stdout, "verify=0", "the chain holds after the full disk: %s", stdout)
			audited := map[string]bool{}
			for _, rec := range auditLines(t, filepath.Join(out, "after.jsonl")) {
				if op, ok := rec["op"].(map[string]any); ok && rec["result"] == "applied" {
					audited[fmt.Sprint(op["source"])] = true
				}
			}
			inFirewall := banned(t, ns, backend, "iptables", chain)
			t.Logf("%s: %d bans in the firewall, %d with an applied audit line", backend, len(inFirewall), len(audited))
			for _, src := range inFirewall {
				assert.True(t, audited[src], "%s is in the firewall without its audit line", src)
			}
			full, err := os.ReadFile(filepath.Join(out, "full.jsonl"))
			require.NoError(t, err)
			assert.True(t, bytes.HasSuffix(full, []byte("\n")), "the log ends with a whole line")
			replies, err := os.ReadFile(filepath.Join(out, "replies"))
			require.NoError(t, err)
			assert.NotContains(t, string(replies), " 5 failed", "nothing is carried out and then reported unaudited")
		})
	}
}

// TestStreamAuditGrowthIsBounded floods the log through allowed lines:
// bans over the quota, re-bans of one address, and quota-denied one-shot
// calls. Every request is counted, and the log grows by a few lines per
// second, not one per request.
func TestStreamAuditGrowthIsBounded(t *testing.T) {
	for _, backend := range []string{"nft", "legacy"} {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			ns, pol, audit := startedJail(t, backend, "max_new_bans_per_minute = 10\n")
			size := func() (int64, int) {
				b, err := os.ReadFile(audit)
				require.NoError(t, err)
				return int64(len(b)), strings.Count(string(b), "\n")
			}
			// changes is how many of the n requests change the firewall:
			// those are written one by one.
			grew := func(what string, n, changes int, run func()) {
				before, beforeLines := size()
				start := time.Now()
				run()
				took := time.Since(start)
				after, afterLines := size()
				bytes, lines := after-before, afterLines-beforeLines
				// At most two lines (the first in full, one count) per
				// kind and second, each at most 4 KiB; a flood sees few
				// kinds. Each flood here repeats one kind: besides its
				// changes, two lines for each second it touches.
				bound := int64(took.Seconds()+2) * 8 * 2 * 4096
				seconds := int(took.Seconds()) + 2
				t.Logf("%s: %d requests in %s wrote %d bytes, %d lines (bound %d bytes)", what, n, took.Round(time.Millisecond), bytes, lines, bound)
				assert.LessOrEqual(t, bytes, bound, what)
				assert.LessOrEqual(t, lines, changes+2*seconds, "%s: its changes, and two lines a second", what)
				assert.Less(t, lines, n/2, "%s: far less than a line per request", what)
			}
			grew("2,000 bans over the quota", 2000, 10, func() {
				r := ns.Stream(t, shim, pol, strings.Join(banLines("iptables", 2000), "\n")+"\n")
				require.Equal(t, 0, r.Code, r.Stderr)
				assert.GreaterOrEqual(t, strings.Count(r.Stdout, " 3 denied "), 1990, "the quota (10) holds")
			})
			again := "iptables -w -I " + chain + " 1 -s 203.0.113.45 -j REJECT --reject-with icmp-port-unreachable"
			grew("20,000 unchanged re-bans", 20000, 0, func() {
				r := ns.Stream(t, shim, pol, strings.Repeat(again+"\n", 20000))
				require.Equal(t, 0, r.Code, r.Stderr)
				assert.Equal(t, 20000, strings.Count(r.Stdout, " 0 unchanged"))
			})
			grew("20 quota-denied one-shot calls", 20, 0, func() {
				for i := range 20 {
					r := ns.Shim(t, shim, pol, fmt.Sprintf("iptables -w -I %s 1 -s 198.51.100.%d -j DROP", chain, i+1))
					require.Equal(t, 3, r.Code, r.Stderr)
				}
			})
			r := verifyAudit(t, ns, pol)
			assert.Equal(t, 0, r.Code, r.Stdout+r.Stderr)
		})
	}
}

// TestStreamFollowsLogrotate rotates the audit log with the shipped
// examples/logrotate/f2b-shim while a session is open: the ban made after
// the rotation is in the new audit.jsonl, and the chain verifies.
func TestStreamFollowsLogrotate(t *testing.T) {
	nstest.RequireRoot(t, "logrotate")
	for _, backend := range []string{"nft", "legacy"} {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			ns, pol, audit := startedJail(t, backend, "")
			rotate := shippedLogrotate(t, audit)
			s := startSession(t, ns, pol)
			assert.Equal(t, "1 0 applied", s.send(t, "iptables -w -I "+chain+" 1 -s 203.0.113.61 -j DROP"))
			rotate()
			assert.Equal(t, "2 0 applied", s.send(t, "iptables -w -I "+chain+" 1 -s 203.0.113.62 -j DROP"))
			require.NoError(t, s.in.Close())
			require.Equal(t, 0, s.wait(30*time.Second), s.stderr.String())
			_, err := os.Stat(audit)
			require.NoError(t, err, "the session made the new log")
			found := false
			for _, rec := range auditLines(t, audit) {
				if op, ok := rec["op"].(map[string]any); ok && op["source"] == "203.0.113.62/32" {
					found = true
				}
			}
			assert.True(t, found, "the ban after the rotation is in the current audit log")
			r := verifyAudit(t, ns, pol)
			assert.Equal(t, 0, r.Code, r.Stdout+r.Stderr)
		})
	}
}

// TestStreamObeysAPolicyChangeAndSIGTERM changes the policy under an open
// session (never_ban, then dry_run, then max_bans_per_chain): each next
// line is judged by the policy of now. SIGTERM then ends the session
// with exit 0.
func TestStreamObeysAPolicyChangeAndSIGTERM(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			ns, pol, _ := startedJail(t, backend, "")
			base, err := os.ReadFile(pol)
			require.NoError(t, err)
			s := startSession(t, ns, pol)
			assert.Equal(t, "1 0 applied", s.send(t, "iptables -w -I "+chain+" 1 -s 203.0.113.61 -j DROP"))
			rewrite := func(extra string) {
				require.NoError(t, os.WriteFile(pol+".new", append(append([]byte{}, base...), extra...), 0o644))
				require.NoError(t, os.Rename(pol+".new", pol))
			}
			rewrite("never_ban = [\"203.0.113.0/24\"]\n")
			assert.Regexp(t, `^2 3 denied .*never banned`, s.send(t, "iptables -w -I "+chain+" 1 -s 203.0.113.62 -j DROP"))
			rewrite("dry_run = true\n")
			assert.Equal(t, "3 0 dry-run", s.send(t, "iptables -w -I "+chain+" 1 -s 198.51.100.7 -j DROP"))
			rewrite("max_bans_per_chain = 1\n")
			// The set backend's bound is the set's maxelem, fixed when the
			// set is made: a lowered limit holds for new sets only, for
			// one-shot calls as for a stream.
			if !usesSets(backend) {
				assert.Regexp(t, `^4 3 denied .*max_bans_per_chain`, s.send(t, "iptables -w -I "+chain+" 1 -s 203.0.113.63 -j DROP"))
			}
			assert.NotContains(t, banned(t, ns, backend, "iptables", chain), "203.0.113.62/32")
			assert.NotContains(t, banned(t, ns, backend, "iptables", chain), "198.51.100.7/32")
			require.NoError(t, s.cmd.Process.Signal(syscall.SIGTERM))
			assert.Equal(t, 0, s.wait(10*time.Second), "SIGTERM ends the session cleanly: %s", s.stderr.String())
		})
	}
}

// TestStreamSessionsAreBounded opens max_stream_sessions sessions and one
// more, which is refused (exit 3, audited); and a client that stops
// reading its replies is ended by stream_idle_timeout.
func TestStreamSessionsAreBounded(t *testing.T) {
	for _, backend := range []string{"nft", "legacy"} {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			ns, pol, audit := startedJail(t, backend, "stream_idle_timeout = \"2s\"\n") // max_stream_sessions: 4 by default
			t.Run("a session past max_stream_sessions is refused", func(t *testing.T) {
				var open []*liveSession
				for range 4 {
					s := startSession(t, ns, pol)
					assert.Equal(t, "1 1 check-false", s.send(t, "iptables -w -C "+chain+" -s 192.0.2.99 -j DROP"))
					open = append(open, s)
				}
				r := ns.Stream(t, shim, pol, "iptables -w -C "+chain+" -s 192.0.2.99 -j DROP\n")
				assert.Equal(t, 3, r.Code, r.Stderr)
				assert.Contains(t, r.Stderr, "max_stream_sessions")
				assert.Contains(t, fmt.Sprint(lastAudit(t, audit)["reason"]), "max_stream_sessions", "the refusal is audited")
				for _, s := range open {
					require.NoError(t, s.in.Close())
					assert.Equal(t, 0, s.wait(10*time.Second))
				}
				r = ns.Stream(t, shim, pol, "iptables -w -C "+chain+" -s 192.0.2.99 -j DROP\n")
				assert.Equal(t, 0, r.Code, "a slot is free again: %s", r.Stderr)
			})
			t.Run("a client that stops reading is ended", func(t *testing.T) {
				s := startSessionReading(t, ns, pol, false)
				go func() {
					// Far more replies than a pipe holds, never read:
					// denials, which run no iptables, so the pipe fills
					// at once however loaded the machine is.
					line := "iptables -w -F INPUT\n"
					for range 50000 {
						if _, err := io.WriteString(s.in, line); err != nil {
							return
						}
					}
				}()
				code := s.wait(20 * time.Second)
				assert.NotEqual(t, -1, code, "the session outlived stream_idle_timeout (2s) by 18s")
				if code != -1 {
					assert.Contains(t, s.stderr.String(), "took no replies", "ended by the write deadline")
				}
			})
		})
	}
}

// TestMetricsAsTheServiceUser runs "f2b-shim metrics" as the shim's user
// in the least-privilege layout, where only f2b-shim carries the file
// capabilities (as the package installs it): the firewall is read, the
// drift is measured, and f2b_shim_up is 1. When the firewall cannot be
// read, no drift gauge claims a 0 that was never measured.
func TestMetricsAsTheServiceUser(t *testing.T) {
	for _, backend := range []string{"nft", "legacy"} {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			for _, caps := range []bool{true, false} {
				u := newUserSetup(t, backend, caps)
				helper, err := os.ReadFile(filepath.Join(filepath.Dir(shim), "f2b-shim-metrics"))
				require.NoError(t, err)
				require.NoError(t, os.WriteFile(filepath.Join(u.dir, "f2b-shim-metrics"), helper, 0o755))
				ns, _, _ := setup(t, backend, "")
				lock := lockSetup("0660")
				r := asUser(t, ns, u, lock, "", u.bin, "metrics", "--policy", u.pol)
				if caps {
					require.Equal(t, 0, r.Code, r.Stderr)
					assert.Contains(t, r.Stdout, `f2b_shim_up{policy="user"} 1`)
					assert.Contains(t, r.Stdout, `f2b_shim_drift{family="ipv4",kind="missing",policy="user"} 0`)
					continue
				}
				assert.NotEqual(t, 0, r.Code)
				assert.Contains(t, r.Stdout, `f2b_shim_up{policy="user"} 0`)
				assert.NotContains(t, r.Stdout, "f2b_shim_drift{", "a drift that was not measured is absent")
			}
		})
	}
}

// memberLines are n bans of distinct addresses of one /64.
func memberLines(n int, kind string) string {
	var b strings.Builder
	for i := range n {
		switch kind {
		case "ban":
			fmt.Fprintf(&b, "ip6tables -w -I %s 1 -s 2001:db8:6:4::%x -j DROP\n", chain, i+1)
		case "check":
			fmt.Fprintf(&b, "ip6tables -w -C %s -s 2001:db8:6:4::%x -j DROP\n", chain, i+1)
		}
	}
	return b.String()
}

// TestWidenedBanMembersAreBounded sends 20,000 addresses of one /64 with
// ban_prefix_v6 = 64: each new member counts toward the quota and toward
// max_bans_per_chain like a ban, so neither can be passed through one
// prefix; and checks of members stay cheap (logged, not asserted).
func TestWidenedBanMembersAreBounded(t *testing.T) {
	for _, backend := range []string{"nft", "legacy+ipset"} {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			ns, pol, _ := startedJail(t, backend, "ban_prefix_v6 = 64\nmax_new_bans_per_minute = 100\n")
			r := ns.Stream(t, shim, pol, memberLines(20000, "ban"))
			require.Equal(t, 0, r.Code, r.Stderr)
			taken := strings.Count(r.Stdout, " 0 applied") + strings.Count(r.Stdout, " 0 unchanged")
			t.Logf("%s: %d of 20,000 members of one /64 taken with max_new_bans_per_minute = 100", backend, taken)
			assert.LessOrEqual(t, taken, 100, "the quota counts members")
			assert.Contains(t, r.Stdout, "max_new_bans_per_minute")

			base, err := os.ReadFile(pol)
			require.NoError(t, err)
			require.NoError(t, os.WriteFile(pol, []byte(strings.Replace(string(base), "max_new_bans_per_minute = 100", "max_new_bans_per_minute = 1000000\nmax_bans_per_chain = 5000", 1)), 0o644))
			r = ns.Stream(t, shim, pol, memberLines(20000, "ban"))
			require.Equal(t, 0, r.Code, r.Stderr)
			taken = strings.Count(r.Stdout, " 0 applied") + strings.Count(r.Stdout, " 0 unchanged")
			t.Logf("%s: %d of 20,000 members taken with max_bans_per_chain = 5000", backend, taken)
			assert.LessOrEqual(t, taken, 5000, "max_bans_per_chain counts members")
			assert.Contains(t, r.Stdout, "max_bans_per_chain")

			start := time.Now()
			r = ns.Stream(t, shim, pol, memberLines(2000, "check"))
			require.Equal(t, 0, r.Code, r.Stderr)
			t.Logf("%s: 2,000 checks of members among %d took %s", backend, taken, time.Since(start).Round(time.Millisecond))
			assert.Equal(t, 2000, strings.Count(r.Stdout, " 0 check-true"), "a recorded member checks true")
		})
	}
}

// TestExpireLetsABanIn expires 3,000 due bans while the mail host bans
// another address: the ban waits for one chunk at most, well within a
// lock_timeout of 2s, and every due ban goes, from the firewall and the
// state, audited.
func TestExpireLetsABanIn(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			ns, pol, _ := startedJail(t, backend, "max_ban_time = \"2s\"\nlock_timeout = \"2s\"\nmax_new_bans_per_minute = 100000\n")
			r := ns.Stream(t, shim, pol, strings.Join(banLines("iptables", 3000), "\n")+"\n")
			require.Equal(t, 0, r.Code, r.Stderr)
			time.Sleep(2500 * time.Millisecond) // every ban is due now
			cmd := ns.Command(shim, "expire", "--policy", pol)
			cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
			var out, errOut bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &errOut
			start := time.Now()
			require.NoError(t, cmd.Start())
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			// As soon as expire has lifted its first bans from the
			// firewall, ban another.
			require.NoError(t, nstest.WaitFor(5*time.Minute, func() bool {
				return len(banned(t, ns, backend, "iptables", chain)) < 3002
			}))
			sent := time.Now()
			ban := ns.Shim(t, shim, pol, "iptables -w -I "+chain+" 1 -s 203.0.113.77 -j DROP")
			t.Logf("%s: the ban came %s after expire started, took %s, and ended with exit %d", backend, sent.Sub(start).Round(time.Millisecond), time.Since(sent).Round(time.Millisecond), ban.Code)
			assert.Equal(t, 0, ban.Code, "the ban got the lock during expire: %s", ban.Stderr)
			select {
			case err := <-done:
				require.NoError(t, err, errOut.String())
			case <-time.After(5 * time.Minute):
				t.Fatal("expire did not end")
			}
			t.Logf("%s: expire took %s: %s", backend, time.Since(start).Round(time.Millisecond), strings.TrimSpace(out.String()))
			assert.Contains(t, out.String(), "3003 bans expired")
			assert.Equal(t, []string{"203.0.113.77/32"}, banned(t, ns, backend, "iptables", chain))
			r = admin(t, ns, pol, "reconcile")
			assert.Equal(t, 0, r.Code, "state and firewall agree: %s%s", r.Stdout, r.Stderr)
		})
	}
}
