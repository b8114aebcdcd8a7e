// Package relay is the mail host's side of the streamed ban channel:
// "f2b-shim relay", the child that proxy-stream.py (a fail2ban Python
// action) starts for its jail and feeds on stdin. It keeps a durable
// outbox, and delivers it to every proxy over one kept-open
// "ssh PROXY f2b-shim stream" session each, in order and at least once.
//
// The outbox is what makes this safe: an operation is fsync'd before the
// action's ban() returns, a proxy that is down gets everything when it is
// back, and a relay killed at any point replays from the outbox. Every
// operation is idempotent on the proxy, so a replay changes nothing that
// was already done.
package relay

import (
	"bufio"
	"cmp"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// Kind is what an operation does to the jail's chain on a proxy.
type Kind string

// The operations the action sends.
const (
	Start Kind = "start" // create the chain and hook it in
	Stop  Kind = "stop"  // unhook, flush and delete it
	Flush Kind = "flush" // empty it
	Ban   Kind = "ban"
	Unban Kind = "unban"
)

// Op is one operation of the outbox.
type Op struct {
	Seq  uint64
	Kind Kind
	// Addr is the address or prefix of a ban or unban.
	Addr netip.Prefix
}

func (o Op) String() string {
	if o.Addr.IsValid() {
		return fmt.Sprintf("%d %s %s", o.Seq, o.Kind, o.Addr)
	}
	return fmt.Sprintf("%d %s", o.Seq, o.Kind)
}

// ParseOp reads an operation as the action sends it: "start", "stop",
// "flush", "ban ADDR" or "unban ADDR".
func ParseOp(line string) (Op, error) {
	f := strings.Fields(line)
	if len(f) == 0 {
		return Op{}, errors.New("empty request")
	}
	op := Op{Kind: Kind(f[0])}
	switch op.Kind {
	case Start, Stop, Flush:
		if len(f) != 1 {
			return Op{}, fmt.Errorf("%s takes no argument", op.Kind)
		}
	case Ban, Unban:
		if len(f) != 2 {
			return Op{}, fmt.Errorf("%s takes one address", op.Kind)
		}
		p, err := parseAddr(f[1])
		if err != nil {
			return Op{}, err
		}
		op.Addr = p
	default:
		return Op{}, fmt.Errorf("unknown request %q; the action sends start, stop, flush, ban ADDR or unban ADDR", f[0])
	}
	return op, nil
}

func parseAddr(s string) (netip.Prefix, error) {
	if p, err := netip.ParsePrefix(s); err == nil {
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("%q is not an IP address or prefix", s)
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// Outbox is a jail's durable queue of operations for its proxies: the
// file outbox.log in its directory, one "SEQ KIND [ADDR]" line per
// operation, and a cursor file per proxy with the last sequence number
// that proxy has taken.
//
// It keeps only what a later operation does not supersede: the latest
// ban or unban of each address; a flush drops the bans and unbans before
// it; a stop drops everything before it; a start is kept unless a start
// after the last stop is kept already. Operations every proxy has taken
// are dropped too. So the outbox is bounded by the number of addresses
// in flight, not by history; it is rewritten when its file holds twice
// what is live.
type Outbox struct {
	mu      sync.Mutex
	dir     string
	f       *os.File
	lock    *os.File
	ops     []Op // live, by Seq
	seq     uint64
	lines   int // lines in the file
	cursors map[string]uint64
	changed chan struct{}
	// NoSync skips the fsync of appends: for benchmarks of what it costs.
	NoSync bool
}

const logName = "outbox.log"

// seqHeader starts the line that carries the last sequence number over a
// rewrite.
const seqHeader = "#seq "

// OpenOutbox opens (creating) the outbox in dir for the given proxies,
// and takes its lock: one relay per outbox.
func OpenOutbox(dir string, proxies []string) (*Outbox, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	lock, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("outbox %s is in use by another relay (is the jail started twice, or two fail2ban servers share outbox_dir?): %w", dir, err)
	}
	o := &Outbox{dir: dir, lock: lock, cursors: map[string]uint64{}, changed: make(chan struct{})}
	if err := o.load(); err != nil {
		o.Close()
		return nil, err
	}
	for _, p := range proxies {
		o.cursors[p] = o.readCursor(p)
	}
	if err := o.compact(); err != nil {
		o.Close()
		return nil, err
	}
	return o, nil
}

// load replays the file. A last line without its newline is a write the
// crash cut short; its ban() never returned, so fail2ban did not count
// it, and it is dropped.
func (o *Outbox) load() error {
	data, err := os.ReadFile(filepath.Join(o.dir, logName))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	text := string(data)
	if i := strings.LastIndexByte(text, '\n'); i < len(text)-1 {
		text = text[:i+1]
	}
	for n, line := range strings.Split(strings.TrimSuffix(text, "\n"), "\n") {
		if line == "" {
			continue
		}
		if n, ok := strings.CutPrefix(line, seqHeader); ok {
			if seq, err := strconv.ParseUint(n, 10, 64); err == nil {
				o.seq = max(o.seq, seq)
				continue
			}
		}
		o.lines++
		seqText, rest, _ := strings.Cut(line, " ")
		seq, err := strconv.ParseUint(seqText, 10, 64)
		if err != nil {
			return fmt.Errorf("%s line %d: %q: not SEQ KIND [ADDR]; move the file away to start afresh", filepath.Join(o.dir, logName), n+1, line)
		}
		op, err := ParseOp(rest)
		if err != nil {
			return fmt.Errorf("%s line %d: %v; move the file away to start afresh", filepath.Join(o.dir, logName), n+1, err)
		}
		op.Seq = seq
		o.seq = max(o.seq, seq)
		o.add(op)
	}
	return nil
}

// add puts op into the live list and drops what it supersedes.
func (o *Outbox) add(op Op) {
	keep := o.ops[:0]
	dup := false
	for _, old := range o.ops {
		drop := false
		switch op.Kind {
		case Stop:
			drop = true
		case Flush:
			drop = old.Kind == Ban || old.Kind == Unban || old.Kind == Flush
		case Ban, Unban:
			drop = (old.Kind == Ban || old.Kind == Unban) && old.Addr == op.Addr
		case Start:
			dup = dup || old.Kind == Start
		}
		if !drop {
			keep = append(keep, old)
		}
	}
	o.ops = keep
	if !dup {
		o.ops = append(o.ops, op)
	}
}

// Append makes op durable (fsync'd) and live, and wakes the deliverers.
func (o *Outbox) Append(op Op) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	op.Seq = o.seq + 1
	if o.f == nil {
		f, err := os.OpenFile(filepath.Join(o.dir, logName), os.O_WRONLY|os.O_APPEND|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
		if err != nil {
			return err
		}
		o.f = f
	}
	if _, err := o.f.WriteString(op.String() + "\n"); err != nil {
		return err
	}
	if !o.NoSync {
		// fdatasync: the line's data and the file's new size, without
		// the times, which nothing reads.
		if err := syscall.Fdatasync(int(o.f.Fd())); err != nil {
			return err
		}
	}
	o.seq, o.lines = op.Seq, o.lines+1
	o.add(op)
	o.wake()
	if o.lines > 2*len(o.ops)+1024 {
		return o.compact()
	}
	return nil
}

// wake tells every deliverer waiting in Changed that there is news.
func (o *Outbox) wake() {
	close(o.changed)
	o.changed = make(chan struct{})
}

// Changed is closed at the next change of the outbox.
func (o *Outbox) Changed() <-chan struct{} {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.changed
}

// Pending returns up to n live operations the proxy has not taken, in
// order.
func (o *Outbox) Pending(proxy string, n int) []Op {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.after(o.cursors[proxy], n)
}

// PendingAfter returns up to n live operations after seq, in order: what
// a deliverer sends next on a session that has sent up to seq.
func (o *Outbox) PendingAfter(seq uint64, n int) []Op {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.after(seq, n)
}

func (o *Outbox) after(seq uint64, n int) []Op {
	i := o.index(seq + 1)
	return slices.Clone(o.ops[i:min(len(o.ops), i+n)])
}

// index is where the first operation numbered seq or more is.
func (o *Outbox) index(seq uint64) int {
	i, _ := slices.BinarySearchFunc(o.ops, seq, func(op Op, seq uint64) int { return cmp.Compare(op.Seq, seq) })
	return i
}

// Cursor is the last operation the proxy has taken.
func (o *Outbox) Cursor(proxy string) uint64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.cursors[proxy]
}

// Backlog is how many live operations the proxy has not taken.
func (o *Outbox) Backlog(proxy string) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.ops) - o.index(o.cursors[proxy]+1)
}

