package relay

import (
	"bufio"
	"errors"
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
}

// NewConn wraps a session's stdin and stdout; close ends it.
func NewConn(stdin io.WriteCloser, stdout io.Reader, end func() error) *Conn {
	c := &Conn{w: bufio.NewWriterSize(stdin, 64<<10), stdin: stdin, replies: make(chan string, 1024), end: end}
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

// chunk is the most operations sent before their replies are read.
const chunk = 2048

// quotaDenial starts the message of a ban the proxy refused only for
// max_new_bans_per_minute: it is sent again later, not dropped.
const quotaDenial = "denied: ban quota"

// errRetry marks a failure after which the same operations are sent
// again, after a backoff.
type errRetry struct{ msg string }

func (e errRetry) Error() string { return e.msg }

// send writes the operations' lines and reads their replies, in order.
// It returns the last operation every line of which the proxy took
// (applied, unchanged, or denied for good), and why it stopped short.
func (c *Conn) send(dest string, j Jail, ops []Op, logf func(level, format string, a ...any)) (uint64, error) {
	type line struct {
		op   int
		text string
	}
	var lines []line
	for i, op := range ops {
		for _, t := range j.Commands(op) {
			lines = append(lines, line{i, t})
		}
	}
	werr := make(chan error, 1)
	go func() {
		for _, l := range lines {
			if _, err := c.w.WriteString(l.text + "\n"); err != nil {
				werr <- err
				return
			}
		}
		werr <- c.w.Flush()
	}()
	var taken uint64
	timer := time.NewTimer(replyTimeout)
	defer timer.Stop()
	for i, l := range lines {
		var reply string
		var ok bool
		select {
		case reply, ok = <-c.replies:
		case <-timer.C:
			return taken, fmt.Errorf("no reply in %s", replyTimeout)
		}
		if !ok {
			err := <-werr
			if err == nil {
				err = errors.New("the session ended")
			}
			return taken, fmt.Errorf("the session ended before line %d was answered: %w", i+1, err)
		}
		if !timer.Stop() {
			<-timer.C
		}
		timer.Reset(replyTimeout)
		c.last = time.Now()
		c.sent++
		n, code, msg, err := parseReply(reply)
		if err != nil || n != c.sent {
			return taken, fmt.Errorf("reply %q does not answer line %d", reply, c.sent)
		}
		switch {
		case code == 0 || code == 1:
		case code == 3 && strings.HasPrefix(msg, quotaDenial):
			return taken, errRetry{fmt.Sprintf("%q: %s", l.text, msg)}
		case code == 3:
			// The proxy's policy refuses it: sending it again would get
			// the same answer. fail2ban's log says so.
			logf("error", "proxy %s denied %q: %s", dest, l.text, msg)
		default:
			return taken, errRetry{fmt.Sprintf("%q failed (exit %d): %s", l.text, code, msg)}
		}
		if i == len(lines)-1 || lines[i+1].op != l.op {
			taken = ops[l.op].Seq
		}
	}
	return taken, <-werr
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
