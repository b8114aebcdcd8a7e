package cli

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/audit"
	"github.com/f2b-shim/f2b-shim/internal/engine"
	"github.com/f2b-shim/f2b-shim/internal/lock"
	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/internal/stream"
	"github.com/f2b-shim/f2b-shim/policy"
)

// StreamCommand is the SSH_ORIGINAL_COMMAND that starts stream mode.
const StreamCommand = "f2b-shim stream"

// streamLockBudget bounds how long one batch holds the policy's lock: a
// batch stops early when it has held the lock this long, and the rest of
// it goes into the next batch, after the lock was let go. So a one-shot
// request from the plain action waits for at most one batch.
const streamLockBudget = time.Second

// session is one stream session: what runForced sets up per request, set
// up once.
type session struct {
	pol    *policy.Policy
	log    *audit.Log
	ctx    policy.Context
	deps   Deps
	id     string
	client string
	addr   netip.Addr
	port   int
	// ctxErr is why the proxy's own addresses, resolvers and gateways
	// could not be read for the current batch.
	ctxErr error
	// broken is set when the audit log failed: nothing more is carried
	// out, since it could not be audited.
	broken error
	// policyPath and stamp tell when the policy file changed (see
	// beforeBatch).
	policyPath string
	stamp      policyStamp
	// held is the policy's lock while a batch is carried out; it is let
	// go once the batch's audit lines are written, as one-shot mode
	// holds it until its line is written: the log records changes in
	// the order they were made, and the room reserved under the lock is
	// not shared with the next holder.
	held *engine.Held
	// slot is the session's max_stream_sessions slot; stopNow ends the
	// session after the batch being served.
	slot    *lock.Lock
	stopNow func()
}

// runStream serves a stream session: one request per line on stdin, one
// reply per line on stdout (package stream). Every line is judged by the
// same precheck, grammar, policy and bounds as a one-shot request, and
// gets its own audit line with the session's id and its line number.
func runStream(policyPath string, env Env, stdout, stderr io.Writer, deps Deps) int {
	if policyPath == "" && deps.DefaultPolicyFile != "" {
		if _, err := os.Stat(deps.DefaultPolicyFile); err == nil {
			policyPath = deps.DefaultPolicyFile
		}
	}
	stamp := stampOf(policyPath)
	pol, err := loadPolicy(policyPath, deps)
	if err != nil {
		fmt.Fprintf(stderr, "f2b-shim: policy: %v\nf2b-shim: hint: nothing was changed; fix the policy file on the proxy\n", err)
		return ExitSetup
	}
	log, err := audit.Open(pol.AuditLog)
	if err != nil {
		fmt.Fprintf(stderr, "f2b-shim: denied: cannot write the audit log %q: %v\nf2b-shim: hint: nothing was changed; make the audit log's directory writable and its filesystem not full\n", pol.AuditLog, err)
		return ExitSetup
	}
	s := &session{pol: pol, log: log, deps: deps, id: newSessionID(), policyPath: policyPath, stamp: stamp}
	client, port := parseSSHConnection(env.SSHConnection)
	defer func() { s.log.Close() }()
	s.addr = client
	if client.IsValid() {
		s.client, s.port = client.String(), port
	}
	s.ctx, err = deps.Context(client)
	if err == nil {
		err = deps.PrepareExec()
	}
	if err != nil {
		// Nothing can be judged safely: say so once, in the log and to
		// the relay, which tries again later.
		rec := s.record(stream.Request{Line: StreamCommand, Len: len(StreamCommand)}, deps.Now())
		rec.Decision, rec.Reason, rec.Exit, rec.Result = audit.Deny, audit.Text(err.Error()), ExitSetup, "denied"
		_ = log.Write(rec)
		fmt.Fprintf(stderr, "f2b-shim: denied: %v\n", oneLine.Replace(err.Error()))
		return ExitSetup
	}
	slot, code := s.takeSlot(stderr)
	if slot == nil {
		return code
	}
	defer slot.Release()
	if deps.Stdin == nil {
		deps.Stdin = os.Stdin
	}
	stop, stopNow, unwatch := stopOnSignals()
	defer unwatch()
	s.slot, s.stopNow = slot, stopNow
	err = stream.Serve(deps.Stdin, stdout, stream.Options{
		MaxLine:  policy.MaxCommandLen,
		MaxBatch: pol.StreamMaxBatch,
		Idle:     pol.StreamIdleTimeout,
		Stop:     stop,
	}, s.serveBatch)
	if code, done := sessionEnd(err, pol, stderr); done {
		return code
	}
	switch {
	case errors.Is(err, stream.ErrIdle):
		fmt.Fprintf(stderr, "f2b-shim: stream idle for %s (stream_idle_timeout); closing the session\n", pol.StreamIdleTimeout)
	case err != nil:
		fmt.Fprintf(stderr, "f2b-shim: stream: %v\n", err)
		return ExitFirewall
	case s.broken != nil:
		return ExitSetup
	}
	return ExitOK
}

