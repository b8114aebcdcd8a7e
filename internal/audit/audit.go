// Package audit writes the shim's audit log: one JSON object per line, one
// line per invocation, allowed or denied.
//
// Every string that may hold the client's bytes is a Text, whose encoding
// escapes every control character, so no input can forge or split a line.
package audit

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/f2b-shim/f2b-shim/internal/safefile"
)

// Record is one audit line. The field names are part of the log format
// that "f2b-shim audit" and users' log pipelines read; keep them stable.
type Record struct {
	Time   time.Time `json:"time"`
	Policy string    `json:"policy"`
	// UID is the user the shim ran as: 0 in root mode.
	UID        int    `json:"uid"`
	ClientIP   string `json:"client_ip,omitempty"`
	ClientPort int    `json:"client_port,omitempty"`
	// Session and Line name a request of a stream session (f2b-shim
	// stream): the session's random id, and the line's number in it.
	Session string `json:"session,omitempty"`
	LineNo  int    `json:"line,omitempty"`
	Command Text   `json:"command"`
	// CommandB64 holds the raw bytes of Command, base64, when they are
	// not valid UTF-8, so that no byte of an attack is lost.
	CommandB64 []byte `json:"command_b64,omitempty"`
	CommandLen int    `json:"command_len"`
	// CommandSHA256 is set when Command holds only a prefix of a command
	// too long for one line: the hash of all of it, to match repeats.
	CommandSHA256 string `json:"command_sha256,omitempty"`
	Decision      string `json:"decision"`
	Reason        Text   `json:"reason,omitempty"`
	Op            *Op    `json:"op,omitempty"`
	Result        string `json:"result"`
	Exit          int    `json:"exit"`
	// IptablesStatus and IptablesStderr come from the failing iptables call.
	IptablesStatus int  `json:"iptables_status,omitempty"`
	IptablesStderr Text `json:"iptables_stderr,omitempty"`
	// State is a note about the state, when it needed attention.
	State      Text    `json:"state,omitempty"`
	DurationMS float64 `json:"duration_ms"`
	// Count, on a "coalesced" line, is how many denials of the client in
	// that second were not written out one by one (see Log.Write).
	Count int `json:"count,omitempty"`
	// Prev is the SHA-256 of the line before this one: the hash chain
	// that "f2b-shim audit --verify" checks (see chain.go).
	Prev string `json:"prev,omitempty"`
}

// Op is the typed operation, as the policy understood it.
type Op struct {
	Kind   string `json:"kind"`
	Family string `json:"family"`
	// Chain is always the ban chain; Parent is set for hooks.
	Chain  string `json:"chain"`
	Parent string `json:"parent,omitempty"`
	Proto  string `json:"proto,omitempty"`
	Match  string `json:"match,omitempty"`
	Ports  string `json:"ports,omitempty"`
	Source string `json:"source,omitempty"`
	Target string `json:"target,omitempty"`
	// Member is the address a widened ban (ban_prefix_v6/v4) stands for.
	Member    string `json:"member,omitempty"`
	Canonical string `json:"canonical"`
}

// Decisions and results, as written in the log.
const (
	Allow = "allow"
	Deny  = "deny"
)

// MaxLine bounds one audit line, newline included, whatever the input:
// a hostile mail host must not turn one connection into kilobytes of
// log. A fail2ban request's line is about 600 bytes.
const MaxLine = 4096

// Caps of the other untrusted texts in a line, escaped. Reasons quote at
// most a short prefix of a word (see policy), and iptables' messages are
// one line.
const (
	maxReason = 512
	maxStderr = 512
	maxState  = 512
)

// SetCommand records the client's command, with its raw bytes in
// CommandB64 when they are not valid UTF-8. Line keeps as much of it as
// fits in MaxLine, and its length and hash when it does not all fit.
func (r *Record) SetCommand(cmd string) {
	r.CommandLen = len(cmd)
	r.setShown(cmd, len(cmd))
}

// setShown shows the first n bytes of cmd.
func (r *Record) setShown(cmd string, n int) {
	shown := cmd[:n]
	r.Command, r.CommandB64, r.CommandSHA256 = Text(shown), nil, ""
	if !validText(shown) {
		r.CommandB64 = []byte(shown)
	}
	if n < len(cmd) {
		sum := sha256.Sum256([]byte(cmd))
		r.CommandSHA256 = hex.EncodeToString(sum[:])
	}
}

