package state

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/f2b-shim/f2b-shim/policy"
)

// File names in state_dir.
const (
	journalName = "journal.jsonl"
	// baseName holds the journal's size right after the last compaction.
	baseName = "journal.base"
)

// compactSlack is how much the journal may grow past twice its compacted
// size before it is compacted again: rare enough that a ban almost never
// pays for it, often enough that reading it stays quick.
const compactSlack = 1 << 20

// maxLine bounds one journal line; canonical commands are under 200 bytes.
const maxLine = 64 << 10

type line struct {
	Time    time.Time `json:"time"`
	Command string    `json:"command"`
}

// Path is the journal's path in dir.
func Path(dir string) string { return filepath.Join(dir, journalName) }

// TornTail reports whether the journal ends in the middle of a line, as
// a crash during a write leaves it.
func TornTail(dir string) bool {
	f, err := os.Open(Path(dir))
	if err != nil {
		return false
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || st.Size() == 0 {
		return false
	}
	last := make([]byte, 1)
	_, err = f.ReadAt(last, st.Size()-1)
	return err == nil && last[0] != '\n'
}

// Append adds one change to the journal and fsyncs it before returning,
// so that a change reported as done survives a crash. With endTorn, it
// first ends a torn last line, so that the new line stays whole.
func Append(dir string, e Entry, endTorn bool) error {
	data, err := json.Marshal(line(e))
	if err != nil {
		return err
	}
	f, err := os.OpenFile(Path(dir), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return err
	}
	defer f.Close()
	if endTorn {
		data = append([]byte{'\n'}, data...)
	}
	if _, err := f.Write(append(data, '\n')); err != nil {
		return err
	}
	return f.Sync()
}

// Problem is a journal line that could not be used.
type Problem struct {
	Line   int
	Reason string
}

func (p Problem) String() string { return fmt.Sprintf("line %d: %s", p.Line, p.Reason) }

// Load replays the journal through the policy. Lines that do not parse,
// are cut short or that the policy refuses are skipped and reported; the
// rest still count, so a damaged journal loses as little as possible.
func Load(dir string, pol *policy.Policy, ctx policy.Context) (*State, []Problem, error) {
	s := New()
	f, err := os.Open(Path(dir))
	if errors.Is(err, os.ErrNotExist) {
		return s, nil, nil
	}
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	var problems []Problem
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 4096), maxLine)
	for n := 1; sc.Scan(); n++ {
		var l line
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			problems = append(problems, Problem{n, "not a journal line"})
			continue
		}
		op, err := policy.Decide(pol, l.Command, ctx)
		if err == nil && !Changes(op.Kind) {
			err = fmt.Errorf("%s changes nothing", op.Kind)
		}
		if err == nil {
			s.Apply(op, l.Time)
			continue
		}
		problems = append(problems, Problem{n, fmt.Sprintf("%q refused: %v", l.Command, err)})
	}
	if err := sc.Err(); err != nil {
		problems = append(problems, Problem{0, "reading stopped: " + err.Error()})
	}
	return s, problems, nil
}

// Write replaces the journal with the state's shortest form, atomically:
// a temp file, fsync, rename, fsync of the directory.
func Write(dir string, s *State) error {
	tmp, err := os.CreateTemp(dir, journalName+".tmp-")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	w := bufio.NewWriter(tmp)
	for _, e := range s.Entries() {
		data, err := json.Marshal(line(e))
		if err != nil {
			tmp.Close()
			return err
		}
		w.Write(append(data, '\n'))
	}
	if err := errors.Join(w.Flush(), tmp.Chmod(0o640), tmp.Sync(), tmp.Close()); err != nil {
		return err
	}
	st, err := os.Stat(tmp.Name())
	if err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), Path(dir)); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, baseName), []byte(strconv.FormatInt(st.Size(), 10)), 0o640); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// NeedsCompaction reports whether the journal has grown enough since it
// was last written whole.
func NeedsCompaction(dir string) bool {
	st, err := os.Stat(Path(dir))
	if err != nil {
		return false
	}
	base := int64(0)
	if b, err := os.ReadFile(filepath.Join(dir, baseName)); err == nil {
		base, _ = strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	}
	return st.Size() > 2*base+compactSlack
}
