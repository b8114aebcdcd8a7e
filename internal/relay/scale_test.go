package relay

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// queueAndLoad queues n IPv6 bans (an attacker rotating addresses) with
// one proxy down, then opens the outbox again as a restart does; it
// returns the time both took, at best of three.
func queueAndLoad(t *testing.T, n int) time.Duration {
	best := time.Duration(1<<63 - 1)
	for range 3 {
		dir := t.TempDir()
		o, err := OpenOutbox(dir, []string{"down"}, nil)
		require.NoError(t, err)
		o.NoSync = true
		began := time.Now()
		for i := range n {
			a := netip.MustParseAddr(fmt.Sprintf("2001:db8:%x:%x::1", i>>16, i&0xffff))
			require.NoError(t, o.Append(Op{Kind: Ban, Addr: netip.PrefixFrom(a, 128)}))
		}
		require.NoError(t, o.Close())
		o, err = OpenOutbox(dir, []string{"down"}, nil)
		require.NoError(t, err)
		took := time.Since(began)
		require.Len(t, o.Pending("down", n+1), n)
		require.NoError(t, o.Close())
		best = min(best, took)
	}
	return best
}

// TestOutboxScalesLinearly: queueing and loading 80,000 IPv6 bans costs
// about eight times what 10,000 cost, not sixty-four (the old outbox
// scanned every live operation for each new one). The test compares the
// two sizes measured side by side, not a wall-clock limit: the bound,
// 24, is three times the linear ratio and a third of the quadratic one.
func TestOutboxScalesLinearly(t *testing.T) {
	if testing.Short() {
		t.Skip("80,000 operations")
	}
	small, large := queueAndLoad(t, 10000), queueAndLoad(t, 80000)
	ratio := float64(large) / float64(small)
	t.Logf("10,000 bans: %s, 80,000: %s, ratio %.1f (linear 8, quadratic 64)", small, large, ratio)
	assert.Less(t, ratio, 24.0)
}

// TestOutboxStepsPerOperationAreBounded counts the outbox's own loop
// steps (deterministic, whatever the machine's load) for the cases that
// were quadratic: queueing distinct addresses, re-banning the same ones,
// and a proxy taking the backlog a few at a time.
func TestOutboxStepsPerOperationAreBounded(t *testing.T) {
	for _, n := range []int{10000, 80000} {
		o, err := OpenOutbox(t.TempDir(), []string{"down", "up"}, nil)
		require.NoError(t, err)
		o.NoSync = true
		for i := range n {
			require.NoError(t, o.Append(Op{Kind: Ban, Addr: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 32)}))
			if i%7 == 0 {
				require.NoError(t, o.Append(Op{Kind: Unban, Addr: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 32)}))
			}
		}
		for seq := uint64(0); seq < o.seq; seq += 10 {
			o.PendingAfter(seq, 10)
			require.NoError(t, o.Taken("up", seq+10))
		}
		queued := o.work
		require.NoError(t, o.Close())
		o, err = OpenOutbox(o.dir, []string{"down", "up"}, nil)
		require.NoError(t, err)
		ops, loaded := o.seq, o.work
		require.NoError(t, o.Close())
		t.Logf("%d operations: %d steps to queue and deliver to one proxy, %d to load", ops, queued, loaded)
		assert.Less(t, queued, 8*int(ops), "steps per operation stay bounded")
		assert.Less(t, loaded, 4*int(ops), "steps per operation stay bounded")
		assert.Equal(t, n, len(slices.DeleteFunc(o.ops, func(op Op) bool { return op.Kind == dead })))
	}
}
