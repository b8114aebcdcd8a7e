package integration

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/test/nstest"
)

// TestAdminCommandsOnNftables: what the admin's commands say on the
// nftables backend. "f2b-shim unban CHAIN ADDR" tries every target of the
// policy, and the table holds one verdict per chain and family, so a
// check finds the address under every target: the admin saw one "note:
// the state did not hold the ban" per other target (seven with the
// default targets) for a ban the state held. "reconcile --fix" said to
// delete a hook it left with iptables, which neither sees the shim's
// table nor, on a pure nftables proxy, is installed.
func TestAdminCommandsOnNftables(t *testing.T) {
	nstest.RequireRoot(t, "nft")
	dir := t.TempDir()
	pol := nstest.WritePolicy(t, dir, fmt.Sprintf("name = \"it-nft-admin\"\naudit_log = %q\nstate_dir = %q\nbackend = \"nftables\"\n",
		filepath.Join(dir, "audit.jsonl"), filepath.Join(dir, "state")))
	ns := nstest.NewNetns(t)
	runAll(t, ns, pol, jailStart[:4]...)

	t.Run("a ban the state holds is lifted with one line and no note", func(t *testing.T) {
		r := admin(t, ns, pol, "unban", chain, "203.0.113.45")
		require.Equal(t, 0, r.Code, r.Stderr)
		assert.NotContains(t, r.Stdout, "note:")
		assert.Equal(t, "applied: iptables -w -D "+chain+" -s 203.0.113.45/32 -j REJECT --reject-with icmp-port-unreachable\n", r.Stdout)
		assert.NotContains(t, ns.MustRun(t, "nft", "list", "table", "inet", "f2b_shim"), "203.0.113.45")
	})
	t.Run("a ban only the table holds gets one note and is lifted", func(t *testing.T) {
		ns.MustRun(t, "nft", "add", "element", "inet", "f2b_shim", chain+"-v4-addr", "{ 203.0.113.99 }")
		r := admin(t, ns, pol, "unban", chain, "203.0.113.99")
		require.Equal(t, 0, r.Code, r.Stderr)
		assert.Equal(t, 1, strings.Count(r.Stdout, "note: the state did not hold the ban"), r.Stdout)
		assert.NotContains(t, ns.MustRun(t, "nft", "list", "table", "inet", "f2b_shim"), "203.0.113.99")
	})
	t.Run("reconcile --fix says to delete a hook it leaves with nft, not iptables", func(t *testing.T) {
		ns.MustRun(t, "nft", "add", "rule", "inet", "f2b_shim", "input", "meta", "nfproto", "ipv4", "tcp", "dport", "25", "jump", chain)
		r := admin(t, ns, pol, "reconcile", "--fix")
		assert.Equal(t, 1, r.Code, r.Stdout+r.Stderr)
		assert.Contains(t, r.Stdout, "nft delete rule inet f2b_shim input handle N")
		assert.NotContains(t, r.Stdout, "iptables -D")
	})
	t.Run("an address banned nowhere is not banned", func(t *testing.T) {
		r := admin(t, ns, pol, "unban", chain, "203.0.113.98")
		assert.Equal(t, 1, r.Code)
		assert.Contains(t, r.Stdout, "is not banned in "+chain)
	})
}
