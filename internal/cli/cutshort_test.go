package cli

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/internal/hostnet"
	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
)

// A shim that was killed, or whose state write failed (a full state_dir),
// after the firewall took its changes leaves their intents, and the next
// request reads their chains back before it trusts the record. The admin
// commands that compare the record with the firewall, or put it back,
// must do the same first: from the bare record, an unban the firewall
// carried out (and the audit log says was applied) looked missing, and
// "reconcile --fix" (the timer, every minute) or "restore" put the ban
// back; a ban the firewall made looked unexpected, with the advice to
// lift it.
func TestAdminCommandsFinishCutShortChangesFirst(t *testing.T) {
	tests := []struct {
		name string
		args []string
		boot bool // the firewall is empty, as after a reboot
	}{
		{"reconcile --fix does not put back an unban that was cut short", []string{"reconcile", "--fix"}, false},
		{"reconcile tells no drift where the record only lagged", []string{"reconcile"}, false},
		{"restore at boot does not put back an unban that was cut short", []string{"restore"}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			h.startWithBans(3)
			v4 := h.tables[policy.IPv4]
			rules, err := v4.List(chain)
			require.NoError(t, err)
			require.Contains(t, rules, "-A "+chain+" -s 203.0.113.2/32 -j DROP")
			// The killed shim's unban of .2 and ban of .9 reached the
			// firewall; its record did not.
			require.NoError(t, v4.Delete(chain, "-s", "203.0.113.2/32", "-j", "DROP"))
			require.NoError(t, v4.Insert(chain, 1, "-s", "203.0.113.9/32", "-j", "DROP"))
			ctx := policy.Context{LocalAddrs: []netip.Addr{netip.MustParseAddr("192.0.2.7")}, LookupPort: hostnet.LookupPort}
			var ops []policy.Operation
			for _, line := range []string{"iptables -w -D " + chain + " -s 203.0.113.2 -j DROP", healBan(9)} {
				op, err := policy.Decide(h.pol, line, ctx)
				require.NoError(t, err, line)
				ops = append(ops, op)
			}
			store, err := state.Open(h.pol, hostnet.LookupPort, time.Second)
			require.NoError(t, err)
			require.NoError(t, store.SetIntent(ops...))
			require.NoError(t, store.Close())
			if tt.boot {
				v4.Wipe("")
			}

			code, stdout, stderr := h.admin(tt.args...)
			assert.Equal(t, ExitOK, code, stdout+stderr)
			if !tt.boot {
				assert.Contains(t, stdout, "no drift", "the record now holds what the firewall does")
			}
			assert.Contains(t, stdout, "were cut short", "it says what it read back")
			var noted bool
			for _, r := range h.records() {
				noted = noted || strings.Contains(string(r.State), "were cut short")
			}
			assert.True(t, noted, "and the audit log says it, as the next request's line would have")
			gone, err := v4.Exists(chain, "-s", "203.0.113.2/32", "-j", "DROP")
			require.NoError(t, err)
			assert.False(t, gone, "the unban the audit log says was applied stays done")
			assert.Equal(t, 2+btoi(!tt.boot), h.recordedBans(), "the record holds .1 and .3, and .9 where the firewall holds it")
		})
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// A ban that the firewall took and the record did not (its shim was
// killed) is read back by the next request; it must still be due for
// expire once max_ban_time has passed since it was found. Read back with
// no time, it was never due, and stayed in the rule backend's chain for
// good.
func TestABanReadBackAfterACrashExpires(t *testing.T) {
	h := newHarness(t)
	h.pol.MaxBanTime = time.Hour
	h.startWithBans(1)
	v4 := h.tables[policy.IPv4]
	require.NoError(t, v4.Insert(chain, 1, "-s", "203.0.113.9/32", "-j", "DROP"))
	ctx := policy.Context{LocalAddrs: []netip.Addr{netip.MustParseAddr("192.0.2.7")}, LookupPort: hostnet.LookupPort}
	op, err := policy.Decide(h.pol, healBan(9), ctx)
	require.NoError(t, err)
	store, err := state.Open(h.pol, hostnet.LookupPort, time.Second)
	require.NoError(t, err)
	require.NoError(t, store.SetIntent(op))
	require.NoError(t, store.Close())
	code, stderr := h.forced(healBan(2))
	require.Equal(t, ExitOK, code, stderr)
	require.Equal(t, 3, h.recordedBans(), "the cut-short ban was read back")

	h.calls += 3 * 3600 // three hours on (the harness's clock)
	code, stdout, stderr := h.admin("expire")
	require.Equal(t, ExitOK, code, stdout+stderr)
	there, err := v4.Exists(chain, "-s", "203.0.113.9/32", "-j", "DROP")
	require.NoError(t, err)
	assert.False(t, there, "the read-back ban is lifted with the others")
	assert.Equal(t, 0, h.recordedBans())
}
