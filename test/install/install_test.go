// Package install tests scripts/install into a scratch root (--root), so
// that the host's users, /etc and /usr/local stay as they are.
package install

import (
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/test/e2e/lab"
	"github.com/f2b-shim/f2b-shim/test/nstest"
)

func scratchRoot(t *testing.T) string {
	root := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(root, "etc"), 0o755))
	// useradd --root works on the scratch root's own account files.
	for _, f := range []string{"passwd", "group", "shadow", "gshadow", "login.defs"} {
		data, err := os.ReadFile(filepath.Join("/etc", f))
		if os.IsNotExist(err) {
			continue
		}
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(root, "etc", f), data, 0o644))
	}
	return root
}

func install(t *testing.T, args ...string) string {
	cmd := exec.Command(filepath.Join(lab.RepoRoot(), "scripts", "install"), args...)
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	return string(out)
}

func owner(t *testing.T, path string) (uint32, uint32, os.FileMode) {
	st, err := os.Stat(path)
	require.NoError(t, err)
	sys := st.Sys().(*syscall.Stat_t)
	return sys.Uid, sys.Gid, st.Mode().Perm()
}

func TestInstallUserMode(t *testing.T) {
	nstest.RequireRoot(t, "useradd", "setcap", "getcap")
	bin, err := nstest.BuildShim(t.TempDir())
	require.NoError(t, err)
	root := scratchRoot(t)

	out := install(t, "--root", root, "--binary", bin)
	assert.Contains(t, out, `restrict,from="MAIL-HOST-ADDRESS",command="/usr/local/sbin/f2b-shim --policy /etc/f2b-shim/policy.toml"`)
	assert.Contains(t, out, "AuthorizedKeysFile /etc/f2b-shim/authorized_keys")
	first := tree(t, root)
	install(t, "--root", root, "--binary", bin)
	assert.Equal(t, first, tree(t, root), "a second run changes nothing")

	passwd, err := os.ReadFile(filepath.Join(root, "etc", "passwd"))
	require.NoError(t, err)
	var entry string
	for _, l := range strings.Split(string(passwd), "\n") {
		if strings.HasPrefix(l, "f2b-shim:") {
			assert.Empty(t, entry, "one user, however often install runs")
			entry = l
		}
	}
	require.NotEmpty(t, entry)
	f := strings.Split(entry, ":")
	assert.Equal(t, "/bin/sh", f[6], "sshd runs command= through the user's shell")
	shadow, err := os.ReadFile(filepath.Join(root, "etc", "shadow"))
	require.NoError(t, err)
	assert.Contains(t, string(shadow), "\nf2b-shim:*:", "no password, and not locked")

	sbin := filepath.Join(root, "usr/local/sbin/f2b-shim")
	caps, err := exec.Command("getcap", sbin).CombinedOutput()
	require.NoError(t, err)
	assert.Contains(t, string(caps), "cap_net_admin,cap_net_raw=ep")
	userUID, userGID := f[2], f[3]
	uid, gid, mode := owner(t, sbin)
	assert.Equal(t, "0:"+userGID+":750", fmt.Sprintf("%d:%d:%o", uid, gid, mode), "root-owned, the shim's group may run it, others may not")
	st, _ := os.Stat(sbin)
	assert.Zero(t, st.Mode()&os.ModeSetuid)
	t.Run("another local user cannot run the binary that holds CAP_NET_ADMIN", func(t *testing.T) {
		nstest.RequireRoot(t, "setpriv")
		// Open the path for everyone, so that only the binary's own mode
		// stands in the way; a 0755 copy beside it shows the test can fail.
		for d := sbin; d != "/"; d = filepath.Dir(d) {
			if st, err := os.Stat(d); err == nil && st.IsDir() && st.Mode().Perm()&0o005 != 0o005 {
				require.NoError(t, os.Chmod(d, st.Mode().Perm()|0o005))
			}
		}
		open := filepath.Join(filepath.Dir(sbin), "f2b-shim-0755")
		data, err := os.ReadFile(sbin)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(open, data, 0o755))
		defer os.Remove(open)
		asNobody := func(bin string) (string, error) {
			// Through sh: setpriv's own execve can still pass the
			// permission check with root's capabilities.
			out, err := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", `exec "$0" version`, bin).CombinedOutput()
			return string(out), err
		}
		out, err := asNobody(open)
		assert.NoError(t, err, "a 0755 copy runs as nobody: %s", out)
		out, err = asNobody(sbin)
		assert.Error(t, err, "the installed binary does not")
		assert.Contains(t, out, "Permission denied")
	})

	for path, want := range map[string]string{
		"etc/f2b-shim/policy.toml":            "0:" + userGID + ":640",
		"var/lib/f2b-shim":                    userUID + ":" + userGID + ":750",
		"var/log/f2b-shim":                    userUID + ":" + userGID + ":750",
		"run/xtables.lock":                    "0:" + userGID + ":640",
		"etc/tmpfiles.d/f2b-shim.conf":        "0:0:644",
		"usr/local/share/man/man8/f2b-shim.8": "0:0:644",
	} {
		uid, gid, mode := owner(t, filepath.Join(root, path))
		assert.Equal(t, want, fmt.Sprintf("%d:%d:%o", uid, gid, mode), path)
	}

	out = install(t, "--root", root, "--uninstall")
	assert.Contains(t, out, "kept")
	_, err = os.Stat(sbin)
	assert.True(t, os.IsNotExist(err), "the binary is gone")
	passwd, _ = os.ReadFile(filepath.Join(root, "etc", "passwd"))
	assert.Contains(t, string(passwd), "\nf2b-shim:", "the user stays: a freed uid could go to another daemon, which a reinstall would then trust")
	_, err = os.Stat(filepath.Join(root, "etc/f2b-shim/policy.toml"))
	assert.NoError(t, err, "the policy is kept")
	install(t, "--root", root, "--uninstall", "--purge")
	_, err = os.Stat(filepath.Join(root, "var/log/f2b-shim"))
	assert.True(t, os.IsNotExist(err), "--purge removes the audit log too")
}

