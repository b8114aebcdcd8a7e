package integration

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestAdminMessagesSayWhatToDo: the admin commands' answers in the cases
// issue 22 met, each saying what to do, against the real iptables.
func TestAdminMessagesSayWhatToDo(t *testing.T) {
	ns, pol, _ := setup(t, "nft", "")

	t.Run("a ban into a chain that does not exist says to start the jail, not iptables' words", func(t *testing.T) {
		r := admin(t, ns, pol, "ban", chain, "203.0.113.50")
		assert.Equal(t, 4, r.Code)
		assert.Contains(t, r.Stderr, `chain "`+chain+`" does not exist in the ipv4 firewall: fail2ban creates it when the jail starts`)
		assert.NotContains(t, r.Stderr, "incompatible")
	})
	t.Run("a summary of no records is one clear line", func(t *testing.T) {
		r := admin(t, ns, pol, "audit", "--summary", "--ip", "203.0.113.250")
		assert.Equal(t, 0, r.Code)
		assert.Contains(t, r.Stdout, "no audit records")
		assert.NotContains(t, r.Stdout, "CLIENT")
	})

	runAll(t, ns, pol, jailStart...)
	t.Run("list counts one ban as one ban", func(t *testing.T) {
		r := admin(t, ns, pol, "list")
		assert.Contains(t, r.Stdout, "ipv6 "+chain+": 1 ban, return rule")
		r = admin(t, ns, pol, "status")
		assert.Contains(t, r.Stdout, "2 chains, 3 bans")
	})

	ns.MustRun(t, "iptables-nft", "-I", chain, "1", "-s", "203.0.113.77", "-j", "DROP")
	ns.MustRun(t, "iptables-nft", "-I", chain, "1", "-s", "0.0.0.0/0", "-j", "ACCEPT")
	t.Run("reconcile --fix says how to clear what it leaves", func(t *testing.T) {
		r := admin(t, ns, pol, "reconcile", "--fix")
		assert.Equal(t, 1, r.Code)
		assert.Contains(t, r.Stdout, "left: 2 unexpected or duplicate rules, for you to check; what clears each:")
		assert.Contains(t, r.Stdout, "to clear: lift it: f2b-shim unban "+chain+" 203.0.113.77;")
		assert.Contains(t, r.Stdout, "to clear: remove it, if nobody needs it: iptables -D "+chain+" -j ACCEPT")
	})
	t.Run("unban lifts a ban only the firewall holds, and says so", func(t *testing.T) {
		r := admin(t, ns, pol, "unban", chain, "203.0.113.77")
		require.Equal(t, 0, r.Code, r.Stdout+r.Stderr)
		assert.Contains(t, r.Stdout, `the state did not hold the ban`)
		assert.NotContains(t, ns.Rules(t, "iptables", "nft"), "203.0.113.77")
		r = admin(t, ns, pol, "unban", chain, "203.0.113.77")
		assert.Equal(t, 1, r.Code)
		assert.Contains(t, r.Stdout, "neither the state nor the firewall holds a ban of it there")
	})
}
