package integration

import (
	"bytes"
	"fmt"
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

// private starts a shell script in the namespace and in a private mount
// namespace, so that it can hide or replace files (the xtables lock,
// iptables itself, the audit log's filesystem) without touching the host.
// $SHIM and $POLICY name the binary and the policy.
func private(ns *nstest.Netns, pol, script string) *exec.Cmd {
	cmd := ns.Command("unshare", "--mount", "--propagation", "private", "sh", "-euc", script)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "SHIM=" + shim, "POLICY=" + pol,
		"SSH_CONNECTION=192.0.2.10 50022 192.0.2.7 22"}
	return cmd
}

func runPrivate(t *testing.T, ns *nstest.Netns, pol, script string) (int, string, string) {
	r := nstest.RunCmd(t, private(ns, pol, script))
	return r.Code, r.Stdout, r.Stderr
}

func lastAudit(t *testing.T, path string) map[string]any {
	lines := auditLines(t, path)
	require.NotEmpty(t, lines)
	return lines[len(lines)-1]
}

// holdXtablesLock takes iptables-legacy's lock (in the script's private
// /run) and hands it to a background sleep, the only holder, so that
// killing $holder releases it; the sleep keeps no pipe of ours open.
func holdXtablesLock(seconds int) string {
	return fmt.Sprintf(`mount -t tmpfs none /run
exec 9>/run/xtables.lock
flock 9
sleep %d >/dev/null 2>&1 & holder=$!
exec 9>&-
`, seconds)
}

const ban45 = "iptables -w -I " + chain + " 1 -s 203.0.113.45 -j DROP"

func TestXtablesLockHeldLongerThanLockTimeout(t *testing.T) {
	ns, pol, audit := setup(t, "legacy", `lock_timeout = "2s"`)
	require.Equal(t, 0, ns.Shim(t, shim, pol, "iptables -w -N "+chain).Code)
	// Another program holds iptables-legacy's lock for 30 s. The shim
	// must give up by itself, long before that.
	start := time.Now()
	code, out, stderr := runPrivate(t, ns, pol, holdXtablesLock(30)+`
sleep 0.3
set +e
SSH_ORIGINAL_COMMAND="`+ban45+`" "$SHIM" --policy "$POLICY"; rc=$?
if kill -0 $holder 2>/dev/null; then echo "holder still holds the lock"; fi
kill $holder
exit $rc`)
	took := time.Since(start)
	t.Logf("the shim gave up after %s (lock_timeout 2s, plus 0.3s before it started)", took.Round(time.Millisecond))
	assert.Equal(t, 4, code, stderr)
	assert.Contains(t, out, "holder still holds the lock", "the shim returned while the lock was still held")
	assert.Contains(t, stderr, "f2b-shim: firewall: ")
	assert.Contains(t, stderr, "xtables lock")
	assert.Equal(t, 1, strings.Count(stderr, "\n"), "%q", stderr)
	rec := lastAudit(t, audit)
	assert.Equal(t, "failed", rec["result"])
	assert.Equal(t, float64(4), rec["iptables_status"])
	assert.NotContains(t, ns.Rules(t, "iptables", "legacy"), "203.0.113.45", "nothing was applied")
}

func TestIptablesMissingOrFailing(t *testing.T) {
	ns, pol, audit := setup(t, "legacy", "")
	t.Run("a missing iptables is a firewall failure that says what to install", func(t *testing.T) {
		code, _, stderr := runPrivate(t, ns, pol, `
mount -t tmpfs none /usr/sbin
SSH_ORIGINAL_COMMAND="iptables -w -N `+chain+`" exec "$SHIM" --policy "$POLICY"`)
		assert.Equal(t, 4, code)
		assert.Contains(t, stderr, "iptables-legacy not found in /usr/sbin, /sbin, /usr/bin, /bin; install the iptables package")
		assert.Equal(t, "failed", lastAudit(t, audit)["result"])
	})
	t.Run("a failing iptables is a firewall failure with its stderr in the audit log", func(t *testing.T) {
		fake := filepath.Join(t.TempDir(), "iptables")
		require.NoError(t, os.WriteFile(fake, []byte(`#!/bin/sh
case "$1" in --version) echo "iptables v1.8.9 (legacy)"; exit 0;; esac
echo "iptables: fault injected by the test" >&2
exit 2
`), 0o755))
		code, _, stderr := runPrivate(t, ns, pol, `
mount --bind `+fake+` "$(readlink -f /usr/sbin/iptables-legacy)"
SSH_ORIGINAL_COMMAND="iptables -w -N `+chain+`" exec "$SHIM" --policy "$POLICY"`)
		assert.Equal(t, 4, code)
		assert.Contains(t, stderr, "fault injected by the test")
		rec := lastAudit(t, audit)
		assert.Equal(t, float64(2), rec["iptables_status"])
		assert.Contains(t, rec["iptables_stderr"], "fault injected by the test")
	})
	assert.Equal(t, policyLines, ns.Rules(t, "iptables", "legacy"), "the real firewall was never touched")
}

