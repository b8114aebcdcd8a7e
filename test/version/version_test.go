// Package version tests scripts/version: the versions it gives successive
// builds must sort upwards the way dpkg and apt sort them, or apt refuses
// a newer build as a downgrade.
package version

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// run runs a command in dir and returns its trimmed output.
func run(t *testing.T, dir string, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@example.org",
		"GIT_COMMITTER_NAME=t", "GIT_COMMITTER_EMAIL=t@example.org", "GIT_CONFIG_GLOBAL=/dev/null")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s %s: %s", name, strings.Join(args, " "), out)
	return strings.TrimSpace(string(out))
}

// TestVersionsSortUpwards makes commits in a throw-away repository that
// holds scripts/version, untagged and then after a tag, and checks with
// dpkg that each build's version sorts above the one before.
func TestVersionsSortUpwards(t *testing.T) {
	for _, tool := range []string{"git", "dpkg"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed", tool)
		}
	}
	script, err := os.ReadFile("../../scripts/version")
	require.NoError(t, err)
	dir := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "scripts"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "scripts/version"), script, 0o755))
	run(t, dir, "git", "init", "-q")
	run(t, dir, "git", "add", ".")

	var versions []string
	commit := func(i int, tag string) {
		// Every commit gets its own content, so the hashes differ in an
		// order that has nothing to do with the commits' order.
		require.NoError(t, os.WriteFile(filepath.Join(dir, "f"), []byte(strings.Repeat("x", i)), 0o644))
		run(t, dir, "git", "add", "f")
		run(t, dir, "git", "commit", "-q", "-m", "commit")
		if tag != "" {
			run(t, dir, "git", "tag", tag)
		}
		versions = append(versions, run(t, dir, "scripts/version"))
	}
	for i := 1; i <= 12; i++ {
		commit(i, "")
	}
	commit(13, "v1.0.0")
	for i := 14; i <= 25; i++ {
		commit(i, "")
	}
	require.True(t, strings.HasPrefix(versions[0], "0.0~git.1."), "the first untagged build is %q", versions[0])
	require.Equal(t, "1.0.0", versions[12])
	for i := 1; i < len(versions); i++ {
		cmd := exec.Command("dpkg", "--compare-versions", versions[i], "gt", versions[i-1])
		if err := cmd.Run(); err != nil {
			t.Errorf("build %d's version %q does not sort above build %d's %q", i+1, versions[i], i, versions[i-1])
		}
	}

	// A change not yet committed sorts above its commit, below the next.
	require.NoError(t, os.WriteFile(filepath.Join(dir, "f"), []byte("changed"), 0o644))
	dirty := run(t, dir, "scripts/version")
	require.True(t, strings.HasSuffix(dirty, "+dirty"), dirty)
	require.NoError(t, exec.Command("dpkg", "--compare-versions", dirty, "gt", versions[len(versions)-1]).Run(), "%q is not above %q", dirty, versions[len(versions)-1])
}
