package state

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/internal/hostnet"
	"github.com/f2b-shim/f2b-shim/policy"
)

const hookLine = "iptables -w -I INPUT -p tcp -m multiport --dports 143,993 -j " + chain

// recordedChain is a chain with its return rule, its hook and n bans.
func recordedChain(t *testing.T, n int) *State {
	s := New(hostnet.LookupPort)
	at := time.Unix(1_800_000_000, 0)
	for _, l := range []string{"iptables -w -N " + chain, "iptables -w -A " + chain + " -j RETURN", hookLine} {
		s.Apply(op(t, l), at)
	}
	for i := range n {
		s.Apply(op(t, fmt.Sprintf("iptables -w -I %s 1 -s 203.0.113.%d -j DROP", chain, i+1)), at.Add(time.Duration(i)*time.Second))
	}
	return s
}

func banSet(s *State) map[string]bool {
	out := map[string]bool{}
	if c := s.Tables[policy.IPv4].Chains[chain]; c != nil {
		for _, b := range c.Bans() {
			out[b.Op.Source.Addr().String()] = true
		}
	}
	return out
}

func TestReadBackNeverDropsWhatTheFirewallLost(t *testing.T) {
	ban := func(i int) string { return fmt.Sprintf("iptables -w -I %s 1 -s 203.0.113.%d -j DROP", chain, i) }
	unban := func(i int) string { return fmt.Sprintf("iptables -w -D %s -s 203.0.113.%d -j DROP", chain, i) }
	tests := []struct {
		name      string
		live      func(*State) // what the live firewall holds of the chain
		liveChain bool
		cut       []string
		// wantBans are the addresses (203.0.113.N) the result holds; 0
		// means all ten recorded ones and nothing else.
		wantBans []int
		wantHook bool
		gone     bool
	}{
		{"a failed ban into a chain that a reload deleted keeps every ban", nil, false, []string{ban(99)}, nil, true, false},
		{"a failed ban into a flushed chain keeps every ban", func(*State) {}, true, []string{ban(99)}, nil, true, false},
		{"a failed start (-N) keeps every ban", nil, false, []string{"iptables -w -N " + chain}, nil, true, false},
		{"a failed hook keeps the recorded hook", nil, false, []string{hookLine}, nil, true, false},
		{"a ban that reached the firewall is learned", func(l *State) { l.Apply(op(t, ban(99)), time.Time{}) }, true, []string{ban(99)}, []int{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 99}, true, false},
		{"an unban the firewall shows done is taken", func(l *State) {
			for i := 1; i <= 9; i++ {
				l.Apply(op(t, ban(i)), time.Time{})
			}
		}, true, []string{unban(10)}, []int{1, 2, 3, 4, 5, 6, 7, 8, 9}, true, false},
		{"an unban into a deleted chain is taken: it was asked for", nil, false, []string{unban(10)}, []int{1, 2, 3, 4, 5, 6, 7, 8, 9}, true, false},
		{"a flush that was asked for empties the chain", func(*State) {}, true, []string{"iptables -w -F " + chain}, []int{}, true, false},
		{"a delete of the chain that was asked for forgets it", nil, false, []string{"iptables -w -X " + chain}, []int{}, false, true},
		{"a hook delete that was asked for forgets the hook", func(*State) {}, true, []string{"iptables -w -D INPUT -p tcp -m multiport --dports 143,993 -j " + chain}, nil, false, false},
		{"a change to another chain leaves this one alone", nil, false, []string{"iptables -w -X mail-remote-f2b-other"}, nil, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			recorded, live := recordedChain(t, 10), New(hostnet.LookupPort)
			if tt.live != nil {
				live.Apply(op(t, "iptables -w -N "+chain), time.Time{})
				tt.live(live)
			}
			var cut []policy.Operation
			for _, l := range tt.cut {
				cut = append(cut, op(t, l))
			}
			got := ReadBack(recorded, live, policy.IPv4, chain, tt.liveChain, cut)
			c := got.Tables[policy.IPv4].Chains[chain]
			if tt.gone {
				assert.Nil(t, c)
				assert.Empty(t, got.Tables[policy.IPv4].Hooks)
				return
			}
			require.NotNil(t, c, "the chain stays recorded")
			want := map[string]bool{}
			if tt.wantBans == nil {
				tt.wantBans = []int{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
			}
			for _, i := range tt.wantBans {
				want[fmt.Sprintf("203.0.113.%d", i)] = true
			}
			assert.Equal(t, want, banSet(got))
			assert.Equal(t, tt.wantHook, len(got.Tables[policy.IPv4].Hooks) == 1)
		})
	}
}

