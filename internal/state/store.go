package state

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/f2b-shim/f2b-shim/internal/safefile"
	"github.com/f2b-shim/f2b-shim/policy"
)

// Store is one policy's record of what the shim has put into the
// firewall: state_dir/NAME.db, a bbolt database. Each policy has its own
// file, so policies that share a state_dir never read or rewrite each
// other's state.
//
// Layout: a bucket per family ("ipv4", "ipv6"), in it a bucket per ban
// chain, and in that a bucket "bans" (key: "SOURCE TARGET", value: the
// time it was banned), a bucket "hooks" (key: the hook's canonical
// command line, value: its time), the key "return" when the chain ends
// in a RETURN rule, and "synced" when the rule backend may trust "bans"
// to be what the live chain holds. The bucket "meta" holds "intent": the
// change in flight, set before the firewall is touched and cleared with
// the record of it, so that the next request finds a change a crash cut
// short and reads that chain back from the firewall.
//
// Every change is one transaction of O(log n) work: no request pays for
// the history before it.
type Store struct {
	db     *bolt.DB
	pol    *policy.Policy
	lookup func(proto, name string) (uint16, bool)
	// batch, between Begin and Commit, is the one write transaction every
	// read and change goes through (stream mode).
	batch *bolt.Tx
	// RenamedFrom is the policy's old name when this Open took over the
	// state it kept under it (see adoptRenamed).
	RenamedFrom string
	// KeepIntent keeps the intent when a change is recorded: the caller
	// clears it (ClearIntent) once the change's audit line is written, so
	// that a shim killed between the record and its line leaves a trace,
	// which the next request reads back and notes in its own line.
	KeepIntent bool
	// held is set by HoldIntent: a change whose outcome the record may
	// not hold, so its intent must stay for the next request to read back.
	held bool
}

// view and update run fn in a transaction of their own, or in the batch.
func (s *Store) view(fn func(*bolt.Tx) error) error {
	if s.batch != nil {
		return fn(s.batch)
	}
	return s.db.View(fn)
}

func (s *Store) update(fn func(*bolt.Tx) error) error {
	if s.batch != nil {
		return fn(s.batch)
	}
	return s.db.Update(fn)
}

// Begin starts a batch: until Commit, every read and change of the store
// is one write transaction, so that a stream's batch of requests costs one
// fsync, and each request in it sees the ones before (a duplicate ban is
// found, the quota and the limits count the batch). A batch that is never
// committed (the process was killed) leaves the store as it was; the
// intents set before it (SetIntent) tell the next request which chains to
// read back.
func (s *Store) Begin() error {
	if s.batch != nil {
		return errors.New("state: a batch is already open")
	}
	tx, err := s.db.Begin(true)
	if err != nil {
		return err
	}
	s.batch = tx
	return nil
}

// Commit writes the batch, with one fsync.
func (s *Store) Commit() error {
	tx := s.batch
	s.batch = nil
	if tx == nil {
		return errors.New("state: no batch is open")
	}
	return tx.Commit()
}

// Rollback drops the batch; nothing of it is written.
func (s *Store) Rollback() {
	if s.batch != nil {
		_ = s.batch.Rollback()
		s.batch = nil
	}
}

var (
	metaBucket      = []byte("meta")
	intentKey       = []byte("intent")
	unsettledBucket = []byte("unsettled")
	bansBucket      = []byte("bans")
	hooksBucket     = []byte("hooks")
	returnKey       = []byte("return")
	syncedKey       = []byte("synced")
	countKey        = []byte("count")
	// memberCountKey counts the chain's members (see recordMember), so
	// that max_bans_per_chain bounds them without a scan.
	memberCountKey = []byte("members-count")
)

// marker is the value of a key that only marks (synced, return,
// unsettled, a member). Not nil: bbolt gives back nil for a nil value
// within the transaction that wrote it (an empty slice only once it is
// on disk), so a stream's batch would not see its own marks.
var marker = []byte{1}

// Path is the policy's state file.
func Path(pol *policy.Policy) string { return filepath.Join(pol.StateDir, pol.Name+".db") }

// Open opens the policy's state, creating state_dir and the file when
// they are missing; a policy whose name changed takes over the state it
// kept under its old name. The caller holds the policy's lock. The first open
// imports the journal of f2b-shim versions before the store (see
// importJournal). timeout bounds the wait for bbolt's own file lock.
func Open(pol *policy.Policy, lookup func(proto, name string) (uint16, bool), timeout time.Duration) (*Store, error) {
	if err := os.MkdirAll(pol.StateDir, 0o750); err != nil {
		return nil, err
	}
	path := Path(pol)
	_, statErr := os.Lstat(path)
	fresh := errors.Is(statErr, os.ErrNotExist)
	var renamed string
	if fresh {
		var err error
		if renamed, err = adoptRenamed(pol, timeout); err != nil {
			return nil, fmt.Errorf("state %s: %w", path, err)
		}
		fresh = renamed == ""
	}
	db, err := bolt.Open(path, 0o640, &bolt.Options{
		Timeout:  timeout,
		OpenFile: safefile.Open,
		// The shim holds the file for one request; a small initial map
		// keeps its start cheap, and bbolt grows it as needed.
		InitialMmapSize: 0,
	})
	if err != nil {
		return nil, fmt.Errorf("state %s: %w", path, err)
	}
	s := &Store{db: db, pol: pol, lookup: lookup, RenamedFrom: renamed}
	// Without the note a later rename is not followed; the request
	// itself is still fine, so it goes on.
	_ = recordSource(pol)
	if fresh {
		if err := s.importJournal(); err != nil {
			db.Close()
			return nil, fmt.Errorf("importing %s into %s: %w", legacyJournal(pol), path, err)
		}
	}
	return s, nil
}

