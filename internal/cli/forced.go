package cli

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/audit"
	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/lock"
	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
)

// oneLine folds a multi-line message (iptables prints several) into one.
var oneLine = strings.NewReplacer("\r\n", "; ", "\n", "; ", "\r", "; ")

// lockName is the host-wide lock file in state_dir.
const lockName = "lock"

// runForced serves one request from the mail host. The order is the
// safety argument: judge the whole request, make sure it can be audited,
// take the lock, act, then write the one audit line.
func runForced(policyPath string, env Env, stderr io.Writer, deps Deps) int {
	start := deps.Now()
	pol, err := loadPolicy(policyPath, deps)
	if err != nil {
		// Without a policy there is no audit_log to write to; sshd's own
		// log still has the login, and fail2ban logs this line.
		fmt.Fprintf(stderr, "f2b-shim: policy: %v\nf2b-shim: hint: nothing was changed; fix the policy file on the proxy\n", err)
		return ExitSetup
	}
	rec := audit.Record{Time: start.UTC(), Policy: pol.Name, UID: os.Getuid()}
	client, port := parseSSHConnection(env.SSHConnection)
	if client.IsValid() {
		rec.ClientIP, rec.ClientPort = client.String(), port
	}
	rec.SetCommand(env.OriginalCommand)

	log, err := audit.Open(pol.AuditLog)
	if err != nil {
		fmt.Fprintf(stderr, "f2b-shim: denied: cannot write the audit log %q: %v\nf2b-shim: hint: nothing was changed; make the audit log's directory writable and its filesystem not full\n", pol.AuditLog, err)
		return ExitSetup
	}
	defer log.Close()

	finish := func(code int, result string, msg string) int {
		rec.Exit, rec.Result = code, result
		rec.DurationMS = float64(deps.Now().Sub(start).Microseconds()) / 1000
		if msg != "" {
			// One line: fail2ban logs it, and iptables' own messages can
			// span several.
			fmt.Fprintf(stderr, "f2b-shim: %s\n", oneLine.Replace(strings.TrimSpace(msg)))
		}
		if err := log.Write(rec); err != nil {
			fmt.Fprintf(stderr, "f2b-shim: cannot write the audit log %q: %v\n", pol.AuditLog, err)
			return ExitSetup
		}
		if pol.Syslog {
			// The file is the record of truth; syslog is a copy for log
			// pipelines, so its failure changes nothing.
			_ = deps.Syslog(rec)
		}
		return code
	}

	if !env.HasCommand {
		rec.Decision, rec.Reason = audit.Deny, "interactive login"
		return finish(ExitDenied, "denied", "denied: this key only runs fail2ban's iptables commands; an interactive login is not allowed")
	}
	ctx := policy.Context{Client: client}
	if ctx.LocalAddrs, err = deps.LocalAddrs(); err != nil {
		// Without the proxy's own addresses a ban could cut the proxy off
		// from itself; refuse rather than guess.
		rec.Decision, rec.Reason = audit.Deny, audit.Text("cannot list local addresses: "+err.Error())
		return finish(ExitSetup, "denied", fmt.Sprintf("denied: cannot list this proxy's addresses: %v", err))
	}
	op, err := policy.Decide(pol, env.OriginalCommand, ctx)
	if err != nil {
		rec.Decision, rec.Reason = audit.Deny, audit.Text(err.Error())
		return finish(ExitDenied, "denied", "denied: "+err.Error())
	}
	rec.Decision, rec.Op = audit.Allow, opRecord(op)

	if err := deps.PrepareExec(); err != nil {
		rec.Reason = audit.Text(err.Error())
		return finish(ExitSetup, "failed", "setup: "+err.Error())
	}

	// The lock is held until the audit line is written, so that the audit
	// log records changes in the order they were made.
	deadline := start.Add(pol.LockTimeout)
	held, err := lock.Acquire(pol.StateDir, lockName, deadline)
	if err != nil {
		rec.Reason = audit.Text(err.Error())
		return finish(ExitFirewall, "failed", "firewall: "+err.Error())
	}
	defer held.Release()

	outcome, err := apply(pol, op, deadline, deps)
	if err != nil {
		status, stderrText := errorStatus(err)
		rec.IptablesStatus = status
		rec.SetStderr(stderrText)
		rec.Reason = audit.Text(err.Error())
		if errors.Is(err, firewall.ErrBanLimit) {
			return finish(ExitDenied, "denied", "denied: "+err.Error())
		}
		return finish(ExitFirewall, "failed", "firewall: "+err.Error())
	}
	if state.Changes(op.Kind) {
		rec.State = audit.Text(journal(pol, op, ctx, start, deadline, deps))
	}
	code := ExitOK
	if outcome == firewall.CheckFalse {
		code = ExitCheckFalse
	}
	return finish(code, outcome.String(), "")
}

