package relay

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
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
	// MinBackoff and MaxBackoff bound the wait between attempts to
	// reach a proxy (1 s and 1 min when zero).
	MinBackoff, MaxBackoff time.Duration
	// Quit, when closed, ends the input as its end would (SIGTERM).
	Quit <-chan struct{}
	// GroupAcks answers "ok N" per group and "error N MESSAGE" (the
	// action of this version, which does not wait); without it, each line
	// gets its own "ok" or "error MESSAGE", in order, as the action of
	// earlier versions expects: fail2ban keeps running the action it
	// loaded when the package upgraded the binary under it.
	GroupAcks bool
	// Restart, when closed, ends the relay without the drain: its
	// binary was replaced, and the action starts the new one at once,
	// which goes on from the outbox. What was read is durable and
	// acknowledged first; what was not is still the action's.
	Restart <-chan struct{}
}

// quitGrace is how long a relay told to stop (SIGTERM) waits for its
// input's next line before it stops reading: when the action is gone
// the input ends at once, after what is in the pipe; when it is alive
// and idle, this is all the stop waits for.
const quitGrace = 500 * time.Millisecond

// quitLimit bounds that reading: an action that is alive and never
// quiet does not keep a relay told to stop.
const quitLimit = 10 * time.Second

// maxBatch bounds a group commit: the lines that came while the last
// fdatasync ran are written and synced together, up to this many, so a
// burst costs one sync per few hundred bans and a lone ban one sync.
const maxBatch = 512

// Run serves the action: each line on in is an operation ("ban ADDR",
// ...). Lines are taken in groups: the operations that came while the
// last group was synced are appended in one write and made durable with
// one fdatasync, then acknowledged together on out with "ok N" (every
// line up to the N-th of this relay's input is taken). A line that is
// refused (not an operation, a full disk) gets "error N MESSAGE" before
// the "ok" that covers it. The action does not wait for either: it keeps
// what is not yet acknowledged and sends it again to the next relay if
// this one dies.
//
// Each proxy has its own deliverer; one proxy down never delays the
// others. At the end of in, Run drains for cfg.Drain, then returns.
func Run(cfg Config, in io.Reader, out io.Writer) error {
	if cfg.MaxBackoff == 0 {
		cfg.MaxBackoff = time.Minute
	}
	if cfg.MinBackoff == 0 {
		cfg.MinBackoff = time.Second
	}
	cfg.MinBackoff = min(cfg.MinBackoff, cfg.MaxBackoff)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, p := range cfg.Proxies {
		wg.Add(1)
		go func() {
			defer wg.Done()
			deliver(cfg, p, stop)
		}()
	}
	lines := make(chan string, 2*maxBatch)
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
	n := 0 // lines read
	restart := false
	quit, quitting := cfg.Quit, false
	var quitBy <-chan time.Time
	for {
		var first string
		var ok bool
		var idle <-chan time.Time
		if quitting {
			idle = time.After(quitGrace)
		}
		select {
		case first, ok = <-lines:
		case <-quit:
			// Read on until the input ends or goes quiet: after a
			// SIGKILL of fail2ban-server, systemd sends SIGTERM to the
			// relay, and what ban() wrote to the pipe before the kill
			// is in no one else's hands.
			quit, quitting = nil, true
			quitBy = time.After(quitLimit)
			continue
		case <-idle:
		case <-quitBy:
		case <-cfg.Restart:
			restart = true
		}
		if !ok {
			if first == "" {
				select {
				case err = <-readErr:
				default:
				}
			}
			break
		}
		batch := []string{first}
	gather:
		for len(batch) < maxBatch {
			select {
			case l, ok := <-lines:
				if !ok {
					break gather
				}
				batch = append(batch, l)
			default:
				break gather
			}
		}
		commit(cfg, w, n, batch)
		n += len(batch)
		if cfg.GroupAcks {
			fmt.Fprintf(w, "ok %d\n", n)
		}
		if werr := w.Flush(); werr != nil && err == nil {
			// The action is gone: what was read is durable, and is
			// delivered; nothing more can come.
			err = werr
		}
	}
	if !restart {
		drain(cfg)
	}
	close(stop)
	wg.Wait()
	return err
}

