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

	// The lock is held until the audit line is written, so that the audit
	// log records changes in the order they were made. Each policy has
	// its own lock and state: policies that share a state_dir do not wait
	// for each other.
	deadline := start.Add(pol.LockTimeout)
	held, err := lock.Acquire(pol.StateDir, lockName(pol), deadline)
	if err != nil {
		rec.Reason = audit.Text(err.Error())
		if !errors.Is(err, lock.ErrTimeout) {
			// Not another shim: state_dir itself is unusable.
			return finish(ExitSetup, "failed", "state: "+err.Error()+"; hint: nothing was changed; state_dir must be a directory the shim's user can write (scripts/install makes it)")
		}
		return finish(ExitFirewall, "failed", "firewall: "+err.Error())
	}
	defer held.Release()
	// Room for the line, reserved again now that the lock is held: the
	// reservation at Open shares its blocks with every request that
	// opened the log at the same end and then waited for the lock, and
	// their lines have used them since (300 concurrent bans with 80 KiB
	// free put 16 bans in the firewall without their lines).
	if err := log.Reserve(1); err != nil {
		rec.Decision, rec.Reason = audit.Deny, audit.Text(err.Error())
		return finish(ExitSetup, "denied", fmt.Sprintf("denied: cannot write the audit log %q: %v; nothing was changed", pol.AuditLog, err))
	}
	store, err := state.Open(pol, ctx.LookupPort, max(time.Until(deadline), 100*time.Millisecond))
	if err != nil {
		rec.Reason = audit.Text(err.Error())
		return finish(ExitSetup, "failed", "state: "+err.Error()+"; hint: nothing was changed; fix or move the file named, then run \"f2b-shim reconcile --fix\" on the proxy")
	}
	defer store.Close()

	b, err := openBackend(pol, op.Family, deadline, deps)
	if err == nil {
		b.Record, b.LookupPort = store, ctx.LookupPort
		rec.State = audit.Text(finishCutShort(store, pol, ctx, deadline, deps))
	}
	if err == nil && healsFirst(op.Kind) {
		// Before the intent: a repair only puts back what the record
		// holds, so a kill in the middle of it leaves nothing to read back.
		var note string
		var probe *policy.Operation
		if probe, err = recordedBan(store, pol, op); err == nil {
			note, err = healOnContact(store, b, pol, ctx, op.Family, op.BanChain(), deadline, deps, nil, probe)
		}
		rec.State = audit.Text(joinNotes(string(rec.State), note))
	}
	if err == nil && state.Changes(op.Kind) {
		err = store.SetIntent(op)
	}
	if err != nil {
		return finish(failure(&rec, err))
	}
	return finish(serve(store, b, pol, op, &rec, start.UTC(), deps))
}

// serve carries out one judged operation under the policy's lock, and
// records it: what one-shot and stream mode share. The caller has set the
// intent. It returns the exit code and the audit log's result word, and
// fills in rec, and the message for the client when there is one.
func serve(store *state.Store, b firewall.Backend, pol *policy.Policy, op policy.Operation, rec *audit.Record, at time.Time, deps Deps) (code int, result, msg string) {
	var (
		outcome firewall.Outcome
		err     error
	)
	lifted := true // for a widened unban: whether the prefix goes
	switch {
	case op.Kind == policy.AddBan:
		err = checkQuota(store, pol, op, deps.Now())
		if err == nil {
			err = checkMembers(store, pol, op, rec)
		}
		if err == nil {
			outcome, err = firewall.Apply(b, op)
		}
	case op.Member.IsValid() && op.Kind == policy.DeleteBan:
		// The prefix stays while it is banned for other addresses.
		var others bool
		if others, err = store.HasOtherMember(op); err == nil && others {
			lifted, outcome = false, firewall.Unchanged
			rec.State = audit.Text(strings.TrimPrefix(fmt.Sprintf("%s; %s stays banned for other addresses in it", rec.State, op.Source), "; "))
		} else if err == nil {
			outcome, err = firewall.Apply(b, op)
		}
	case op.Member.IsValid() && op.Kind == policy.CheckBan:
		// A check answers for the address it names, not for its prefix.
		var has bool
		if has, err = store.HasMember(op); err == nil {
			outcome = firewall.CheckFalse
			if has {
				outcome = firewall.CheckTrue
			}
		}
	default:
		outcome, err = firewall.Apply(b, op)
	}
	if err != nil {
		if errors.Is(err, firewall.ErrLimit) || nothingChanged(b, op, err) {
			// Nothing was changed: there is nothing to look at again.
			_ = store.ClearIntent()
		}
		return failure(rec, err)
	}
	if state.Changes(op.Kind) {
		applied := outcome == firewall.Applied
		if op.Member.IsValid() && op.Kind == policy.DeleteBan {
			applied = lifted
		}
		if err := store.RecordRequest(op, applied, at); err != nil {
			// The change is in the firewall; the next request finds the
			// intent and reads the chain back from it.
			rec.State = audit.Text(strings.TrimPrefix(string(rec.State)+"; state not written: "+err.Error()+"; run \"f2b-shim reconcile --fix\" on the proxy", "; "))
		}
	}
	if outcome == firewall.CheckFalse {
		return ExitCheckFalse, outcome.String(), ""
	}
	return ExitOK, outcome.String(), ""
}