func TestInstallRootMode(t *testing.T) {
	nstest.RequireRoot(t, "useradd")
	bin, err := nstest.BuildShim(t.TempDir())
	require.NoError(t, err)
	root := scratchRoot(t)
	out := install(t, "--root", root, "--binary", bin, "--mode", "root")
	assert.Contains(t, out, "/root/.ssh/authorized_keys")
	assert.Contains(t, out, "PermitRootLogin forced-commands-only")
	caps, _ := exec.Command("getcap", filepath.Join(root, "usr/local/sbin/f2b-shim")).CombinedOutput()
	assert.Empty(t, strings.TrimSpace(string(caps)), "root mode needs no file capabilities")
	passwd, _ := os.ReadFile(filepath.Join(root, "etc", "passwd"))
	assert.NotContains(t, string(passwd), "\nf2b-shim:")
	uid, gid, _ := owner(t, filepath.Join(root, "var/log/f2b-shim"))
	assert.Equal(t, [2]uint32{0, 0}, [2]uint32{uid, gid})
}

// tree lists every file below root with its owner, mode and content.
func tree(t *testing.T, root string) string {
	var b strings.Builder
	require.NoError(t, filepath.Walk(root, func(path string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		sys := info.Sys().(*syscall.Stat_t)
		fmt.Fprintf(&b, "%s %d:%d %v", strings.TrimPrefix(path, root), sys.Uid, sys.Gid, info.Mode())
		if info.Mode().IsRegular() {
			data, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			fmt.Fprintf(&b, " %x", sha256.Sum256(data))
		}
		b.WriteString("\n")
		return nil
	}))
	return b.String()
}

