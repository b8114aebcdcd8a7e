package engine_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/internal/nftables"
	"github.com/f2b-shim/f2b-shim/policy"
)

// A ban whose shim was killed after the kernel took it and before the
// record did is read back from the table by the next request. The kernel
// lifts it after max_ban_time; the record must not put it back after
// that (a flushed ruleset healed on contact), nor keep it past expire.
func TestNFTablesABanReadBackAfterACrashStillExpires(t *testing.T) {
	r := newNFTRig(t)
	r.start(1)
	cut := r.op("iptables -w -I " + chain + " 1 -s 198.51.100.77 -j REJECT --reject-with icmp-port-unreachable")
	require.NoError(t, r.store.SetIntent(cut))
	// The killed shim's transaction reached the kernel; its record did not.
	r.ns.MustRun(t, "nft", "add", "element", "inet", nftables.DefaultTable, chain+"-v4-addr", "{ 198.51.100.77 timeout 1h }")
	r.e.FinishCutShort(r.store)
	require.Equal(t, 2, r.recorded(policy.IPv4), "the ban was read back into the record")

	// Two hours on: the kernel lifted it long ago; a reload then wipes
	// the table, and the next contact heals it from the record.
	r.now = r.now.Add(2 * time.Hour)
	s, _, err := r.store.Load(r.e.Ctx)
	require.NoError(t, err)
	assert.Len(t, s.Expired(r.now.Add(-r.e.Pol.MaxBanTime)), 2, "expire lifts both bans from the record")
	r.ns.MustRun(t, "nft", "flush", "ruleset")
	_, err = r.serve(ban(5))
	require.NoError(t, err)
	elems := r.ns.MustRun(t, "nft", "list", "set", "inet", nftables.DefaultTable, chain+"-v4-addr")
	assert.NotContains(t, elems, "198.51.100.77", "a ban past max_ban_time is not put back")
}
