package engine_test

import (
	"errors"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/internal/audit"
	"github.com/f2b-shim/f2b-shim/internal/engine"
	"github.com/f2b-shim/f2b-shim/internal/engine/enginetest"
	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/hostnet"
	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
)

const chain = "mail-remote-f2b-sshd"

// rig is an engine on the recording fake, with a real record.
type rig struct {
	t     *testing.T
	e     *engine.Engine
	fw    *enginetest.Firewall
	store *state.Store
	now   time.Time
}

func newRig(t *testing.T) *rig {
	pol := policy.Default()
	pol.Name, pol.StateDir = "test", t.TempDir()
	ctx := policy.Context{LocalAddrs: []netip.Addr{netip.MustParseAddr("192.0.2.1")}, LookupPort: hostnet.LookupPort}
	r := &rig{t: t, fw: enginetest.New(), now: time.Date(2026, 12, 1, 5, 0, 0, 0, time.UTC)}
	r.e = &engine.Engine{Pol: pol, Ctx: ctx, Deadline: time.Now().Add(time.Minute), OpenBackend: r.fw.Open,
		Ports: engine.Ports{Now: func() time.Time { return r.now }}}
	store, err := state.Open(pol, ctx.LookupPort, time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { store.Close() })
	r.store = store
	return r
}

func (r *rig) op(line string) policy.Operation {
	op, err := policy.Decide(r.e.Pol, line, r.e.Ctx)
	require.NoError(r.t, err, line)
	return op
}

// serve does what one-shot mode does with a judged request: heal, note
// the intent, serve.
func (r *rig) serve(line string) (firewall.Outcome, error) {
	op := r.op(line)
	b, err := r.e.Open(op.Family, r.store, engine.NoBatch)
	require.NoError(r.t, err)
	if engine.HealsFirst(op.Kind) {
		if _, err := r.e.HealOnContact(r.store, b, op.Family, op.BanChain(), nil, nil); err != nil {
			return 0, err
		}
	}
	if state.Changes(op.Kind) {
		require.NoError(r.t, r.store.SetIntent(op))
	}
	var rec audit.Record
	return r.e.Serve(r.store, b, op, &rec, r.now)
}

func (r *rig) start(bans int) {
	for _, line := range []string{
		"iptables -w -N " + chain,
		"iptables -w -A " + chain + " -j RETURN",
		"iptables -w -I INPUT -p tcp -m multiport --dports 22,25 -j " + chain,
		"ip6tables -w -N " + chain,
		"ip6tables -w -A " + chain + " -j RETURN",
	} {
		_, err := r.serve(line)
		require.NoError(r.t, err, line)
	}
	for i := range bans {
		_, err := r.serve(ban(i))
		require.NoError(r.t, err)
	}
}

func ban(i int) string {
	return fmt.Sprintf("iptables -w -I %s 1 -s 203.0.113.%d -j REJECT --reject-with icmp-port-unreachable", chain, i+1)
}

func (r *rig) recorded(fam policy.Family) int {
	s, _, err := r.store.Load(r.e.Ctx)
	require.NoError(r.t, err)
	c := s.Tables[fam].Chains[chain]
	if c == nil {
		return -1
	}
	return c.Len()
}

func (r *rig) live(fam policy.Family) int {
	c := r.fw.Live.Tables[fam].Chains[chain]
	if c == nil {
		return -1
	}
	return c.Len()
}

func TestServeRecordsWhatItAppliedAndClearsTheIntent(t *testing.T) {
	r := newRig(t)
	r.start(3)
	assert.Equal(t, 3, r.recorded(policy.IPv4))
	assert.Equal(t, 3, r.live(policy.IPv4))
	intent, err := r.store.Intent(r.e.Ctx)
	require.NoError(t, err)
	assert.Empty(t, intent, "recording a change clears its intent")

	out, err := r.serve(ban(0))
	require.NoError(t, err)
	assert.Equal(t, firewall.Unchanged, out, "a re-ban changes nothing")
	out, err = r.serve(fmt.Sprintf("iptables -w -D %s -s 203.0.113.1 -j REJECT --reject-with icmp-port-unreachable", chain))
	require.NoError(t, err)
	assert.Equal(t, firewall.Applied, out)
	assert.Equal(t, 2, r.recorded(policy.IPv4))
	assert.Equal(t, 2, r.live(policy.IPv4))
}

