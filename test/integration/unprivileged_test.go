package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/test/nstest"
)

// userID stands for the f2b-shim system user; no passwd entry is needed to
// run a program under a uid.
const userID = 64123

// userSetup installs the shim as scripts/install does, in a temp dir that
// the user can reach: the binary with cap_net_admin,cap_net_raw+ep, the
// policy root-owned and readable by the user's group, the audit log's and
// state directories owned by the user.
type userSetup struct {
	dir, bin, pol, audit string
}

func newUserSetup(t *testing.T, backend string, caps bool) userSetup {
	nstest.RequireRoot(t, "setcap", "setpriv", "unshare", "ipset")
	dir, err := os.MkdirTemp("", "f2bt-user-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	u := userSetup{dir: dir, bin: filepath.Join(dir, "f2b-shim"), pol: filepath.Join(dir, "policy.toml"), audit: filepath.Join(dir, "log", "audit.jsonl")}
	data, err := os.ReadFile(shim)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(u.bin, data, 0o755))
	if caps {
		out, err := exec.Command("setcap", "cap_net_admin,cap_net_raw+ep", u.bin).CombinedOutput()
		require.NoError(t, err, "%s", out)
	}
	for _, d := range []string{"log", "state"} {
		require.NoError(t, os.Mkdir(filepath.Join(dir, d), 0o750))
		require.NoError(t, os.Chown(filepath.Join(dir, d), userID, userID))
	}
	bans := "rules"
	if usesSets(backend) {
		bans = "ipset"
	}
	require.NoError(t, os.WriteFile(u.pol, []byte(fmt.Sprintf("name = \"user\"\naudit_log = %q\nstate_dir = %q\niptables_backend = %q\nbackend = %q\n",
		u.audit, filepath.Join(dir, "state"), ipt(backend), bans)), 0o640))
	require.NoError(t, os.Chown(u.pol, 0, userID))
	return u
}

// lockSetup is the shell that gives the user's group read access to
// iptables-legacy's lock file, as examples/tmpfiles.d/f2b-shim.conf does on
// a real proxy; here in a private /run, so the host's stays as it is.
func lockSetup(mode string) string {
	return fmt.Sprintf("mount -t tmpfs none /run\ninstall -m %s -o 0 -g %d /dev/null /run/xtables.lock\n", mode, userID)
}

// asUser runs script's last command as the user, inside the namespace
// and a private mount namespace.
func asUser(t *testing.T, ns *nstest.Netns, u userSetup, setupScript, line string, args ...string) nstest.Result {
	script := setupScript + fmt.Sprintf("exec setpriv --reuid=%d --regid=%d --clear-groups \"$@\"", userID, userID)
	cmd := ns.Command("unshare", append([]string{"--mount", "--propagation", "private", "sh", "-euc", script, "sh"}, args...)...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "SSH_ORIGINAL_COMMAND=" + line, "SSH_CONNECTION=192.0.2.10 50022 192.0.2.7 22"}
	return nstest.RunCmd(t, cmd)
}

// TestUnprivilegedUser runs the whole action sequence as a non-root user
// whose only privilege is the binary's file capabilities.
func TestUnprivilegedUser(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			u := newUserSetup(t, backend, true)
			ns, _, _ := setup(t, backend, "")
			playSequence(t, backend, ns, u.audit, func(line string) nstest.Result {
				return asUser(t, ns, u, lockSetup("0640"), line, u.bin, "--policy", u.pol)
			})
			for _, rec := range auditLines(t, u.audit) {
				require.Equal(t, float64(userID), rec["uid"], "the shim ran as the user, not root")
			}
		})
	}
}