// commit appends one group of lines; the first line is number from+1.
func commit(cfg Config, w io.Writer, from int, batch []string) {
	ops := make([]Op, 0, len(batch))
	which := make([]int, 0, len(batch)) // the line of each op
	refused := make([]string, len(batch))
	for i, line := range batch {
		op, err := ParseOp(line)
		if err != nil {
			refused[i] = err.Error()
			continue
		}
		ops, which = append(ops, op), append(which, i)
	}
	taken, err := cfg.Outbox.AppendBatch(ops)
	if err != nil {
		for _, i := range which[taken:] {
			refused[i] = err.Error()
		}
		cfg.Logf("error", "outbox: %d operation(s) refused: %v", len(ops)-taken, err)
	}
	for i, msg := range refused {
		switch {
		case cfg.GroupAcks && msg != "":
			fmt.Fprintf(w, "error %d %s\n", from+i+1, oneLine(msg))
		case cfg.GroupAcks:
		case msg != "":
			fmt.Fprintf(w, "error %s\n", oneLine(msg))
		default:
			fmt.Fprintln(w, "ok")
		}
	}
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

// pipelined is how many operations a deliverer gathers before it writes
// while earlier lines are still unanswered. A line to an idle proxy goes
// at once; during a burst, what came while the proxy applied the last
// batch goes as the next one, so the proxy applies many bans per batch
// (one lock hold, one fsync of its state and of its log, one
// iptables-restore) instead of a few, and its batches grow with its own
// latency; pipelined keeps it fed when it is faster than that.
const pipelined = 256

// deliver sends the outbox to one proxy until stop: one session, kept
// open, reopened with backoff when it fails. Lines go out as operations
// come, and each reply is checked against its line; the proxy's cursor
// moves on when every line of an operation is answered.
//
// fail2ban's log hears one line when the proxy goes down (with the
// reason: ssh's own message, or the failing line and the proxy's
// answer), nothing while it stays down, and one line when it is back.
// The backoff starts again from its floor only when the proxy really
// took something; it doubles up to cfg.MaxBackoff while the proxy is
// unreachable, fails, or refuses for its quota.
func deliver(cfg Config, dest string, stop <-chan struct{}) {
	d := &deliverer{cfg: cfg, dest: dest, win: window}
	defer d.hangUp()
	backoff := time.Duration(0)
	for {
		err := d.step(stop)
		if err == errStopped {
			return
		}
		if err == nil {
			d.checkBack()
			continue
		}
		var retry errRetry
		isRetry := errors.As(err, &retry)
		c := d.conn
		quietDrop := c != nil && c.quiet && !isRetry && d.took == 0
		progressed := d.took > 0
		d.hangUp()
		if quietDrop {
			// A kept session the proxy closed while it was quiet
			// (stream_idle_timeout): open a new one at once.
			continue
		}
		if !isRetry && c != nil && c.stderr != nil && c.sent == 0 {
			if why := c.stderr(); why != "" {
				err = errors.New(why)
			}
		}
		wait := time.Duration(0)
		switch {
		case isRetry && retry.restart && !d.restarting:
			// Send the start at once; if the line fails again after
			// it, the backoff applies.
			d.restarting = true
		case progressed && !retry.quota:
			backoff = cfg.MinBackoff
			wait = backoff
		default:
			backoff = min(max(2*backoff, cfg.MinBackoff), cfg.MaxBackoff)
			wait = backoff
		}
		// A start that failed too is sent again with the line.
		d.restart = isRetry && retry.restart || d.restart && !progressed
		// After a failure, a session probes with one operation, and
		// widens its window as the proxy answers: a proxy over its
		// quota denies one line per attempt, not a window of them.
		d.win = 1
		d.wentDown(err)
		if wait == 0 {
			continue
		}
		select {
		case <-time.After(wait):
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
	// took counts the operations the proxy took on this session since
	// its last quiet spell.
	took int
	// win is how many lines may be in flight: window, or less after a
	// failure, doubling with each answered group.
	win int
	// restart is set when the next session starts with the jail's start
	// (an operation failed with exit 4); restarting while that attempt
	// has not yet led to progress.
	restart, restarting bool
	// down is set from the first failure until the proxy has taken its
	// backlog; delivered counts what it took meanwhile.
	down      bool
	delivered int
}

func (d *deliverer) hangUp() {
	if d.conn != nil {
		_ = d.conn.Close()
	}
	d.conn, d.flying, d.writing = nil, nil, nil
}

// wentDown says once, in fail2ban's log and in the outbox's error file,
// that the proxy is down and why.
func (d *deliverer) wentDown(err error) {
	box := d.cfg.Outbox
	box.SetError(d.dest, err.Error())
	if d.down {
		return
	}
	d.down, d.delivered = true, 0
	d.cfg.Logf("warning", "proxy %s: %v; it counts as down until it answers: %d operation(s) wait in the outbox, tried again with a backoff doubling up to %s, and nothing more is logged until it is back", d.dest, err, box.Backlog(d.dest), d.cfg.MaxBackoff)
}

// checkBack says once that a proxy which was down has taken its backlog.
func (d *deliverer) checkBack() {
	if !d.down || d.cfg.Outbox.Backlog(d.dest) > 0 || len(d.flying) > 0 {
		return
	}
	d.down = false
	d.cfg.Outbox.SetError(d.dest, "")
	d.cfg.Logf("info", "%s is back: %d operations delivered", d.dest, d.delivered)
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
		if d.restart {
			var lines []flight
			for _, c := range d.cfg.Jail.Commands(Op{Kind: Start}) {
				lines = append(lines, flight{text: c, seq: d.sent, kind: Start})
			}
			d.flying = lines
			d.writing = d.conn.write(lines)
		}
	}
	if d.writing == nil && len(d.flying) < d.win {
		room := d.win - len(d.flying)
		if ops := box.PendingAfter(d.sent, room); len(ops) > 0 && (len(d.flying) == 0 || len(ops) >= min(pipelined, room)) {
			lines := d.cfg.Jail.lines(ops, room)
			if len(d.flying) == 0 && !d.conn.last.IsZero() && time.Since(d.conn.last) > time.Second {
				d.conn.quiet, d.took = true, 0
			}
			d.flying = append(d.flying, lines...)
			d.sent = lines[len(lines)-1].seq
			d.writing = d.conn.write(lines)
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
	case <-timeout:
		return fmt.Errorf("no reply in %s", replyTimeout)
	case <-stop:
		return errStopped
	}
}

// replied handles a reply, and every other reply already there, then
// moves the proxy's cursor past the operations they complete.
func (d *deliverer) replied(reply string) error {
	if len(d.flying) == 0 {
		// Unsolicited: a broken or compromised proxy. The session is
		// dropped; the relay, and the other proxies, go on.
		return fmt.Errorf("reply %q answers no line: none is in flight", reply)
	}
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
			d.delivered++
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
		d.restart, d.restarting = false, false
		d.win = min(2*d.win, window)
		if terr := d.cfg.Outbox.Taken(d.dest, taken); terr != nil {
			d.cfg.Logf("error", "proxy %s: recording what it took: %v", d.dest, terr)
		}
	}
	return err
}

// oneLine keeps a message on one line of the protocol.
func oneLine(s string) string {
	return Printable(strings.NewReplacer("\n", " ", "\r", " ").Replace(s))
}

// errorName is the file that holds a proxy's last error while it is
// down: "UNIXTIME MESSAGE". "f2b-shim outbox" shows it.
func errorName(proxy string) string { return "error." + safeName(proxy) }

// SetError records the proxy's last error for "f2b-shim outbox" (an
// empty one removes it). It is a hint for the admin: a failure to write
// it changes nothing else.
func (o *Outbox) SetError(proxy, msg string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	path := filepath.Join(o.dir, errorName(proxy))
	if msg == "" {
		_ = os.Remove(path)
		return
	}
	_ = writeAside(o.dir, path, []byte(strconv.FormatInt(time.Now().Unix(), 10)+" "+oneLine(msg)+"\n"), false)
}
