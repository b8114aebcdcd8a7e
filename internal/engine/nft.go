package engine

import (
	"fmt"
	"slices"
	"strings"

	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/nftables"
	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
)

// nft is the nftables backend: the shim's own inet table, changed over
// netlink (package nftables), with no program at all. A batch is one
// kernel transaction.
type nft struct {
	e    *Engine
	fam  policy.Family
	b    firewall.Backend
	kind BatchKind
}

func (n *nft) Apply(op policy.Operation) (firewall.Outcome, error) { return firewall.Apply(n.b, op) }

func (n *nft) Queue(op policy.Operation, ticket int) {
	q := n.b.NFTQueue
	if q == nil {
		return
	}
	if n.kind == StreamBatch {
		// Bans and unbans go into the batch's transaction; a widened
		// unban goes on its own: whether its prefix goes depends on the
		// record of its members.
		q.Queue = op.Kind == policy.AddBan || op.Kind == policy.DeleteBan && !op.Member.IsValid()
	}
	q.Ticket = ticket
}

func (n *nft) Flush() map[int]error {
	if n.b.NFTQueue == nil {
		return nil
	}
	return n.b.NFTQueue.Flush()
}

func (n *nft) Read(live *state.State, chain policy.Chain) (Read, error) {
	snap, err := n.b.NFT.ReadBack()
	if err != nil {
		return Read{}, err
	}
	out := Read{Foreign: state.FromNFT(live, n.fam, snap, n.e.Pol, n.e.Ctx, chain)}
	if cs := snap.Chains[chain]; chain != "" && cs != nil {
		out.Exists = cs.Returns(n.fam)
	}
	return out, nil
}

// Missing reads the chain's part of the family (its sets, which also
// stand for the implicit return rule) and the hooks: metadata, not
// elements, so the check costs the same at any number of bans. No ban
// is probed: a re-ban adds its element whatever the record says, which
// puts back a ban the firewall lost. A set emptied by hand is found by
// reconcile (the timer), as with the set backend.
func (n *nft) Missing(chain policy.Chain, shape state.Shape, hooks []policy.Operation, _ *policy.Operation) ([]string, error) {
	var ok, matched bool
	var err error
	if shape.Bans > 0 {
		// A flushed ban chain keeps its sets: the bans are there, and
		// without their verdict rules they stop nothing. One read tells
		// both, and whether each set is there.
		ok, matched, err = n.b.NFT.Matched(chain, n.fam)
	} else {
		// No ban, so no verdict rule yet; but a set deleted by hand
		// would fail the first ban's transaction.
		ok, matched, err = n.b.NFT.Whole(chain, n.fam)
	}
	if err != nil {
		return nil, err
	}
	if !ok {
		return []string{"chain or return rule"}, nil
	}
	var missing []string
	if !matched {
		missing = append(missing, "set or verdict rule")
	}
	if len(hooks) == 0 {
		return missing, nil
	}
	live, err := n.b.NFT.Hooks()
	if err != nil {
		return nil, err
	}
	for _, h := range hooks {
		want, err := firewall.NFTHook(h, n.e.Ctx.LookupPort)
		if err != nil {
			continue // a service name this proxy no longer knows: reconcile says so
		}
		if !slices.ContainsFunc(live, func(l nftables.Hook) bool { return nftables.SameHook(l, want) }) {
			missing = append(missing, "hook from "+string(h.Chain))
		}
	}
	return missing, nil
}

// PutBack queues, for each chain, what the record holds: its part, its
// verdict and bans (each with what is left of max_ban_time), and its
// hooks, and commits them as one transaction. Everything in it is
// idempotent (what is there stays, a ban already there gets its
// remaining time), so it need not know what was lost.
func (n *nft) PutBack(s *state.State, chains []policy.Chain) (string, error) {
	if len(chains) == 0 {
		chains = s.Tables[n.fam].ChainNames()
	}
	x := n.b.NFT.NewBatch()
	var said []string
	for _, chain := range chains {
		c := s.Tables[n.fam].Chains[chain]
		if c == nil {
			said = append(said, "nothing of "+string(chain)+": the record holds no such chain")
			continue
		}
		x.EnsureChain(chain, n.fam)
		list, target := state.NFTBans(c, n.e.Pol.MaxBanTime, n.e.Ports.Now())
		if len(list) > 0 {
			x.SetVerdict(chain, n.fam, target)
			x.AddBans(chain, list)
		}
		hooks := 0
		for _, h := range s.Tables[n.fam].Hooks {
			if h.Op.Jump != chain {
				continue
			}
			if hk, err := firewall.NFTHook(h.Op, n.e.Ctx.LookupPort); err == nil {
				x.EnsureHook(hk)
				hooks++
			}
		}
		said = append(said, fmt.Sprintf("the chain (%s in the record, with its return rule) and %d hook(s)", bans(len(list)), hooks))
	}
	if err := x.Commit(); err != nil {
		return "", err
	}
	return strings.Join(said, "; "), nil
}