// Taken records that the proxy has taken every operation up to seq. The
// cursor file is written without fsync: a cursor lost in a crash only
// sends operations again, which changes nothing on the proxy.
func (o *Outbox) Taken(proxy string, seq uint64) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if seq <= o.cursors[proxy] {
		return nil
	}
	o.cursors[proxy] = seq
	o.wake()
	tmp := o.cursorPath(proxy) + ".tmp"
	if err := os.WriteFile(tmp, []byte(strconv.FormatUint(seq, 10)+"\n"), 0o600); err != nil {
		return err
	}
	if err := os.Rename(tmp, o.cursorPath(proxy)); err != nil {
		return err
	}
	// What every proxy has taken is dropped from memory at once, and
	// from the file when it holds twice what is live.
	o.ops = slices.Delete(o.ops, 0, o.index(o.low()+1))
	if o.lines > 2*len(o.ops)+1024 {
		return o.compact()
	}
	return nil
}

// low is the sequence number every proxy has taken.
func (o *Outbox) low() uint64 {
	low, first := uint64(0), true
	for _, c := range o.cursors {
		if first || c < low {
			low, first = c, false
		}
	}
	return low
}

func (o *Outbox) cursorPath(proxy string) string {
	safe := strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '-' || r == '_' {
			return r
		}
		return '_'
	}, proxy)
	return filepath.Join(o.dir, "cursor."+safe)
}

