package relay

import (
	"bufio"
	"fmt"
	"io"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Conn is one stream session with a proxy: "f2b-shim stream" at its end.
type Conn struct {
	w       *bufio.Writer
	stdin   io.Closer
	replies chan string
	// closed ends the goroutine that reads replies, even while it waits
	// to hand one over: a proxy that floods replies must not leave it,
	// and the lines it holds, behind each session.
	closed    chan struct{}
	closeOnce sync.Once
	end       func() error
	// sent is the session's line count: the proxy numbers replies by it.
	sent int
	// last is when the session last answered: a session that fails
	// after being quiet for a while was most likely closed by the
	// proxy's stream_idle_timeout, not by an outage.
	last time.Time
	// quiet is set when lines went out on a session that had been quiet.
	quiet bool
	// stderr, when set, is what the session's ssh said on stderr, once
	// it has ended: why a proxy could not be reached.
	stderr func() string
}

// NewConn wraps a session's stdin and stdout; close ends it.
func NewConn(stdin io.WriteCloser, stdout io.Reader, end func() error) *Conn {
	c := &Conn{w: bufio.NewWriterSize(stdin, 64<<10), stdin: stdin, replies: make(chan string, window+24), closed: make(chan struct{}), end: end}
	go func() {
		defer close(c.replies)
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64<<10), 64<<10)
		for sc.Scan() {
			select {
			case c.replies <- sc.Text():
			case <-c.closed:
				return
			}
		}
	}()
	return c
}

// Close ends the session: its stdin is closed, so the shim finishes
// what it has and exits.
func (c *Conn) Close() error {
	c.closeOnce.Do(func() { close(c.closed) })
	_ = c.stdin.Close()
	return c.end()
}

// Dialer opens a stream session with a proxy.
type Dialer func(dest string) (*Conn, error)

// SSHDialer runs "ssh [args] DEST f2b-shim stream". Its stderr is kept
// (the last lines): ssh says there why a proxy cannot be reached, and the
// deliverer says it once in fail2ban's log when the proxy goes down, not
// at every attempt.
func SSHDialer(ssh string, args []string) Dialer {
	return func(dest string) (*Conn, error) {
		cmd := exec.Command(ssh, append(append(append([]string(nil), args...), "--", dest), "f2b-shim stream")...)
		stdin, err := cmd.StdinPipe()
		if err != nil {
			return nil, err
		}
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			return nil, err
		}
		tail := &tailWriter{}
		// Not a pipe: Wait returns once ssh's stderr is all read.
		cmd.Stderr = tail
		if err := cmd.Start(); err != nil {
			return nil, fmt.Errorf("starting %s: %w", ssh, err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		c := NewConn(stdin, stdout, func() error {
			select {
			case err := <-done:
				return err
			case <-time.After(5 * time.Second):
				_ = cmd.Process.Kill()
				return <-done
			}
		})
		c.stderr = tail.String
		return c, nil
	}
}

// tailWriter keeps the last lines written to it, bounded.
type tailWriter struct {
	mu  sync.Mutex
	buf []byte
}

// maxStderr bounds what is kept of a session's stderr: the reason ssh
// gives fits in a line or two.
const maxStderr = 1024

func (t *tailWriter) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if len(t.buf) > maxStderr {
		t.buf = t.buf[len(t.buf)-maxStderr:]
	}
	return len(p), nil
}

// String is the last non-empty lines, joined by "; ".
func (t *tailWriter) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	var lines []string
	for _, l := range strings.Split(string(t.buf), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			lines = append(lines, l)
		}
	}
	return strings.Join(lines[max(0, len(lines)-3):], "; ")
}

// replyTimeout bounds the wait for one reply: a proxy that stops
// answering is dropped and dialled again.
const replyTimeout = 60 * time.Second

// window is the most lines sent and not yet answered. It is below the
// reply buffer of a Conn, so the proxy can always write its replies, and
// so always read what comes next: no deadlock however the two race.
const window = 1000

// SessionLimit is the policy key named by a proxy that refuses a session
// because too many are open: the lines were not judged, and are sent
// again later.
const SessionLimit = "max_stream_sessions"

