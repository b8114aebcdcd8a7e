package relay

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestMakeDirUnderAStickyDirectory: an outbox_dir to be made in a
// root-owned sticky directory such as /tmp is made, as CheckDir's
// comment promises, rather than refused with advice to chmod /tmp. If
// another user wins the race and makes the directory, or a link by its
// name, between the relay's look and its mkdir, the relay refuses it
// before it makes anything in it: nothing is made through the link.
func TestMakeDirUnderAStickyDirectory(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the sticky directory must be root's, and the other user's entries another uid's")
	}
	sticky := func(t *testing.T) string {
		d := filepath.Join(t.TempDir(), "tmp")
		require.NoError(t, os.Mkdir(d, 0o700))
		require.NoError(t, os.Chmod(d, os.ModeSticky|0o777))
		return d
	}
	t.Run("a missing outbox_dir under a sticky /tmp is made", func(t *testing.T) {
		dir := filepath.Join(sticky(t), "f2b-shim", "imap")
		require.NoError(t, MakeDir(dir))
		st, err := os.Lstat(dir)
		require.NoError(t, err)
		assert.True(t, st.IsDir())
	})
	t.Run("the outbox directory itself may not be a sticky /tmp", func(t *testing.T) {
		err := MakeDir(sticky(t))
		require.Error(t, err)
		assert.Contains(t, err.Error(), "is writable by its group or by others")
	})
	for _, tc := range []struct {
		name  string
		plant func(t *testing.T, path, victim string)
		want  string
	}{
		{"a link another user makes in the race is not followed", func(t *testing.T, path, victim string) {
			require.NoError(t, os.Symlink(victim, path))
			require.NoError(t, os.Lchown(path, 65534, 65534))
		}, "is a symbolic link"},
		{"a directory another user makes in the race is refused", func(t *testing.T, path, _ string) {
			require.NoError(t, os.Mkdir(path, 0o755))
			require.NoError(t, os.Chown(path, 65534, 65534))
		}, "belongs to uid 65534"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			victim := t.TempDir()
			parent := filepath.Join(sticky(t), "f2b-shim")
			beforeMkdir = func(p string) {
				if p == parent {
					tc.plant(t, p, victim)
				}
			}
			defer func() { beforeMkdir = func(string) {} }()
			err := MakeDir(filepath.Join(parent, "imap"))
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
			entries, err := os.ReadDir(victim)
			require.NoError(t, err)
			assert.Empty(t, entries, "made through the other user's link")
			entries, err = os.ReadDir(parent)
			if err == nil {
				assert.Empty(t, entries, "made in the other user's directory")
			}
		})
	}
}