// SetStderr records a failing program's stderr.
func (r *Record) SetStderr(s string) { r.IptablesStderr = Text(s) }

// capText cuts t so that its JSON form (escaped) takes at most n bytes.
func capText(t Text, n int) Text {
	size := 0
	s := string(t)
	for i := 0; i < len(s); {
		r, w := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && w == 1, needsEscape(r):
			size += 6
		case r == '"' || r == '\\':
			size += 2
		default:
			size += w
		}
		if size > n {
			return Text(s[:i]) + "…"
		}
		i += w
	}
	return t
}

// reserve is how much room the log must have before anything is done: a
// record is at most MaxLine, so 64 KiB always holds the next line and
// any coalesced counts written before it.
const reserve = 64 << 10

// Log is an open audit log.
type Log struct {
	f    *os.File
	path string
	// Prev is the prev of the last line Write wrote: the chain's head as
	// it was, for the copy that goes to syslog.
	Prev string
}

// Open opens path for appending, creating it and its directory, and
// reserves room for the next record. The shim refuses to act when Open
// fails: a change that cannot be audited is not carried out.
func Open(path string) (*Log, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, err
	}
	// Never through a link: in the least-privilege install the shim's
	// user owns the directory, and root's restore writes here too.
	f, err := safefile.Open(path, os.O_RDWR|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return nil, err
	}
	if err := reserveRoom(f, reserve); err != nil {
		f.Close()
		return nil, err
	}
	return &Log{f: f, path: path}, nil
}

// Reserve makes sure the log has room for n more records before a
// stream's batch of n requests touches the firewall: a change that
// cannot be audited is not carried out, and a session's single
// reservation at Open would be used up by its first batches. Each
// record is counted at MaxLine, several times a real request's line, so
// that concurrent writers of the same file fit in the same blocks.
func (l *Log) Reserve(n int) error {
	return reserveRoom(l.f, reserve+int64(n)*MaxLine)
}

// FollowRotation reopens the log when its path no longer names the open
// file: logrotate's create mode renamed it (and a later run may have
// compressed and deleted it). A long stream session would otherwise go
// on writing into a file no one reads. It reports whether it reopened.
// With copytruncate the path still names the open file, and O_APPEND
// writes go on at its new end.
func (l *Log) FollowRotation() (bool, error) {
	open, err := l.f.Stat()
	if err != nil {
		return false, err
	}
	if now, err := os.Stat(l.path); err == nil && os.SameFile(open, now) {
		return false, nil
	} else if err != nil && !errors.Is(err, os.ErrNotExist) {
		return false, err
	}
	fresh, err := Open(l.path)
	if err != nil {
		return false, err
	}
	l.f.Close()
	l.f = fresh.f
	return true, nil
}

// followBeforeWrite moves to the file at the log's path when logrotate
// renamed the open one after the caller's FollowRotation: a stream's
// batch takes up to seconds, and a one-shot call may have started the
// new file meanwhile, linked to the rotated file's last line, so lines
// appended to the rotated file after that one would break the chain.
// Room for the records is reserved in the new file first; when that
// fails, they go to the rotated file, whose room was reserved before
// the batch touched the firewall.
func (l *Log) followBeforeWrite(n int) {
	open, err := l.f.Stat()
	if err != nil {
		return
	}
	if now, err := os.Stat(l.path); err != nil || os.SameFile(open, now) {
		return
	}
	fresh, err := Open(l.path)
	if err != nil {
		return
	}
	if err := reserveRoom(fresh.f, reserve+int64(n)*MaxLine); err != nil {
		fresh.Close()
		return
	}
	l.f.Close()
	l.f = fresh.f
}

// reserveRoom allocates blocks past the end of the file without changing
// its size, so that a full filesystem is found before the firewall is
// touched rather than after. Filesystems without fallocate are let be.
func reserveRoom(f *os.File, room int64) error {
	st, err := f.Stat()
	if err != nil {
		return err
	}
	const keepSize = 0x01 // FALLOC_FL_KEEP_SIZE
	err = syscall.Fallocate(int(f.Fd()), keepSize, st.Size(), room)
	if errors.Is(err, syscall.EOPNOTSUPP) || errors.Is(err, syscall.ENOSYS) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("no room for the audit record: %w", err)
	}
	return nil
}