// QuotaDenial starts the message of a ban the proxy refused only for
// max_new_bans_per_minute: it is sent again later, not dropped.
const QuotaDenial = "denied: ban quota"

// errRetry marks a failure after which the same operations are sent
// again, after a backoff.
type errRetry struct {
	msg string
	// quota is set for a ban refused by the proxy's quota: the backoff
	// grows whatever the session took before it.
	quota bool
	// restart is set when an operation failed on the proxy's firewall
	// (exit 4), most often because its chain is gone (a firewall
	// reload): the jail's start, which is idempotent, is sent again
	// before it.
	restart bool
}

func (e errRetry) Error() string { return e.msg }

// flight is one line sent and not yet answered.
type flight struct {
	text string
	seq  uint64
	// last is set on an operation's last line: its reply completes it.
	last bool
	// kind is the operation's.
	kind Kind
}

// lines are the command lines of ops, at most max of them, cut only
// between operations (but at least one operation).
func (j Jail) lines(ops []Op, max int) []flight {
	var out []flight
	for _, op := range ops {
		cmds := j.Commands(op)
		if len(out) > 0 && len(out)+len(cmds) > max {
			break
		}
		for i, c := range cmds {
			out = append(out, flight{text: c, seq: op.Seq, last: i == len(cmds)-1, kind: op.Kind})
		}
	}
	return out
}

// answer checks one reply against the line it answers. It returns
// whether the line is done (applied, unchanged, or denied for good, which
// is logged), or the error that ends the session: a failure (exit 4 or
// 5) or a ban refused only by the quota, which are sent again, or a reply
// that is not the one expected.
func (c *Conn) answer(dest, reply string, f flight, logf func(level, format string, a ...any)) error {
	c.last = time.Now()
	c.sent++
	n, code, msg, err := parseReply(reply)
	if err != nil || n != c.sent {
		return fmt.Errorf("reply %q does not answer line %d", reply, c.sent)
	}
	switch {
	case code == 0 || code == 1:
	case code == 3 && strings.HasPrefix(msg, QuotaDenial):
		return errRetry{msg: fmt.Sprintf("%q: %s", f.text, msg), quota: true}
	case code == 3 && strings.Contains(msg, SessionLimit):
		// The proxy refused the session, not the line: try later.
		return errRetry{msg: msg, quota: true}
	case code == 3:
		// The proxy's policy refuses it: sending it again would get the
		// same answer. fail2ban's log says so.
		logf("error", "proxy %s denied %q: %s", dest, f.text, msg)
	case code == 4 && f.kind != Start && f.kind != Stop:
		return errRetry{msg: fmt.Sprintf("%q failed (exit 4): %s; sending the jail's start again (it may have been wiped by a firewall reload), then the rest", f.text, msg), restart: true}
	default:
		return errRetry{msg: fmt.Sprintf("%q failed (exit %d): %s", f.text, code, msg)}
	}
	return nil
}

// write sends lines on the session, in its own goroutine: a proxy that
// stalls must not stall the deliverer, which watches for replies, the
// reply timeout and the relay's stop meanwhile.
func (c *Conn) write(lines []flight) <-chan error {
	done := make(chan error, 1)
	go func() {
		for _, l := range lines {
			if _, err := c.w.WriteString(l.text + "\n"); err != nil {
				done <- err
				return
			}
		}
		done <- c.w.Flush()
	}()
	return done
}

// parseReply reads "N EXIT RESULT[ MESSAGE]".
func parseReply(s string) (n, code int, msg string, err error) {
	f := strings.SplitN(s, " ", 4)
	if len(f) < 3 {
		return 0, 0, "", fmt.Errorf("short reply %q", s)
	}
	if n, err = strconv.Atoi(f[0]); err != nil {
		return 0, 0, "", err
	}
	if code, err = strconv.Atoi(f[1]); err != nil {
		return 0, 0, "", err
	}
	if len(f) == 4 {
		msg = f[3]
	}
	return n, code, msg, nil
}
