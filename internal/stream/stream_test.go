package stream

import (
	"bytes"
	"fmt"
	"io"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// echo serves every request with its number and length, and records the
// batches it was given.
type echo struct {
	batches [][]Request
	// serve, when set, is how many of each batch it serves.
	serve int
}

func (e *echo) handle(batch []Request) []Reply {
	e.batches = append(e.batches, append([]Request(nil), batch...))
	n := len(batch)
	if e.serve > 0 {
		n = min(n, e.serve)
	}
	out := make([]Reply, n)
	for i, r := range batch[:n] {
		out[i] = Reply{Exit: 0, Result: "len" + strconv.Itoa(r.Len), Message: r.Line}
		if r.Unterminated {
			out[i].Result = "unterminated"
		}
	}
	return out
}

func opts() Options { return Options{MaxLine: 16, MaxBatch: 4, Idle: time.Minute} }

func TestServe(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     []string
	}{
		{"empty", "", nil},
		{"one", "a b\n", []string{"1 0 len3 a b"}},
		{"empty line", "\n", []string{"1 0 len0"}},
		{"unterminated tail", "a\nb", []string{"1 0 len1 a", "2 0 unterminated b"}},
		{"too long", strings.Repeat("x", 40) + "\nok\n", []string{"1 0 len40 " + strings.Repeat("x", 17), "2 0 len2 ok"}},
		{"CR folded in the reply", "a\r\n", []string{"1 0 len2 a;"}},
		{"message folded to one line", "a\x0bb\n", []string{"1 0 len3 a\x0bb"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			e := &echo{}
			require.NoError(t, Serve(strings.NewReader(tc.in), &out, opts(), e.handle))
			got := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
			if tc.want == nil {
				assert.Empty(t, out.String())
				return
			}
			assert.Equal(t, tc.want, got)
		})
	}
}

// TestBatchesAreBoundedAndLeftoversComeAgain: a batch never holds more
// than MaxBatch requests, and requests the handler did not serve (it
// stopped to bound its lock time) come first in the next batch.
func TestBatchesAreBoundedAndLeftoversComeAgain(t *testing.T) {
	var in strings.Builder
	for i := range 10 {
		fmt.Fprintf(&in, "r%d\n", i)
	}
	var out bytes.Buffer
	e := &echo{serve: 3}
	require.NoError(t, Serve(strings.NewReader(in.String()), &out, opts(), e.handle))
	lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	require.Len(t, lines, 10)
	for i, l := range lines {
		assert.Equal(t, fmt.Sprintf("%d 0 len2 r%d", i+1, i), l)
	}
	seen := 0
	for _, b := range e.batches {
		assert.LessOrEqual(t, len(b), 4)
		assert.Equal(t, seen+1, b[0].N, "a batch starts where the last one stopped")
		seen += min(len(b), 3)
	}
}

// TestIdleTimeoutEndsTheSession: a client that sends nothing is let go.
func TestIdleTimeoutEndsTheSession(t *testing.T) {
	r, w := io.Pipe()
	defer w.Close()
	o := opts()
	o.Idle = 50 * time.Millisecond
	var out bytes.Buffer
	done := make(chan error, 1)
	go func() { done <- Serve(r, &out, o, (&echo{}).handle) }()
	_, err := w.Write([]byte("a\n"))
	require.NoError(t, err)
	select {
	case err := <-done:
		assert.ErrorIs(t, err, ErrIdle)
		assert.Equal(t, "1 0 len1 a\n", out.String(), "the reply was written before the session ended")
	case <-time.After(10 * time.Second):
		t.Fatal("the idle session never ended")
	}
}

// FuzzServe: any byte stream yields exactly one reply per line, in
// order, and every request is handed over once.
func FuzzServe(f *testing.F) {
	for _, s := range []string{"", "\n", "a\nb", "iptables -w -N x\n\n\x00\n", strings.Repeat("y", 100) + "\n", "\xff\xfe\n\r\n"} {
		f.Add([]byte(s), uint8(2))
	}
	f.Fuzz(func(t *testing.T, in []byte, serve uint8) {
		var out bytes.Buffer
		e := &echo{serve: int(serve % 5)}
		require.NoError(t, Serve(bytes.NewReader(in), &out, opts(), e.handle))
		want := bytes.Count(in, []byte("\n"))
		if len(in) > 0 && in[len(in)-1] != '\n' {
			want++
		}
		got := 0
		if out.Len() > 0 {
			got = strings.Count(out.String(), "\n")
		}
		require.Equal(t, want, got, "one reply per line")
		for i, line := range strings.SplitN(out.String(), "\n", got) {
			if i == got {
				break
			}
			n, _, _ := strings.Cut(line, " ")
			require.Equal(t, strconv.Itoa(i+1), n, "replies in order")
		}
	})
}

// blocked is a writer that never returns, as a pipe whose reader stopped
// reading.
type blocked struct{ never chan struct{} }

func (b blocked) Write(p []byte) (int, error) { <-b.never; return 0, io.ErrClosedPipe }

// TestAClientThatStopsReadingIsEnded: a reply that cannot be written
// within the idle timeout ends the session, whatever the client sends.
func TestAClientThatStopsReadingIsEnded(t *testing.T) {
	o := opts()
	o.Idle = 50 * time.Millisecond
	r, w := io.Pipe()
	defer w.Close()
	go func() {
		for i := 0; ; i++ {
			if _, err := fmt.Fprintf(w, "line %d\n", i); err != nil {
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	e := &echo{}
	err := Serve(r, blocked{make(chan struct{})}, o, e.handle)
	assert.ErrorIs(t, err, ErrStalled)
}

// TestStopEndsTheSessionAfterTheBatch: once Stop is closed, the batch in
// hand is answered and no other is taken.
func TestStopEndsTheSessionAfterTheBatch(t *testing.T) {
	o := opts()
	stop := make(chan struct{})
	o.Stop = stop
	var out bytes.Buffer
	served, first := 0, 0
	h := func(batch []Request) []Reply {
		served++
		first = len(batch)
		close(stop) // the signal comes while this batch is served
		return (&echo{}).handle(batch)
	}
	err := Serve(strings.NewReader("a\nb\nc\nd\ne\nf\n"), &out, o, h)
	assert.ErrorIs(t, err, ErrStopped)
	assert.Equal(t, 1, served)
	assert.Equal(t, first, strings.Count(out.String(), "\n"), "the batch's replies are written: %q", out.String())
}

// TestStopEndsASessionWhoseClientDoesNotRead: a client that stopped
// reading must not keep a session past SIGTERM for the whole idle
// timeout (5 minutes by default; the package's prerm waits 5 seconds,
// then kills).
func TestStopEndsASessionWhoseClientDoesNotRead(t *testing.T) {
	o := opts()
	o.Idle = time.Hour
	stop := make(chan struct{})
	o.Stop = stop
	h := func(batch []Request) []Reply {
		close(stop) // the signal comes while this batch is served
		return (&echo{}).handle(batch)
	}
	ended := make(chan error, 1)
	go func() { ended <- Serve(strings.NewReader("a\n"), blocked{make(chan struct{})}, o, h) }()
	select {
	case err := <-ended:
		assert.ErrorIs(t, err, ErrStopped)
	case <-time.After(30 * time.Second):
		t.Fatal("the session outlived its stop by 30s: it waits for the idle timeout (1h)")
	}
}