// Write appends r as one line. The line goes out in a single write(2) to a
// file opened O_APPEND, under an exclusive flock, so concurrent shims
// never interleave or tear lines.
//
// Denials are coalesced per client and second: the first denial of a
// client in a second is written in full; the others in that second only
// count, and their number goes out as one "coalesced" line (with count)
// before the next line of the log. A hostile mail host that floods the
// proxy with refused commands so writes about one line a second, not one
// per connection, and no denial goes unrecorded.
func (l *Log) Write(r Record) error {
	return l.WriteBatch([]Record{r})
}

// WriteBatch appends the records in order, exactly as one Write each
// would, but with one lock, one write(2) and one fsync for them all: a
// stream's batch of requests is audited line by line at the cost of one.
// Each record written gets its Prev, for the copy that goes to syslog.
func (l *Log) WriteBatch(recs []Record) error {
	l.followBeforeWrite(len(recs))
	fd := int(l.f.Fd())
	if err := syscall.Flock(fd, syscall.LOCK_EX); err != nil {
		return err
	}
	defer syscall.Flock(fd, syscall.LOCK_UN)
	pending, err := l.readPending()
	if err != nil {
		return err
	}
	hadPending := len(pending) > 0
	var head string
	var out []byte
	link := func(r *Record) error {
		if out == nil {
			if head, err = chainHead(l.f, l.path); err != nil {
				return err
			}
		}
		r.Prev = head
		line, err := r.Line()
		if err != nil {
			return err
		}
		out = append(out, line...)
		head = LineHash(line)
		l.Prev = r.Prev
		return nil
	}
	for i := range recs {
		r := &recs[i]
		sec := r.Time.Unix()
		kind := coalesceKind(*r)
		// Counts of seconds that are over go out before this line. Those
		// of this second go out before a change too, so that the log
		// reads in order around it, and stay open for more of their kind
		// in this second; a line of another non-changing kind leaves
		// them be, so that kinds taking turns are still coalesced.
		for _, key := range flushKeys(pending, sec, kind == "") {
			p := pending[key]
			if p.Count > 0 {
				c := p.record()
				if err := link(&c); err != nil {
					return err
				}
			}
			if p.Second != sec {
				delete(pending, key)
			} else {
				p.Count = 0
				pending[key] = p
			}
		}
		key := r.ClientIP + " " + kind
		if p, ok := pending[key]; kind != "" && ok {
			p.Count++
			pending[key] = p
			continue
		}
		if err := link(r); err != nil {
			return err
		}
		if kind != "" && len(pending) < maxPending {
			pending[key] = pendingDenials{Second: sec, Policy: r.Policy, UID: r.UID, Client: r.ClientIP, Kind: kind,
				Decision: r.Decision, Result: r.Result, Exit: r.Exit, Reason: capText(r.Reason, maxCoalescedReason)}
		}
	}
	if len(out) > 0 {
		if err := l.append(out); err != nil {
			return err
		}
	}
	if !hadPending && len(pending) == 0 {
		return nil // the side file is empty already, or absent
	}
	return l.writePending(pending)
}

// append writes out at the end of the log and syncs it. A write cut
// short (a full filesystem) is cut back to where it started, under the
// caller's flock, so the log always ends with a whole line: the next
// record must not be glued to half of one, which would break the chain.
func (l *Log) append(out []byte) error {
	st, err := l.f.Stat()
	if err != nil {
		return err
	}
	n, err := l.f.Write(out)
	if err == nil && n != len(out) {
		err = fmt.Errorf("short write (%d of %d bytes)", n, len(out))
	}
	if err != nil {
		if n > 0 {
			if terr := l.f.Truncate(st.Size()); terr != nil {
				err = errors.Join(err, fmt.Errorf("cutting the torn record back: %w", terr))
			}
		}
		return err
	}
	return l.f.Sync()
}

// flushKeys lists, in order, the keys of the counts to write out before a
// line of second sec: those of other seconds, and before a change those
// of this second with something counted. Usually none, so that a batch
// pays no sort per line.
func flushKeys(pending map[string]pendingDenials, sec int64, change bool) []string {
	due := func(p pendingDenials) bool { return p.Second != sec || change && p.Count > 0 }
	for _, p := range pending {
		if due(p) {
			return slices.DeleteFunc(slices.Sorted(maps.Keys(pending)), func(k string) bool { return !due(pending[k]) })
		}
	}
	return nil
}

