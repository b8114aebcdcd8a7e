package cli

import (
	"fmt"
	"net/netip"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/engine"

	"github.com/f2b-shim/f2b-shim/internal/audit"
	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
)

// expireChunk bounds the bans one hold of the lock lifts: each chunk is
// one state transaction, one iptables-restore (or one netlink batch of
// the set backend) and one write of the audit log, and expire lets the
// lock go between chunks, so that a ban from the mail host waits for one
// chunk at most, never for thousands of expiries (which took a minute
// when each was its own transaction and iptables call).
const expireChunk = 100

// expirePause lets a shim that waits for the lock take it between two
// chunks: flock wakes the waiter, and without the pause expire would
// usually take the lock again first.
const expirePause = 20 * time.Millisecond

// expireIn expires what is due in s, the state as just read, and takes
// it out of s as well, chunk by chunk. restore passes applyFirewall false:
// it is about to rebuild the firewall from s, and holds the lock until
// then (at boot, before sshd takes requests).
func (a *admin) expireIn(s *state.State, applyFirewall bool) (int, int) {
	if a.pol.MaxBanTime == 0 {
		return 0, ExitOK
	}
	cutoff := a.deps.Now().Add(-a.pol.MaxBanTime)
	code, n := ExitOK, 0
	failed := map[string]bool{} // not tried again in this run
	for first := true; ; first = false {
		if !first && applyFirewall {
			var err error
			if err = a.retake(); err == nil {
				s, err = a.journal()
			}
			if err != nil {
				fmt.Fprintf(a.stderr, "f2b-shim: expire: %v\n", err)
				return n, ExitFirewall
			}
		}
		var chunk []state.Ban
		for _, b := range s.Expired(cutoff) {
			if !failed[b.Op.CommandLine()] {
				chunk = append(chunk, b)
			}
			if len(chunk) == expireChunk {
				break
			}
		}
		if len(chunk) == 0 {
			return n, code
		}
		if applyFirewall {
			// A ban is not lifted without its audit line: the due bans
			// wait for room, as a request from the mail host does.
			if err := a.auditRoom(len(chunk)); err != nil {
				fmt.Fprintf(a.stderr, "f2b-shim: expire: cannot write the audit log %q: %v; %d due bans stay until it has room\n", a.pol.AuditLog, err, len(s.Expired(cutoff)))
				return n, ExitSetup
			}
		}
		done, c := a.expireChunk(s, chunk, applyFirewall, failed)
		n += done
		if c != ExitOK {
			code = c
		}
	}
}

// retake lets the lock go and takes it again, with the state reopened.
func (a *admin) retake() error {
	a.held.Release()
	a.store, a.held = nil, nil
	time.Sleep(expirePause)
	a.deadline = a.deps.Now().Add(a.pol.LockTimeout)
	held, err := a.engine().Take(nil)
	if err != nil {
		return err
	}
	a.held, a.store = held, held.Store
	return nil
}

// expireChunk lifts one chunk of due bans: the firewall first (its rules
// in one iptables-restore), then the state in one transaction, then the
// audit log, and takes them out of s. A ban whose removal failed is
// marked in failed, audited as failed, and stays.
func (a *admin) expireChunk(s *state.State, chunk []state.Ban, applyFirewall bool, failed map[string]bool) (int, int) {
	now := a.deps.Now()
	ops := make([]policy.Operation, len(chunk))
	errs := make([]error, len(chunk))
	for i, b := range chunk {
		ops[i] = b.Op
		ops[i].Kind, ops[i].Member = policy.DeleteBan, netip.Prefix{}
	}
	if applyFirewall {
		a.liftChunk(ops, errs)
	}
	if err := a.store.Begin(); err != nil {
		for i := range errs {
			errs[i] = firstErr(errs[i], err)
		}
	} else {
		for i, op := range ops {
			if errs[i] == nil {
				errs[i] = a.store.Record(op, true, now.UTC())
			}
		}
		if err := a.store.Commit(); err != nil {
			// The rules are gone; the intents are still set, so the next
			// request reads their chains back.
			for i := range errs {
				errs[i] = firstErr(errs[i], err)
			}
		}
	}
	code, n := ExitOK, 0
	recs := make([]audit.Record, 0, len(ops))
	for i, op := range ops {
		if errs[i] != nil {
			fmt.Fprintf(a.stderr, "f2b-shim: expire %s: %s\n", op.CommandLine(), oneLine.Replace(errs[i].Error()))
			recs = append(recs, a.record("f2b-shim expire", &op, "failed", ExitFirewall, errs[i]))
			failed[chunk[i].Op.CommandLine()] = true
			code = ExitFirewall
			continue
		}
		s.Apply(op, now)
		n++
		rec := a.record("f2b-shim expire", &op, "expired", ExitOK, nil)
		rec.Reason = audit.Text(fmt.Sprintf("last made %s, more than max_ban_time (%s) ago", chunk[i].Last.Format(time.RFC3339), a.pol.MaxBanTime))
		recs = append(recs, rec)
	}
	a.audit(recs...)
	return n, code
}

// liftChunk takes a chunk's bans out of the firewall, with the intents
// noted first; errs gets each one's failure.
func (a *admin) liftChunk(ops []policy.Operation, errs []error) {
	if err := a.store.SetIntent(ops...); err != nil {
		for i := range errs {
			errs[i] = err
		}
		return
	}
	type opened struct {
		b   engine.Backend
		err error
	}
	backends := map[policy.Family]*opened{}
	for i, op := range ops {
		ob := backends[op.Family]
		if ob == nil {
			// The chunk's unbans: one iptables-restore, or one nftables
			// transaction (engine.LiftBatch).
			ob = &opened{}
			ob.b, ob.err = a.backendFor(op.Family, engine.LiftBatch)
			backends[op.Family] = ob
		}
		if ob.err != nil {
			errs[i] = ob.err
			continue
		}
		ob.b.Queue(op, i)
		_, errs[i] = ob.b.Apply(op)
	}
	for _, ob := range backends {
		if ob.err != nil {
			continue
		}
		for i, err := range ob.b.Flush() {
			errs[i] = err
		}
	}
}

// firstErr keeps the first failure of a ban.
func firstErr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}
