package relay

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"
)

// Config is one relay: one jail, its proxies, and how to reach them.
type Config struct {
	Jail    Jail
	Proxies []string
	Outbox  *Outbox
	Dial    Dialer
	// Drain bounds how long the relay keeps delivering after its input
	// ends (fail2ban stops); what is left stays in the outbox.
	Drain time.Duration
	// Logf goes to fail2ban's log, through the action.
	Logf func(level, format string, a ...any)
	// MaxBackoff caps the wait between attempts to reach a proxy.
	MaxBackoff time.Duration
	// Quit, when closed, ends the input as its end would (SIGTERM).
	Quit <-chan struct{}
}

// Run serves the action: each line on in is an operation ("ban ADDR",
// ...), made durable in the outbox before "ok" goes back on out, so that
// the action's ban() returns within a fsync whatever state the proxies
// are in. Each proxy has its own deliverer; one proxy down never delays
// the others. At the end of in, Run drains for cfg.Drain, then returns.
func Run(cfg Config, in io.Reader, out io.Writer) error {
	if cfg.MaxBackoff == 0 {
		cfg.MaxBackoff = time.Minute
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, p := range cfg.Proxies {
		wg.Add(1)
		go func() {
			defer wg.Done()
			deliver(cfg, p, stop)
		}()
	}
	lines := make(chan string)
	readErr := make(chan error, 1)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(in)
		for sc.Scan() {
			lines <- sc.Text()
		}
		readErr <- sc.Err()
	}()
	w := bufio.NewWriter(out)
	var err error
serve:
	for {
		select {
		case line, ok := <-lines:
			if !ok {
				err = <-readErr
				break serve
			}
			op, perr := ParseOp(line)
			if perr == nil {
				perr = cfg.Outbox.Append(op)
			}
			if perr != nil {
				fmt.Fprintf(w, "error %s\n", oneLine(perr.Error()))
			} else {
				fmt.Fprintln(w, "ok")
			}
			if err = w.Flush(); err != nil {
				break serve
			}
		case <-cfg.Quit:
			break serve
		}
	}
	drain(cfg)
	close(stop)
	wg.Wait()
	return err
}

// drain waits until every proxy has taken everything, or cfg.Drain.
func drain(cfg Config) {
	deadline := time.After(cfg.Drain)
	for {
		changed := cfg.Outbox.Changed()
		left := 0
		for _, p := range cfg.Proxies {
			left += cfg.Outbox.Backlog(p)
		}
		if left == 0 {
			return
		}
		select {
		case <-changed:
		case <-deadline:
			cfg.Logf("warning", "stopping with %d operation(s) not yet delivered; they stay in the outbox for the next start", left)
			return
		}
	}
}

// In a burst (a send less than burstGap after the last), a deliverer
// waits gather for more operations before it sends.
const (
	burstGap = 100 * time.Millisecond
	gather   = 20 * time.Millisecond
)

// deliver sends the outbox to one proxy until stop: one session, kept
// open, reopened with backoff when it fails.
func deliver(cfg Config, dest string, stop <-chan struct{}) {
	var conn *Conn
	defer func() {
		if conn != nil {
			_ = conn.Close()
		}
	}()
	backoff := time.Duration(0)
	failing := false
	var lastSend time.Time
	for {
		changed := cfg.Outbox.Changed()
		ops := cfg.Outbox.Pending(dest, chunk)
		if len(ops) == 0 {
			select {
			case <-changed:
				continue
			case <-stop:
				return
			}
		}
		if len(ops) < chunk && time.Since(lastSend) < burstGap {
			// In a burst, let the outbox fill a little: one batch on the
			// proxy (one lock hold, one fsync of its state and its log)
			// for many bans instead of one each. A ban after a quiet
			// spell goes at once.
			select {
			case <-time.After(gather):
			case <-stop:
				return
			}
			ops = cfg.Outbox.Pending(dest, chunk)
		}
		lastSend = time.Now()
		var err error
		if conn == nil {
			conn, err = cfg.Dial(dest)
		}
		if err == nil {
			quiet := !conn.last.IsZero() && time.Since(conn.last) > time.Second
			var taken uint64
			taken, err = conn.send(dest, cfg.Jail, ops, cfg.Logf)
			if taken > 0 {
				if terr := cfg.Outbox.Taken(dest, taken); terr != nil {
					cfg.Logf("error", "proxy %s: recording what it took: %v", dest, terr)
				}
			}
			var retry errRetry
			if err != nil && !errors.As(err, &retry) && quiet && taken == 0 {
				// A kept session the proxy closed while it was quiet
				// (stream_idle_timeout): open a new one at once.
				_ = conn.Close()
				conn = nil
				continue
			}
		}
		if err == nil {
			if failing {
				cfg.Logf("info", "proxy %s: delivering again", dest)
			}
			backoff, failing = 0, false
			continue
		}
		if conn != nil {
			_ = conn.Close()
			conn = nil
		}
		backoff = min(max(2*backoff, time.Second), cfg.MaxBackoff)
		failing = true
		cfg.Logf("error", "proxy %s: %v; trying again in %s, %d operation(s) wait", dest, err, backoff, cfg.Outbox.Backlog(dest))
		select {
		case <-time.After(backoff):
		case <-stop:
			return
		}
	}
}

// oneLine keeps a message on one line of the protocol.
func oneLine(s string) string {
	out := []rune(s)
	for i, r := range out {
		if r == '\n' || r == '\r' {
			out[i] = ' '
		}
	}
	return string(out)
}