func TestUnprivilegedUserLimits(t *testing.T) {
	const create = "iptables -w -N " + chain
	t.Run("without file capabilities the shim says what to run", func(t *testing.T) {
		u := newUserSetup(t, "nft", false)
		ns, _, _ := setup(t, "nft", "")
		r := asUser(t, ns, u, "", create, u.bin, "--policy", u.pol)
		assert.Equal(t, 5, r.Code, r.Stderr)
		assert.Contains(t, r.Stderr, "without CAP_NET_ADMIN, CAP_NET_RAW")
		assert.Contains(t, r.Stderr, "run: setcap cap_net_admin,cap_net_raw+ep "+u.bin)
		assert.Equal(t, policyLines, ns.Rules(t, "iptables", "nft"))
	})
	t.Run("a root-only xtables lock is a clear firewall failure", func(t *testing.T) {
		u := newUserSetup(t, "legacy", true)
		ns, _, _ := setup(t, "legacy", "")
		r := asUser(t, ns, u, "mount -t tmpfs none /run\ninstall -m 0600 -o 0 -g 0 /dev/null /run/xtables.lock\n", create, u.bin, "--policy", u.pol)
		assert.Equal(t, 4, r.Code, r.Stderr)
		assert.Contains(t, r.Stderr, "/run/xtables.lock")
		assert.Equal(t, policyLines, ns.Rules(t, "iptables", "legacy"))
	})
	t.Run("a root-only policy cannot be read, and nothing of it is shown", func(t *testing.T) {
		u := newUserSetup(t, "nft", true)
		require.NoError(t, os.Chmod(u.pol, 0o600))
		ns, _, _ := setup(t, "nft", "")
		r := asUser(t, ns, u, "", create, u.bin, "--policy", u.pol)
		assert.Equal(t, 5, r.Code)
		assert.Contains(t, r.Stderr, "permission denied")
		assert.NotContains(t, r.Stderr, "audit_log")
	})
	t.Run("admin commands run as root leave the state usable by the user", func(t *testing.T) {
		u := newUserSetup(t, "nft", true)
		ns, _, _ := setup(t, "nft", "")
		require.Equal(t, 0, asUser(t, ns, u, "", create, u.bin, "--policy", u.pol).Code)
		require.NoError(t, os.Remove(filepath.Join(u.dir, "state", loadPolicy(t, u.pol).Name+".lock")))
		require.NoError(t, os.Remove(u.audit))
		for _, args := range [][]string{{"list"}, {"reconcile", "--fix"}, {"restore"}} {
			cmd := ns.Command(u.bin, append(args[:1:1], append([]string{"--policy", u.pol}, args[1:]...)...)...)
			r := nstest.RunCmd(t, cmd)
			require.Contains(t, []int{0, 1}, r.Code, "%v as root: %s", args, r.Stderr)
		}
		r := asUser(t, ns, u, "", "iptables -w -I "+chain+" 1 -s 203.0.113.45 -j DROP", u.bin, "--policy", u.pol)
		assert.Equal(t, 0, r.Code, "the user still bans after root's admin commands: %s", r.Stderr)
	})
	t.Run("the user cannot change the firewall except through the shim", func(t *testing.T) {
		u := newUserSetup(t, "legacy", true)
		for _, backend := range backends {
			ns, _, _ := setup(t, backend, "")
			for _, args := range [][]string{
				{"iptables-" + ipt(backend), "-F", "INPUT"},
				{"iptables-" + ipt(backend), "-N", chain},
				{"sh", "-c", "iptables-" + ipt(backend) + " -P INPUT DROP"},
				{"ipset", "create", "x", "hash:net"},
			} {
				r := asUser(t, ns, u, lockSetup("0640"), "", args...)
				assert.NotEqual(t, 0, r.Code, "%v as the user succeeded", args)
			}
			r := asUser(t, ns, u, lockSetup("0640"), "iptables -F INPUT", u.bin, "--policy", u.pol)
			assert.Equal(t, 3, r.Code)
			assert.True(t, strings.HasPrefix(r.Stderr, "f2b-shim: denied: "))
			assert.Equal(t, policyLines, ns.Rules(t, "iptables", backend))
		}
	})
}

// TestRestoreWithoutCapabilitiesSaysSo: a restore by the shim's user with
// a binary whose file capabilities are gone says that, with the forced
// command's exit status for it (5), not a firewall failure.
func TestRestoreWithoutCapabilitiesSaysSo(t *testing.T) {
	withCaps := newUserSetup(t, "nft", true)
	ns, _, _ := setup(t, "nft", "")
	require.Equal(t, 0, asUser(t, ns, withCaps, "", "iptables -w -N "+chain, withCaps.bin, "--policy", withCaps.pol).Code)
	out, err := exec.Command("setcap", "-r", withCaps.bin).CombinedOutput()
	require.NoError(t, err, "%s", out)
	rebooted := nstest.NewNetns(t)
	r := asUser(t, rebooted, withCaps, "", "", withCaps.bin, "restore", "--policy", withCaps.pol)
	assert.Equal(t, 5, r.Code, r.Stdout+r.Stderr)
	assert.Contains(t, r.Stderr, "setcap")
	assert.NotContains(t, r.Stdout, "holds no chains")
}
