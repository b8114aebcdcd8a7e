package cli

import (
	"fmt"
	"os"
	"syscall"

	"github.com/f2b-shim/f2b-shim/internal/audit"
	"github.com/f2b-shim/f2b-shim/internal/stream"
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
func (s *session) beforeBatch(n int) (note string, refuse error) {
	if s.policyPath != "" {
		if stamp := stampOf(s.policyPath); stamp != s.stamp {
			pol, err := loadPolicy(s.policyPath, s.deps)
			if err != nil {
				return "", fmt.Errorf("the policy file changed and does not load: %w; nothing was changed", err)
			}
			if pol.AuditLog != s.pol.AuditLog {
				log, err := audit.Open(pol.AuditLog)
				if err != nil {
					return "", fmt.Errorf("the policy file changed, and its audit log %q cannot be written: %w; nothing was changed", pol.AuditLog, err)
				}
				s.log.Close()
				s.log = log
			}
			s.pol, s.stamp = pol, stamp
			note = "the policy file changed; read again for this batch"
		}
	}
	if _, err := s.log.FollowRotation(); err != nil {
		return note, fmt.Errorf("cannot reopen the audit log %q after its rotation: %w; nothing was changed", s.pol.AuditLog, err)
	}
	if err := s.log.Reserve(n); err != nil {
		return note, fmt.Errorf("cannot write the audit log %q: %w; nothing was changed", s.pol.AuditLog, err)
	}
	return note, nil
}

// refuseBatch answers every line of a batch that cannot be served safely
// with exit 5, and tries to audit the refusal: the relay keeps the lines
// and sends them again.
func (s *session) refuseBatch(batch []stream.Request, why error) []stream.Reply {
	replies := make([]stream.Reply, len(batch))
	recs := make([]audit.Record, len(batch))
	for i, req := range batch {
		recs[i] = s.record(req, s.deps.Now())
		recs[i].Decision, recs[i].Reason, recs[i].Exit, recs[i].Result = audit.Deny, audit.Text(why.Error()), ExitSetup, "denied"
		replies[i] = stream.Reply{Exit: ExitSetup, Result: "denied", Message: "denied: " + why.Error()}
	}
	// Best effort: the refusal changed nothing, so a log that cannot
	// take it is not a reason to stop the session.
	_ = s.log.WriteBatch(recs)
	return replies
}