// nothingChanged reports whether a failed ban or unban of the rule
// backend left the firewall as it was: it is one iptables call, and
// iptables changes nothing when it exits with an error. (A stream's
// queued bans fail later, at the batch's flush, and are forgotten there.)
func nothingChanged(b firewall.Backend, op policy.Operation, err error) bool {
	var ce *firewall.CommandError
	return b.Sets == nil && (op.Kind == policy.AddBan || op.Kind == policy.DeleteBan) && errors.As(err, &ce)
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

// checkQuota refuses a ban that would change the firewall once
// max_new_bans_per_minute bans have, in the last minute: a compromised
// mail host cannot fill the proxy in seconds. A ban already in place is
// not new, and goes through.
func checkQuota(store *state.Store, pol *policy.Policy, op policy.Operation, now time.Time) error {
	n, err := store.NewBans(now)
	if err != nil || n < pol.MaxNewBansPerMinute {
		return err
	}
	has, err := store.HasBan(op)
	if err == nil && has && op.Member.IsValid() {
		// A new member of a widened ban is new, though its prefix is not.
		has, err = store.HasMember(op)
	}
	if err != nil || has {
		return err
	}
	return fmt.Errorf("ban quota %w: %d bans were made in the last minute (max_new_bans_per_minute); wait, or raise the limit in the policy", firewall.ErrLimit, n)
}

// famChain names a chain of one family.
type famChain struct {
	fam   policy.Family
	chain policy.Chain
}

// lockName is the policy's lock file in state_dir.
func lockName(pol *policy.Policy) string { return pol.Name + ".lock" }

// finishCutShort finishes the record of changes that a shim started and
// never recorded (it was killed between the firewall and the record, or a
// stream in the middle of a batch, or the change failed): each chain they
// touched, and the hooks into it, are read back from the live firewall,
// judged by the policy, and merged into the record (state.ReadBack: what
// the firewall lacks stays recorded, as drift to put back). The note says
// so in the audit line.
func finishCutShort(store *state.Store, pol *policy.Policy, ctx policy.Context, deadline time.Time, deps Deps) string {
	ops, err := store.Intent(ctx)
	if err != nil {
		return "state: " + err.Error()
	}
	if len(ops) == 0 {
		return ""
	}
	done := map[famChain]bool{}
	for _, op := range ops {
		fc := famChain{op.Family, op.BanChain()}
		if done[fc] {
			continue
		}
		done[fc] = true
		if note := readBack(store, pol, ctx, fc.fam, fc.chain, ops, deadline, deps); note != "" {
			return note
		}
	}
	for _, op := range ops {
		if op.Kind == policy.AddBan || op.Kind == policy.DeleteBan {
			if err := store.Unsettle(op); err != nil {
				return "state: " + err.Error()
			}
		}
	}
	if err := store.ClearIntent(); err != nil {
		return "state: " + err.Error()
	}
	if len(ops) == 1 {
		return fmt.Sprintf("an earlier change (%s) was cut short; %s %s was read back from the firewall", ops[0].CommandLine(), ops[0].Family, ops[0].BanChain())
	}
	return fmt.Sprintf("%d earlier changes (first %s) were cut short; %d chain(s) were read back from the firewall", len(ops), ops[0].CommandLine(), len(done))
}

// readBack merges what the firewall holds of one chain into its record.
// Nothing is written when either cannot be read: the record stays as it
// was, and the intent stays for the next request.
func readBack(store *state.Store, pol *policy.Policy, ctx policy.Context, fam policy.Family, chain policy.Chain, cut []policy.Operation, deadline time.Time, deps Deps) string {
	b, err := openBackend(pol, fam, deadline, deps)
	if err != nil {
		return "an earlier change was cut short, and the firewall is unreadable: " + err.Error()
	}
	b.LookupPort = ctx.LookupPort
	live := state.New(ctx.LookupPort)
	exists, err := readLiveChain(live, b, pol, ctx, fam, chain)
	if err != nil {
		return "an earlier change was cut short, and the firewall is unreadable: " + err.Error()
	}
	recorded, _, err := store.Load(ctx)
	if err != nil {
		return "an earlier change was cut short, and the state is unreadable: " + err.Error()
	}
	merged := state.ReadBack(recorded, live, fam, chain, exists, cut)
	if err := store.ReplaceChainKeeping(merged, recorded, fam, chain); err != nil {
		return "an earlier change was cut short, and the state could not be repaired: " + err.Error()
	}
	return ""
}

// readLiveChain reads one chain of the live firewall, and the hooks into
// it, into live; exists says whether the chain is there.
func readLiveChain(live *state.State, b firewall.Backend, pol *policy.Policy, ctx policy.Context, fam policy.Family, chain policy.Chain) (exists bool, err error) {
	if b.NFT != nil {
		snap, err := b.NFT.ReadBack()
		if err != nil {
			return false, err
		}
		state.FromNFT(live, fam, snap, pol, ctx, chain)
		cs := snap.Chains[chain]
		return cs != nil && cs.Returns(fam), nil
	}
	exists, err = b.Table.ChainExists(string(chain))
	if err == nil && exists {
		_, err = state.ChainFromLive(live, fam, chain, b, ctx)
		if err == nil {
			_, err = state.HooksFromLive(live, fam, b, ctx, chain)
		}
	}
	return exists, err
}

// openBackend opens the family's table, and ipset for the set backend;
// for the nftables backend, the shim's own nftables table and nothing
// else.
func openBackend(pol *policy.Policy, fam policy.Family, deadline time.Time, deps Deps) (firewall.Backend, error) {
	b := firewall.Backend{Policy: pol}
	var err error
	if pol.Backend == "nftables" {
		if deps.OpenNFT == nil {
			return b, fmt.Errorf("the nftables backend is not available here")
		}
		b.NFT, err = deps.OpenNFT(pol.NftablesTable)
		return b, err
	}
	if b.Table, err = deps.OpenTable(fam, pol.IptablesBackend, max(time.Until(deadline), time.Second)); err != nil {
		return b, err
	}
	if pol.Backend == "ipset" {
		b.Sets, err = deps.OpenSets()
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
	if op.Member.IsValid() {
		r.Member = op.Member.String()
	}
	return r
}