func newSessionID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// record starts the audit record of one line.
func (s *session) record(req stream.Request, now time.Time) audit.Record {
	rec := audit.Record{Time: now.UTC(), Policy: s.pol.Name, UID: os.Getuid(), ClientIP: s.client, ClientPort: s.port, Session: s.id, LineNo: req.N}
	rec.SetCommand(req.Line)
	if req.Len > len(req.Line) {
		rec.CommandLen = req.Len
	}
	return rec
}

// line is one request of a batch on its way through.
type line struct {
	rec   audit.Record
	op    policy.Operation
	reply stream.Reply
	// act is set for a request the policy allows and that needs the
	// firewall.
	act bool
}

func (l *line) done(code int, result, msg string) {
	l.rec.Exit, l.rec.Result = code, result
	l.reply = stream.Reply{Exit: code, Result: result, Message: msg}
}

// serveBatch is the stream's handler: judge every line, then carry out
// the allowed ones under one hold of the lock, one state transaction and
// one fsync of the audit log, and answer each with its own result.
func (s *session) serveBatch(batch []stream.Request) []stream.Reply {
	start := s.deps.Now()
	// The proxy's addresses, resolvers and gateways, read again for each
	// batch: a session can outlive a change of them, and a ban must never
	// cut the proxy off from what it has now.
	if ctx, err := s.deps.Context(s.addr); err == nil {
		s.ctx, s.ctxErr = ctx, nil
	} else {
		s.ctxErr = err
	}
	note, fit, refuse := s.beforeBatch(len(batch))
	if refuse != nil && s.broken == nil {
		return s.refuseBatch(batch, refuse)
	}
	if refuse == nil {
		batch = batch[:fit]
	}
	lines := make([]line, len(batch))
	acting := 0
	for i, req := range batch {
		l := &lines[i]
		l.rec = s.record(req, s.deps.Now())
		switch {
		case s.broken != nil:
			l.rec.Decision, l.rec.Reason = audit.Deny, audit.Text(s.broken.Error())
			l.done(ExitSetup, "denied", "denied: not carried out, the audit log failed: "+s.broken.Error())
			continue
		case s.ctxErr != nil:
			l.rec.Decision, l.rec.Reason = audit.Deny, audit.Text(s.ctxErr.Error())
			l.done(ExitSetup, "denied", "denied: "+s.ctxErr.Error())
			continue
		case req.Unterminated:
			l.rec.Decision, l.rec.Reason = audit.Deny, "the line does not end in a newline"
			l.done(ExitDenied, "denied", "denied: the line does not end in a newline (LF); it may be cut short, so it was not carried out")
			continue
		}
		op, err := policy.Decide(s.pol, req.Line, s.ctx)
		if err != nil {
			l.rec.Decision, l.rec.Reason = audit.Deny, audit.Text(err.Error())
			l.done(ExitDenied, "denied", "denied: "+err.Error())
			continue
		}
		l.op, l.rec.Decision, l.rec.Op = op, audit.Allow, opRecord(op)
		if s.pol.DryRun && state.Changes(op.Kind) {
			l.done(ExitOK, "dry-run", "")
			continue
		}
		l.act = true
		acting++
	}
	if note != "" {
		lines[0].rec.State = audit.Text(note)
	}
	served := len(lines)
	if acting > 0 && s.broken == nil {
		served = s.act(lines, start)
	}
	lines = lines[:served]
	replies := make([]stream.Reply, served)
	recs := make([]audit.Record, served)
	for i := range lines {
		lines[i].rec.DurationMS = float64(s.deps.Now().Sub(start).Microseconds()) / 1000
		recs[i] = lines[i].rec
	}
	if s.broken == nil {
		if err := s.log.WriteBatch(recs); err != nil {
			s.broken = err
		}
	}
	if s.held != nil {
		if s.broken == nil && s.held.Store != nil {
			// Every change of the batch has its line: nothing is left to
			// read back. A kill before this leaves the intents, and the
			// next request notes the changes as cut short.
			_ = s.held.Store.ClearIntent()
		}
		s.held.Release()
		s.held = nil
	}
	for i := range lines {
		replies[i] = lines[i].reply
		if s.broken != nil && lines[i].act {
			// Carried out but not audited: say so, as one-shot mode does.
			replies[i] = stream.Reply{Exit: ExitSetup, Result: "failed", Message: fmt.Sprintf("cannot write the audit log %q: %v", s.pol.AuditLog, s.broken)}
		}
	}
	if s.pol.Syslog && s.broken == nil {
		for _, r := range recs {
			_ = s.deps.Syslog(r)
		}
	}
	return replies
}