func TestAuditLogUnusable(t *testing.T) {
	dir := t.TempDir()
	logDir := filepath.Join(dir, "auditfs")
	require.NoError(t, os.MkdirAll(logDir, 0o755))
	ns, pol, _ := setup(t, "nft", "")
	nstest.WritePolicy(t, filepath.Dir(pol), fmt.Sprintf("audit_log = %q\nstate_dir = %q\niptables_backend = \"nft\"\n",
		filepath.Join(logDir, "audit.jsonl"), filepath.Join(dir, "state")))
	for _, tt := range []struct{ name, mount string }{
		{"a full filesystem", `mount -t tmpfs -o size=64k none "$D"; dd if=/dev/zero of="$D/fill" bs=4k 2>/dev/null || true`},
		{"a read-only filesystem", `mount -t tmpfs -o ro none "$D"`},
	} {
		t.Run(tt.name+" refuses the request and applies nothing", func(t *testing.T) {
			before := snapshot(t, ns, "nft")
			code, _, stderr := runPrivate(t, ns, pol, "D="+logDir+"\n"+tt.mount+"\nSSH_ORIGINAL_COMMAND='iptables -w -N "+chain+"' exec \"$SHIM\" --policy \"$POLICY\"")
			assert.Equal(t, 5, code, stderr)
			assert.Contains(t, stderr, "f2b-shim: denied: cannot write the audit log")
			assert.Contains(t, stderr, "nothing was changed")
			assert.Equal(t, before, snapshot(t, ns, "nft"))
		})
	}
}

func TestUnsafePolicyFileIsRefused(t *testing.T) {
	ns, pol, _ := setup(t, "nft", "")
	for _, tt := range []struct {
		name   string
		change func() error
		want   string
	}{
		{"group-writable", func() error { return os.Chmod(pol, 0o664) }, "chmod go-w"},
		{"world-writable", func() error { return os.Chmod(pol, 0o646) }, "chmod go-w"},
		{"owned by another user", func() error { return os.Chown(pol, 65534, 65534) }, "chown root:"},
	} {
		t.Run("a "+tt.name+" policy is refused", func(t *testing.T) {
			require.NoError(t, os.Chmod(pol, 0o644))
			require.NoError(t, os.Chown(pol, 0, 0))
			require.NoError(t, tt.change())
			r := ns.Shim(t, shim, pol, "iptables -w -N "+chain)
			assert.Equal(t, 5, r.Code)
			assert.Contains(t, r.Stderr, "f2b-shim: policy: ")
			assert.Contains(t, r.Stderr, tt.want)
		})
	}
	assert.Equal(t, policyLines, ns.Rules(t, "iptables", "nft"))
}

