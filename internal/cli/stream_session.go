package cli

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"

	"github.com/f2b-shim/f2b-shim/internal/audit"
	"github.com/f2b-shim/f2b-shim/internal/lock"
	"github.com/f2b-shim/f2b-shim/internal/stream"
	"github.com/f2b-shim/f2b-shim/policy"
)

// policyStamp is what tells a changed policy file from the one a session
// loaded: its inode (an editor's rename), size and modification time.
type policyStamp struct {
	dev, ino uint64
	size     int64
	mtime    int64
}

func stampOf(path string) policyStamp {
	st, err := os.Stat(path)
	if err != nil {
		return policyStamp{}
	}
	s := policyStamp{size: st.Size(), mtime: st.ModTime().UnixNano()}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		s.dev, s.ino = uint64(sys.Dev), sys.Ino
	}
	return s
}

// beforeBatch keeps a long session as safe as a one-shot call before each
// batch: the policy is read again when its file changed, so the batch is
// judged by the admin's policy of now; the audit log is reopened when
// logrotate moved it; and room is reserved in it for every line of the
// batch, so that nothing is carried out that cannot be audited. It
// returns why the batch must be refused, or nil; note is a remark for
// the batch's first audit line.
func (s *session) beforeBatch(n int) (note string, fit int, refuse error) {
	if s.policyPath != "" {
		if stamp := stampOf(s.policyPath); stamp != s.stamp {
			pol, err := loadPolicy(s.policyPath, s.deps)
			if err != nil {
				return "", 0, fmt.Errorf("the policy file changed and does not load: %w; nothing was changed", err)
			}
			if pol.AuditLog != s.pol.AuditLog {
				log, err := audit.Open(pol.AuditLog)
				if err != nil {
					return "", 0, fmt.Errorf("the policy file changed, and its audit log %q cannot be written: %w; nothing was changed", pol.AuditLog, err)
				}
				s.log.Close()
				s.log = log
			}
			s.pol, s.stamp = pol, stamp
			note = "the policy file changed; read again for this batch"
			if s.slot != nil && s.slot.Index >= pol.MaxStreamSessions {
				// A lowered bound holds for the sessions open, as a lower
				// limit does for the next line: this one ends, and the
				// relay reconnects when a slot under the bound is free.
				s.stopNow()
				return note, 0, fmt.Errorf("%w: the policy now allows %d stream sessions (max_stream_sessions), and this is session %d; ending it, nothing was changed", errOverSessions, pol.MaxStreamSessions, s.slot.Index+1)
			}
		}
	}
	if _, err := s.log.FollowRotation(); err != nil {
		return note, 0, fmt.Errorf("cannot reopen the audit log %q after its rotation: %w; nothing was changed", s.pol.AuditLog, err)
	}
	// When the whole batch does not fit, serve the part that does: the
	// rest comes again in the next batch, and is refused only when not
	// even one line has room.
	for fit = n; ; fit /= 2 {
		err := s.log.Reserve(fit)
		if err == nil {
			return note, fit, nil
		}
		if fit == 1 {
			return note, 0, fmt.Errorf("cannot write the audit log %q: %w; nothing was changed", s.pol.AuditLog, err)
		}
	}
}

// errOverSessions refuses the batch of a session past a lowered
// max_stream_sessions.
var errOverSessions = errors.New("denied")

// refuseBatch answers every line of a batch that cannot be served safely
// with exit 5, and tries to audit the refusal: the relay keeps the lines
// and sends them again.
func (s *session) refuseBatch(batch []stream.Request, why error) []stream.Reply {
	replies := make([]stream.Reply, len(batch))
	recs := make([]audit.Record, len(batch))
	code, msg := ExitSetup, "denied: "+why.Error()
	if errors.Is(why, errOverSessions) {
		code, msg = ExitDenied, why.Error()
	}
	for i, req := range batch {
		recs[i] = s.record(req, s.deps.Now())
		recs[i].Decision, recs[i].Reason, recs[i].Exit, recs[i].Result = audit.Deny, audit.Text(strings.TrimPrefix(msg, "denied: ")), code, "denied"
		replies[i] = stream.Reply{Exit: code, Result: "denied", Message: msg}
	}
	// Best effort: the refusal changed nothing, so a log that cannot
	// take it is not a reason to stop the session.
	_ = s.log.WriteBatch(recs)
	return replies
}

// takeSlot takes one of the policy's max_stream_sessions slots for the
// session, or refuses it (exit 3, audited): sshd does not bound
// authenticated connections, and each session holds an sshd and a shim.
func (s *session) takeSlot(stderr io.Writer) (*lock.Lock, int) {
	slot, err := lock.Slot(s.pol.StateDir, s.pol.Name+".stream", s.pol.MaxStreamSessions)
	if err == nil {
		return slot, ExitOK
	}
	code, msg := ExitSetup, "state: "+err.Error()
	if errors.Is(err, lock.ErrNoSlot) {
		code = ExitDenied
		msg = fmt.Sprintf("denied: %d stream sessions of policy %q are open already (max_stream_sessions)", s.pol.MaxStreamSessions, s.pol.Name)
	}
	rec := s.record(stream.Request{Line: StreamCommand, Len: len(StreamCommand)}, s.deps.Now())
	rec.Decision, rec.Reason, rec.Exit, rec.Result = audit.Deny, audit.Text(strings.TrimPrefix(msg, "denied: ")), code, "denied"
	_ = s.log.Write(rec)
	fmt.Fprintf(stderr, "f2b-shim: %s\n", msg)
	if code == ExitDenied {
		fmt.Fprintf(stderr, "f2b-shim: hint: the relay keeps one session per proxy; end stale sessions, or raise max_stream_sessions in the policy\n")
	}
	return nil, code
}

// stopOnSignals makes SIGTERM and SIGHUP end the session after the batch
// being served, with its replies written and exit 0: an admin or a
// package's prerm can end a session without SIGKILL.
// stopNow does the same from within: a policy that lowered
// max_stream_sessions below the session's slot.
func stopOnSignals() (stop <-chan struct{}, stopNow func(), unwatch func()) {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGHUP)
	stopped, quit := make(chan struct{}), make(chan struct{})
	var once sync.Once
	stopNow = func() { once.Do(func() { close(stopped) }) }
	go func() {
		select {
		case <-sigs:
			stopNow()
		case <-quit:
		}
	}()
	return stopped, stopNow, func() { signal.Stop(sigs); close(quit) }
}

// sessionEnd says how a session ended by a signal or by a client that
// does not read ended; done is false for the other ends.
func sessionEnd(err error, pol *policy.Policy, stderr io.Writer) (code int, done bool) {
	switch {
	case errors.Is(err, stream.ErrStopped):
		fmt.Fprintf(stderr, "f2b-shim: stream: told to stop (SIGTERM or SIGHUP, or max_stream_sessions lowered below this session); the batch in hand was served and answered, the client sends the rest again\n")
		return ExitOK, true
	case errors.Is(err, stream.ErrStalled):
		fmt.Fprintf(stderr, "f2b-shim: stream: the client took no replies for %s (stream_idle_timeout); closing the session\n", pol.StreamIdleTimeout)
		return ExitOK, true
	}
	return 0, false
}
