package engine

import (
	"errors"
	"fmt"
	"strings"
	"syscall"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/audit"
	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
)

// Serve carries out one judged operation under the policy's lock, and
// records it: what one-shot and stream mode share. The caller has set
// the intent (state.Store.SetIntent), and writes the audit line after:
// Serve adds to rec's state note what the record says of the request.
// A ban first passes max_new_bans_per_minute and the bound on widened
// bans' members; an error wrapping firewall.ErrLimit is a denial, and
// nothing was changed.
func (e *Engine) Serve(store *state.Store, b Backend, op policy.Operation, rec *audit.Record, at time.Time) (firewall.Outcome, error) {
	var (
		outcome firewall.Outcome
		err     error
	)
	lifted := true // for a widened unban: whether the prefix goes
	switch {
	case op.Kind == policy.AddBan:
		err = checkQuota(store, e.Pol, op, e.Ports.Now())
		if err == nil {
			err = checkMembers(store, e.Pol, op, rec)
		}
		if err == nil {
			outcome, err = b.Apply(op)
		}
	case op.Member.IsValid() && op.Kind == policy.DeleteBan:
		// The prefix stays while it is banned for other addresses.
		var others bool
		if others, err = store.HasOtherMember(op); err == nil && others {
			lifted, outcome = false, firewall.Unchanged
			rec.State = audit.Text(strings.TrimPrefix(fmt.Sprintf("%s; %s stays banned for other addresses in it", rec.State, op.Source), "; "))
		} else if err == nil {
			outcome, err = b.Apply(op)
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
		outcome, err = b.Apply(op)
	}
	if err != nil {
		if errors.Is(err, firewall.ErrLimit) || nothingChanged(b, op, err) {
			// Nothing was changed: there is nothing to look at again.
			_ = store.ClearIntent()
		} else {
			// It may have changed halfway: the next request reads the
			// chain back.
			store.HoldIntent()
		}
		return 0, err
	}
	if state.Changes(op.Kind) {
		applied := outcome == firewall.Applied
		if op.Member.IsValid() && op.Kind == policy.DeleteBan {
			applied = lifted
		}
		if err := store.RecordRequest(op, applied, at); err != nil {
			store.HoldIntent()
			// The change is in the firewall; the next request finds the
			// intent and reads the chain back from it.
			rec.State = audit.Text(strings.TrimPrefix(string(rec.State)+"; state not written: "+err.Error()+"; run \"f2b-shim reconcile --fix\" on the proxy", "; "))
		}
	}
	return outcome, nil
}

// nothingChanged reports whether a failed ban or unban of the rule
// backend left the firewall as it was: it is one iptables call, and
// iptables changes nothing when it exits with an error. (A stream's
// queued bans fail later, at the batch's flush, and are taken back
// there.)
//
// With nftables a ban or unban is one transaction, which the kernel
// applies whole or not at all; only a lost acknowledgement (ENOBUFS)
// leaves its outcome unknown.
func nothingChanged(b Backend, op policy.Operation, err error) bool {
	if op.Kind != policy.AddBan && op.Kind != policy.DeleteBan {
		return false
	}
	switch b := b.(type) {
	case *rules:
		var ce *firewall.CommandError
		return b.b.Sets == nil && errors.As(err, &ce)
	case *nft:
		return !errors.Is(err, syscall.ENOBUFS)
	}
	return false
}

// TakeBack undoes the record of a gathered change that did not reach the
// firewall at the batch's Flush: a ban is forgotten, an unban's ban
// recorded again.
func TakeBack(store *state.Store, op policy.Operation, now time.Time) error {
	var err error
	if op.Kind == policy.DeleteBan {
		undo := op
		undo.Kind = policy.AddBan
		err = store.Record(undo, true, now)
	} else {
		err = store.Forget(op)
	}
	if err != nil {
		store.HoldIntent()
	}
	return err
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

// checkMembers bounds the members of widened bans (ban_prefix_v6/v4) by
// max_bans_per_chain: a ban for a new address in a prefix already banned
// changes no rule, but the state records the address, and without a
// bound one /64 could make it grow without end. Each member counts like
// a ban (the prefix's own ban counts too), also for the ban of a new
// prefix, which adds a ban and a member: counting its bans alone, the
// firewall layer let a chain whose members had reached the bound take
// max_bans_per_chain more prefixes. A new member is noted in the audit
// line, which so is written in full, never coalesced.
func checkMembers(store *state.Store, pol *policy.Policy, op policy.Operation, rec *audit.Record) error {
	if !op.Member.IsValid() {
		return nil
	}
	if has, err := store.HasMember(op); err != nil || has {
		return err
	}
	banned, err := store.HasBan(op)
	if err != nil {
		return err
	}
	bans, err := store.BanCount(op.Family, op.Chain)
	if err != nil {
		return err
	}
	members, err := store.MemberCount(op.Family, op.Chain)
	if err != nil {
		return err
	}
	if bans+members >= pol.MaxBansPerChain {
		return fmt.Errorf("ban %w: chain %q already holds %d bans and %d addresses of widened bans (max_bans_per_chain); unban some or raise the limit in the policy", firewall.ErrLimit, op.Chain, bans, members)
	}
	if banned {
		rec.State = audit.Text(fmt.Sprintf("%s is recorded as a member of the ban of %s", op.Member, op.Source))
	}
	return nil
}

// FinishCutShort finishes the record of changes that a shim started and
// never recorded (it was killed between the firewall and the record, or a
// stream in the middle of a batch, or the change failed): each chain they
// touched, and the hooks into it, are read back from the live firewall,
// judged by the policy, and merged into the record (state.ReadBack: what
// the firewall lacks stays recorded, as drift to put back). The note says
// so in the audit line.
func (e *Engine) FinishCutShort(store *state.Store) string {
	ops, err := store.Intent(e.Ctx)
	if err != nil {
		store.HoldIntent()
		return "state: " + err.Error()
	}
	if len(ops) == 0 {
		return ""
	}
	// Until the intent is cleared below it stays for the next request,
	// also past this request's own change (held): this request's intent
	// is added to it, not put in its place.
	done := map[FamChain]bool{}
	for _, op := range ops {
		fc := FamChain{op.Family, op.BanChain()}
		if done[fc] {
			continue
		}
		done[fc] = true
		if note := e.readBack(store, fc.Fam, fc.Chain, ops); note != "" {
			store.HoldIntent()
			return note
		}
	}
	for _, op := range ops {
		if op.Kind == policy.AddBan || op.Kind == policy.DeleteBan {
			if err := store.Unsettle(op); err != nil {
				store.HoldIntent()
				return "state: " + err.Error()
			}
		}
	}
	if err := store.ClearIntent(); err != nil {
		store.HoldIntent()
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
func (e *Engine) readBack(store *state.Store, fam policy.Family, chain policy.Chain, cut []policy.Operation) string {
	b, err := e.Open(fam, nil, NoBatch)
	if err != nil {
		return "an earlier change was cut short, and the firewall is unreadable: " + err.Error()
	}
	live := state.New(e.Ctx.LookupPort)
	got, err := b.Read(live, chain)
	if err != nil {
		return "an earlier change was cut short, and the firewall is unreadable: " + err.Error()
	}
	recorded, _, err := store.Load(e.Ctx)
	if err != nil {
		return "an earlier change was cut short, and the state is unreadable: " + err.Error()
	}
	live.Stamp(e.Ports.Now())
	merged := state.ReadBack(recorded, live, fam, chain, got.Exists, cut)
	if err := store.ReplaceChainKeeping(merged, recorded, fam, chain); err != nil {
		return "an earlier change was cut short, and the state could not be repaired: " + err.Error()
	}
	return ""
}
