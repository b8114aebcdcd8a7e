package nftables

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/policy"
)

// A named object or flowtable in the table is not the shim's: read back
// lists it as foreign, so that reconcile shows it and the table is not
// taken for an empty one of the shim's and deleted with it.
func TestSystemObjectsAndFlowtablesAreForeign(t *testing.T) {
	tbl, ns := nsTable(t)
	require.NoError(t, tbl.Do(func(b *Batch) { ensureBoth(b, "mail-remote-f2b-imap") }))
	ns.MustRun(t, "nft", "add", "counter", "inet", DefaultTable, "seen")
	ns.MustRun(t, "nft", "add", "quota", "inet", DefaultTable, "q", "{ over 1 mbytes ; }")
	snap, err := tbl.ReadBack()
	require.NoError(t, err)
	assert.Contains(t, snap.Foreign, `object "seen"`)
	assert.Contains(t, snap.Foreign, `object "q"`)
	assert.Len(t, snap.Foreign, 2, "nothing else: %q", snap.Foreign)
}

// When an interval ban's timeout is up the kernel stops listing its start
// element, but its end element, which carries no timeout, stays until the
// set's next garbage collection (a later commit to it). That is the
// kernel lifting a ban as asked, not something foreign in the table: read
// back must not report it, or every expired prefix ban made reconcile and
// status fail until the next ban into the chain.
func TestSystemAnExpiredIntervalLeavesNothingForeign(t *testing.T) {
	tbl, _ := nsTable(t)
	require.NoError(t, tbl.Do(func(b *Batch) {
		ensureBoth(b, "mail-remote-f2b-imap")
		b.SetVerdict("mail-remote-f2b-imap", policy.IPv4, drop)
		b.AddBans("mail-remote-f2b-imap", bans(time.Second, "198.51.100.0/28", "203.0.113.16/28"))
	}))
	// Long past the timeout, with no commit since: no wall-clock bound
	// is asserted, the kernel only has to have lifted the bans.
	time.Sleep(2500 * time.Millisecond)
	snap, err := tbl.ReadBack()
	require.NoError(t, err)
	assert.Empty(t, snap.Chains["mail-remote-f2b-imap"].Bans[policy.IPv4], "the kernel lifted both bans")
	assert.Empty(t, snap.Foreign)
}

// A table the policy names that is someone else's, with a base chain
// "input" on the shim's hook and priority but policy drop: ensuring the
// shim's base chain sent it again with policy accept, and the kernel
// changed the other's chain to accept every packet its rules do not
// drop. A table made dormant was woken the same way (the table is sent
// again with no flags). The shim must leave both as they are.
func TestSystemEnsuringTheTableChangesNoOneElsesChainOrFlags(t *testing.T) {
	t.Run("a base chain input with policy drop is refused, not turned to accept", func(t *testing.T) {
		tbl, ns := nsTable(t)
		ns.MustRun(t, "nft", "add", "table", "inet", DefaultTable)
		ns.MustRun(t, "nft", "add", "chain", "inet", DefaultTable, "input", "{ type filter hook input priority -1 ; policy drop ; }")
		err := tbl.Do(func(b *Batch) { ensureBoth(b, "mail-remote-f2b-imap") })
		require.Error(t, err)
		assert.Contains(t, err.Error(), "not the shim's")
		assert.Contains(t, ns.MustRun(t, "nft", "list", "chain", "inet", DefaultTable, "input"), "policy drop")
	})
	t.Run("a dormant table stays dormant", func(t *testing.T) {
		tbl, ns := nsTable(t)
		require.NoError(t, tbl.Do(func(b *Batch) { ensureBoth(b, "mail-remote-f2b-imap") }))
		ns.MustRun(t, "nft", "add", "table", "inet", DefaultTable, "{ flags dormant ; }")
		require.NoError(t, tbl.Do(func(b *Batch) { ensureBoth(b, "mail-remote-f2b-ssh") }))
		assert.Contains(t, ns.MustRun(t, "nft", "list", "table", "inet", DefaultTable), "flags dormant")
	})
}