// Kinds of coalesced lines: every repeated request that changes nothing.
// Changes are never coalesced; the ban quota bounds them.
const (
	kindDenied = "denied" // refused by the grammar or the policy
	kindFailed = "failed"
)

// coalesceKind is the kind under which r is counted rather than written
// when the same client had one of that kind in the same second, or "" for
// a record that is always written in full: a change, or one without a
// client to count it against. A hostile or merely retrying mail host
// can so add at most a few lines per second to the log, whatever it
// sends (see README, "Bounds").
func coalesceKind(r Record) string {
	if r.ClientIP == "" {
		return ""
	}
	if r.Op != nil && r.Op.Kind == "ban" && r.Op.Member != "" && r.State != "" {
		// A new member of a widened ban: the firewall is unchanged, the
		// state is not, and the quota bounds these.
		return ""
	}
	if changedOnItsOwn(r.State) {
		// The request changed nothing, but the shim did before it: a
		// repair after a wipe, or the record of a change a killed shim
		// left. Those are changes; the mail host cannot cause them at
		// will (it can wipe no firewall, kill no shim), so they do not
		// need the bound.
		return ""
	}
	switch {
	case r.Decision == Deny && r.Result == "denied":
		return kindDenied
	case r.Result == "denied":
		// A limit: allowed by the policy, refused by one of its bounds.
		// Each bound is its own kind, so the log shows which were hit.
		return "limit " + limitName(string(r.Reason))
	case r.Result == kindFailed:
		// By exit and iptables' status: a new kind of failure is seen.
		return fmt.Sprintf("%s %d %d", kindFailed, r.Exit, r.IptablesStatus)
	case r.Result == "unchanged", r.Result == "check-true", r.Result == "check-false", r.Result == "dry-run":
		return r.Result
	}
	return ""
}

// changedOnItsOwn reports whether a state note says the shim changed the
// firewall or the record before the request: a note of its own starts
// with "repaired: " (heal on contact) or says an earlier change was cut
// short (engine.FinishCutShort). Only the start of each "; "-separated
// part counts: a part's text may quote a chain's name, which the client
// chose.
func changedOnItsOwn(state Text) bool {
	for part := range strings.SplitSeq(string(state), "; ") {
		if strings.HasPrefix(part, "repaired: ") || strings.HasPrefix(part, "an earlier change ") || earlierChanges.MatchString(part) {
			return true
		}
	}
	return false
}

// earlierChanges starts the note of several changes cut short.
var earlierChanges = regexp.MustCompile(`^[0-9]+ earlier changes \(first `)

// limitKeys are the policy keys a limit's reason can name. A kind must
// come from this closed set: a reason also quotes the client's chain, and
// a chain may be named "mail-remote-f2b-max_aa", so a key read out of the
// text would let the client make a kind (a full line a second) per chain.
var limitKeys = []string{"max_new_bans_per_minute", "max_bans_per_chain", "max_chains", "max_hooks_per_chain", "max_stream_sessions"}

// limitName is the policy key a limit's reason names, such as
// max_new_bans_per_minute, or "". The key the shim wrote comes after the
// chain it quotes, so the last one found wins.
func limitName(reason string) string {
	name, at := "", -1
	for _, key := range limitKeys {
		if i := strings.LastIndex(reason, key); i > at {
			name, at = key, i
		}
	}
	return name
}

// maxCoalescedReason caps the first line's reason repeated on a
// coalesced line.
const maxCoalescedReason = 160

// MaxCoalescedSecond bounds what one client adds to the log per kind of
// non-change (coalesceKind) and second: its first line in full (at most
// MaxLine) and one "coalesced" line (a few hundred bytes, its reason
// capped).
const MaxCoalescedSecond = MaxLine + 1024

// pendingDenials counts a client's requests of one kind in one second
// that were not written one by one.
type pendingDenials struct {
	Second int64  `json:"second"`
	Count  int    `json:"count"`
	Policy string `json:"policy"`
	UID    int    `json:"uid"`
	Client string `json:"client,omitempty"`
	// Kind is "" in side files of versions that coalesced denials only.
	Kind     string `json:"kind,omitempty"`
	Decision string `json:"decision,omitempty"`
	Result   string `json:"result,omitempty"`
	Exit     int    `json:"exit,omitempty"`
	Reason   Text   `json:"reason,omitempty"`
}