func (o *Outbox) readCursor(proxy string) uint64 {
	data, err := os.ReadFile(o.cursorPath(proxy))
	if err != nil {
		return 0
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(data)), 10, 64)
	if err != nil || n > o.seq {
		return 0
	}
	return n
}

// compact rewrites the file with the live operations some proxy has not
// taken: written aside, fsync'd, and renamed over the old one.
func (o *Outbox) compact() error {
	low := o.low()
	o.ops = slices.DeleteFunc(o.ops, func(op Op) bool { return op.Seq <= low })
	tmp := filepath.Join(o.dir, logName+".tmp")
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	w := bufio.NewWriter(f)
	// The last sequence number stays in the file, so that numbers never
	// go back after a restart, even when nothing is live.
	fmt.Fprintf(w, "%s%d\n", seqHeader, o.seq)
	for _, op := range o.ops {
		fmt.Fprintln(w, op.String())
	}
	err = errors.Join(w.Flush(), f.Sync(), f.Close())
	if err == nil {
		err = os.Rename(tmp, filepath.Join(o.dir, logName))
	}
	if err != nil {
		return fmt.Errorf("rewriting the outbox: %w", err)
	}
	if d, err := os.Open(o.dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	if o.f != nil {
		o.f.Close()
		o.f = nil
	}
	o.lines = len(o.ops)
	return nil
}

// Close releases the file and the lock.
func (o *Outbox) Close() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	var err error
	if o.f != nil {
		err = o.f.Close()
	}
	if o.lock != nil {
		err = errors.Join(err, o.lock.Close())
	}
	return err
}

var _ io.Closer = (*Outbox)(nil)
