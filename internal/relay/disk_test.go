package relay

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

// TestLoaderKeepsWholeRecordsAroundATornLine: the file an older relay
// left after a full disk (issue 21: "341 ban 203341 ban 198.51.100.1/32",
// a torn append glued to the next one), and a foreign line someone
// wrote, are skipped and said; every whole record around them is kept,
// the glued one included, and the relay starts.
func TestLoaderKeepsWholeRecordsAroundATornLine(t *testing.T) {
	dir := t.TempDir()
	content := "339 start\n340 ban 192.0.2.1/32\n341 ban 203341 ban 198.51.100.1/32\n342 ban 198.51.100.2/32\nrm -rf /\n343 unban 192.0.2.1/32\n344 ban 198.51.1"
	require.NoError(t, os.WriteFile(filepath.Join(dir, logName), []byte(content), 0o600))
	l := &logs{}
	o, err := OpenOutbox(dir, []string{"p"}, l.logf)
	require.NoError(t, err, "a torn or foreign line never stops the relay")
	defer o.Close()
	assert.Equal(t, []string{"start", "ban 198.51.100.1/32", "ban 198.51.100.2/32", "unban 192.0.2.1/32"}, live(o))
	assert.Contains(t, l.text(), `line 3: the torn start of "341 ban 203341 ban 198.51.100.1/32" (its record "341 ban 198.51.100.1/32" is kept)`)
	assert.Contains(t, l.text(), `line 5 "rm -rf /"`)
	assert.Contains(t, l.text(), `the last line "344 ban 198.51.1" was cut short`)
	require.NoError(t, o.Append(Op{Kind: Ban, Addr: mustPrefix("192.0.2.7")}))
	assert.Equal(t, uint64(344), o.ops[len(o.ops)-1].Seq, "the cut-short record's number is used again: it was never acknowledged")
	data, err := os.ReadFile(filepath.Join(dir, logName))
	require.NoError(t, err)
	assert.NotContains(t, string(data), "rm -rf", "the file was rewritten without what was skipped")
	assert.True(t, bytes.HasSuffix(data, []byte("\n")))
}

// inTmpfs runs the calling test again in a private mount namespace
// (unshare -m), with a tmpfs of the given size at dir: the host's mounts
// are never touched, and the mount goes with the namespace.
func inTmpfs(t *testing.T, size string) (dir string, inside bool) {
	t.Helper()
	const env = "F2B_SHIM_RELAY_TMPFS"
	if d := os.Getenv(env); d != "" {
		return d, true
	}
	nstest.RequireRoot(t, "unshare", "mount")
	dir = t.TempDir()
	script := fmt.Sprintf("mount -t tmpfs -o size=%s,mode=0700 f2bt-outbox %q && exec %q -test.run '^%s$' -test.v", size, dir, os.Args[0], t.Name())
	cmd := exec.Command("unshare", "-m", "--propagation", "private", "sh", "-c", script)
	cmd.Env = append(os.Environ(), env+"="+dir)
	out, err := cmd.CombinedOutput()
	t.Logf("in a private mount namespace with a %s tmpfs:\n%s", size, out)
	require.NoError(t, err)
	require.Contains(t, string(out), "--- PASS: "+t.Name())
	return dir, false
}

// writeBacklog leaves in dir the outbox of a jail "imap" that an earlier
// relay wrote while its proxy was down: reBans re-bans of 20 IPv4
// addresses and fresh IPv6 bans, so more than twice what is live and a
// start wants to rewrite it. It returns the jail's directory and the
// last record's number.
func writeBacklog(t *testing.T, dir string, reBans, fresh int) (string, int) {
	box := filepath.Join(dir, "imap")
	require.NoError(t, os.Mkdir(box, 0o700))
	var b strings.Builder
	seq := 0
	for i := range reBans {
		seq++
		fmt.Fprintf(&b, "%d ban 192.0.2.%d/32\n", seq, i%20)
	}
	for i := range fresh {
		seq++
		fmt.Fprintf(&b, "%d ban 2001:db8::%x/128\n", seq, i)
	}
	require.NoError(t, os.WriteFile(filepath.Join(box, logName), []byte(b.String()), 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(box, "lock"), nil, 0o600))
	return box, seq
}

// fill takes every free block of dir's filesystem.
func fill(t *testing.T, dir string) *os.File {
	f, err := os.Create(filepath.Join(dir, "filler"))
	require.NoError(t, err)
	buf := make([]byte, 4096)
	for {
		if _, err := f.Write(buf); err != nil {
			require.ErrorIs(t, err, syscall.ENOSPC)
			break
		}
	}
	// Smaller writes fill the last partial block.
	for {
		if _, err := f.Write(buf[:64]); err != nil {
			break
		}
	}
	return f
}

