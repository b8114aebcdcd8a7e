package audit

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// The audit log is a hash chain: every line carries, in "prev", the
// SHA-256 of the line before it (its bytes, without the newline), and the
// first line of a file after logrotate links to the last line of the file
// before (audit.jsonl.1, or audit.jsonl.1.gz). Editing, inserting or
// removing a line breaks the chain at the next line, which Verify names.
// The very first line of a log links to genesis, 64 zeros. With syslog =
// true every record also goes to syslog with its prev, so that even a
// rewrite of the whole file shows against the remote copy.

// Genesis is the prev of the first line of a new log.
var Genesis = strings.Repeat("0", 64)

// LineHash is the chain's hash of one line.
func LineHash(line []byte) string {
	sum := sha256.Sum256(bytes.TrimSuffix(line, []byte("\n")))
	return hex.EncodeToString(sum[:])
}

// maxTail bounds how far back the last line is looked for: a line is at
// most MaxLine, older lines of earlier versions up to a few times that.
const maxTail = 64 << 10

// lastLine returns the last line of the open file, or nil when it is
// empty.
func lastLine(f *os.File) ([]byte, error) {
	st, err := f.Stat()
	if err != nil || st.Size() == 0 {
		return nil, err
	}
	// A line is at most MaxLine: twice that nearly always holds the last
	// whole line, and maxTail covers the longer lines of older versions.
	for _, want := range []int64{2 * MaxLine, maxTail} {
		n := min(st.Size(), want)
		buf := make([]byte, n)
		if _, err := f.ReadAt(buf, st.Size()-n); err != nil && err != io.EOF {
			return nil, err
		}
		buf = bytes.TrimSuffix(buf, []byte("\n"))
		if i := bytes.LastIndexByte(buf, '\n'); i >= 0 {
			return buf[i+1:], nil
		}
		if n == st.Size() || want == maxTail {
			// The file is this one line, or its end is not a line the
			// shim wrote: link to what is there, and let --verify say so,
			// rather than refuse every request.
			return buf, nil
		}
	}
	return nil, nil
}

// chainHead is the prev for the next line of the log at path, open as f:
// the hash of its last line, else of the last line of its newest
// rotation, else genesis.
func chainHead(f *os.File, path string) (string, error) {
	last, err := lastLine(f)
	if err != nil {
		return "", err
	}
	if last != nil {
		return LineHash(last), nil
	}
	for _, prev := range []string{path + ".1", path + ".1.gz"} {
		last, err := lastLineOf(prev)
		if os.IsNotExist(err) {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("reading the end of %s to link the new log to it: %w", prev, err)
		}
		if last != nil {
			return LineHash(last), nil
		}
	}
	return Genesis, nil
}

// lastLineOf reads a rotated file's last line, gzipped or not.
func lastLineOf(name string) ([]byte, error) {
	if !strings.HasSuffix(name, ".gz") {
		f, err := os.Open(name)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		return lastLine(f)
	}
	var last []byte
	err := scanLog(name, func(_ int, line []byte) { last = append(last[:0], line...) })
	var open *openError
	if errors.As(err, &open) {
		return nil, open.err
	}
	return last, err
}

// Break is where the chain does not hold.
type Break struct {
	File string
	Line int
	// Reason says what was found.
	Reason string
}

func (b Break) String() string { return fmt.Sprintf("%s:%d: %s", b.File, b.Line, b.Reason) }

// Verify checks the chain through the log at path and its rotations,
// oldest first. It returns the first break, or nil, and how many lines
// it checked. Lines written before the chain existed (no prev) are
// accepted until the first chained line; after it, every line must link.
func Verify(path string) (*Break, int, error) {
	files, err := rotations(path)
	if err != nil {
		return nil, 0, err
	}
	var head string // hash of the line before; "" before the first line
	chained := false
	checked := 0
	for _, name := range files {
		lines, err := rawLines(name)
		if err != nil {
			return nil, checked, err
		}
		for i, line := range lines {
			prev := prevOf(line)
			switch {
			case prev == "" && !chained:
				// a line from before the chain
			case prev == "":
				return &Break{name, i + 1, "the line has no prev: it was inserted, or written by hand"}, checked, nil
			case !chained:
				chained = true // the first chained line: its predecessor may be rotated away
			case prev != head:
				return &Break{name, i + 1, "prev does not match the line before: that line was edited or removed, or this one was inserted"}, checked, nil
			}
			head = LineHash(line)
			checked++
		}
	}
	return nil, checked, nil
}

// prevOf reads a line's prev without trusting the rest of it.
func prevOf(line []byte) string {
	var r struct {
		Prev string `json:"prev"`
	}
	if err := jsonUnmarshal(line, &r); err != nil {
		return ""
	}
	return r.Prev
}

// rawLines reads a file's lines, gzipped or not, as they are.
func rawLines(name string) ([][]byte, error) {
	var out [][]byte
	err := scanLog(name, func(_ int, line []byte) { out = append(out, bytes.Clone(line)) })
	var open *openError
	if errors.As(err, &open) {
		return nil, open.err
	}
	return out, err
}
