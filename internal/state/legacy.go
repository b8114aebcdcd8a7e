package state

import (
	"bufio"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/f2b-shim/f2b-shim/internal/safefile"
	"github.com/f2b-shim/f2b-shim/policy"
)

// legacyJournal is where f2b-shim versions before the store kept their
// state: one JSON line per change, shared by every policy of a state_dir.
func legacyJournal(pol *policy.Policy) string { return filepath.Join(pol.StateDir, "journal.jsonl") }

// maxLegacyLine bounds one old journal line; they were under 200 bytes.
const maxLegacyLine = 64 << 10

// importJournal carries an upgraded proxy's bans over: it replays the old
// journal through this policy (lines another policy wrote, or that this
// one refuses, are left out) into the new, empty store. Its chains are
// not marked in sync, so the rule backend reads each live chain once
// before trusting the record. The old file stays for other policies of
// the same state_dir; once every policy has its store, it can go.
func (s *Store) importJournal() error {
	f, err := safefile.Open(legacyJournal(s.pol), os.O_RDONLY, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	st := New(s.lookup)
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 4096), maxLegacyLine)
	for sc.Scan() {
		var l struct {
			Time    time.Time `json:"time"`
			Command string    `json:"command"`
		}
		if json.Unmarshal(sc.Bytes(), &l) != nil {
			continue
		}
		// Judged without the connection's context: the record is judged
		// again, in full, whenever it is read.
		if op, err := policy.Decide(s.pol, l.Command, policy.Context{LookupPort: s.lookup}); err == nil && Changes(op.Kind) {
			st.Apply(op, l.Time)
		}
	}
	if err := sc.Err(); err != nil && !errors.Is(err, bufio.ErrTooLong) {
		return err
	}
	return s.update(func(tx *bolt.Tx) error {
		for _, fam := range []policy.Family{policy.IPv4, policy.IPv6} {
			if err := writeTable(tx, fam, st.Tables[fam], false); err != nil {
				return err
			}
		}
		return nil
	})
}
