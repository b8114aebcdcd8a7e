package state

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/lock"
	"github.com/f2b-shim/f2b-shim/internal/safefile"
	"github.com/f2b-shim/f2b-shim/policy"
)

// The state file is named by the policy's name, which an admin may change
// (examples/policy.toml once described it only as the audit lines' name):
// a renamed policy found no state, so "list" showed nothing and a restore
// at boot restored nothing. Beside each state, NAME.source holds the
// policy file that last used it; a policy whose NAME.db does not exist yet
// looks for a state its own file used under another name, and takes it
// over (adoptRenamed).

// maxSourceLen bounds a .source file: one absolute path.
const maxSourceLen = 4096

func sourcePath(dir, name string) string { return filepath.Join(dir, name+".source") }

// readSource returns the policy file a state's .source names ("" when
// there is none).
func readSource(path string) string {
	f, err := safefile.Open(path, os.O_RDONLY, 0)
	if err != nil {
		return ""
	}
	defer f.Close()
	b, _ := io.ReadAll(io.LimitReader(f, maxSourceLen))
	return strings.TrimSpace(string(b))
}

// recordSource notes in NAME.source that pol's file uses this state; it
// writes only when the file named differs.
func recordSource(pol *policy.Policy) error {
	path := sourcePath(pol.StateDir, pol.Name)
	if pol.File == "" || readSource(path) == pol.File {
		return nil
	}
	f, err := safefile.Open(path, os.O_RDWR|os.O_CREATE, 0o640)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Truncate(0); err != nil {
		return err
	}
	_, err = f.WriteAt([]byte(pol.File+"\n"), 0)
	return err
}

// renamedFrom finds the name under which pol's file last used a state in
// state_dir that still exists: "" when there is none.
func renamedFrom(pol *policy.Policy) (string, error) {
	if pol.File == "" {
		return "", nil
	}
	sources, err := filepath.Glob(filepath.Join(pol.StateDir, "*.source"))
	if err != nil {
		return "", err
	}
	var names []string
	for _, src := range sources {
		name := strings.TrimSuffix(filepath.Base(src), ".source")
		if name == pol.Name || readSource(src) != pol.File {
			continue
		}
		if _, err := os.Lstat(filepath.Join(pol.StateDir, name+".db")); err == nil {
			names = append(names, name)
		}
	}
	switch len(names) {
	case 0:
		return "", nil
	case 1:
		return names[0], nil
	}
	return "", fmt.Errorf("%s was used under the names %q, not %q; keep the state of the one that holds the bans: move it to %s, and the others out of %s",
		pol.File, names, pol.Name, Path(pol), pol.StateDir)
}

// adoptRenamed moves the state that pol's file kept under its old name to
// pol's name, holding the old name's lock (the one cli takes for it) so
// that no request still running under the old name is cut in two. It
// returns the old name, or "" when there was nothing to adopt. The caller
// holds pol's own lock, and Path(pol) does not exist.
func adoptRenamed(pol *policy.Policy, timeout time.Duration) (string, error) {
	old, err := renamedFrom(pol)
	if old == "" || err != nil {
		return "", err
	}
	held, err := lock.Acquire(pol.StateDir, old+".lock", time.Now().Add(timeout))
	if err != nil {
		return "", fmt.Errorf("the state of %s's old name %q: %w", pol.File, old, err)
	}
	defer held.Release()
	from := filepath.Join(pol.StateDir, old+".db")
	// Link, not rename: a file that already stands at the new path (made
	// meanwhile) is never overwritten.
	if err := os.Link(from, Path(pol)); err != nil {
		if errors.Is(err, os.ErrExist) {
			return "", nil
		}
		return "", fmt.Errorf("moving the state of the old name %q to %s: %w", old, Path(pol), err)
	}
	if err := os.Remove(from); err != nil {
		return "", fmt.Errorf("moving the state of the old name %q to %s: %w", old, Path(pol), err)
	}
	_ = os.Remove(sourcePath(pol.StateDir, old))
	return old, nil
}