// TestInstallIntoAnEmptyRootAndSwitchModes installs into an empty
// directory, checks the units, the logrotate file and the sshd block it
// prints, then switches to root mode and back: each switch leaves the
// shim's directories to the account that now logs in, so the shim can go
// on using them.
func TestInstallIntoAnEmptyRootAndSwitchModes(t *testing.T) {
	nstest.RequireRoot(t, "useradd", "setcap", "getcap")
	bin, err := nstest.BuildShim(t.TempDir())
	require.NoError(t, err)
	root := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(root, "etc/ssh/sshd_config.d"), 0o755)) // as Debian 12 has it
	out := install(t, "--root", root, "--binary", bin)
	assert.Contains(t, out, "/etc/ssh/sshd_config.d/f2b-shim.conf", "the block is offered as a drop-in where sshd includes them")
	_, err = os.Stat(filepath.Join(root, "etc/ssh/sshd_config.d/f2b-shim.conf"))
	assert.True(t, os.IsNotExist(err), "offered, not put in place behind the admin's back")
	example, err := os.ReadFile(filepath.Join(lab.RepoRoot(), "examples", "ssh", "sshd_config-f2b-shim.conf"))
	require.NoError(t, err)
	for _, l := range strings.Split(strings.TrimSpace(string(example)), "\n") {
		assert.Contains(t, out, l, "the block it prints is the example file")
	}
	for _, f := range []string{
		"etc/systemd/system/f2b-shim-restore.service", "etc/systemd/system/f2b-shim-expire.timer", "etc/systemd/system/f2b-shim-metrics.timer",
		"etc/systemd/system/f2b-shim-reconcile.service", "etc/systemd/system/f2b-shim-reconcile.timer",
		"etc/logrotate.d/f2b-shim", "usr/local/sbin/f2b-shim-metrics",
	} {
		_, err := os.Stat(filepath.Join(root, f))
		assert.NoError(t, err, f)
	}
	if want, err := nstest.GitVersion(); err == nil {
		got, err := exec.Command(filepath.Join(root, "usr/local/sbin/f2b-shim"), "--version").Output()
		require.NoError(t, err)
		assert.Equal(t, "f2b-shim "+want+"\n", string(got), "the version is git describe's")
	}
	for _, link := range []string{"multi-user.target.wants/f2b-shim-restore.service", "timers.target.wants/f2b-shim-expire.timer", "timers.target.wants/f2b-shim-reconcile.timer"} {
		target, err := os.Readlink(filepath.Join(root, "etc/systemd/system", link))
		assert.NoError(t, err, "enabled: %s", link)
		assert.Equal(t, "/etc/systemd/system/"+filepath.Base(link), target)
	}
	// The state and log the shim's user made.
	state := filepath.Join(root, "var/lib/f2b-shim")
	passwd, err := os.ReadFile(filepath.Join(root, "etc/passwd"))
	require.NoError(t, err)
	require.Contains(t, string(passwd), "f2b-shim:")
	uid, gid, _ := owner(t, state)
	require.NoError(t, os.WriteFile(filepath.Join(state, "default.db"), nil, 0o640))
	require.NoError(t, os.Chown(filepath.Join(state, "default.db"), int(uid), int(gid)))

	install(t, "--root", root, "--binary", bin, "--mode", "root")
	for _, f := range []string{"var/lib/f2b-shim", "var/lib/f2b-shim/default.db", "var/log/f2b-shim"} {
		u, g, _ := owner(t, filepath.Join(root, f))
		assert.Equal(t, [2]uint32{0, 0}, [2]uint32{u, g}, "root mode: %s is root's", f)
	}
	unit, err := os.ReadFile(filepath.Join(root, "etc/systemd/system/f2b-shim-restore.service"))
	require.NoError(t, err)
	assert.NotContains(t, string(unit), "User=f2b-shim", "root mode's units run as root")
	_, err = os.Stat(filepath.Join(root, "etc/tmpfiles.d/f2b-shim.conf"))
	assert.True(t, os.IsNotExist(err), "root mode needs no group on the xtables lock")

	tmp := t.TempDir()
	cmd := exec.Command(filepath.Join(lab.RepoRoot(), "scripts", "install"), "--root", root, "--binary", bin)
	cmd.Env = append(os.Environ(), "TMPDIR="+tmp)
	out2, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out2)
	u, g, _ := owner(t, filepath.Join(state, "default.db"))
	assert.Equal(t, [2]uint32{uid, gid}, [2]uint32{u, g}, "back in user mode, the user's again")
	left, err := os.ReadDir(tmp)
	require.NoError(t, err)
	assert.Empty(t, left, "no temp files left behind")
}
