package relay

import (
	"bufio"
	"fmt"
	"io"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestAReplyNoLineAwaitsEndsTheSessionNotTheRelay: a compromised or
// broken proxy that writes a reply while nothing is in flight (an
// unsolicited line on a kept-open session) ends that session, is said in
// fail2ban's log, and is backed off from; the relay does not crash, and
// so the other proxies go on.
func TestAReplyNoLineAwaitsEndsTheSessionNotTheRelay(t *testing.T) {
	box, err := OpenOutbox(t.TempDir(), []string{"evil"}, nil)
	require.NoError(t, err)
	defer box.Close()
	l := &logs{}
	dials := make(chan struct{}, 100)
	dial := func(string) (*Conn, error) {
		dials <- struct{}{}
		inR, inW := io.Pipe()
		outR, outW := io.Pipe()
		go func() {
			defer outW.Close()
			sc := bufio.NewScanner(inR)
			n := 0
			for sc.Scan() {
				n++
				fmt.Fprintf(outW, "%d 0 applied\n", n)
				// Once every line is answered, one more.
				time.Sleep(20 * time.Millisecond)
				fmt.Fprintf(outW, "%d 0 applied\n", n+1)
			}
		}()
		return NewConn(inW, outR, func() error { return inR.Close() }), nil
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	cfg := Config{Jail: DefaultJail("mail-remote-f2b-imap"), Proxies: []string{"evil"}, Outbox: box,
		Dial: dial, Logf: l.logf, MinBackoff: 10 * time.Millisecond, MaxBackoff: 40 * time.Millisecond}
	go func() {
		defer close(done)
		deliver(cfg, "evil", stop)
	}()
	require.NoError(t, box.Append(Op{Kind: Ban, Addr: mustPrefix("192.0.2.1")}))
	<-dials
	require.Eventually(t, func() bool { return box.Backlog("evil") == 0 }, 5*time.Second, 5*time.Millisecond)
	require.NoError(t, box.Append(Op{Kind: Ban, Addr: mustPrefix("192.0.2.2")}))
	require.Eventually(t, func() bool { return box.Backlog("evil") == 0 }, 5*time.Second, 5*time.Millisecond)
	time.Sleep(100 * time.Millisecond)
	close(stop)
	<-done
	assert.Contains(t, l.text(), "answers no line")
}

// TestAFailedSyncLeavesNoRecordBehind: when the group's fdatasync fails
// (an I/O error, or a filesystem that finds out at sync that it is
// full), the group is refused and cut off the file. Left there, it would
// be replayed though it was refused, and the next group, which takes its
// numbers again, would be skipped at the next load as out of order:
// acknowledged operations lost.
func TestAFailedSyncLeavesNoRecordBehind(t *testing.T) {
	dir := t.TempDir()
	o, err := OpenOutbox(dir, []string{"p"}, nil)
	require.NoError(t, err)
	require.NoError(t, o.Append(Op{Kind: Start}))
	fdatasync = func(int) error { return syscall.EIO }
	n, err := o.AppendBatch(ops(t, "ban 192.0.2.1", "ban 192.0.2.2"))
	fdatasync = syscall.Fdatasync
	require.Error(t, err)
	require.Equal(t, 0, n)
	require.NoError(t, o.Append(Op{Kind: Ban, Addr: mustPrefix("198.51.100.7")}))
	require.NoError(t, o.Close())

	l := &logs{}
	o, err = OpenOutbox(dir, []string{"p"}, l.logf)
	require.NoError(t, err)
	defer o.Close()
	assert.Equal(t, []string{"start", "ban 198.51.100.7/32"}, live(o), "what was acknowledged, and only that")
	assert.Empty(t, l.text())
}

// TestAFloodingProxyLeaksNothing: a compromised proxy that writes reply
// after reply fills the session's reply buffer; when the relay hangs up
// (the first wrong reply), the goroutine that read them, and the up to
// 64 MiB of lines it holds, must go too, or every session leaks them.
func TestAFloodingProxyLeaksNothing(t *testing.T) {
	before := runtime.NumGoroutine()
	const sessions = 20
	for range sessions {
		inR, inW := io.Pipe()
		outR, outW := io.Pipe()
		go func() { _, _ = io.Copy(io.Discard, inR) }()
		go func() {
			for {
				if _, err := fmt.Fprintf(outW, "1 0 applied\n"); err != nil {
					return
				}
			}
		}()
		// As exec.Cmd.Wait does once ssh has exited: both pipes close.
		c := NewConn(inW, outR, func() error { inR.Close(); outR.Close(); return nil })
		require.Eventually(t, func() bool { return len(c.replies) == cap(c.replies) }, 10*time.Second, time.Millisecond)
		require.NoError(t, c.Close())
	}
	require.Eventually(t, func() bool { return runtime.NumGoroutine() <= before+2 }, 10*time.Second, 10*time.Millisecond,
		"%d goroutines left behind by %d closed sessions", runtime.NumGoroutine()-before, sessions)
}

// TestSIGTERMReadsWhatIsInThePipe: when fail2ban-server is SIGKILLed,
// systemd then sends SIGTERM to what is left in its cgroup, the relay
// included. What ban() wrote to the pipe before the kill is the relay's
// alone to keep (the action that would send it again is gone): the
// relay reads it all, and makes it durable, before it stops.
func TestSIGTERMReadsWhatIsInThePipe(t *testing.T) {
	for round := range 5 {
		dir := t.TempDir()
		box, err := OpenOutbox(dir, []string{"down"}, nil)
		require.NoError(t, err)
		quit := make(chan struct{})
		close(quit)
		var in strings.Builder
		const n = 2000
		for i := range n {
			fmt.Fprintf(&in, "ban 2001:db8::%x\n", i)
		}
		cfg := Config{Jail: DefaultJail("mail-remote-f2b-imap"), Proxies: []string{"down"}, Outbox: box, Drain: time.Millisecond,
			Logf: func(string, string, ...any) {}, Quit: quit, GroupAcks: true,
			Dial: func(string) (*Conn, error) { return nil, fmt.Errorf("down") }}
		var out strings.Builder
		require.NoError(t, Run(cfg, strings.NewReader(in.String()), &out))
		require.NoError(t, box.Close())
		assert.True(t, strings.HasSuffix(out.String(), fmt.Sprintf("ok %d\n", n)), "round %d: not every line read: %q", round, out.String()[max(0, out.Len()-20):])
		box, err = OpenOutbox(dir, []string{"down"}, nil)
		require.NoError(t, err)
		assert.Equal(t, n, box.Backlog("down"), "round %d", round)
		require.NoError(t, box.Close())
	}
}

// TestSIGTERMStopsABusyRelay: reading on after SIGTERM is bounded: an
// action that is alive and never quiet does not keep the relay from
// stopping.
func TestSIGTERMStopsABusyRelay(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for quitLimit")
	}
	box, err := OpenOutbox(t.TempDir(), []string{"down"}, nil)
	require.NoError(t, err)
	defer box.Close()
	quit := make(chan struct{})
	close(quit)
	inR, inW := io.Pipe()
	const lines = 400 // one per 100 ms: far longer than quitLimit
	wrote := make(chan int, 1)
	go func() {
		i := 0
		for ; i < lines; i++ {
			if _, err := fmt.Fprintf(inW, "ban 192.0.2.%d\n", i%250); err != nil {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		inW.Close()
		wrote <- i
	}()
	cfg := Config{Jail: DefaultJail("mail-remote-f2b-imap"), Proxies: []string{"down"}, Outbox: box, Drain: time.Millisecond,
		Logf: func(string, string, ...any) {}, Quit: quit, GroupAcks: true,
		Dial: func(string) (*Conn, error) { return nil, fmt.Errorf("down") }}
	require.NoError(t, Run(cfg, inR, io.Discard))
	inR.Close()
	assert.Less(t, <-wrote, lines, "the relay read on until its input ended")
}

// TestARelayWaitsForTheOneStillDraining: after fail2ban-server is killed
// and started again, the old relay may still hold the outbox's lock
// while it drains. The new relay waits for it (bounded by lockWait)
// instead of failing at once, which made the action drop, as refused,
// every operation the new fail2ban sent it meanwhile.
func TestARelayWaitsForTheOneStillDraining(t *testing.T) {
	dir := t.TempDir()
	old, err := OpenOutbox(dir, []string{"p"}, nil)
	require.NoError(t, err)
	go func() {
		time.Sleep(300 * time.Millisecond)
		old.Close()
	}()
	l := &logs{}
	o, err := OpenOutbox(dir, []string{"p"}, l.logf)
	require.NoError(t, err)
	require.NoError(t, o.Close())
	assert.Contains(t, l.text(), "in use by another relay")

	t.Run("it gives up after lockWait", func(t *testing.T) {
		held, err := OpenOutbox(dir, []string{"p"}, nil)
		require.NoError(t, err)
		defer held.Close()
		saved := lockWait
		lockWait = 200 * time.Millisecond
		defer func() { lockWait = saved }()
		_, err = OpenOutbox(dir, []string{"p"}, nil)
		require.Error(t, err)
		assert.Contains(t, err.Error(), "in use by another relay")
	})
}