func TestStoppedHalfway(t *testing.T) {
	ns, pol, audit := setup(t, "legacy", `lock_timeout = "20s"`)
	require.Equal(t, 0, ns.Shim(t, shim, pol, "iptables -w -N "+chain).Code)

	t.Run("SIGTERM: the shim still finishes its operation and audits it", func(t *testing.T) {
		cmd := private(ns, pol, holdXtablesLock(2)+`
sleep 0.3
SSH_ORIGINAL_COMMAND="`+ban45+`" exec "$SHIM" --policy "$POLICY"`)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		require.NoError(t, cmd.Start())
		time.Sleep(time.Second) // the shim now waits for the xtables lock
		require.NoError(t, signalShim(t, "SIGTERM"))
		assert.NoError(t, cmd.Wait(), stderr.String())
		rec := lastAudit(t, audit)
		assert.Equal(t, "applied", rec["result"])
		assert.Equal(t, 1, strings.Count(ns.Rules(t, "iptables", "legacy"), "203.0.113.45/32"))
	})
	t.Run("SIGKILL: the next invocation is not blocked, and no rule is doubled", func(t *testing.T) {
		cmd := private(ns, pol, holdXtablesLock(2)+`
sleep 0.3
SSH_ORIGINAL_COMMAND="iptables -w -I `+chain+` 1 -s 203.0.113.46 -j DROP" exec "$SHIM" --policy "$POLICY"`)
		require.NoError(t, cmd.Start())
		time.Sleep(time.Second) // the shim holds its own lock and waits for the xtables lock
		require.NoError(t, signalShim(t, "SIGKILL"))
		_ = cmd.Wait()
		// The shim's lock died with it: this runs at once, outside the
		// private /run, and must not wait for the killed one.
		r := ns.Shim(t, shim, pol, "iptables -w -I "+chain+" 1 -s 203.0.113.47 -j DROP")
		assert.Equal(t, 0, r.Code, r.Stderr)
		time.Sleep(2 * time.Second) // let the orphaned iptables call, if any, end
		rules := ns.Rules(t, "iptables", "legacy")
		for _, ip := range []string{"203.0.113.45", "203.0.113.47"} {
			assert.Equal(t, 1, strings.Count(rules, ip+"/32"), ip)
		}
		assert.LessOrEqual(t, strings.Count(rules, "203.0.113.46/32"), 1, "the killed ban is either in place once or not at all")
		again := ns.Shim(t, shim, pol, "iptables -w -I "+chain+" 1 -s 203.0.113.46 -j DROP")
		assert.Equal(t, 0, again.Code, "fail2ban's retry of the killed ban succeeds")
		assert.Equal(t, 1, strings.Count(ns.Rules(t, "iptables", "legacy"), "203.0.113.46/32"))
	})
}

// signalShim sends sig to the shim processes this test started: those
// running this test's binary path, which no other program uses.
func signalShim(t *testing.T, sig string) error {
	out, err := exec.Command("pgrep", "-f", "^"+shim+" ").Output()
	if err != nil {
		return fmt.Errorf("no shim process found: %v", err)
	}
	for _, f := range strings.Fields(string(out)) {
		var pid int
		fmt.Sscan(f, &pid)
		s := map[string]syscall.Signal{"SIGTERM": syscall.SIGTERM, "SIGKILL": syscall.SIGKILL}[sig]
		if err := syscall.Kill(pid, s); err != nil {
			return err
		}
	}
	return nil
}

func TestBanLimit(t *testing.T) {
	ns, pol, audit := setup(t, "nft", "max_bans_per_chain = 3\n")
	require.Equal(t, 0, ns.Shim(t, shim, pol, "iptables -w -N "+chain).Code)
	for i := 1; i <= 3; i++ {
		require.Equal(t, 0, ns.Shim(t, shim, pol, fmt.Sprintf("iptables -w -I %s 1 -s 203.0.113.%d -j DROP", chain, i)).Code)
	}
	r := ns.Shim(t, shim, pol, "iptables -w -I "+chain+" 1 -s 203.0.113.4 -j DROP")
	assert.Equal(t, 3, r.Code)
	assert.Contains(t, r.Stderr, `f2b-shim: denied: ban limit reached: chain "`+chain+`" already holds 3 bans (max_bans_per_chain)`)
	assert.Equal(t, "denied", lastAudit(t, audit)["result"])
	assert.Equal(t, 0, ns.Shim(t, shim, pol, "iptables -w -D "+chain+" -s 203.0.113.1 -j DROP").Code, "an unban still works")
	assert.Equal(t, 0, ns.Shim(t, shim, pol, "iptables -w -I "+chain+" 1 -s 203.0.113.4 -j DROP").Code, "and makes room again")
	assert.Equal(t, 3, strings.Count(ns.Rules(t, "iptables", "nft"), "-A "+chain+" -s "))
}
