package cli

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/audit"
	"github.com/f2b-shim/f2b-shim/internal/engine"
	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/lock"
	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
)

// oneLine folds a multi-line message (iptables prints several) into one.
var oneLine = strings.NewReplacer("\r\n", "; ", "\n", "; ", "\r", "; ")

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

	logged := false // the request's audit line is written
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
		logged = true
		if pol.Syslog {
			// The file is the record of truth; syslog is a copy for log
			// pipelines, so its failure changes nothing. The copy carries
			// the chain's link, so a rewrite of the file shows against it.
			rec.Prev = log.Prev
			_ = deps.Syslog(rec)
		}
		return code
	}

	if !env.HasCommand {
		rec.Decision, rec.Reason = audit.Deny, "interactive login"
		return finish(ExitDenied, "denied", "denied: this key only runs fail2ban's iptables commands; an interactive login is not allowed")
	}
	ctx, err := deps.Context(client)
	if err != nil {
		// Without the proxy's own addresses, resolvers and gateways a
		// ban could cut the proxy off from itself; refuse rather than guess.
		rec.Decision, rec.Reason = audit.Deny, audit.Text(err.Error())
		return finish(ExitSetup, "denied", "denied: "+err.Error())
	}
	op, err := policy.Decide(pol, env.OriginalCommand, ctx)
	if err != nil {
		rec.Decision, rec.Reason = audit.Deny, audit.Text(err.Error())
		return finish(ExitDenied, "denied", "denied: "+err.Error())
	}
	rec.Decision, rec.Op = audit.Allow, opRecord(op)
	if pol.DryRun && state.Changes(op.Kind) {
		// Judged and audited as it would be; the firewall and the state
		// are left alone, so an admin can roll the shim out and watch.
		return finish(ExitOK, "dry-run", "")
	}

	if err := deps.PrepareExec(); err != nil {
		rec.Reason = audit.Text(err.Error())
		return finish(ExitSetup, "failed", "setup: "+err.Error())
	}

	// The lock is held until the audit line is written (engine.Take).
	deadline := start.Add(pol.LockTimeout)
	e := &engine.Engine{Pol: pol, Ctx: ctx, Deadline: deadline, Ports: deps.Ports}
	held, err := e.Take(func() error {
		// 300 concurrent bans with 80 KiB free put 16 bans in the
		// firewall without their lines, before this was reserved again
		// under the lock.
		return log.Reserve(1)
	})
	if err != nil {
		return finish(takeFailure(&rec, pol, err))
	}
	defer held.Release()
	store := held.Store
	// The intent stays until the audit line is written (below).
	store.KeepIntent = true
	b, err := e.Open(op.Family, store, engine.NoBatch)
	if err == nil {
		rec.State = audit.Text(e.FinishCutShort(store))
	}
	if err == nil && engine.HealsFirst(op.Kind) {
		// Before the intent: a repair only puts back what the record
		// holds, so a kill in the middle of it leaves nothing to read back.
		var note string
		var probe *policy.Operation
		if probe, err = e.RecordedBan(store, op); err == nil {
			note, err = e.HealOnContact(store, b, op.Family, op.BanChain(), nil, probe)
		}
		rec.State = audit.Text(engine.JoinNotes(string(rec.State), note))
	}
	if err == nil && state.Changes(op.Kind) {
		err = store.SetIntent(op)
	}
	if err != nil {
		return finish(failure(&rec, err))
	}
	code := finish(serve(e, store, b, op, &rec, start.UTC()))
	if logged && state.Changes(op.Kind) {
		// Written: the change has its line, and nothing is left to read
		// back. A kill before this leaves the intent, and the next
		// request notes the change as cut short.
		_ = store.ClearIntent()
	}
	return code
}

// serve carries out one judged operation (engine.Serve) and turns what
// happened into the exit code, the audit log's result word and the
// message for the client: what one-shot and stream mode share.
func serve(e *engine.Engine, store *state.Store, b engine.Backend, op policy.Operation, rec *audit.Record, at time.Time) (code int, result, msg string) {
	outcome, err := e.Serve(store, b, op, rec, at)
	if err != nil {
		return failure(rec, err)
	}
	if outcome == firewall.CheckFalse {
		return ExitCheckFalse, outcome.String(), ""
	}
	return ExitOK, outcome.String(), ""
}

// failure fills in rec for an operation that failed, and returns its exit
// code, result and message: a limit is a denial (nothing was changed),
// anything else the firewall's failure.
func failure(rec *audit.Record, err error) (int, string, string) {
	status, stderrText := errorStatus(err)
	rec.IptablesStatus = status
	rec.SetStderr(stderrText)
	rec.Reason = audit.Text(err.Error())
	if errors.Is(err, firewall.ErrLimit) {
		return ExitDenied, "denied", "denied: " + err.Error()
	}
	return ExitFirewall, "failed", "firewall: " + err.Error()
}

// takeFailure fills in rec for a request that engine.Take refused, and
// returns its exit code, result and message. Nothing was changed.
func takeFailure(rec *audit.Record, pol *policy.Policy, err error) (int, string, string) {
	rec.Reason = audit.Text(err.Error())
	var te *engine.TakeError
	errors.As(err, &te)
	switch {
	case te != nil && te.Step == engine.StepUnderLock:
		rec.Decision = audit.Deny
		return ExitSetup, "denied", fmt.Sprintf("denied: cannot write the audit log %q: %v; nothing was changed", pol.AuditLog, err)
	case te != nil && te.Step == engine.StepState:
		return ExitSetup, "failed", "state: " + err.Error() + "; hint: nothing was changed; fix or move the file named, then run \"f2b-shim reconcile --fix\" on the proxy"
	case errors.Is(err, lock.ErrTimeout):
		return ExitFirewall, "failed", "firewall: " + err.Error()
	}
	// Not another shim: state_dir itself is unusable.
	return ExitSetup, "failed", "state: " + err.Error() + "; hint: nothing was changed; state_dir must be a directory the shim's user can write (scripts/install makes it)"
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
	if op.Member.IsValid() {
		r.Member = op.Member.String()
	}
	return r
}