// Close closes the file.
func (s *Store) Close() error { return s.db.Close() }

func famBucket(fam policy.Family) []byte { return []byte(fam.String()) }

// chainBucket returns the chain's bucket, creating it when create is set.
func chainBucket(tx *bolt.Tx, fam policy.Family, chain policy.Chain, create bool) (*bolt.Bucket, error) {
	if !create {
		f := tx.Bucket(famBucket(fam))
		if f == nil {
			return nil, nil
		}
		return f.Bucket([]byte(chain)), nil
	}
	f, err := tx.CreateBucketIfNotExists(famBucket(fam))
	if err != nil {
		return nil, err
	}
	c, err := f.CreateBucketIfNotExists([]byte(chain))
	if err != nil {
		return nil, err
	}
	if _, err := c.CreateBucketIfNotExists(bansBucket); err != nil {
		return nil, err
	}
	_, err = c.CreateBucketIfNotExists(hooksBucket)
	return c, err
}

func encodeTime(t time.Time) []byte {
	if t.IsZero() {
		return binary.BigEndian.AppendUint64(nil, 0)
	}
	return binary.BigEndian.AppendUint64(nil, uint64(t.UnixNano()))
}

// encodeBan is a ban's value: when it was first made, and when it was
// last made (a re-ban refreshes it; max_ban_time counts from it).
func encodeBan(since, last time.Time) []byte {
	return append(encodeTime(since), encodeTime(last)...)
}