// TestNoReadBackDropsARecordedBan is the property: whatever the live chain
// holds (nothing, a part, other bans, no chain at all) and whatever was
// cut short, a recorded ban leaves the record only when a cut-short unban
// or flush of it explains its absence.
func TestNoReadBackDropsARecordedBan(t *testing.T) {
	r := rand.New(rand.NewPCG(20, 20))
	kinds := []string{"ban", "unban", "-N", "-A", "hook", "-F", "-X"}
	for round := range 2000 {
		n := r.IntN(20)
		recorded, live := recordedChain(t, n), New(hostnet.LookupPort)
		liveChain := r.IntN(3) > 0
		if liveChain {
			live.Apply(op(t, "iptables -w -N "+chain), time.Time{})
			for i := 1; i <= 30; i++ {
				if r.IntN(2) == 0 {
					live.Apply(op(t, fmt.Sprintf("iptables -w -I %s 1 -s 203.0.113.%d -j DROP", chain, i)), time.Time{})
				}
			}
		}
		var cut []policy.Operation
		explained := map[string]bool{}
		flushed := false
		for range r.IntN(4) {
			i := 1 + r.IntN(30)
			switch kinds[r.IntN(len(kinds))] {
			case "ban":
				cut = append(cut, op(t, fmt.Sprintf("iptables -w -I %s 1 -s 203.0.113.%d -j DROP", chain, i)))
			case "unban":
				cut = append(cut, op(t, fmt.Sprintf("iptables -w -D %s -s 203.0.113.%d -j DROP", chain, i)))
				explained[fmt.Sprintf("203.0.113.%d", i)] = true
			case "-N":
				cut = append(cut, op(t, "iptables -w -N "+chain))
			case "-A":
				cut = append(cut, op(t, "iptables -w -A "+chain+" -j RETURN"))
			case "hook":
				cut = append(cut, op(t, hookLine))
			case "-F":
				cut = append(cut, op(t, "iptables -w -F "+chain))
				flushed = true
			case "-X":
				cut = append(cut, op(t, "iptables -w -X "+chain))
				flushed = true
			}
		}
		got := banSet(ReadBack(recorded, live, policy.IPv4, chain, liveChain, cut))
		liveBans := banSet(live)
		for b := range banSet(recorded) {
			if !got[b] && !liveBans[b] {
				require.True(t, flushed || explained[b], "round %d: recorded ban %s was dropped (live chain: %v, cut: %v)", round, b, liveChain, cut)
			}
		}
	}
}

// TestAReadBackKeepsWhatThePolicyRefusesNow: Load skips the records the
// policy refuses at the moment; writing a read back made from what it
// loaded must not erase them, whether the chain is read back with bans
// or Load refused the chain itself.
func TestAReadBackKeepsWhatThePolicyRefusesNow(t *testing.T) {
	pol := testPolicy(t)
	s := open(t, pol)
	now := time.Now()
	for _, line := range []string{"iptables -N " + chain, "iptables -I " + chain + " 1 -s 203.0.113.1 -j DROP", "iptables -I " + chain + " 1 -s 203.0.113.2 -j DROP"} {
		require.NoError(t, s.Record(op(t, line), true, now))
	}
	refusing := policy.Context{LookupPort: ctx.LookupPort, Client: netip.MustParseAddr("203.0.113.2")}
	t.Run("a refused ban stays in a chain read back", func(t *testing.T) {
		loaded, _, err := s.Load(refusing)
		require.NoError(t, err)
		require.Equal(t, 1, loaded.Tables[policy.IPv4].Chains[chain].Len(), "the client's address is refused")
		require.NoError(t, s.ReplaceChainKeeping(ReadBack(loaded, New(ctx.LookupPort), policy.IPv4, chain, false, nil), loaded, policy.IPv4, chain))
		all, _, err := s.Load(ctx)
		require.NoError(t, err)
		assert.Equal(t, 2, all.Tables[policy.IPv4].Chains[chain].Len())
		n, err := s.BanCount(policy.IPv4, chain)
		require.NoError(t, err)
		assert.Equal(t, 2, n)
	})
	t.Run("a chain the policy refuses stays whole", func(t *testing.T) {
		other := *pol
		other.ChainPrefix = "other-"
		so := &Store{db: s.db, pol: &other, lookup: s.lookup}
		loaded, _, err := so.Load(ctx)
		require.NoError(t, err)
		require.Empty(t, loaded.Tables[policy.IPv4].Chains)
		require.NoError(t, so.ReplaceChainKeeping(ReadBack(loaded, New(ctx.LookupPort), policy.IPv4, chain, false, nil), loaded, policy.IPv4, chain))
		all, _, err := s.Load(ctx)
		require.NoError(t, err)
		assert.Equal(t, 2, all.Tables[policy.IPv4].Chains[chain].Len())
	})
}
