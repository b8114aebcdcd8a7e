package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/test/nstest"
)

// persistentPlugins is netfilter-persistent's plugin directory, and the
// iptables plugins iptables-persistent puts there.
const persistentPlugins = "/usr/share/netfilter-persistent/plugins.d"

var iptablesPlugins = []string{"15-ip4tables", "25-ip6tables"}

// TestNetfilterPersistentSaveThenBoot: with the set backend, the rules
// "netfilter-persistent save" writes refer to the shim's ipsets. At the
// next boot (a fresh namespace: an empty firewall, no sets) the real
// netfilter-persistent runs its plugins in order; with the shipped
// plugin (examples/netfilter-persistent/14-f2b-shim) the sets are made
// before the iptables plugins load the saved rules, so the admin's whole
// firewall loads, with the shim's chains and bans. Without it the load
// fails and the admin's own rule is gone too: what the test guards.
// /etc/iptables and the plugin directory are bind-mounted from temp
// directories in a private mount namespace: the host's stay untouched.
func TestNetfilterPersistentSaveThenBoot(t *testing.T) {
	nstest.RequireRoot(t, "netfilter-persistent", "run-parts", "unshare", "ipset", "iptables-save")
	for _, p := range iptablesPlugins {
		if _, err := os.Stat(filepath.Join(persistentPlugins, p)); err != nil {
			if os.Getenv("F2B_SHIM_REQUIRE_SYSTEM_TESTS") != "" {
				t.Fatalf("iptables-persistent's %s is missing: run scripts/install-test-deps", p)
			}
			t.Skipf("iptables-persistent's %s is missing (scripts/install-test-deps installs it)", p)
		}
	}
	// The plugins run plain iptables-restore: the system's default.
	version, err := exec.Command("iptables", "--version").Output()
	require.NoError(t, err)
	backend := "legacy+ipset"
	if strings.Contains(string(version), "nf_tables") {
		backend = "nft+ipset"
	}
	ns, pol, _ := setup(t, backend, "")
	ns.MustRun(t, "iptables", "-A", "INPUT", "-s", "192.0.2.99/32", "-j", "ACCEPT") // the admin's own rule
	runAll(t, ns, pol, jailStart...)
	etc := t.TempDir()

	// plugins makes a plugin directory with the system's iptables
	// plugins, and the shim's when withShim.
	plugins := func(withShim bool) string {
		dir := t.TempDir()
		// Copies, not links: the directory is mounted over the original.
		for _, p := range iptablesPlugins {
			data, err := os.ReadFile(filepath.Join(persistentPlugins, p))
			require.NoError(t, err)
			require.NoError(t, os.WriteFile(filepath.Join(dir, p), data, 0o755))
		}
		if withShim {
			data, err := os.ReadFile(filepath.Join(repoRoot(t), "examples", "netfilter-persistent", "14-f2b-shim"))
			require.NoError(t, err)
			require.NoError(t, os.WriteFile(filepath.Join(dir, "14-f2b-shim"), data, 0o755))
		}
		return dir
	}
	persistent := func(ns *nstest.Netns, pluginDir, verb string) nstest.Result {
		script := fmt.Sprintf("set -e; mount --bind %s /etc/iptables; mount --bind %s %s; netfilter-persistent %s", etc, pluginDir, persistentPlugins, verb)
		cmd := ns.Command("unshare", "-m", "--propagation", "private", "sh", "-c", script)
		cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "F2B_SHIM=" + shim, "F2B_SHIM_DIR=" + filepath.Dir(pol)}
		return nstest.RunCmd(t, cmd)
	}
	r := persistent(ns, plugins(true), "save")
	require.Equal(t, 0, r.Code, r.Stdout+r.Stderr)
	saved, err := os.ReadFile(filepath.Join(etc, "rules.v4"))
	require.NoError(t, err)
	require.Contains(t, string(saved), "--match-set f2b-", "the saved rules refer to the shim's sets")

	t.Run("without the plugin the saved rules do not load", func(t *testing.T) {
		boot := nstest.NewNetns(t)
		persistent(boot, plugins(false), "start")
		assert.NotContains(t, boot.MustRun(t, "iptables", "-S"), "-A INPUT -s 192.0.2.99/32 -j ACCEPT", "the admin's rule is lost with the rest")
	})
	t.Run("with the plugin the whole saved firewall loads, the shim's bans included", func(t *testing.T) {
		boot := nstest.NewNetns(t)
		r := persistent(boot, plugins(true), "start")
		require.Equal(t, 0, r.Code, r.Stdout+r.Stderr)
		rules := boot.MustRun(t, "iptables", "-S")
		assert.Contains(t, rules, "-A INPUT -s 192.0.2.99/32 -j ACCEPT", "the admin's rule")
		assert.Contains(t, rules, "-A INPUT -p tcp -m multiport --dports 143,993 -j "+chain)
		assert.Equal(t, banned(t, ns, backend, "iptables", chain), banned(t, boot, backend, "iptables", chain))
		assert.Equal(t, banned(t, ns, backend, "ip6tables", chain), banned(t, boot, backend, "ip6tables", chain))
		sorted := func(s string) []string { f := strings.Fields(s); slices.Sort(f); return f }
		assert.Equal(t, sorted(setsOf(t, ns)), sorted(setsOf(t, boot)), "only the sets in use are made")
		// The shim's own restore then finds nothing to change.
		r = admin(t, boot, pol, "reconcile")
		assert.Equal(t, 0, r.Code, r.Stdout+r.Stderr)
	})
}

// repoRoot is the checkout the test runs from.
func repoRoot(t *testing.T) string {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}").Output()
	require.NoError(t, err)
	return strings.TrimSpace(string(out))
}
