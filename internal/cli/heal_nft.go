package cli

import (
	"fmt"
	"slices"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/nftables"
	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
)

// missingNFT is missingParts for the nftables backend: the chain's part
// of the family (its sets, which also stand for the implicit return rule)
// and each recorded hook. Both reads are of metadata, not of elements, so
// the check costs the same at any number of bans. A set emptied by hand
// is found by reconcile (the timer), as with the set backend.
func missingNFT(b firewall.Backend, ctx policy.Context, fam policy.Family, chain policy.Chain, hooks []policy.Operation) ([]string, error) {
	ok, err := b.NFT.Part(chain, fam)
	if err != nil {
		return nil, err
	}
	if !ok {
		return []string{"chain or return rule"}, nil
	}
	if len(hooks) == 0 {
		return nil, nil
	}
	live, err := b.NFT.Hooks()
	if err != nil {
		return nil, err
	}
	var missing []string
	for _, h := range hooks {
		want, err := firewall.NFTHook(h, ctx.LookupPort)
		if err != nil {
			continue // a service name this proxy no longer knows: reconcile says so
		}
		if !slices.ContainsFunc(live, func(l nftables.Hook) bool { return nftables.SameHook(l, want) }) {
			missing = append(missing, "hook from "+string(h.Chain))
		}
	}
	return missing, nil
}

// putBackNFT queues what the record holds of one family's chain: its
// part, its verdict and bans (with what is left of max_ban_time), and its
// hooks. Everything is idempotent in the batch (what is there stays, a
// ban already there gets its remaining time), so the caller need not know
// what was lost. It returns the number of bans and hooks queued.
func putBackNFT(x *nftables.Batch, only *state.State, pol *policy.Policy, ctx policy.Context, fam policy.Family, chain policy.Chain, now time.Time) (bans, hooks int) {
	c := only.Tables[fam].Chains[chain]
	if c == nil {
		return 0, 0
	}
	x.EnsureChain(chain, fam)
	list, target := state.NFTBans(c, pol.MaxBanTime, now)
	if len(list) > 0 {
		x.SetVerdict(chain, fam, target)
		x.AddBans(chain, list)
	}
	for _, h := range only.Tables[fam].Hooks {
		if h.Op.Jump != chain {
			continue
		}
		if hk, err := firewall.NFTHook(h.Op, ctx.LookupPort); err == nil {
			x.EnsureHook(hk)
			hooks++
		}
	}
	return len(list), hooks
}

// repairNFT is repairChain for the nftables backend: one transaction.
func repairNFT(store *state.Store, b firewall.Backend, pol *policy.Policy, ctx policy.Context, fam policy.Family, chain policy.Chain, now time.Time) (string, error) {
	all, _, err := store.Load(ctx)
	if err != nil {
		return "", err
	}
	only := all.Only(fam, chain)
	if only.Tables[fam].Chains[chain] == nil {
		return "nothing: the record holds no such chain", nil
	}
	x := b.NFT.NewBatch()
	bans, hooks := putBackNFT(x, only, pol, ctx, fam, chain, now)
	if err := x.Commit(); err != nil {
		return "", err
	}
	if err := store.MarkChainSynced(fam, chain); err != nil {
		return "", err
	}
	return fmt.Sprintf("the chain (%d bans in the record, with its return rule) and %d hook(s)", bans, hooks), nil
}
