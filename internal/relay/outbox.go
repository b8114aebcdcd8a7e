// Package relay is the mail host's side of the streamed ban channel:
// "f2b-shim relay", the child that proxy-stream.py (a fail2ban Python
// action) starts for its jail and feeds on stdin. It keeps a durable
// outbox, and delivers it to every proxy over one kept-open
// "ssh PROXY f2b-shim stream" session each, in order and at least once.
//
// The outbox is what makes this safe: operations are written to it and
// fdatasync'd in groups (group commit), a proxy that is down gets
// everything when it is back, and a relay killed at any point replays
// from the outbox. Every operation is idempotent on the proxy, so a
// replay changes nothing that was already done.
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
	"time"

	"github.com/f2b-shim/f2b-shim/internal/safefile"
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

// dead marks a superseded operation in the outbox's list until the list
// is compacted.
const dead Kind = ""

// Op is one operation of the outbox.
type Op struct {
	Seq  uint64
	Kind Kind
	// Addr is the address or prefix of a ban or unban.
	Addr netip.Prefix
	// At is when the relay took it (Unix seconds): "f2b-shim outbox"
	// shows the age of the oldest one a proxy has not taken.
	At int64
}

func (o Op) String() string {
	if o.Addr.IsValid() {
		return fmt.Sprintf("%d %s %s", o.Seq, o.Kind, o.Addr)
	}
	return fmt.Sprintf("%d %s", o.Seq, o.Kind)
}