func TestServeRefusals(t *testing.T) {
	tests := []struct {
		name  string
		setup func(r *rig)
		line  string
	}{
		{"past max_new_bans_per_minute a new ban is denied", func(r *rig) { r.e.Pol.MaxNewBansPerMinute = 2 }, ban(5)},
		{"a ban the backend fails changes neither firewall nor record", func(r *rig) { r.fw.FailApply = policy.AddBan }, ban(5)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newRig(t)
			r.start(2)
			tt.setup(r)
			applies := r.fw.Count("Apply")
			_, err := r.serve(tt.line)
			require.Error(t, err)
			assert.Equal(t, 2, r.recorded(policy.IPv4), "the record holds what it held")
			assert.Equal(t, 2, r.live(policy.IPv4), "the firewall holds what it held")
			if errors.Is(err, firewall.ErrLimit) {
				assert.Equal(t, applies, r.fw.Count("Apply"), "a denied ban never reaches the backend")
				intent, ierr := r.store.Intent(r.e.Ctx)
				require.NoError(t, ierr)
				assert.Empty(t, intent, "a denial changed nothing: no intent to read back")
			}
		})
	}
}

func TestHealOnContactPutsBackWhatTheFirewallLost(t *testing.T) {
	tests := []struct {
		name string
		wipe func(fw *enginetest.Firewall)
		puts int // one per family that lost the chain
	}{
		{"the whole firewall (nft flush ruleset)", func(fw *enginetest.Firewall) { fw.Live = state.New(nil) }, 2},
		{"the hook", func(fw *enginetest.Firewall) { fw.Live.Tables[policy.IPv4].Hooks = nil }, 1},
		{"the ban chain's return rule (a flush)", func(fw *enginetest.Firewall) {
			fw.Live.Apply(policy.Operation{Command: policy.Command{Family: policy.IPv4, Kind: policy.FlushChain, Chain: chain}}, time.Time{})
		}, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newRig(t)
			r.start(50)
			tt.wipe(r.fw)
			puts := r.fw.Count("PutBack")
			out, err := r.serve(ban(60))
			require.NoError(t, err)
			assert.Equal(t, firewall.Applied, out)
			assert.Equal(t, 51, r.live(policy.IPv4), "every recorded ban is back, and the new one")
			assert.Equal(t, 51, r.recorded(policy.IPv4), "the record lost nothing")
			assert.Len(t, r.fw.Live.Tables[policy.IPv4].Hooks, 1, "the hook is back, once")
			assert.Equal(t, puts+tt.puts, r.fw.Count("PutBack "+chain), "one put-back per family that lost the chain")

			// The next request finds nothing missing.
			puts = r.fw.Count("PutBack")
			_, err = r.serve(ban(61))
			require.NoError(t, err)
			assert.Equal(t, puts, r.fw.Count("PutBack"))
		})
	}
}

func TestHealOnContactLeavesChainsTheBatchChecked(t *testing.T) {
	r := newRig(t)
	r.start(1)
	r.fw.Live = state.New(nil)
	b, err := r.e.Open(policy.IPv4, r.store, engine.StreamBatch)
	require.NoError(t, err)
	checked := map[engine.FamChain]bool{{Fam: policy.IPv6, Chain: chain}: true}
	note, err := r.e.HealOnContact(r.store, b, policy.IPv4, chain, checked, nil)
	require.NoError(t, err)
	assert.Contains(t, note, "repaired: ipv4 "+chain)
	assert.NotContains(t, note, "ipv6", "the batch had checked the ipv6 chain")
	assert.Equal(t, -1, r.live(policy.IPv6))

	delete(checked, engine.FamChain{Fam: policy.IPv6, Chain: chain})
	r.fw.Live = state.New(nil)
	note, err = r.e.HealOnContact(r.store, b, policy.IPv4, chain, checked, nil)
	require.NoError(t, err)
	assert.Contains(t, note, "repaired: ipv6 "+chain, "a reload rarely takes one chain alone")
	assert.Equal(t, 0, r.live(policy.IPv6))
	assert.True(t, checked[engine.FamChain{Fam: policy.IPv6, Chain: chain}])
}