// TestOutboxOnAFullFilesystem: on a real full tmpfs, an append that does
// not fit is refused and leaves no part of itself; once there is room
// again, appends go on, and a restart reads every taken operation: no
// line is torn, none glued to another.
func TestOutboxOnAFullFilesystem(t *testing.T) {
	dir, inside := inTmpfs(t, "256k")
	if !inside {
		return
	}
	box := filepath.Join(dir, "imap")
	o, err := OpenOutbox(box, []string{"down"}, nil)
	require.NoError(t, err)
	filler := fill(t, dir)
	var taken, refused []string
	for i := range 3000 {
		a := fmt.Sprintf("2001:db8::%x", i)
		op := Op{Kind: Ban, Addr: mustPrefix(a)}
		if err := o.Append(op); err != nil {
			assert.ErrorIs(t, err, syscall.ENOSPC)
			refused = append(refused, a)
			continue
		}
		taken = append(taken, a)
		if len(refused) > 20 {
			break
		}
	}
	require.NotEmpty(t, refused, "the filesystem never filled")
	data, err := os.ReadFile(filepath.Join(box, logName))
	require.NoError(t, err)
	assert.True(t, len(data) == 0 || bytes.HasSuffix(data, []byte("\n")), "a refused append left a torn line: %q", data[max(0, len(data)-60):])

	// Room again: the next bans are taken, and nothing is glued.
	require.NoError(t, filler.Truncate(0))
	require.NoError(t, filler.Close())
	for _, a := range []string{"192.0.2.1", "192.0.2.2"} {
		require.NoError(t, o.Append(Op{Kind: Ban, Addr: mustPrefix(a)}))
		taken = append(taken, a)
	}
	require.NoError(t, o.Close())
	l := &logs{}
	o, err = OpenOutbox(box, []string{"down"}, l.logf)
	require.NoError(t, err)
	defer o.Close()
	assert.NotContains(t, l.text(), "skipped")
	var got []string
	for _, s := range live(o) {
		p := mustPrefix(strings.TrimPrefix(s, "ban "))
		got = append(got, p.Addr().String())
	}
	assert.Equal(t, taken, got, "every taken ban, in order, and no refused one")
}

// TestRelayStartsAndDeliversOnAFullFilesystem: a relay started on a full
// disk, with a backlog large enough that its file wants a rewrite, starts
// (the rewrite is skipped and said), and delivers the whole backlog,
// though it can record neither the cursor nor a compaction.
func TestRelayStartsAndDeliversOnAFullFilesystem(t *testing.T) {
	dir, inside := inTmpfs(t, "1m")
	if !inside {
		return
	}
	// The file an earlier relay left while the proxy was down: many
	// re-bans of a few addresses, more than twice what is live, so a
	// start wants to rewrite it.
	box, _ := writeBacklog(t, dir, 3000, 500)
	filler := fill(t, dir)
	defer filler.Close()

	p := &fakeProxy{}
	l := &logs{}
	o, err := OpenOutbox(box, []string{"p"}, l.logf)
	require.NoError(t, err, "a full disk must not stop the relay from starting")
	assert.Contains(t, l.text(), "not rewritten")
	cfg := Config{Jail: DefaultJail("c"), Proxies: []string{"p"}, Outbox: o, Drain: time.Minute, Logf: l.logf, Dial: p.dial}
	require.NoError(t, Run(cfg, strings.NewReader(""), io_discard{}))
	assert.Zero(t, o.Backlog("p"), "the backlog was delivered")
	assert.Len(t, dedupe(p.taken()), 520)
	require.NoError(t, o.Close())
}

type io_discard struct{}

func (io_discard) Write(p []byte) (int, error) { return len(p), nil }