// act carries out the batch's allowed requests in order under one hold
// of the lock, and returns how many lines it served: all of them, or
// fewer when it has held the lock for streamLockBudget (at least one).
func (s *session) act(lines []line, start time.Time) int {
	deadline := start.Add(s.pol.LockTimeout)
	failAll := func(code int, result, msg string, err error) int {
		for i := range lines {
			if lines[i].act {
				lines[i].rec.Reason = audit.Text(err.Error())
				lines[i].done(code, result, msg)
			}
		}
		return len(lines)
	}
	if err := s.deps.PrepareExec(); err != nil {
		return failAll(ExitSetup, "failed", "setup: "+err.Error(), err)
	}
	e := &engine.Engine{Pol: s.pol, Ctx: s.ctx, Deadline: deadline, Ports: s.deps.Ports}
	held, err := e.Take(func() error { return s.log.Reserve(len(lines)) })
	var te *engine.TakeError
	if errors.As(err, &te) && te.Step == engine.StepUnderLock {
		// No room for the batch's lines: none of it is carried out.
		msg := fmt.Sprintf("denied: cannot write the audit log %q: %v; nothing was changed", s.pol.AuditLog, err)
		for i := range lines {
			if lines[i].act {
				lines[i].act = false
				lines[i].rec.Decision, lines[i].rec.Reason = audit.Deny, audit.Text(err.Error())
				lines[i].done(ExitSetup, "denied", msg)
			}
		}
		return len(lines)
	}
	if err != nil {
		var r audit.Record
		code, result, msg := takeFailure(&r, s.pol, err)
		return failAll(code, result, msg, err)
	}
	s.held = held // let go by serveBatch, after the audit lines
	store := held.Store
	// The intents stay until the batch's audit lines are written
	// (serveBatch clears them).
	store.KeepIntent = true
	taken := s.deps.Now()
	note := e.FinishCutShort(store)
	var intents []policy.Operation
	for _, l := range lines {
		if l.act && state.Changes(l.op.Kind) {
			intents = append(intents, l.op)
		}
	}
	if len(intents) > 0 {
		if err := store.SetIntent(intents...); err != nil {
			return failAll(ExitFirewall, "failed", "firewall: "+err.Error(), err)
		}
	}
	if err := store.Begin(); err != nil {
		return failAll(ExitFirewall, "failed", "firewall: "+err.Error(), err)
	}
	// Each family's backend is opened once per batch, and gathers the
	// batch's bans into one change (engine.StreamBatch).
	type opened struct {
		b   engine.Backend
		err error
	}
	backends := map[policy.Family]*opened{}
	checked := map[engine.FamChain]bool{}
	served := len(lines)
	first := true
	for i := range lines {
		l := &lines[i]
		if !l.act {
			continue
		}
		if !first && s.deps.Now().Sub(taken) > streamLockBudget {
			served = i
			break
		}
		if first && note != "" {
			l.rec.State = audit.Text(note)
		}
		first = false
		ob := backends[l.op.Family]
		if ob == nil {
			ob = &opened{}
			ob.b, ob.err = e.Open(l.op.Family, store, engine.StreamBatch)
			backends[l.op.Family] = ob
		}
		if ob.err != nil {
			l.done(failure(&l.rec, ob.err))
			continue
		}
		if fc := (engine.FamChain{Fam: l.op.Family, Chain: l.op.BanChain()}); !checked[fc] {
			// Once per chain and batch: the batch holds the lock, so
			// nothing but its own lines changes the chain meanwhile.
			checked[fc] = true
			if engine.HealsFirst(l.op.Kind) {
				probe, err := s.probe(e, store, lines[i:], fc)
				var note string
				if err == nil {
					note, err = e.HealOnContact(store, ob.b, fc.Fam, fc.Chain, checked, probe)
				}
				if err != nil {
					l.done(failure(&l.rec, err))
					continue
				}
				l.rec.State = audit.Text(engine.JoinNotes(string(l.rec.State), note))
			}
		}
		ob.b.Queue(l.op, i)
		l.done(serve(e, store, ob.b, l.op, &l.rec, s.deps.Now().UTC()))
	}
	for _, ob := range backends {
		if ob.err != nil {
			continue
		}
		for i, err := range ob.b.Flush() {
			// Recorded as made, and not in the firewall after all.
			l := &lines[i]
			if ferr := engine.TakeBack(store, l.op, s.deps.Now()); ferr != nil {
				err = errors.Join(err, ferr)
			}
			l.done(failure(&l.rec, err))
		}
	}
	if err := store.Commit(); err != nil {
		// The changes are in the firewall; the intents are still set, so
		// the next request reads their chains back.
		for i := range lines[:served] {
			if lines[i].act {
				lines[i].rec.State = audit.Text("state not written: " + err.Error() + "; the next request reads the chain back")
			}
		}
	}
	return served
}

// probe is the first ban of the chain in the rest of the batch that the
// record holds: the heal checks it in the firewall, so that the batch's
// re-bans answer "unchanged" only when it is true of the firewall.
func (s *session) probe(e *engine.Engine, store *state.Store, rest []line, fc engine.FamChain) (*policy.Operation, error) {
	for _, l := range rest {
		if !l.act || l.op.Family != fc.Fam || l.op.BanChain() != fc.Chain {
			continue
		}
		if p, err := e.RecordedBan(store, l.op); err != nil || p != nil {
			return p, err
		}
	}
	return nil, nil
}