func decodeTime(b []byte) time.Time {
	if len(b) < 8 {
		return time.Time{}
	}
	n := int64(binary.BigEndian.Uint64(b[:8]))
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

// decodeLast is when a ban was last made: its second time, or its first
// for a value with one.
func decodeLast(b []byte) time.Time {
	if len(b) >= 16 {
		return decodeTime(b[8:])
	}
	return decodeTime(b)
}

func count(c *bolt.Bucket) int {
	b := c.Get(countKey)
	if len(b) != 8 {
		return 0
	}
	return int(binary.BigEndian.Uint64(b))
}

func setCount(c *bolt.Bucket, n int) error {
	return c.Put(countKey, binary.BigEndian.AppendUint64(nil, uint64(max(n, 0))))
}

// SetIntent notes the change about to be made. It is written without
// fsync: it only needs to survive the shim being killed (the page cache
// keeps it); a power cut loses the firewall too, and restore rebuilds it.
//
// A stream's batch sets the intents of all its changes at once, one line
// each, before its batch transaction begins.
//
// An intent held (HoldIntent) before this, such as an earlier request's
// that could not be read back, is kept, and the new lines are added to
// it: replacing it would forget the chain that still has to be read back.
func (s *Store) SetIntent(ops ...policy.Operation) error {
	lines := make([]string, 0, len(ops))
	for _, op := range ops {
		lines = append(lines, op.CommandLine())
	}
	s.db.NoSync = true
	defer func() { s.db.NoSync = false }()
	return s.update(func(tx *bolt.Tx) error {
		m, err := tx.CreateBucketIfNotExists(metaBucket)
		if err != nil {
			return err
		}
		if old := m.Get(intentKey); s.held && len(old) > 0 {
			kept := strings.Split(string(old), "\n")
			for _, l := range lines {
				if !slices.Contains(kept, l) {
					kept = append(kept, l)
				}
			}
			lines = kept
		}
		return m.Put(intentKey, []byte(strings.Join(lines, "\n")))
	})
}

// ClearIntent forgets the change in flight: when it changed nothing, or
// (KeepIntent) once its audit line is written. A held intent
// (HoldIntent) stays: it names changes that still need reading back.
func (s *Store) ClearIntent() error {
	if s.held {
		return nil
	}
	s.db.NoSync = true
	defer func() { s.db.NoSync = false }()
	return s.update(func(tx *bolt.Tx) error {
		if m := tx.Bucket(metaBucket); m != nil {
			return m.Delete(intentKey)
		}
		return nil
	})
}

// HoldIntent keeps the intent past SettleIntent: a change failed halfway,
// or its record was not written, and the next request reads its chain
// back.
func (s *Store) HoldIntent() { s.held = true }

// SettleIntent clears the intent once the audit lines of the changes are
// written (KeepIntent), unless one of them was held (HoldIntent).
func (s *Store) SettleIntent() error {
	if s.held {
		return nil
	}
	return s.ClearIntent()
}

// Intent is the changes a shim started and never recorded, each judged
// by the policy again; lines that do not judge are left out.
func (s *Store) Intent(ctx policy.Context) (ops []policy.Operation, err error) {
	var text string
	err = s.view(func(tx *bolt.Tx) error {
		if m := tx.Bucket(metaBucket); m != nil {
			text = string(m.Get(intentKey))
		}
		return nil
	})
	if err != nil || text == "" {
		return nil, err
	}
	for line := range strings.SplitSeq(text, "\n") {
		if op, err := policy.Decide(s.pol, line, ctx); err == nil {
			ops = append(ops, op)
		}
	}
	return ops, nil
}

// Record writes one change that was carried out (applied says whether
// it changed the firewall), and clears the intent, in one fsync'd
// transaction.
func (s *Store) Record(op policy.Operation, applied bool, at time.Time) error {
	return s.recordTx(op, applied, at, false)
}

// RecordRequest is Record for a request from the mail host: a ban that
// changed the firewall also counts against max_new_bans_per_minute.
func (s *Store) RecordRequest(op policy.Operation, applied bool, at time.Time) error {
	return s.recordTx(op, applied, at, true)
}

func (s *Store) recordTx(op policy.Operation, applied bool, at time.Time, quota bool) error {
	return s.update(func(tx *bolt.Tx) error {
		if quota && op.Kind == policy.AddBan && (applied || newMember(tx, op)) {
			// A new member of a widened ban counts like a new ban: each
			// is an address the mail host made the proxy record.
			if err := countNewBan(tx, at); err != nil {
				return err
			}
		}
		if m := tx.Bucket(metaBucket); m != nil && !s.KeepIntent && !s.held {
			if err := m.Delete(intentKey); err != nil {
				return err
			}
		}
		if u := tx.Bucket(unsettledBucket); u != nil && (op.Kind == policy.AddBan || op.Kind == policy.DeleteBan) {
			if err := u.Delete(unsettledKey(op)); err != nil {
				return err
			}
		}
		return s.record(tx, op, applied, at)
	})
}

// newMember reports whether op is a widened ban for an address not yet
// recorded as a member.
func newMember(tx *bolt.Tx, op policy.Operation) bool {
	if op.Member == (netip.Prefix{}) {
		return false
	}
	c, err := chainBucket(tx, op.Family, op.Chain, false)
	if err != nil || c == nil || c.Bucket(membersBucket) == nil {
		return err == nil
	}
	return c.Bucket(membersBucket).Get(memberKey(op)) == nil
}

// RecordBatch records several changes in one transaction, one fsync:
// for tools and tests that replay a history.
func (s *Store) RecordBatch(ops []policy.Operation, at time.Time) error {
	return s.update(func(tx *bolt.Tx) error {
		for _, op := range ops {
			if err := s.record(tx, op, true, at); err != nil {
				return err
			}
		}
		return nil
	})
}

// Forget takes back the record of a ban that was recorded as applied and
// then did not reach the firewall (a stream's queued insert that failed).
func (s *Store) Forget(ban policy.Operation) error {
	undo := ban
	undo.Kind = policy.DeleteBan
	return s.update(func(tx *bolt.Tx) error { return s.record(tx, undo, true, time.Time{}) })
}

func unsettledKey(op policy.Operation) []byte {
	return []byte(op.Family.String() + " " + string(op.Chain) + " " + banKey(op))
}

// Unsettle marks a ban whose change a killed shim may still make: its
// iptables call can outlive it while it waits for the xtables lock. The
// next ban of that address asks the chain instead of the record.
func (s *Store) Unsettle(op policy.Operation) error {
	return s.update(func(tx *bolt.Tx) error {
		u, err := tx.CreateBucketIfNotExists(unsettledBucket)
		if err != nil {
			return err
		}
		return u.Put(unsettledKey(op), marker)
	})
}

// Unsettled implements firewall.Record.
func (s *Store) Unsettled(op policy.Operation) (bool, error) {
	var ok bool
	err := s.view(func(tx *bolt.Tx) error {
		u := tx.Bucket(unsettledBucket)
		ok = u != nil && u.Get(unsettledKey(op)) != nil
		return nil
	})
	return ok, err
}

func (s *Store) record(tx *bolt.Tx, op policy.Operation, applied bool, at time.Time) error {
	fam, chain := op.Family, op.BanChain()
	switch op.Kind {
	case policy.CreateChain:
		if applied {
			// The chain was not there: whatever was recorded for it is
			// gone from the firewall (a reboot without restore), and the
			// new chain is empty, so the record starts empty and in sync.
			if err := dropChain(tx, fam, chain); err != nil {
				return err
			}
		}
		c, err := chainBucket(tx, fam, chain, true)
		if err != nil || !applied {
			return err
		}
		return c.Put(syncedKey, marker)
	case policy.FlushChain:
		c, err := chainBucket(tx, fam, chain, false)
		if err != nil || c == nil {
			return err
		}
		if err := c.DeleteBucket(bansBucket); err != nil && !errors.Is(err, bolt.ErrBucketNotFound) {
			return err
		}
		if _, err := c.CreateBucket(bansBucket); err != nil {
			return err
		}
		if err := errors.Join(c.Delete(returnKey), setCount(c, 0)); err != nil {
			return err
		}
		return c.Put(syncedKey, marker)
	case policy.DeleteChain:
		return dropChain(tx, fam, chain)
	case policy.AddReturn:
		c, err := chainBucket(tx, fam, chain, true)
		if err != nil {
			return err
		}
		return c.Put(returnKey, marker)
	case policy.AddHook, policy.DeleteHook:
		// An unhook never makes a chain's record, as an unban does not.
		c, err := chainBucket(tx, fam, chain, op.Kind == policy.AddHook)
		if err != nil || c == nil {
			return err
		}
		hooks := c.Bucket(hooksBucket)
		if op.Kind == policy.DeleteHook {
			// The firewall layer removed the live hook with the same
			// effect, whatever its spelling; so does the record.
			return s.deleteHooks(hooks, op)
		}
		add := op
		add.Kind = policy.AddHook
		if !applied {
			// A hook with this effect is in the firewall already: keep the
			// record's spelling of it, or learn it if the record has none
			// (the state was lost or made by hand), so restore brings it back.
			known := false
			_ = hooks.ForEach(func(k, _ []byte) error {
				if c, err := policy.ParseCommand(string(k)); err == nil && s.sameHook(policy.Operation{Command: c}, op) {
					known = true
				}
				return nil
			})
			if known {
				return nil
			}
		}
		return hooks.Put([]byte(add.CommandLine()), encodeTime(at))
	case policy.AddBan, policy.DeleteBan:
		// An unban never makes a chain's record: one for a chain the
		// state does not hold (never made, or made by hand) would have
		// the heal build a chain that was never there.
		c, err := chainBucket(tx, fam, chain, op.Kind == policy.AddBan)
		if err != nil || c == nil {
			return err
		}
		if err := recordMember(c, op); err != nil {
			return err
		}
		bans, key := c.Bucket(bansBucket), []byte(banKey(op))
		old := bans.Get(key)
		if op.Kind == policy.AddBan {
			// A re-ban refreshes the time max_ban_time counts from.
			since := at
			if old != nil {
				since = decodeTime(old)
			}
			if err := bans.Put(key, encodeBan(since, at)); err != nil {
				return err
			}
			if old == nil {
				return setCount(c, count(c)+1)
			}
			return nil
		}
		if old != nil && (op.Member == (netip.Prefix{}) || applied) {
			if err := bans.Delete(key); err != nil {
				return err
			}
			return setCount(c, count(c)-1)
		}
	}
	return nil
}

// membersBucket holds, for a widened ban (ban_prefix_v6/v4), the
// addresses it was made for: "PREFIX TARGET ADDRESS".
var membersBucket = []byte("members")

func memberKey(op policy.Operation) []byte {
	return []byte(banKey(op) + " " + op.Member.String())
}

// recordMember adds or removes the address a widened ban was made for;
// an unban of the prefix itself forgets all of them.
func recordMember(c *bolt.Bucket, op policy.Operation) error {
	m, err := c.CreateBucketIfNotExists(membersBucket)
	if err != nil {
		return err
	}
	n := memberCount(c)
	switch {
	case op.Member != (netip.Prefix{}) && op.Kind == policy.AddBan:
		if m.Get(memberKey(op)) != nil {
			return nil
		}
		if err := m.Put(memberKey(op), marker); err != nil {
			return err
		}
		n++
	case op.Member != (netip.Prefix{}):
		if m.Get(memberKey(op)) == nil {
			return nil
		}
		if err := m.Delete(memberKey(op)); err != nil {
			return err
		}
		n--
	case op.Kind == policy.DeleteBan:
		for _, k := range keysWithPrefix(m, banKey(op)+" ") {
			if err := m.Delete(k); err != nil {
				return err
			}
			n--
		}
	default:
		return nil
	}
	return c.Put(memberCountKey, binary.BigEndian.AppendUint64(nil, uint64(max(n, 0))))
}

func memberCount(c *bolt.Bucket) int {
	b := c.Get(memberCountKey)
	if len(b) != 8 {
		return 0
	}
	return int(binary.BigEndian.Uint64(b))
}

// HasMember reports whether the address of a widened ban is recorded as
// one of its members: one lookup, whatever the number of members.
func (s *Store) HasMember(op policy.Operation) (bool, error) {
	var ok bool
	err := s.view(func(tx *bolt.Tx) error {
		c, err := chainBucket(tx, op.Family, op.Chain, false)
		if c != nil && c.Bucket(membersBucket) != nil {
			ok = c.Bucket(membersBucket).Get(memberKey(op)) != nil
		}
		return err
	})
	return ok, err
}

// HasOtherMember reports whether a widened ban stands for another address
// than the one op names: at most two steps of a cursor, whatever the
// number of members.
func (s *Store) HasOtherMember(op policy.Operation) (bool, error) {
	var ok bool
	err := s.view(func(tx *bolt.Tx) error {
		c, err := chainBucket(tx, op.Family, op.Chain, false)
		if c == nil || c.Bucket(membersBucket) == nil {
			return err
		}
		prefix, own := []byte(banKey(op)+" "), memberKey(op)
		cur := c.Bucket(membersBucket).Cursor()
		for k, _ := cur.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = cur.Next() {
			if !bytes.Equal(k, own) {
				ok = true
				return nil
			}
		}
		return nil
	})
	return ok, err
}

// MemberCount is the number of members recorded in the chain.
func (s *Store) MemberCount(fam policy.Family, chain policy.Chain) (int, error) {
	var n int
	err := s.view(func(tx *bolt.Tx) error {
		c, err := chainBucket(tx, fam, chain, false)
		if c != nil {
			n = memberCount(c)
		}
		return err
	})
	return n, err
}

func keysWithPrefix(b *bolt.Bucket, prefix string) [][]byte {
	var out [][]byte
	c := b.Cursor()
	for k, _ := c.Seek([]byte(prefix)); k != nil && bytes.HasPrefix(k, []byte(prefix)); k, _ = c.Next() {
		out = append(out, bytes.Clone(k))
	}
	return out
}

// Members lists the addresses a widened ban stands for.
func (s *Store) Members(op policy.Operation) ([]string, error) {
	var out []string
	err := s.view(func(tx *bolt.Tx) error {
		c, err := chainBucket(tx, op.Family, op.Chain, false)
		if err != nil || c == nil || c.Bucket(membersBucket) == nil {
			return err
		}
		for _, k := range keysWithPrefix(c.Bucket(membersBucket), banKey(op)+" ") {
			out = append(out, strings.TrimPrefix(string(k), banKey(op)+" "))
		}
		return nil
	})
	return out, err
}

// deleteHooks removes the hooks recorded with the same parent, protocol
// and ports as op: the firewall layer removed the live one whatever its
// spelling, and when it found none, the record had it wrong.
func (s *Store) deleteHooks(hooks *bolt.Bucket, op policy.Operation) error {
	var drop [][]byte
	err := hooks.ForEach(func(k, _ []byte) error {
		c, err := policy.ParseCommand(string(k))
		if err == nil && s.sameHook(policy.Operation{Command: c}, op) {
			drop = append(drop, bytes.Clone(k))
		}
		return nil
	})
	for _, k := range drop {
		err = errors.Join(err, hooks.Delete(k))
	}
	return err
}

// sameHook compares two hooks by effect, or by their words apart from
// the kind of command when a service name does not resolve.
func (s *Store) sameHook(a, b policy.Operation) bool {
	a.Kind, b.Kind = policy.AddHook, policy.AddHook
	if a.CommandLine() == b.CommandLine() {
		return true
	}
	ea, errA := policy.HookEffect(a, s.lookup)
	eb, errB := policy.HookEffect(b, s.lookup)
	return errA == nil && errB == nil && ea == eb
}

func dropChain(tx *bolt.Tx, fam policy.Family, chain policy.Chain) error {
	f := tx.Bucket(famBucket(fam))
	if f == nil {
		return nil
	}
	if err := f.DeleteBucket([]byte(chain)); err != nil && !errors.Is(err, bolt.ErrBucketNotFound) {
		return err
	}
	return nil
}

// quotaBucket counts, per second (the key, big-endian Unix time), the
// bans that changed the firewall, for max_new_bans_per_minute; seconds
// older than a minute are dropped as new ones come.
var quotaBucket = []byte("quota")

// quotaWindow is the window max_new_bans_per_minute counts over.
const quotaWindow = 60

// NewBans is how many bans changed the firewall in the minute up to now.
func (s *Store) NewBans(now time.Time) (int, error) {
	n := 0
	err := s.view(func(tx *bolt.Tx) error {
		m := tx.Bucket(metaBucket)
		if m == nil || m.Bucket(quotaBucket) == nil {
			return nil
		}
		c := m.Bucket(quotaBucket).Cursor()
		from := binary.BigEndian.AppendUint64(nil, uint64(now.Unix()-quotaWindow+1))
		for k, v := c.Seek(from); k != nil; k, v = c.Next() {
			n += int(binary.BigEndian.Uint64(v))
		}
		return nil
	})
	return n, err
}

// countNewBan adds one to the current second's count.
func countNewBan(tx *bolt.Tx, at time.Time) error {
	m, err := tx.CreateBucketIfNotExists(metaBucket)
	if err != nil {
		return err
	}
	q, err := m.CreateBucketIfNotExists(quotaBucket)
	if err != nil {
		return err
	}
	cutoff := uint64(at.Unix() - quotaWindow)
	var old [][]byte
	c := q.Cursor()
	for k, _ := c.First(); k != nil && binary.BigEndian.Uint64(k) <= cutoff; k, _ = c.Next() {
		old = append(old, bytes.Clone(k))
	}
	for _, k := range old {
		if err := q.Delete(k); err != nil {
			return err
		}
	}
	key := binary.BigEndian.AppendUint64(nil, uint64(at.Unix()))
	n := uint64(0)
	if v := q.Get(key); len(v) == 8 {
		n = binary.BigEndian.Uint64(v)
	}
	return q.Put(key, binary.BigEndian.AppendUint64(nil, n+1))
}

// Chains is the number of chains recorded for the family.
func (s *Store) Chains(fam policy.Family) (int, error) {
	n := 0
	err := s.view(func(tx *bolt.Tx) error {
		if f := tx.Bucket(famBucket(fam)); f != nil {
			return f.ForEachBucket(func([]byte) error { n++; return nil })
		}
		return nil
	})
	return n, err
}

// ChainNames lists the chains recorded for the family, in name order.
func (s *Store) ChainNames(fam policy.Family) ([]policy.Chain, error) {
	var out []policy.Chain
	err := s.view(func(tx *bolt.Tx) error {
		if f := tx.Bucket(famBucket(fam)); f != nil {
			return f.ForEachBucket(func(k []byte) error { out = append(out, policy.Chain(k)); return nil })
		}
		return nil
	})
	return out, err
}

// HasChain reports whether the chain is recorded.
func (s *Store) HasChain(fam policy.Family, chain policy.Chain) (bool, error) {
	var ok bool
	err := s.view(func(tx *bolt.Tx) error {
		c, err := chainBucket(tx, fam, chain, false)
		ok = c != nil
		return err
	})
	return ok, err
}

// Synced reports whether the record's bans of the chain may be taken for
// what the live chain holds.
func (s *Store) Synced(fam policy.Family, chain policy.Chain) (bool, error) {
	var ok bool
	err := s.view(func(tx *bolt.Tx) error {
		c, err := chainBucket(tx, fam, chain, false)
		ok = c != nil && c.Get(syncedKey) != nil
		return err
	})
	return ok, err
}

// HasBan reports whether the ban is recorded.
func (s *Store) HasBan(op policy.Operation) (bool, error) {
	var ok bool
	err := s.view(func(tx *bolt.Tx) error {
		c, err := chainBucket(tx, op.Family, op.Chain, false)
		ok = c != nil && c.Bucket(bansBucket) != nil && c.Bucket(bansBucket).Get([]byte(banKey(op))) != nil
		return err
	})
	return ok, err
}

// BanCount is the number of bans recorded in the chain.
func (s *Store) BanCount(fam policy.Family, chain policy.Chain) (int, error) {
	var n int
	err := s.view(func(tx *bolt.Tx) error {
		c, err := chainBucket(tx, fam, chain, false)
		if c != nil {
			n = count(c)
		}
		return err
	})
	return n, err
}

// Learn adds the bans read from the live chain to the chain's record, and
// marks it in sync. It never drops a recorded ban the live chain lacks:
// the record is the truth, and a ban missing from the firewall is drift
// to put back (a flush or a reload behind the shim's back), not a ban
// that was lifted.
func (s *Store) Learn(fam policy.Family, chain policy.Chain, bans []policy.Operation) error {
	return s.update(func(tx *bolt.Tx) error { return learn(tx, fam, chain, bans) })
}

func learn(tx *bolt.Tx, fam policy.Family, chain policy.Chain, bans []policy.Operation) error {
	c, err := chainBucket(tx, fam, chain, true)
	if err != nil {
		return err
	}
	known := c.Bucket(bansBucket)
	n := count(c)
	for _, b := range bans {
		key := []byte(banKey(b))
		if known.Get(key) != nil {
			continue
		}
		if err := known.Put(key, encodeTime(time.Time{})); err != nil {
			return err
		}
		n++
	}
	if err := setCount(c, n); err != nil {
		return err
	}
	return c.Put(syncedKey, marker)
}

// MarkChainSynced marks one chain in sync, after a repair made the live
// chain equal to the record.
func (s *Store) MarkChainSynced(fam policy.Family, chain policy.Chain) error {
	return s.update(func(tx *bolt.Tx) error {
		c, err := chainBucket(tx, fam, chain, false)
		if err != nil || c == nil {
			return err
		}
		return c.Put(syncedKey, marker)
	})
}

// Shape is what the record holds for one chain, read without reading
// its bans: enough to check cheaply that the live firewall still has it.
type Shape struct {
	Recorded bool
	Return   bool
	Bans     int
	// Hooks are the recorded hooks' command lines.
	Hooks []string
}

// ChainShape reads the shape of one recorded chain.
func (s *Store) ChainShape(fam policy.Family, chain policy.Chain) (Shape, error) {
	var sh Shape
	err := s.view(func(tx *bolt.Tx) error {
		c, err := chainBucket(tx, fam, chain, false)
		if err != nil || c == nil {
			return err
		}
		sh.Recorded, sh.Return, sh.Bans = true, c.Get(returnKey) != nil, count(c)
		return forEach(c.Bucket(hooksBucket), func(k, _ []byte) error {
			sh.Hooks = append(sh.Hooks, string(k))
			return nil
		})
	})
	return sh, err
}

// repairKey, in "meta", holds the last repair: its time (RFC 3339) and
// what it put back, separated by a space.
var repairKey = []byte("repair")

// NoteRepair records when a repair happened and what it put back, for
// status.
func (s *Store) NoteRepair(at time.Time, what string) error {
	return s.update(func(tx *bolt.Tx) error {
		m, err := tx.CreateBucketIfNotExists(metaBucket)
		if err != nil {
			return err
		}
		return m.Put(repairKey, []byte(at.UTC().Format(time.RFC3339)+" "+what))
	})
}

// LastRepair is the last repair's time and what it put back; a zero time
// when there was none.
func (s *Store) LastRepair() (time.Time, string, error) {
	var v []byte
	err := s.view(func(tx *bolt.Tx) error {
		if m := tx.Bucket(metaBucket); m != nil {
			v = bytes.Clone(m.Get(repairKey))
		}
		return nil
	})
	if err != nil || v == nil {
		return time.Time{}, "", err
	}
	when, what, _ := strings.Cut(string(v), " ")
	at, err := time.Parse(time.RFC3339, when)
	return at, what, err
}

// MarkSynced marks every chain of the family in sync, after a restore
// made the firewall equal to the record.
func (s *Store) MarkSynced(fam policy.Family) error {
	return s.update(func(tx *bolt.Tx) error {
		f := tx.Bucket(famBucket(fam))
		if f == nil {
			return nil
		}
		return f.ForEachBucket(func(name []byte) error { return f.Bucket(name).Put(syncedKey, marker) })
	})
}

// Replace makes the record equal to st (read back from the live
// firewall), every chain in sync; the chains of fams not in st are left.
func (s *Store) Replace(st *State, fams ...policy.Family) error {
	return s.update(func(tx *bolt.Tx) error {
		for _, fam := range fams {
			if err := tx.DeleteBucket(famBucket(fam)); err != nil && !errors.Is(err, bolt.ErrBucketNotFound) {
				return err
			}
			if err := writeTable(tx, fam, st.Tables[fam], true); err != nil {
				return err
			}
		}
		return nil
	})
}

// ReplaceChain makes the record of one chain, and of the hooks into it,
// equal to what st holds for it.
func (s *Store) ReplaceChain(st *State, fam policy.Family, chain policy.Chain) error {
	return s.ReplaceChainKeeping(st, nil, fam, chain)
}

// ReplaceChainKeeping is ReplaceChain after a read back, where st was
// made from loaded, the record as Load judged it: the records Load
// skipped because the policy refuses them now (an address that became
// the proxy's own, a never_ban entry added, a resolver) are kept as
// they are. A read back cannot explain their absence, and the policy
// may allow them again; no failure erases what the state holds.
func (s *Store) ReplaceChainKeeping(st, loaded *State, fam policy.Family, chain policy.Chain) error {
	return s.update(func(tx *bolt.Tx) error {
		// The firewall knows the widened bans, not whom they stand for:
		// the members stay, for the bans that are still there.
		members := map[string]bool{}
		refused := map[string][]byte{} // ban key: value
		refusedHooks := map[string][]byte{}
		c, err := chainBucket(tx, fam, chain, false)
		if err == nil && c != nil {
			_ = forEach(c.Bucket(membersBucket), func(k, _ []byte) error { members[string(k)] = true; return nil })
			if loaded != nil {
				lc := loaded.Tables[fam].Chains[chain]
				if lc == nil && st.Tables[fam].Chains[chain] == nil {
					// Load refused the chain itself: nothing was read
					// into it, and nothing of it goes.
					return nil
				}
				_ = forEach(c.Bucket(bansBucket), func(k, v []byte) error {
					if lc == nil || !lc.has(string(k)) {
						refused[string(k)] = bytes.Clone(v)
					}
					return nil
				})
				known := map[string]bool{}
				for _, h := range loaded.Tables[fam].Hooks {
					add := h.Op
					add.Kind = policy.AddHook
					known[add.CommandLine()] = true
				}
				_ = forEach(c.Bucket(hooksBucket), func(k, v []byte) error {
					if !known[string(k)] {
						refusedHooks[string(k)] = bytes.Clone(v)
					}
					return nil
				})
			}
		}
		if err := dropChain(tx, fam, chain); err != nil {
			return err
		}
		t := st.Tables[fam]
		only := &Table{Chains: map[policy.Chain]*Chain{}}
		if c, ok := t.Chains[chain]; ok {
			only.Chains[chain] = c
		}
		for _, h := range t.Hooks {
			if h.Op.Jump == chain {
				only.Hooks = append(only.Hooks, h)
			}
		}
		if err := writeTable(tx, fam, only, true); err != nil {
			return err
		}
		c, err = chainBucket(tx, fam, chain, false)
		if err != nil || c == nil {
			return err
		}
		if err := keepRefused(c, refused, refusedHooks); err != nil || len(members) == 0 {
			return err
		}
		m, err := c.CreateBucketIfNotExists(membersBucket)
		if err != nil {
			return err
		}
		bans := c.Bucket(bansBucket)
		for k := range members {
			// "PREFIX TARGET... ADDRESS": kept while its ban is.
			ban := k[:strings.LastIndexByte(k, ' ')]
			if bans.Get([]byte(ban)) != nil {
				if err := m.Put([]byte(k), marker); err != nil {
					return err
				}
			}
		}
		return nil
	})
}

// keepRefused puts back into a rewritten chain bucket the bans and hooks
// that Load refused, as they were.
func keepRefused(c *bolt.Bucket, bans, hooks map[string][]byte) error {
	n := count(c)
	for k, v := range bans {
		if c.Bucket(bansBucket).Get([]byte(k)) != nil {
			continue
		}
		if err := c.Bucket(bansBucket).Put([]byte(k), v); err != nil {
			return err
		}
		n++
	}
	for k, v := range hooks {
		if err := c.Bucket(hooksBucket).Put([]byte(k), v); err != nil {
			return err
		}
	}
	return setCount(c, n)
}

func writeTable(tx *bolt.Tx, fam policy.Family, t *Table, synced bool) error {
	for name, c := range t.Chains {
		b, err := chainBucket(tx, fam, name, true)
		if err != nil {
			return err
		}
		bans := b.Bucket(bansBucket)
		for _, ban := range c.Bans() {
			if err := bans.Put([]byte(banKey(ban.Op)), encodeBan(ban.Since, ban.Last)); err != nil {
				return err
			}
		}
		if err := setCount(b, c.Len()); err != nil {
			return err
		}
		if c.Return {
			if err := b.Put(returnKey, marker); err != nil {
				return err
			}
		}
		if synced {
			if err := b.Put(syncedKey, marker); err != nil {
				return err
			}
		}
	}
	for _, h := range t.Hooks {
		b, err := chainBucket(tx, fam, h.Op.Jump, true)
		if err != nil {
			return err
		}
		add := h.Op
		add.Kind = policy.AddHook
		if err := b.Bucket(hooksBucket).Put([]byte(add.CommandLine()), encodeTime(h.Since)); err != nil {
			return err
		}
	}
	return nil
}

// forEach is Bucket.ForEach that takes a missing bucket (a state file
// edited by hand) as an empty one.
func forEach(b *bolt.Bucket, fn func(k, v []byte) error) error {
	if b == nil {
		return nil
	}
	return b.ForEach(fn)
}

// Problem is a record that could not be used.
type Problem struct {
	Where  string
	Reason string
}

func (p Problem) String() string { return fmt.Sprintf("%s: %s", p.Where, p.Reason) }

// Load reads the whole record through the policy. Records the policy
// refuses are skipped and reported; the rest still count.
func (s *Store) Load(ctx policy.Context) (*State, []Problem, error) {
	st := New(ctx.LookupPort)
	var problems []Problem
	judge := func(where, line string, at time.Time) {
		op, err := policy.Decide(s.pol, line, ctx)
		if err == nil && !Changes(op.Kind) {
			err = fmt.Errorf("%s changes nothing", op.Kind)
		}
		if err != nil {
			problems = append(problems, Problem{where, fmt.Sprintf("%q refused: %v", line, err)})
			return
		}
		st.Apply(op, at)
	}
	err := s.view(func(tx *bolt.Tx) error {
		for _, fam := range []policy.Family{policy.IPv4, policy.IPv6} {
			f := tx.Bucket(famBucket(fam))
			if f == nil {
				continue
			}
			err := f.ForEachBucket(func(name []byte) error {
				c := f.Bucket(name)
				if c == nil {
					return nil
				}
				where := fam.String() + "/" + string(name)
				judge(where, fmt.Sprintf("%s -w -N %s", fam.Binary(), name), time.Time{})
				type ban struct {
					line, key string
					at, last  time.Time
				}
				var bans []ban
				if err := forEach(c.Bucket(bansBucket), func(k, v []byte) error {
					src, target, _ := bytes.Cut(k, []byte(" "))
					bans = append(bans, ban{fmt.Sprintf("%s -w -I %s 1 -s %s -j %s", fam.Binary(), name, src, target), string(k), decodeTime(v), decodeLast(v)})
					return nil
				}); err != nil {
					return err
				}
				// Oldest first, so that the state keeps the firewall's order.
				slices.SortStableFunc(bans, func(a, b ban) int { return a.at.Compare(b.at) })
				for _, b := range bans {
					judge(where, b.line, b.at)
					st.refresh(fam, policy.Chain(name), b.key, b.last)
				}
				if c.Get(returnKey) != nil {
					judge(where, fmt.Sprintf("%s -w -A %s -j RETURN", fam.Binary(), name), time.Time{})
				}
				return forEach(c.Bucket(hooksBucket), func(k, v []byte) error {
					judge(where, string(k), decodeTime(v))
					return nil
				})
			})
			if err != nil {
				return err
			}
		}
		return nil
	})
	return st, problems, err
}

// Save replaces the policy's whole record with st, for tools and tests
// that prepare a state; the shim itself records change by change.
func Save(pol *policy.Policy, st *State) error {
	s, err := Open(pol, st.lookup, time.Second)
	if err != nil {
		return err
	}
	return errors.Join(s.Replace(st, policy.IPv4, policy.IPv6), s.Close())
}
