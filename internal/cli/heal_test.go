package cli

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/policy"
)

const healHook = "iptables -w -I INPUT -p tcp -m multiport --dports 143,993 -j " + chain

func healBan(i int) string {
	return fmt.Sprintf("iptables -w -I %s 1 -s 203.0.113.%d -j DROP", chain, i)
}

// startWithBans does what fail2ban's start and n bans do.
func (h *harness) startWithBans(n int) {
	for _, l := range []string{"iptables -w -N " + chain, "iptables -w -A " + chain + " -j RETURN", healHook} {
		code, stderr := h.forced(l)
		require.Equal(h.t, ExitOK, code, stderr)
	}
	for i := 1; i <= n; i++ {
		code, stderr := h.forced(healBan(i))
		require.Equal(h.t, ExitOK, code, stderr)
	}
}

// recordedBans counts the bans the state holds, as "list --json" shows.
func (h *harness) recordedBans() int {
	code, stdout, stderr := h.admin("list", "--json")
	require.Equal(h.t, ExitOK, code, stderr)
	return strings.Count(stdout, `"type": "ban"`)
}

// admin runs an admin subcommand with the harness's policy.
func (h *harness) admin(args ...string) (int, string, string) {
	var stdout, stderr bytes.Buffer
	code := Run(append(args, "--policy", "/etc/f2b-shim/policy.toml"), Env{}, &stdout, &stderr, h.deps)
	return code, stdout.String(), stderr.String()
}

// liveBans counts the bans in the live chain, and says whether the hook
// and the return rule are there.
func (h *harness) liveBans() (bans int, hooked, ret bool) {
	v4 := h.tables[policy.IPv4]
	rules, err := v4.List(chain)
	if err != nil {
		return 0, false, false
	}
	for _, r := range rules {
		switch {
		case r == "-A "+chain+" -j RETURN":
			ret = true
		case len(r) > 3 && r[:3] == "-A " && bytes.Contains([]byte(r), []byte(" -s ")):
			bans++
		}
	}
	hooked, _ = v4.Exists("INPUT", "-p", "tcp", "-m", "multiport", "--dports", "143,993", "-j", chain)
	return bans, hooked, ret
}

// TestNoFailureErasesTheState wipes the firewall behind the shim's back,
// makes the next requests fail, and checks that the state still holds
// every ban: a read-back of a missing chain must not replace the record
// with nothing.
func TestNoFailureErasesTheState(t *testing.T) {
	wipes := []struct {
		name string
		wipe func(h *harness)
	}{
		{"iptables -F; iptables -X", func(h *harness) { h.tables[policy.IPv4].Wipe("") }},
		{"the ban chain deleted", func(h *harness) { h.tables[policy.IPv4].Wipe(chain) }},
		{"the ban chain flushed", func(h *harness) { h.tables[policy.IPv4].Empty(chain) }},
	}
	for _, w := range wipes {
		t.Run(w.name, func(t *testing.T) {
			h := newHarness(t)
			h.startWithBans(50)
			w.wipe(h)
			v4 := h.tables[policy.IPv4]
			// Nothing may reach the firewall: every change fails.
			for _, m := range []string{"Restore", "Insert", "NewChain", "Append"} {
				v4.Fail[m] = errors.New("iptables: resource busy")
			}
			code, _ := h.forced(healBan(99))
			assert.Equal(t, ExitFirewall, code, "the ban fails")
			code, _ = h.forced(healBan(98))
			assert.Equal(t, ExitFirewall, code, "so does the next one")
			code, _ = h.forced("iptables -w -C " + chain + " -j RETURN")
			assert.NotEqual(t, ExitOK, code)
			assert.Equal(t, 50, h.recordedBans(), "the state still holds every ban")
		})
	}
}
