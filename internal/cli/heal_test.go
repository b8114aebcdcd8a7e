package cli

import (
	"bytes"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/internal/engine"
	"github.com/f2b-shim/f2b-shim/internal/firewall"
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

// admin runs an admin subcommand with the harness's policy, kept outside
// /etc/f2b-shim, so that status checks this policy and not this host's
// install.
func (h *harness) admin(args ...string) (int, string, string) {
	if h.pol.File == "" {
		h.pol.File = filepath.Join(h.t.TempDir(), "policy.toml")
	}
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

// healWipes are what a firewall reload or an admin does behind the
// shim's back, on the fake table.
var healWipes = []struct {
	name string
	wipe func(h *harness)
}{
	{"the ban chain flushed", func(h *harness) { h.tables[policy.IPv4].Empty(chain) }},
	{"the hook deleted (iptables -F INPUT)", func(h *harness) { h.tables[policy.IPv4].Empty("INPUT") }},
	{"the ban chain deleted", func(h *harness) { h.tables[policy.IPv4].Wipe(chain) }},
	{"everything (iptables -F; iptables -X)", func(h *harness) { h.tables[policy.IPv4].Wipe("") }},
}

// TestContactHealsTheChain: after each wipe, the next request that
// touches the chain (one-shot or stream; a new ban, a re-ban, fail2ban's
// start, its check) puts back the chain, every recorded ban, its return
// rule and its hook, before it is carried out; the repair is in that
// request's audit line, and status names it.
func TestContactHealsTheChain(t *testing.T) {
	requests := []struct {
		name   string
		line   string
		result string
	}{
		{"a new ban", healBan(99), "applied"},
		{"a re-ban answers unchanged only once the ban is really there", healBan(7), "unchanged"},
		{"fail2ban's start (-N) rebuilds the chain with its bans", "iptables -w -N " + chain, "unchanged"},
		{"fail2ban 0.11's check of the hook", "iptables -w -n -L INPUT | grep -q '" + chain + `[ \t]'`, "check-true"},
	}
	for _, w := range healWipes {
		for _, r := range requests {
			for _, mode := range []string{"one-shot", "stream"} {
				t.Run(w.name+", then "+r.name+", "+mode, func(t *testing.T) {
					h := newHarness(t)
					h.startWithBans(50)
					w.wipe(h)
					if mode == "one-shot" {
						code, stderr := h.forced(r.line)
						assert.Contains(t, []int{ExitOK, ExitCheckFalse}, code, stderr)
					} else {
						code, replies, stderr := h.stream(r.line + "\n")
						require.Equal(t, ExitOK, code, stderr)
						require.Len(t, replies, 1)
						assert.Contains(t, replies[0], r.result)
					}
					recs := h.records()
					last := recs[len(recs)-1]
					assert.Equal(t, r.result, last.Result)
					assert.Contains(t, string(last.State), "repaired: ipv4 "+chain)
					bans, hooked, ret := h.liveBans()
					want := 50
					if r.result == "applied" {
						want = 51
					}
					assert.Equal(t, want, bans, "every recorded ban is back")
					assert.True(t, hooked, "the hook is back")
					assert.True(t, ret, "the return rule is back")
					assert.Equal(t, want, h.recordedBans())
					code, stdout, _ := h.admin("status")
					assert.Contains(t, stdout, "repaired: ipv4 "+chain)
					assert.Equal(t, ExitOK, code, stdout)
				})
			}
		}
	}
}

// TestAnIntactChainCostsOneCheck: with nothing missing, a ban costs the
// insert plus one iptables-restore of "-C" lines (the return rule and
// each hook), and nothing is rebuilt.
func TestAnIntactChainCostsOneCheck(t *testing.T) {
	h := newHarness(t)
	h.startWithBans(3)
	v4 := h.tables[policy.IPv4]
	v4.Calls = nil
	code, stderr := h.forced(healBan(99))
	require.Equal(t, ExitOK, code, stderr)
	assert.Equal(t, []string{
		"Restore 4",
		"Insert " + chain + " 1 -s 203.0.113.99/32 -j DROP",
	}, v4.Calls)
}

// TestStatusSeesAWipe: right after a wipe, before any request, status
// and reconcile say what is missing and exit 1.
func TestStatusSeesAWipe(t *testing.T) {
	for _, w := range healWipes {
		t.Run(w.name, func(t *testing.T) {
			h := newHarness(t)
			h.startWithBans(5)
			w.wipe(h)
			code, stdout, _ := h.admin("status")
			assert.Equal(t, ExitCheckFalse, code, stdout)
			assert.Contains(t, stdout, "missing")
			code, stdout, _ = h.admin("reconcile")
			assert.Equal(t, ExitCheckFalse, code, stdout)
			code, stdout, stderr := h.admin("reconcile", "--fix")
			assert.Equal(t, ExitOK, code, stdout+stderr)
			bans, hooked, ret := h.liveBans()
			assert.Equal(t, 5, bans)
			assert.True(t, hooked && ret)
			code, stdout, _ = h.admin("status")
			assert.Equal(t, ExitOK, code, stdout)
		})
	}
}

// TestOneContactHealsEveryChain: a reload rarely takes one chain alone.
// When a request finds its chain lost, every other chain the state
// records, in both families, is checked and put back with it.
func TestOneContactHealsEveryChain(t *testing.T) {
	for _, mode := range []string{"one-shot", "stream"} {
		t.Run(mode, func(t *testing.T) {
			h := newHarness(t)
			h.startWithBans(3)
			for _, l := range []string{"ip6tables -w -N " + chain, "ip6tables -w -A " + chain + " -j RETURN", "ip6tables -w -I " + chain + " 1 -s 2001:db8::7 -j DROP"} {
				code, stderr := h.forced(l)
				require.Equal(t, ExitOK, code, stderr)
			}
			h.tables[policy.IPv4].Wipe("")
			h.tables[policy.IPv6].Wipe("")
			if mode == "one-shot" {
				code, stderr := h.forced(healBan(99))
				require.Equal(t, ExitOK, code, stderr)
			} else {
				code, replies, stderr := h.stream(healBan(99) + "\n")
				require.Equal(t, ExitOK, code, stderr)
				require.Equal(t, []string{"1 0 applied"}, replies)
			}
			rules, err := h.tables[policy.IPv6].List(chain)
			require.NoError(t, err, "the IPv6 chain is back")
			assert.Equal(t, []string{"-N " + chain, "-A " + chain + " -s 2001:db8::7/128 -j DROP", "-A " + chain + " -j RETURN"}, rules)
			recs := h.records()
			assert.Contains(t, string(recs[len(recs)-1].State), "repaired: ipv6 "+chain)
		})
	}
}

// TestABigRuleChainChecksOnlyItsHooks: past engine.FullCheckMaxBans, the rule
// backend's check lists the parent chain (small) instead of reading the
// ban chain (iptables-nft reads the whole chain for any "-C" in it): a
// lost hook or chain still heals on contact.
func TestABigRuleChainChecksOnlyItsHooks(t *testing.T) {
	h := newHarness(t)
	h.pol.MaxNewBansPerMinute = 10 * engine.FullCheckMaxBans
	h.startWithBans(0)
	var lines []string
	for i := range engine.FullCheckMaxBans + 1 {
		lines = append(lines, fmt.Sprintf("iptables -w -I %s 1 -s 10.0.%d.%d -j DROP", chain, i>>8, i&255))
	}
	code, _, stderr := h.stream(strings.Join(lines, "\n") + "\n")
	require.Equal(t, ExitOK, code, stderr)
	v4 := h.tables[policy.IPv4]
	v4.Calls = nil
	code, stderr = h.forced(healBan(99))
	require.Equal(t, ExitOK, code, stderr)
	assert.Equal(t, []string{"List INPUT", "Insert " + chain + " 1 -s 203.0.113.99/32 -j DROP"}, v4.Calls, "one listing of INPUT, then the ban")

	v4.Empty("INPUT")
	code, stderr = h.forced(healBan(98))
	require.Equal(t, ExitOK, code, stderr)
	bans, hooked, ret := h.liveBans()
	assert.Equal(t, engine.FullCheckMaxBans+3, bans)
	assert.True(t, hooked && ret)

	v4.Wipe("")
	code, stderr = h.forced(healBan(97))
	require.Equal(t, ExitOK, code, stderr)
	bans, hooked, ret = h.liveBans()
	assert.Equal(t, engine.FullCheckMaxBans+4, bans, "a chain gone is a hook gone: all put back")
	assert.True(t, hooked && ret)
}

// TestAFailedBanClearsItsIntent: a rule-backend ban that iptables refused
// changed nothing, so the next request has nothing to read back.
func TestAFailedBanClearsItsIntent(t *testing.T) {
	h := newHarness(t)
	h.startWithBans(2)
	h.tables[policy.IPv4].Fail["Insert"] = &firewall.CommandError{Status: 4, Stderr: "iptables: Resource temporarily unavailable."}
	code, _ := h.forced(healBan(9))
	require.Equal(t, ExitFirewall, code)
	delete(h.tables[policy.IPv4].Fail, "Insert")
	code, stderr := h.forced(healBan(8))
	require.Equal(t, ExitOK, code, stderr)
	recs := h.records()
	assert.Empty(t, recs[len(recs)-1].State, "no earlier change to read back")
}

// TestAnotherChainThatCannotBeHealedDoesNotFailTheRequest: a reload took
// both families' chains, and the IPv6 one cannot be put back (ip6tables
// fails). The IPv4 ban that found its own chain gone still heals that
// chain and lands; the audit line says what could not be put back.
func TestAnotherChainThatCannotBeHealedDoesNotFailTheRequest(t *testing.T) {
	for _, mode := range []string{"one-shot", "stream"} {
		t.Run(mode, func(t *testing.T) {
			h := newHarness(t)
			h.startWithBans(3)
			for _, l := range []string{"ip6tables -w -N " + chain, "ip6tables -w -A " + chain + " -j RETURN", "ip6tables -w -I " + chain + " 1 -s 2001:db8::7 -j DROP"} {
				code, stderr := h.forced(l)
				require.Equal(t, ExitOK, code, stderr)
			}
			h.tables[policy.IPv4].Wipe("")
			h.tables[policy.IPv6].Wipe("")
			for _, m := range []string{"Restore", "Insert", "NewChain", "Append"} {
				h.tables[policy.IPv6].Fail[m] = errors.New("ip6tables: resource busy")
			}
			if mode == "one-shot" {
				code, stderr := h.forced(healBan(99))
				require.Equal(t, ExitOK, code, stderr)
			} else {
				code, replies, stderr := h.stream(healBan(99) + "\n")
				require.Equal(t, ExitOK, code, stderr)
				require.Equal(t, []string{"1 0 applied"}, replies)
			}
			bans, hooked, ret := h.liveBans()
			assert.Equal(t, 4, bans)
			assert.True(t, hooked)
			assert.True(t, ret)
			recs := h.records()
			assert.Contains(t, string(recs[len(recs)-1].State), "ipv6 "+chain)
			assert.Contains(t, string(recs[len(recs)-1].State), "resource busy")
		})
	}
}