// journal records a change in state_dir before it is reported done. A
// journal that cannot be written or read never fails the change, which is
// already in the firewall: the returned note goes into the audit line.
func journal(pol *policy.Policy, op policy.Operation, ctx policy.Context, at, deadline time.Time, deps Deps) string {
	dir := pol.StateDir
	torn := state.TornTail(dir)
	if err := state.Append(dir, state.Entry{Time: at.UTC(), Command: op.CommandLine()}, torn); err != nil {
		return "journal not written: " + err.Error() + "; run \"f2b-shim reconcile --fix\" on the proxy"
	}
	if !torn && !state.NeedsCompaction(dir) {
		return ""
	}
	s, problems, err := state.Load(dir, pol, ctx)
	if err != nil {
		return "journal not readable: " + err.Error()
	}
	note := ""
	if len(problems) > 0 {
		// What the shim put into the firewall is there now, under this
		// lock; the journal's times are kept where they still match.
		live := state.New()
		for _, fam := range []policy.Family{policy.IPv4, policy.IPv6} {
			b, err := openBackend(pol, fam, deadline, deps)
			if err == nil {
				_, err = state.FromLive(live, fam, b, ctx)
			}
			if err != nil {
				return fmt.Sprintf("journal damaged (%d bad lines) and the firewall unreadable: %v", len(problems), err)
			}
		}
		live.KeepTimes(s)
		s = live
		note = fmt.Sprintf("journal damaged (%d bad lines, first %s); rebuilt from the live firewall", len(problems), problems[0])
	}
	if err := state.Write(dir, s); err != nil {
		return strings.TrimPrefix(note+"; journal not compacted: "+err.Error(), "; ")
	}
	return note
}

// apply carries out op. Each iptables call may wait for the xtables lock
// until the deadline (at least a second): fail2ban kills an action after
// 60 s, and lock_timeout is at most 50 s.
func apply(pol *policy.Policy, op policy.Operation, deadline time.Time, deps Deps) (firewall.Outcome, error) {
	b, err := openBackend(pol, op.Family, deadline, deps)
	if err != nil {
		return 0, err
	}
	return firewall.Apply(b, op)
}

// openBackend opens the family's table, and ipset for the set backend.
func openBackend(pol *policy.Policy, fam policy.Family, deadline time.Time, deps Deps) (firewall.Backend, error) {
	b := firewall.Backend{Policy: pol}
	var err error
	if b.Table, err = deps.OpenTable(fam, pol.IptablesBackend, max(time.Until(deadline), time.Second)); err != nil {
		return b, err
	}
	if pol.Backend == "ipset" {
		b.Sets, err = deps.OpenSets()
	} else {
		b.Index = state.Index{Dir: pol.StateDir}
	}
	return b, err
}

func opRecord(op policy.Operation) *audit.Op {
	r := &audit.Op{
		Kind:      op.Kind.String(),
		Family:    op.Family.String(),
		Chain:     string(op.BanChain()),
		Canonical: op.CommandLine(),
	}
	if op.Jump != "" {
		r.Parent = string(op.Chain)
	}
	if op.Proto != "" {
		r.Proto, r.Match = op.Proto, op.Match.String()
	}
	for i, p := range op.Ports {
		if i > 0 {
			r.Ports += ","
		}
		r.Ports += p.String()
	}
	if op.Source.IsValid() {
		r.Source, r.Target = op.Source.String(), op.Target.String()
	}
	return r
}