func (p pendingDenials) record() Record {
	r := Record{
		Time: time.Unix(p.Second, 0).UTC(), Policy: p.Policy, UID: p.UID, ClientIP: p.Client,
		Decision: Deny, Result: "coalesced", Exit: 3, Count: p.Count,
		Reason: Text(fmt.Sprintf("%d more denials of this client in this second; the first is logged in full", p.Count)),
	}
	if p.Kind != "" && p.Kind != kindDenied {
		r.Decision, r.Exit = p.Decision, p.Exit
		r.Reason = Text(fmt.Sprintf("%d more %q results of this client in this second; the first is logged in full", p.Count, p.Result))
		if p.Reason != "" {
			r.Reason += ": " + p.Reason
		}
	}
	return r
}

// maxPending bounds the clients the side file tracks; only hosts whose
// key the proxy accepts can be denied, so a handful is normal.
const maxPending = 256

// pendingPath is the side file with the counts not yet written. It is
// not fsync'd: a power cut may lose a count, never the first denial of
// a second, which is in the log.
func (l *Log) pendingPath() string { return l.path + ".coalesce" }

func (l *Log) readPending() (map[string]pendingDenials, error) {
	m := map[string]pendingDenials{}
	f, err := safefile.Open(l.pendingPath(), os.O_RDONLY, 0)
	if errors.Is(err, os.ErrNotExist) {
		return m, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, 1<<20))
	if err != nil {
		return nil, err
	}
	if json.Unmarshal(data, &m) != nil || len(m) > maxPending {
		// A damaged side file loses at most its counts; start afresh.
		return map[string]pendingDenials{}, nil
	}
	for key, p := range m {
		if p.Kind == "" {
			// Written by a version that keyed denials by client alone.
			delete(m, key)
			p.Client, p.Kind = key, kindDenied
			m[key+" "+kindDenied] = p
		}
	}
	return m, nil
}

func (l *Log) writePending(m map[string]pendingDenials) error {
	data, err := json.Marshal(m)
	if err != nil {
		return err
	}
	f, err := safefile.Open(l.pendingPath(), os.O_WRONLY|os.O_CREATE, 0o640)
	if err != nil {
		return err
	}
	_, err = f.WriteAt(data, 0)
	return errors.Join(err, f.Truncate(int64(len(data))), f.Close())
}

func jsonUnmarshal(data []byte, v any) error { return json.Unmarshal(data, v) }

// Line is the record as one line of JSON, newline included, at most
// MaxLine bytes: the untrusted texts are capped, and the command is cut
// to the longest prefix that fits (its length and hash stay).
func (r Record) Line() ([]byte, error) {
	r.Reason, r.IptablesStderr, r.State = capText(r.Reason, maxReason), capText(r.IptablesStderr, maxStderr), capText(r.State, maxState)
	line, err := json.Marshal(r)
	if err != nil || len(line) < MaxLine || r.Command == "" {
		return append(line, '\n'), err
	}
	// Escaping makes a byte up to six, base64 four thirds: search the
	// longest prefix that fits, at a UTF-8 boundary.
	cmd := string(r.Command)
	lo, hi := 0, len(cmd)
	for lo < hi {
		mid := (lo + hi + 1) / 2
		r.setShown(cmd, runeStart(cmd, mid))
		if l, err := json.Marshal(r); err == nil && len(l) < MaxLine {
			lo = mid
		} else {
			hi = mid - 1
		}
	}
	r.setShown(cmd, runeStart(cmd, lo))
	line, err = json.Marshal(r)
	if err == nil && len(line) >= MaxLine {
		err = fmt.Errorf("audit record does not fit in %d bytes", MaxLine)
	}
	return append(line, '\n'), err
}

// runeStart moves n back to the start of a UTF-8 sequence in s.
func runeStart(s string, n int) int {
	for n > 0 && n < len(s) && !utf8.RuneStart(s[n]) {
		n--
	}
	return n
}

// Close closes the log.
func (l *Log) Close() error { return l.f.Close() }

// Pending is how many coalesced requests of the log at path are counted
// in its side file and not yet written on a "coalesced" line, by
// decision: they go out before the next change, or the next line of a
// later second.
func Pending(path string) (map[string]int, error) {
	m, err := (&Log{path: path}).readPending()
	n := map[string]int{}
	for _, p := range m {
		d := p.Decision
		if p.Kind == kindDenied || d == "" {
			d = Deny
		}
		n[d] += p.Count
	}
	return n, err
}
