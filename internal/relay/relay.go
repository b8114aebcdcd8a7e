package relay

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"strings"
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

// In a burst (a write less than burstGap after the last), a deliverer
// writes at most every gather: the proxy then applies many bans per batch
// (one lock hold, one fsync of its state and of its log) instead of one
// each, which would compete for the disk with the outbox's own fsync of
// every ban. A ban after a quiet spell goes at once. Writing does not wait
// for replies (up to window lines), so a slow round trip never slows a
// burst.
const (
	burstGap = 100 * time.Millisecond
	gather   = 20 * time.Millisecond
)

// deliver sends the outbox to one proxy until stop: one session, kept
// open, reopened with backoff when it fails. Lines go out as operations
// come, and each reply is checked against its line; the proxy's cursor
// moves on when every line of an operation is answered.
func deliver(cfg Config, dest string, stop <-chan struct{}) {
	d := &deliverer{cfg: cfg, dest: dest}
	defer d.hangUp()
	backoff := time.Duration(0)
	for {
		err := d.step(stop)
		if err == errStopped {
			return
		}
		if err == nil {
			if d.failing {
				cfg.Logf("info", "proxy %s: delivering again", dest)
			}
			backoff, d.failing = 0, false
			continue
		}
		var retry errRetry
		quietDrop := d.conn != nil && d.conn.quiet && !errors.As(err, &retry) && d.took == 0
		d.hangUp()
		if quietDrop {
			// A kept session the proxy closed while it was quiet
			// (stream_idle_timeout): open a new one at once.
			continue
		}
		backoff = min(max(2*backoff, time.Second), cfg.MaxBackoff)
		d.failing = true
		cfg.Logf("error", "proxy %s: %v; trying again in %s, %d operation(s) wait", dest, err, backoff, cfg.Outbox.Backlog(dest))
		select {
		case <-time.After(backoff):
		case <-stop:
			return
		}
	}
}

var errStopped = errors.New("stopped")

// deliverer is one proxy's delivery state.
type deliverer struct {
	cfg     Config
	dest    string
	conn    *Conn
	flying  []flight     // written, not yet answered, in order
	sent    uint64       // the last operation written on conn
	writing <-chan error // set while a write runs
	lastW   time.Time    // when the last write started
	failing bool
	// took counts the operations the proxy took on this session since
	// its last quiet spell.
	took int
}

func (d *deliverer) hangUp() {
	if d.conn != nil {
		_ = d.conn.Close()
	}
	d.conn, d.flying, d.writing = nil, nil, nil
}

// step waits for one event and handles it: it returns nil when it made
// progress or had nothing to do, errStopped at stop, or the error that
// ends the session.
func (d *deliverer) step(stop <-chan struct{}) error {
	box := d.cfg.Outbox
	changed := box.Changed()
	if d.conn == nil {
		if box.Backlog(d.dest) == 0 {
			select {
			case <-changed:
				return nil
			case <-stop:
				return errStopped
			}
		}
		conn, err := d.cfg.Dial(d.dest)
		if err != nil {
			return err
		}
		d.conn, d.sent, d.took = conn, box.Cursor(d.dest), 0
	}
	var hold <-chan time.Time
	if d.writing == nil && len(d.flying) < window {
		if ops := box.PendingAfter(d.sent, window); len(ops) > 0 {
			since := time.Since(d.lastW)
			if since < burstGap && since < gather {
				hold = time.After(gather - since)
			} else {
				lines := d.cfg.Jail.lines(ops, window-len(d.flying))
				if len(d.flying) == 0 && !d.conn.last.IsZero() && time.Since(d.conn.last) > time.Second {
					d.conn.quiet, d.took = true, 0
				}
				d.flying = append(d.flying, lines...)
				d.sent, d.lastW = lines[len(lines)-1].seq, time.Now()
				d.writing = d.conn.write(lines)
			}
		}
	}
	var timeout <-chan time.Time
	if len(d.flying) > 0 {
		t := time.NewTimer(replyTimeout)
		defer t.Stop()
		timeout = t.C
	}
	select {
	case err := <-d.writing:
		d.writing = nil
		return err
	case reply, ok := <-d.conn.replies:
		if !ok {
			if len(d.flying) == 0 {
				// The proxy closed a session with nothing in flight
				// (stream_idle_timeout): the next operation dials again.
				d.hangUp()
				return nil
			}
			return fmt.Errorf("the session ended with %d line(s) unanswered", len(d.flying))
		}
		return d.replied(reply)
	case <-changed:
		return nil
	case <-hold:
		return nil
	case <-timeout:
		return fmt.Errorf("no reply in %s", replyTimeout)
	case <-stop:
		return errStopped
	}
}

// replied handles a reply, and every other reply already there, then
// moves the proxy's cursor past the operations they complete.
func (d *deliverer) replied(reply string) error {
	var taken uint64
	var err error
	for {
		f := d.flying[0]
		if err = d.conn.answer(d.dest, reply, f, d.cfg.Logf); err != nil {
			break
		}
		d.flying = d.flying[1:]
		if f.last {
			taken = f.seq
			d.took++
		}
		if len(d.flying) == 0 {
			break
		}
		var ok bool
		select {
		case reply, ok = <-d.conn.replies:
		default:
		}
		if !ok {
			break
		}
	}
	if taken > 0 {
		if terr := d.cfg.Outbox.Taken(d.dest, taken); terr != nil {
			d.cfg.Logf("error", "proxy %s: recording what it took: %v", d.dest, terr)
		}
	}
	return err
}

// oneLine keeps a message on one line of the protocol.
var oneLine = strings.NewReplacer("\n", " ", "\r", " ").Replace
