// Package audit writes the shim's audit log: one JSON object per line, one
// line per invocation, allowed or denied.
//
// Every string that may hold the client's bytes is a Text, whose encoding
// escapes every control character, so no input can forge or split a line.
package audit

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/owner"
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
	Command    Text   `json:"command"`
	// CommandB64 holds the raw command, base64, when it is not valid UTF-8
	// or was cut short in Command, so that no byte of an attack is lost.
	CommandB64 []byte `json:"command_b64,omitempty"`
	CommandLen int    `json:"command_len"`
	Decision   string `json:"decision"`
	Reason     Text   `json:"reason,omitempty"`
	Op         *Op    `json:"op,omitempty"`
	Result     string `json:"result"`
	Exit       int    `json:"exit"`
	// IptablesStatus and IptablesStderr come from the failing iptables call.
	IptablesStatus int  `json:"iptables_status,omitempty"`
	IptablesStderr Text `json:"iptables_stderr,omitempty"`
	// State is a note about the state journal, when it needed attention.
	State      Text    `json:"state,omitempty"`
	DurationMS float64 `json:"duration_ms"`
}

// Op is the typed operation, as the policy understood it.
type Op struct {
	Kind   string `json:"kind"`
	Family string `json:"family"`
	// Chain is always the ban chain; Parent is set for hooks.
	Chain     string `json:"chain"`
	Parent    string `json:"parent,omitempty"`
	Proto     string `json:"proto,omitempty"`
	Match     string `json:"match,omitempty"`
	Ports     string `json:"ports,omitempty"`
	Source    string `json:"source,omitempty"`
	Target    string `json:"target,omitempty"`
	Canonical string `json:"canonical"`
}

// Decisions and results, as written in the log.
const (
	Allow = "allow"
	Deny  = "deny"
)

// maxLoggedCommand caps the command text in one line. Longer input is
// refused anyway (policy.MaxCommandLen); the cap keeps one hostile call
// from writing megabytes, and command_len still tells how long it was.
const maxLoggedCommand = 8192

// maxStderr caps iptables' stderr in a line; its messages are one line.
const maxStderr = 1024

// SetCommand records the client's command, escaping it, and keeps the raw
// bytes in CommandB64 whenever Command alone could not reproduce them.
func (r *Record) SetCommand(cmd string) {
	r.CommandLen = len(cmd)
	shown := cmd
	if len(shown) > maxLoggedCommand {
		shown = shown[:maxLoggedCommand]
	}
	r.Command = Text(shown)
	if !validText(shown) || len(shown) < len(cmd) {
		r.CommandB64 = []byte(shown)
	}
}

// SetStderr records a failing program's stderr, capped.
func (r *Record) SetStderr(s string) {
	if len(s) > maxStderr {
		s = s[:maxStderr]
	}
	r.IptablesStderr = Text(s)
}

// reserve is how much room the log must have before anything is done: a
// record is at most a few KiB (the logged command is capped and escaped at
// most sixfold, plus its base64), so 64 KiB always holds the next line.
const reserve = 64 << 10

// Log is an open audit log.
type Log struct {
	f *os.File
}

// Open opens path for appending, creating it and its directory, and
// reserves room for the next record. The shim refuses to act when Open
// fails: a change that cannot be audited is not carried out.
func Open(path string) (*Log, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return nil, err
	}
	if err := owner.Inherit(path); err != nil {
		f.Close()
		return nil, err
	}
	if err := reserveRoom(f); err != nil {
		f.Close()
		return nil, err
	}
	return &Log{f: f}, nil
}

// reserveRoom allocates blocks past the end of the file without changing
// its size, so that a full filesystem is found before the firewall is
// touched rather than after. Filesystems without fallocate are let be.
func reserveRoom(f *os.File) error {
	st, err := f.Stat()
	if err != nil {
		return err
	}
	const keepSize = 0x01 // FALLOC_FL_KEEP_SIZE
	err = syscall.Fallocate(int(f.Fd()), keepSize, st.Size(), reserve)
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
func (l *Log) Write(r Record) error {
	line, err := r.Line()
	if err != nil {
		return err
	}
	fd := int(l.f.Fd())
	if err := syscall.Flock(fd, syscall.LOCK_EX); err != nil {
		return err
	}
	defer syscall.Flock(fd, syscall.LOCK_UN)
	n, err := l.f.Write(line)
	if err == nil && n != len(line) {
		err = fmt.Errorf("short write (%d of %d bytes)", n, len(line))
	}
	if err != nil {
		return err
	}
	return l.f.Sync()
}

// Line is the record as one line of JSON, newline included.
func (r Record) Line() ([]byte, error) {
	line, err := json.Marshal(r)
	return append(line, '\n'), err
}

// Close closes the log.
func (l *Log) Close() error { return l.f.Close() }
