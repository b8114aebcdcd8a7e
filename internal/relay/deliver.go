package relay

import (
	"bufio"
	"fmt"
	"io"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// Conn is one stream session with a proxy: "f2b-shim stream" at its end.
type Conn struct {
	w       *bufio.Writer
	stdin   io.Closer
	replies chan string
	end     func() error
	// sent is the session's line count: the proxy numbers replies by it.
	sent int
	// last is when the session last answered: a session that fails
	// after being quiet for a while was most likely closed by the
	// proxy's stream_idle_timeout, not by an outage.
	last time.Time
	// quiet is set when lines went out on a session that had been quiet.
	quiet bool
}

// NewConn wraps a session's stdin and stdout; close ends it.
func NewConn(stdin io.WriteCloser, stdout io.Reader, end func() error) *Conn {
	c := &Conn{w: bufio.NewWriterSize(stdin, 64<<10), stdin: stdin, replies: make(chan string, window+24), end: end}
	go func() {
		defer close(c.replies)
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64<<10), 64<<10)
		for sc.Scan() {
			c.replies <- sc.Text()
		}
	}()
	return c
}

// Close ends the session: its stdin is closed, so the shim finishes
// what it has and exits.
func (c *Conn) Close() error {
	_ = c.stdin.Close()
	return c.end()
}

// Dialer opens a stream session with a proxy.
type Dialer func(dest string) (*Conn, error)

// SSHDialer runs "ssh [args] DEST f2b-shim stream". Its stderr goes to
// logf, line by line: ssh says there why a proxy cannot be reached.
func SSHDialer(ssh string, args []string, logf func(level, format string, a ...any)) Dialer {
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
		stderr, err := cmd.StderrPipe()
		if err != nil {
			return nil, err
		}
		if err := cmd.Start(); err != nil {
			return nil, fmt.Errorf("starting %s: %w", ssh, err)
		}
		go func() {
			sc := bufio.NewScanner(stderr)
			for sc.Scan() {
				logf("warning", "proxy %s: %s", dest, sc.Text())
			}
		}()
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		return NewConn(stdin, stdout, func() error {
			select {
			case err := <-done:
				return err
			case <-time.After(5 * time.Second):
				_ = cmd.Process.Kill()
				return <-done
			}
		}), nil
	}
}

// replyTimeout bounds the wait for one reply: a proxy that stops
// answering is dropped and dialled again.
const replyTimeout = 60 * time.Second

// window is the most lines sent and not yet answered. It is below the
// reply buffer of a Conn, so the proxy can always write its replies, and
// so always read what comes next: no deadlock however the two race.
const window = 1000

// QuotaDenial starts the message of a ban the proxy refused only for
// max_new_bans_per_minute: it is sent again later, not dropped.
const QuotaDenial = "denied: ban quota"

// errRetry marks a failure after which the same operations are sent
// again, after a backoff.
type errRetry struct{ msg string }

func (e errRetry) Error() string { return e.msg }

// flight is one line sent and not yet answered.
type flight struct {
	text string
	seq  uint64
	// last is set on an operation's last line: its reply completes it.
	last bool
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
			out = append(out, flight{text: c, seq: op.Seq, last: i == len(cmds)-1})
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
		return errRetry{fmt.Sprintf("%q: %s", f.text, msg)}
	case code == 3:
		// The proxy's policy refuses it: sending it again would get the
		// same answer. fail2ban's log says so.
		logf("error", "proxy %s denied %q: %s", dest, f.text, msg)
	default:
		return errRetry{fmt.Sprintf("%q failed (exit %d): %s", f.text, code, msg)}
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