func TestFinishCutShortNeverForgetsARecordedBan(t *testing.T) {
	r := newRig(t)
	r.start(20)
	// A shim was killed after noting the intent of a ban; the firewall
	// has lost everything since (a reload).
	require.NoError(t, r.store.SetIntent(r.op(ban(30))))
	r.fw.Live = state.New(nil)
	note := r.e.FinishCutShort(r.store)
	assert.Contains(t, note, "was cut short")
	assert.Equal(t, 20, r.recorded(policy.IPv4), "a missing live chain is drift to put back, never a reason to forget")
	intent, err := r.store.Intent(r.e.Ctx)
	require.NoError(t, err)
	assert.Empty(t, intent)
}

func TestFinishCutShortLearnsWhatReachedTheFirewall(t *testing.T) {
	r := newRig(t)
	r.start(2)
	// Killed between the firewall and the record.
	op := r.op(ban(9))
	require.NoError(t, r.store.SetIntent(op))
	r.fw.Live.Apply(op, time.Time{})
	r.e.FinishCutShort(r.store)
	assert.Equal(t, 3, r.recorded(policy.IPv4))
	has, err := r.store.HasBan(op)
	require.NoError(t, err)
	assert.True(t, has)
}

func TestABatchThatFailsInPartTakesBackOnlyItsFailures(t *testing.T) {
	r := newRig(t)
	r.start(0)
	b, err := r.e.Open(policy.IPv4, r.store, engine.StreamBatch)
	require.NoError(t, err)
	r.fw.FailFlush = map[string]bool{"203.0.113.2/32": true}
	var ops []policy.Operation
	for i := range 3 {
		op := r.op(ban(i))
		ops = append(ops, op)
		require.NoError(t, r.store.SetIntent(op))
		b.Queue(op, i)
		var rec audit.Record
		_, err := r.e.Serve(r.store, b, op, &rec, r.now)
		require.NoError(t, err)
	}
	assert.Equal(t, 0, r.live(policy.IPv4), "nothing reaches the firewall before the flush")
	failed := b.Flush()
	require.Len(t, failed, 1)
	require.Contains(t, failed, 1)
	require.NoError(t, engine.TakeBack(r.store, ops[1], r.now))
	assert.Equal(t, 2, r.live(policy.IPv4))
	assert.Equal(t, 2, r.recorded(policy.IPv4), "the record holds exactly what reached the firewall")
	assert.Equal(t, 1, r.fw.Count("Flush"), "one batch, one flush")
}

// A request that finds an earlier change cut short, and cannot read its
// chain back (the firewall does not answer), goes on with its own change.
// Its intent replaced the earlier one, and the audit line cleared it, so
// the ban the killed shim put into the firewall was never read back: the
// firewall held a ban the state did not.
func TestAnIntentThatCouldNotBeReadBackOutlivesTheNextRequest(t *testing.T) {
	r := newRig(t)
	r.start(2)
	r.store.KeepIntent = true
	// Killed between the firewall and the record.
	cut := r.op(ban(9))
	require.NoError(t, r.store.SetIntent(cut))
	r.fw.Live.Apply(cut, time.Time{})

	// The next request, as one-shot mode serves it, while reads fail.
	r.fw.FailRead = true
	note := r.e.FinishCutShort(r.store)
	assert.Contains(t, note, "unreadable")
	next := r.op(ban(10))
	b, err := r.e.Open(policy.IPv4, r.store, engine.NoBatch)
	require.NoError(t, err)
	require.NoError(t, r.store.SetIntent(next))
	var rec audit.Record
	_, err = r.e.Serve(r.store, b, next, &rec, r.now)
	require.NoError(t, err)
	require.NoError(t, r.store.SettleIntent(), "its audit line is written")

	// The one after, once the firewall answers again.
	r.fw.FailRead = false
	r.store.Close()
	again, err := state.Open(r.e.Pol, r.e.Ctx.LookupPort, time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { again.Close() })
	r.store = again
	assert.Contains(t, r.e.FinishCutShort(r.store), "cut short")
	has, err := r.store.HasBan(cut)
	require.NoError(t, err)
	assert.True(t, has, "the ban the killed shim made is in the record")
	intent, err := r.store.Intent(r.e.Ctx)
	require.NoError(t, err)
	assert.Empty(t, intent, "read back, the intent is gone")
}
