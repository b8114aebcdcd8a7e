package nftables

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
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