// TestUnsafeDirectoriesAreRefused: another local user's files are never
// trusted. A world-writable outbox directory with a planted unban and a
// planted link (cursor.PROXY.tmp to a file of root's) is refused, naming
// the path and the fix; nothing is written through the link and nothing
// is delivered. So is a directory another user owns, and a symbolic link
// in place of the outbox's file.
func TestUnsafeDirectoriesAreRefused(t *testing.T) {
	victim := filepath.Join(t.TempDir(), "victim")
	require.NoError(t, os.WriteFile(victim, []byte("root's\n"), 0o600))
	plant := func(t *testing.T, dir string) {
		require.NoError(t, os.WriteFile(filepath.Join(dir, logName), []byte("1 unban 192.0.2.66/32\n"), 0o666))
		require.NoError(t, os.Symlink(victim, filepath.Join(dir, "cursor.p.tmp")))
	}
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T) string
		want  []string
	}{
		{"a world-writable outbox directory", func(t *testing.T) string {
			dir := filepath.Join(t.TempDir(), "imap")
			require.NoError(t, os.Mkdir(dir, 0o700))
			require.NoError(t, syscall.Chmod(dir, 0o1777))
			plant(t, dir)
			return dir
		}, []string{"is writable by its group or by others (mode 01777)", "chmod go-w"}},
		{"a group-writable parent", func(t *testing.T) string {
			parent := filepath.Join(t.TempDir(), "f2b-shim")
			require.NoError(t, os.Mkdir(parent, 0o700))
			require.NoError(t, os.Chmod(parent, 0o770))
			dir := filepath.Join(parent, "imap")
			require.NoError(t, os.Mkdir(dir, 0o700))
			plant(t, dir)
			return dir
		}, []string{"f2b-shim is writable by its group or by others (mode 0770)"}},
		{"an outbox directory another user made", func(t *testing.T) string {
			if os.Geteuid() != 0 {
				t.Skip("needs root to give a directory to another user")
			}
			dir := filepath.Join(t.TempDir(), "imap")
			require.NoError(t, os.Mkdir(dir, 0o700))
			plant(t, dir)
			require.NoError(t, os.Chown(dir, 65534, 65534))
			return dir
		}, []string{"belongs to uid 65534", "chown root:root"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := tc.setup(t)
			_, err := OpenOutbox(dir, []string{"p"}, nil)
			require.Error(t, err)
			assert.Contains(t, err.Error(), dir)
			for _, w := range tc.want {
				assert.Contains(t, err.Error(), w)
			}
			data, rerr := os.ReadFile(victim)
			require.NoError(t, rerr)
			assert.Equal(t, "root's\n", string(data), "written through a planted link")
		})
	}

	t.Run("links in a safe directory are not followed", func(t *testing.T) {
		dir := t.TempDir()
		require.NoError(t, os.Symlink(victim, filepath.Join(dir, "cursor.p.tmp")))
		o, err := OpenOutbox(dir, []string{"p"}, nil)
		require.NoError(t, err)
		require.NoError(t, o.Append(Op{Kind: Start}))
		require.NoError(t, o.Taken("p", 1))
		require.NoError(t, o.Close())
		data, err := os.ReadFile(victim)
		require.NoError(t, err)
		assert.Equal(t, "root's\n", string(data), "written through a planted link")
		n, err := readNumber(filepath.Join(dir, "cursor.p"))
		require.NoError(t, err)
		assert.Equal(t, uint64(1), n)

		require.NoError(t, os.Remove(filepath.Join(dir, logName)))
		require.NoError(t, os.Symlink(victim, filepath.Join(dir, logName)))
		_, err = OpenOutbox(dir, []string{"p"}, nil)
		require.Error(t, err)
		assert.Contains(t, err.Error(), "is a symbolic link")
	})
}

// TestAFailedRewriteIsNotRetriedAtEveryOperation: on a nearly full disk,
// appends fit but a rewrite of the file does not. The rewrite is then
// tried again only once the file has grown by as much again, not at
// every operation and every reply (each attempt writes the whole live
// outbox, and logged a warning to fail2ban's log), and it is said once.
func TestAFailedRewriteIsNotRetriedAtEveryOperation(t *testing.T) {
	dir, inside := inTmpfs(t, "1m")
	if !inside {
		return
	}
	box, seq := writeBacklog(t, dir, 4000, 2000)
	for _, p := range []string{"p", "q"} {
		require.NoError(t, os.WriteFile(filepath.Join(box, "cursor."+p), []byte("0\n"), 0o600))
	}
	filler := fill(t, dir)
	defer filler.Close()
	// Room for some appends (a few blocks), not for the whole file.
	st, err := filler.Stat()
	require.NoError(t, err)
	require.NoError(t, filler.Truncate(st.Size()-16<<10))

	l := &logs{}
	o, err := OpenOutbox(box, []string{"p", "q"}, l.logf)
	require.NoError(t, err)
	defer o.Close()
	before := o.work
	for i := range 200 {
		require.NoError(t, o.Append(Op{Kind: Ban, Addr: mustPrefix(fmt.Sprintf("198.51.100.%d", i))}))
		require.NoError(t, o.Taken("p", uint64(seq+i+1)))
	}
	assert.Equal(t, 1, strings.Count(l.text(), "not rewritten"), "said once:\n%s", l.text())
	assert.Less(t, o.work-before, 200*50, "a rewrite of %d live operations was tried at every step", o.live())
}