// record is the op's line in the file: "SEQ KIND [ADDR] [@UNIXTIME]".
func (o Op) record() string {
	if o.At != 0 {
		return o.String() + " @" + strconv.FormatInt(o.At, 10) + "\n"
	}
	return o.String() + "\n"
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

// parseRecord reads one line of the file.
func parseRecord(line string) (Op, error) {
	seqText, rest, _ := strings.Cut(line, " ")
	seq, err := strconv.ParseUint(seqText, 10, 64)
	if err != nil || seq == 0 || seq > maxSeq {
		return Op{}, errors.New("not SEQ KIND [ADDR]")
	}
	var at int64
	if i := strings.LastIndex(rest, " @"); i >= 0 {
		if at, err = strconv.ParseInt(rest[i+2:], 10, 64); err != nil {
			return Op{}, errors.New("not SEQ KIND [ADDR] [@TIME]")
		}
		rest = rest[:i]
	}
	op, err := ParseOp(rest)
	op.Seq, op.At = seq, at
	return op, err
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
// file outbox.log in its directory, one "SEQ KIND [ADDR] [@TIME]" line
// per operation, and a cursor file per proxy with the last sequence
// number that proxy has taken.
//
// It keeps only what a later operation does not supersede: the latest
// ban or unban of each address; a flush drops the bans and unbans before
// it; a stop drops everything before it; a start is kept unless a start
// after the last stop is kept already. Operations every proxy has taken
// are dropped too. So the outbox is bounded by the number of addresses
// in flight, not by history; it is rewritten when its file holds twice
// what is live.
//
// Every step is O(1) amortized per operation (the live operation of an
// address is found through an index, superseded ones are marked dead and
// swept in bulk), so loading is O(n): an attacker who rotates IPv6
// addresses while a proxy is down grows the outbox, not its cost per ban.
type Outbox struct {
	mu   sync.Mutex
	dir  string
	logf func(level, format string, a ...any)
	f    *os.File
	// size is where the file's last whole record ends: a failed append
	// is cut back to it, so the file only ever holds whole lines.
	size int64
	// torn is set when cutting back failed: the next append tries again
	// before it writes.
	torn bool
	lock *os.File
	// ops are by Seq; superseded ones are marked dead until a sweep.
	ops    []Op
	nDead  int
	byAddr map[netip.Prefix]uint64 // the live ban or unban of each address
	others []uint64                // the live start, flush and stop (a few)
	seq    uint64
	lines  int // records in the file
	// cursors are what each proxy has taken; backlog what it has not,
	// kept as a count so that asking costs nothing.
	cursors map[string]uint64
	backlog map[string]int
	// cursorErr is set while cursor files cannot be written (full
	// disk): said once, and the cursors stay in memory.
	cursorErr bool
	// retryAt is the line count below which a rewrite that failed is
	// not tried again; compactErr is set while rewrites fail.
	retryAt    int
	compactErr bool
	// hadSkipped is set when the load skipped lines: the file is
	// rewritten without them when it can be.
	hadSkipped bool
	changed    chan struct{}
	// NoSync skips the fsync of appends: for benchmarks of what it costs.
	NoSync bool
	// work counts the steps of the outbox's loops: the complexity test
	// compares it across sizes.
	work int
}

const logName = "outbox.log"

// seqHeader starts the line that carries the last sequence number over a
// rewrite.
const seqHeader = "#seq "

// maxSeq bounds a record's number: far above the operations a relay
// numbers in any lifetime, and far below the overflow of the next one.
const maxSeq = 1 << 53

// maxRecord bounds a record: "SEQ unban ADDR/LEN @TIME" is below 100
// bytes. A torn line is searched for a record only in its last maxRecord
// bytes, so a planted long line costs the load no more than a short one.
const maxRecord = 128

// OpenOutbox opens (creating) the outbox in dir for the given proxies,
// and takes its lock: one relay per outbox. It refuses a directory that
// another user could write to (CheckDir). logf, when not nil, hears of
// what the load skipped and of compactions that could not be done.
func OpenOutbox(dir string, proxies []string, logf func(level, format string, a ...any)) (*Outbox, error) {
	if logf == nil {
		logf = func(string, string, ...any) {}
	}
	if err := MakeDir(dir); err != nil {
		return nil, err
	}
	lock, err := safefile.Open(filepath.Join(dir, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := takeLock(lock, dir, logf); err != nil {
		lock.Close()
		return nil, err
	}
	o := &Outbox{dir: dir, logf: logf, lock: lock, byAddr: map[netip.Prefix]uint64{},
		cursors: map[string]uint64{}, backlog: map[string]int{}, changed: make(chan struct{})}
	if err := o.load(); err != nil {
		o.Close()
		return nil, err
	}
	for _, p := range proxies {
		o.cursors[p] = o.readCursor(p)
		o.backlog[p] = o.countAfter(o.cursors[p])
	}
	o.initCursors(proxies)
	o.sweep()
	if o.lines > 2*o.live()+1024 || o.hadSkipped {
		// An optimisation, never a precondition: on a full disk the
		// relay starts, and delivers, from the file as it is.
		o.tryCompact("it is delivered as it is")
	}
	return o, nil
}

// lockWait bounds how long a relay waits for the outbox's lock: a relay
// that a killed fail2ban-server left behind reads what is in its pipe
// and drains for the action's drain (10 s), then ends its sessions
// (5 s). Failing at once made the action refuse, as if for good, every
// operation the new fail2ban sent meanwhile.
var lockWait = 30 * time.Second

// takeLock takes the outbox's lock, waiting up to lockWait for a relay
// that still holds it.
func takeLock(lock *os.File, dir string, logf func(level, format string, a ...any)) error {
	deadline := time.Now().Add(lockWait)
	for said := false; ; said = true {
		err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) || time.Now().After(deadline) {
			return fmt.Errorf("outbox %s is in use by another relay (is the jail started twice, or two fail2ban servers share outbox_dir?): %w", dir, err)
		}
		if !said {
			logf("info", "outbox %s is in use by another relay, most likely one still draining after fail2ban restarted; waiting up to %s for it", dir, lockWait)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// load replays the file in one pass. A last line without its newline is
// a write cut short (a crash, a full disk): its operation was never
// acknowledged, and it is dropped and cut off. A line that is not a
// record (torn in the middle by an older relay, or written by someone
// else) is skipped and said, and every whole record around it is kept:
// a torn line glued to the next record keeps that record.
func (o *Outbox) load() error {
	path := filepath.Join(o.dir, logName)
	f, err := safefile.Open(path, os.O_RDONLY, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	r := bufio.NewReaderSize(f, 64<<10)
	var skipped []string
	n := 0
	prev := uint64(0) // the last record's number: they go up in the file
	for {
		line, err := r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			// Far longer than any record: skip it whole.
			n++
			long := len(line)
			for errors.Is(err, bufio.ErrBufferFull) {
				line, err = r.ReadSlice('\n')
				long += len(line)
			}
			if err == nil {
				o.size += int64(long)
				skipped = append(skipped, fmt.Sprintf("line %d (%d bytes, not a record)", n, long))
				continue
			}
		}
		if err == io.EOF {
			if len(line) > 0 {
				o.logf("warning", "outbox %s: the last line %q was cut short (a crash or a full disk while it was written); its operation was never acknowledged, and it is dropped", path, truncate(string(line)))
			}
			break
		}
		if err != nil {
			return err
		}
		n++
		o.size += int64(len(line))
		text := string(line[:len(line)-1])
		if s, ok := strings.CutPrefix(text, seqHeader); ok {
			if seq, err := strconv.ParseUint(s, 10, 64); err == nil && seq <= maxSeq {
				o.seq = max(o.seq, seq)
				continue
			}
		}
		o.lines++
		op, err := parseRecord(text)
		if err != nil || op.Seq <= prev {
			var ok bool
			op, ok = o.salvage(text, prev)
			if !ok {
				skipped = append(skipped, fmt.Sprintf("line %d %q", n, truncate(text)))
				continue
			}
			skipped = append(skipped, fmt.Sprintf("line %d: the torn start of %q (its record %q is kept)", n, truncate(text), op.String()))
		}
		prev, o.seq = op.Seq, max(o.seq, op.Seq)
		o.add(op)
	}
	if len(skipped) > 0 {
		o.hadSkipped = true
		o.logf("warning", "outbox %s: skipped what is not a whole record: %s; every whole record around it is kept", path, strings.Join(skipped, ", "))
	}
	return nil
}

// truncate shortens a foreign line for a log message.
func truncate(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

// salvage finds the whole record at the end of a line whose start was
// torn: "341 ban 203341 ban 198.51.100.1/32" is the torn "341 ban 203"
// and the record "341 ban 198.51.100.1/32". Of the tails that parse,
// the one with the lowest sequence number above the last one read is
// the record (numbers go up by one at each append).
func (o *Outbox) salvage(line string, prev uint64) (Op, bool) {
	var best Op
	found := false
	for i := max(1, len(line)-maxRecord); i < len(line); i++ {
		o.work++
		if c := line[i]; c < '0' || c > '9' {
			continue
		}
		op, err := parseRecord(line[i:])
		if err != nil || op.Seq <= prev {
			continue
		}
		if !found || op.Seq < best.Seq {
			best, found = op, true
		}
	}
	return best, found
}

// live is how many operations are live.
func (o *Outbox) live() int { return len(o.ops) - o.nDead }

// at is the index of the operation numbered seq, or -1.
func (o *Outbox) at(seq uint64) int {
	i, ok := slices.BinarySearchFunc(o.ops, seq, func(op Op, seq uint64) int { return cmp.Compare(op.Seq, seq) })
	if !ok {
		return -1
	}
	return i
}

// kill marks the operation numbered seq dead.
func (o *Outbox) kill(seq uint64) {
	i := o.at(seq)
	if i < 0 || o.ops[i].Kind == dead {
		return
	}
	if a := o.ops[i].Addr; a.IsValid() {
		if o.byAddr[a] == seq {
			delete(o.byAddr, a)
		}
	} else {
		o.others = slices.DeleteFunc(o.others, func(s uint64) bool { return s == seq })
	}
	o.ops[i].Kind = dead
	o.nDead++
	for p, c := range o.cursors {
		if c < seq {
			o.backlog[p]--
		}
	}
}

// add puts op into the live list and marks dead what it supersedes.
func (o *Outbox) add(op Op) {
	switch op.Kind {
	case Ban, Unban:
		if old, ok := o.byAddr[op.Addr]; ok {
			o.kill(old)
		}
	case Flush, Stop:
		for _, seq := range o.byAddr {
			o.work++
			o.kill(seq)
		}
		clear(o.byAddr)
		for _, seq := range slices.Clone(o.others) {
			if op.Kind == Stop || o.ops[o.at(seq)].Kind == Flush {
				o.kill(seq)
			}
		}
	case Start:
		for _, seq := range o.others {
			if o.ops[o.at(seq)].Kind == Start {
				return
			}
		}
	}
	o.ops = append(o.ops, op)
	o.work++
	if op.Addr.IsValid() {
		o.byAddr[op.Addr] = op.Seq
	} else {
		o.others = append(o.others, op.Seq)
	}
	for p := range o.cursors {
		o.backlog[p]++
	}
}

// sweep drops what every proxy has taken and, when the dead outnumber
// the live, the dead: each operation is swept once, so the cost is O(1)
// per operation.
func (o *Outbox) sweep() {
	low := o.low()
	i := 0
	for i < len(o.ops) && o.ops[i].Seq <= low {
		o.work++
		o.kill(o.ops[i].Seq)
		i++
	}
	// The taken prefix, now all dead, goes at once.
	o.ops, o.nDead = o.ops[i:], o.nDead-i
	if o.nDead > len(o.ops)/2 {
		o.work += len(o.ops)
		o.ops = slices.DeleteFunc(o.ops, func(op Op) bool { return op.Kind == dead })
		o.nDead = 0
	}
}

// Append makes op durable (fsync'd) and live, and wakes the deliverers.
func (o *Outbox) Append(op Op) error {
	n, err := o.AppendBatch([]Op{op})
	if n == 1 {
		return nil
	}
	return err
}

// AppendBatch writes ops in one write and makes them durable with one
// fdatasync (group commit), then makes them live and wakes the
// deliverers. It returns how many were taken, from the first on: when a
// write fails (a full disk), the file is cut back to its last whole
// record, the operations that still fit are taken one by one, and the
// rest are refused with the error. What was taken is never lost, and
// the file never holds a torn line.
func (o *Outbox) AppendBatch(ops []Op) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(ops) == 0 {
		return 0, nil
	}
	if err := o.openFile(); err != nil {
		return 0, err
	}
	now := time.Now().Unix()
	var buf []byte
	for i := range ops {
		ops[i].Seq, ops[i].At = o.seq+uint64(i)+1, now
		buf = append(buf, ops[i].record()...)
	}
	n := len(ops)
	before := o.size
	err := o.write(buf)
	if err != nil {
		n = 0
	}
	if err != nil && len(ops) > 1 {
		// Take what still fits, one by one.
		for _, op := range ops {
			if err = o.write([]byte(op.record())); err != nil {
				break
			}
			n++
		}
	}
	if n > 0 && !o.NoSync {
		// fdatasync: the lines' data and the file's new size, without
		// the times, which nothing reads.
		if serr := fdatasync(int(o.f.Fd())); serr != nil {
			// What the disk holds is unknown: refuse it all, and cut
			// the file back to before this group, so that a later load
			// does not replay it, nor meet its numbers twice (the next
			// group takes them again).
			o.cutBack(before)
			return 0, fmt.Errorf("syncing the outbox: %w", serr)
		}
	}
	for _, op := range ops[:n] {
		o.seq = op.Seq
		o.lines++
		o.add(op)
	}
	if n > 0 {
		o.wake()
	}
	if o.lines > 2*o.live()+1024 {
		o.tryCompact("it goes on growing until there is room")
	}
	if err != nil {
		return n, fmt.Errorf("writing the outbox: %w", err)
	}
	return n, nil
}

// fdatasync is syscall.Fdatasync; a test makes it fail as a failing
// disk does.
var fdatasync = syscall.Fdatasync

// openFile opens the file for appending, and cuts off a torn end that
// an earlier failure left.
func (o *Outbox) openFile() error {
	if o.f == nil {
		f, err := safefile.Open(filepath.Join(o.dir, logName), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			return err
		}
		o.f = f
		st, err := f.Stat()
		if err != nil {
			return err
		}
		o.torn = st.Size() != o.size
	}
	if o.torn {
		if err := o.f.Truncate(o.size); err != nil {
			return fmt.Errorf("cutting the outbox back to its last whole record: %w", err)
		}
		o.torn = false
	}
	return nil
}

// write appends whole records, or nothing.
func (o *Outbox) write(b []byte) error {
	n, err := o.f.Write(b)
	if err == nil && n == len(b) {
		o.size += int64(n)
		return nil
	}
	if err == nil {
		err = io.ErrShortWrite
	}
	o.cutBack(o.size)
	return err
}

// cutBack truncates the file to size: a failed append leaves no part of
// itself, so a later append never glues onto a torn line.
func (o *Outbox) cutBack(size int64) {
	o.size = size
	o.torn = o.f.Truncate(size) != nil
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
	var out []Op
	for i := o.index(seq + 1); i < len(o.ops) && len(out) < n; i++ {
		o.work++
		if o.ops[i].Kind != dead {
			out = append(out, o.ops[i])
		}
	}
	return out
}

// countAfter counts the live operations after seq.
func (o *Outbox) countAfter(seq uint64) int {
	n := 0
	for i := o.index(seq + 1); i < len(o.ops); i++ {
		if o.ops[i].Kind != dead {
			n++
		}
	}
	return n
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
	return o.backlog[proxy]
}

// Taken records that the proxy has taken every operation up to seq. The
// cursor file is written without fsync: a cursor lost in a crash only
// sends operations again, which changes nothing on the proxy. A cursor
// that cannot be written (a full disk) stays in memory.
func (o *Outbox) Taken(proxy string, seq uint64) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	old := o.cursors[proxy]
	if seq <= old {
		return nil
	}
	for i := o.index(old + 1); i < len(o.ops) && o.ops[i].Seq <= seq; i++ {
		o.work++
		if o.ops[i].Kind != dead {
			o.backlog[proxy]--
		}
	}
	o.cursors[proxy] = seq
	o.wake()
	err := writeAside(o.dir, o.cursorPath(proxy), []byte(strconv.FormatUint(seq, 10)+"\n"), false)
	if err != nil && !o.cursorErr {
		o.logf("warning", "outbox %s: cannot record what proxy %s took (%v); it is kept in memory, and sent again after a restart", o.dir, proxy, err)
	}
	o.cursorErr = err != nil
	// What every proxy has taken is dropped from memory at once, and
	// from the file when it holds twice what is live.
	o.sweep()
	if o.lines > 2*o.live()+1024 {
		o.tryCompact("it goes on growing until there is room")
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

// safeName keeps a proxy's name to characters that are safe in a file
// name.
func safeName(proxy string) string {
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '-' || r == '_' {
			return r
		}
		return '_'
	}, proxy)
}

func (o *Outbox) cursorPath(proxy string) string {
	return filepath.Join(o.dir, "cursor."+safeName(proxy))
}

func (o *Outbox) readCursor(proxy string) uint64 {
	n, err := readNumber(o.cursorPath(proxy))
	if err != nil || n > o.seq {
		return 0
	}
	return n
}

// readNumber reads a file holding one number, without following links.
func readNumber(path string) (uint64, error) {
	f, err := safefile.Open(path, os.O_RDONLY, 0)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, 64))
	if err != nil {
		return 0, err
	}
	return strconv.ParseUint(strings.TrimSpace(string(data)), 10, 64)
}

// writeAside writes data to path through a temporary file made with
// O_EXCL and O_NOFOLLOW (a stale one, or a link someone planted, is
// removed first, never followed), then renames it over path.
func writeAside(dir, path string, data []byte, sync bool) error {
	tmp := path + ".tmp"
	if err := os.Remove(tmp); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil && sync {
		err = f.Sync()
	}
	if err = errors.Join(err, f.Close()); err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		_ = os.Remove(tmp)
	}
	return err
}

// tryCompact rewrites the file unless a rewrite failed since it last
// grew by what is live plus 1024 lines: each attempt writes the whole
// live outbox, so on a disk with room for appends but not for that, it
// is not tried at every operation. A failure is said once, until a
// rewrite succeeds.
func (o *Outbox) tryCompact(then string) {
	if o.lines < o.retryAt {
		return
	}
	if err := o.compact(); err != nil {
		o.retryAt = o.lines + o.live() + 1024
		if !o.compactErr {
			o.logf("warning", "outbox %s: not rewritten (%v); %s, and it is tried again when the file has grown", o.dir, err, then)
		}
		o.compactErr = true
		return
	}
	o.retryAt, o.compactErr = 0, false
}

// compact rewrites the file with the live operations some proxy has not
// taken: written aside, fsync'd, and renamed over the old one.
func (o *Outbox) compact() error {
	o.sweep()
	var b strings.Builder
	// The last sequence number stays in the file, so that numbers never
	// go back after a restart, even when nothing is live.
	fmt.Fprintf(&b, "%s%d\n", seqHeader, o.seq)
	n := 0
	for _, op := range o.ops {
		o.work++
		if op.Kind != dead {
			b.WriteString(op.record())
			n++
		}
	}
	if err := writeAside(o.dir, filepath.Join(o.dir, logName), []byte(b.String()), true); err != nil {
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
	o.lines, o.size, o.hadSkipped = n, int64(b.Len()), false
	return nil
}

// Close releases the file and the lock.
func (o *Outbox) Close() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	var err error
	if o.f != nil {
		err = o.f.Close()
		o.f = nil
	}
	if o.lock != nil {
		err = errors.Join(err, o.lock.Close())
		o.lock = nil
	}
	return err
}

var _ io.Closer = (*Outbox)(nil)
