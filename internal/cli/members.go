package cli

import (
	"fmt"

	"github.com/f2b-shim/f2b-shim/internal/audit"
	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
)

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
