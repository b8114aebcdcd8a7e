package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
	"github.com/f2b-shim/f2b-shim/test/nstest"
)

// admin runs an admin subcommand of the shim inside the namespace.
func admin(t *testing.T, ns *nstest.Netns, pol string, args ...string) nstest.Result {
	cmd := ns.Command(shim, append(args[:1:1], append([]string{"--policy", pol}, args[1:]...)...)...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	return nstest.RunCmd(t, cmd)
}

func runAll(t *testing.T, ns *nstest.Netns, pol string, lines ...string) {
	for _, l := range lines {
		r := ns.Shim(t, shim, pol, l)
		require.Equal(t, 0, r.Code, "%s: %s", l, r.Stderr)
	}
}

var jailStart = []string{
	"iptables -w -N " + chain, "iptables -w -A " + chain + " -j RETURN",
	"iptables -w -I INPUT -p tcp -m multiport --dports imap,imaps -j " + chain,
	"iptables -w -I " + chain + " 1 -s 203.0.113.45 -j REJECT --reject-with icmp-port-unreachable",
	"iptables -w -I " + chain + " 1 -s 198.51.100.0/24 -j DROP",
	"ip6tables -w -N " + chain, "ip6tables -w -A " + chain + " -j RETURN",
	"ip6tables -w -I INPUT -p tcp -m multiport --dports imap,imaps -j " + chain,
	"ip6tables -w -I " + chain + " 1 -s 2001:db8:45::1 -j DROP",
}

// TestRebootAndRestore makes bans, "reboots" the proxy (a new namespace,
// empty firewall, the same state_dir) and restores them.
func TestRebootAndRestore(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			ns, pol, _ := setup(t, backend, "")
			runAll(t, ns, pol, jailStart...)
			runAll(t, ns, pol, "iptables -w -I "+chain+" 1 -s 203.0.113.46 -j DROP", "iptables -w -D "+chain+" -s 203.0.113.46 -j DROP")
			before4, before6 := ns.Rules(t, "iptables", backend), ns.Rules(t, "ip6tables", backend)
			bans4, bans6 := banned(t, ns, backend, "iptables", chain), banned(t, ns, backend, "ip6tables", chain)

			rebooted := nstest.NewNetns(t)
			assert.Equal(t, policyLines, rebooted.Rules(t, "iptables", backend), "a fresh boot has an empty firewall")
			r := admin(t, rebooted, pol, "restore")
			require.Equal(t, 0, r.Code, r.Stderr)
			assert.Contains(t, r.Stdout, "ipv4: 1 chain, 2 bans, 1 hook")
			assert.Equal(t, before4, rebooted.Rules(t, "iptables", backend))
			assert.Equal(t, before6, rebooted.Rules(t, "ip6tables", backend))
			assert.Equal(t, bans4, banned(t, rebooted, backend, "iptables", chain))
			assert.Equal(t, bans6, banned(t, rebooted, backend, "ip6tables", chain))

			r = admin(t, rebooted, pol, "restore")
			require.Equal(t, 0, r.Code, r.Stderr)
			assert.Equal(t, before4, rebooted.Rules(t, "iptables", backend), "a second restore changes nothing")
			assert.Equal(t, before6, rebooted.Rules(t, "ip6tables", backend))
			assert.Equal(t, bans4, banned(t, rebooted, backend, "iptables", chain))
		})
	}
}

// TestRestoreTenThousandBans measures restoring 10,000 bans with one
// iptables-restore per family. The figure is logged, not asserted.
func TestRestoreTenThousandBans(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			ns, pol, _ := setup(t, backend, "")
			s := state.New(nil)
			at := time.Now()
			for _, l := range []string{"iptables -w -N " + chain, "iptables -w -A " + chain + " -j RETURN"} {
				s.Apply(decideOp(t, l), at)
			}
			for i := range 10000 {
				s.Apply(decideOp(t, fmt.Sprintf("iptables -w -I %s 1 -s 10.%d.%d.%d -j DROP", chain, i>>16&255, i>>8&255, i&255)), at)
			}
			require.NoError(t, state.Save(loadPolicy(t, pol), s))
			start := time.Now()
			r := admin(t, ns, pol, "restore")
			took := time.Since(start)
			require.Equal(t, 0, r.Code, r.Stderr)
			t.Logf("restored 10,000 bans on %s in %s", backend, took.Round(time.Millisecond))
			assert.Len(t, banned(t, ns, backend, "iptables", chain), 10000)
		})
	}
}

// loadPolicy reads a test's policy file.
func loadPolicy(t *testing.T, path string) *policy.Policy {
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	pol, err := policy.Parse(data)
	require.NoError(t, err)
	return pol
}

func decideOp(t *testing.T, line string) policy.Operation {
	op, err := policy.Decide(policy.Default(), line, policy.Context{})
	require.NoError(t, err)
	return op
}

func TestReconcile(t *testing.T) {
	ns, pol, _ := setup(t, "nft", "")
	runAll(t, ns, pol, jailStart...)
	r := admin(t, ns, pol, "reconcile")
	assert.Equal(t, 0, r.Code, r.Stdout+r.Stderr)
	assert.Contains(t, r.Stdout, "no drift")

	// Someone changes the firewall behind the shim's back.
	ns.MustRun(t, "iptables-nft", "-D", chain, "-s", "203.0.113.45", "-j", "REJECT")
	ns.MustRun(t, "iptables-nft", "-D", "INPUT", "-p", "tcp", "-m", "multiport", "--dports", "143,993", "-j", chain)
	ns.MustRun(t, "iptables-nft", "-I", chain, "1", "-s", "203.0.113.77", "-j", "DROP")
	ns.MustRun(t, "iptables-nft", "-I", chain, "1", "-s", "198.51.100.0/24", "-j", "DROP")
	ns.MustRun(t, "iptables-nft", "-I", chain, "1", "-s", "0.0.0.0/0", "-j", "ACCEPT")
	r = admin(t, ns, pol, "reconcile")
	assert.Equal(t, 1, r.Code, "drift is exit status 1")
	for _, want := range []string{
		"missing     ipv4  ban 203.0.113.45/32 in " + chain,
		"missing     ipv4  hook INPUT -p tcp -m multiport --dports imap,imaps -j " + chain,
		"unexpected  ipv4  ban 203.0.113.77/32 in " + chain,
		"unexpected  ipv4  rule -A " + chain + " -j ACCEPT (not one the policy allows)",
		"duplicate   ipv4  -A " + chain + " -s 198.51.100.0/24 -j DROP (2 times)",
	} {
		assert.Contains(t, r.Stdout, want)
	}
	r = admin(t, ns, pol, "reconcile", "--fix")
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "re-applied 2 missing")
	rules := ns.Rules(t, "iptables", "nft")
	assert.Contains(t, rules, "-A "+chain+" -s 203.0.113.45/32 -j REJECT")
	assert.Contains(t, rules, "-A INPUT -p tcp -m multiport --dports 143,993 -j "+chain)
	r = admin(t, ns, pol, "reconcile")
	assert.NotContains(t, r.Stdout, "missing")
}

func TestList(t *testing.T) {
	ns, pol, _ := setup(t, "legacy", "")
	runAll(t, ns, pol, jailStart...)
	r := admin(t, ns, pol, "list")
	require.Equal(t, 0, r.Code, r.Stderr)
	assert.Contains(t, r.Stdout, "ipv4 "+chain+": 2 bans, return rule\n")
	assert.Regexp(t, `\n  ban\s+203\.0\.113\.45/32\s+REJECT icmp-port-unreachable\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\n`, r.Stdout)
	assert.Regexp(t, `\n  hook\s+INPUT tcp imap,imaps\s`, r.Stdout)
	assert.Contains(t, r.Stdout, "live firewall: as the state says")
	for _, line := range strings.Split(r.Stdout, "\n") {
		assert.LessOrEqual(t, len([]rune(line)), 100, "list fits in 100 columns: %q", line)
	}
	ns.MustRun(t, "iptables-legacy", "-F", "INPUT")
	r = admin(t, ns, pol, "list")
	assert.Contains(t, r.Stdout, "live firewall: DIFFERS: 1 missing")
	ns.MustRun(t, "iptables-legacy", "-I", "INPUT", "-p", "tcp", "-m", "multiport", "--dports", "143,993", "-j", chain)
	r = admin(t, ns, pol, "list", "--json", chain)
	var rows []map[string]string
	require.NoError(t, json.Unmarshal([]byte(r.Stdout), &rows))
	bans := 0
	for _, row := range rows {
		if row["type"] == "ban" {
			bans++
			_, err := time.Parse(time.RFC3339, row["since"])
			assert.NoError(t, err, "RFC 3339 times, with the zone")
			assert.NotEmpty(t, row["address"])
		}
	}
	assert.Equal(t, 3, bans)

	assert.Contains(t, r.Stdout, "2001:db8:45::1/128")
}

// TestChangeCutShortIsReadBack: a shim killed between the firewall and
// its record (SIGKILL, a crash) leaves its intent in the state; the next
// request reads that chain back from the live firewall, so the ban is
// neither lost from the state nor doubled in the chain.
func TestChangeCutShortIsReadBack(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			ns, pol, audit := setup(t, backend, "")
			runAll(t, ns, pol, jailStart...)
			// What a killed shim leaves: the ban in the firewall, its
			// intent in the state, no record of it.
			cut := decideOp(t, "iptables -w -I "+chain+" 1 -s 203.0.113.60 -j DROP")
			if usesSets(backend) {
				ns.MustRun(t, "ipset", "add", firewall.SetName(policy.IPv4, chain, cut.Target), "203.0.113.60")
			} else {
				ns.MustRun(t, "iptables-"+ipt(backend), "-I", chain, "1", "-s", "203.0.113.60", "-j", "DROP")
			}
			setIntent(t, pol, cut)
			r := admin(t, ns, pol, "list")
			require.Equal(t, 0, r.Code, r.Stderr)
			assert.NotContains(t, r.Stdout, "203.0.113.60", "not recorded yet")

			runAll(t, ns, pol, cut.CommandLine())
			assert.Contains(t, lastAudit(t, audit)["state"], "was cut short")
			assert.Equal(t, "unchanged", lastAudit(t, audit)["result"], "the ban is not doubled")
			assert.Equal(t, 1, strings.Count(strings.Join(banned(t, ns, backend, "iptables", chain), " "), "203.0.113.60/32"))
			r = admin(t, ns, pol, "list")
			assert.Contains(t, r.Stdout, "203.0.113.60/32", "and it is in the state now")
			r = admin(t, ns, pol, "reconcile")
			assert.Equal(t, 0, r.Code, r.Stdout)
		})
	}
}

// setIntent leaves an intent in a policy's state as a killed shim would.
func setIntent(t *testing.T, polPath string, op policy.Operation) {
	s, err := state.Open(loadPolicy(t, polPath), nil, time.Second)
	require.NoError(t, err)
	require.NoError(t, s.SetIntent(op))
	require.NoError(t, s.Close())
}

func TestReconcileWithSets(t *testing.T) {
	ns, pol, _ := setup(t, "legacy+ipset", "")
	runAll(t, ns, pol, jailStart...)
	r := admin(t, ns, pol, "reconcile")
	require.Equal(t, 0, r.Code, r.Stdout+r.Stderr)
	rej := firewall.SetName(policy.IPv4, chain, policy.Target{Kind: policy.Reject, RejectWith: "icmp-port-unreachable"})
	ns.MustRun(t, "ipset", "del", rej, "203.0.113.45")
	ns.MustRun(t, "ipset", "add", rej, "203.0.113.78")
	r = admin(t, ns, pol, "reconcile")
	assert.Equal(t, 1, r.Code)
	assert.Contains(t, r.Stdout, "missing     ipv4  ban 203.0.113.45/32 in "+chain)
	assert.Contains(t, r.Stdout, "unexpected  ipv4  ban 203.0.113.78/32 in "+chain)
	r = admin(t, ns, pol, "reconcile", "--fix")
	assert.Contains(t, r.Stdout, "re-applied 1 missing")
	assert.Contains(t, banned(t, ns, "legacy+ipset", "iptables", chain), "203.0.113.45/32")
	r = admin(t, ns, pol, "list", "--json")
	assert.Contains(t, r.Stdout, `"address": "203.0.113.45/32"`)
	assert.Contains(t, r.Stdout, `"set": "`+rej+`"`, "the set a person can map to the chain")
	r = admin(t, ns, pol, "list")
	assert.Contains(t, r.Stdout, "in set "+rej+" (REJECT icmp-port-unreachable)")
}

// TestReconcileFixIsAuditedAndEndsClean: --fix writes an audit line for
// what it re-applied and exits 0 once nothing is left to look at.
func TestReconcileFixIsAuditedAndEndsClean(t *testing.T) {
	ns, pol, audit := setup(t, "nft", "")
	runAll(t, ns, pol, jailStart...)
	ns.MustRun(t, "iptables-nft", "-D", chain, "-s", "203.0.113.45", "-j", "REJECT")
	r := admin(t, ns, pol, "reconcile", "--fix")
	assert.Equal(t, 0, r.Code, r.Stdout+r.Stderr)
	assert.Contains(t, r.Stdout, "re-applied 1 missing")
	last := lastAudit(t, audit)
	assert.Equal(t, "f2b-shim reconcile --fix", last["command"])
	assert.Equal(t, "applied", last["result"])
	r = admin(t, ns, pol, "reconcile")
	assert.Equal(t, 0, r.Code, r.Stdout)
}

// TestStatus: the self-test is all ok on a healthy proxy, and names the
// drift when someone changed the firewall behind the shim's back.
func TestStatus(t *testing.T) {
	for _, backend := range []string{"nft", "legacy+ipset"} {
		t.Run(backend, func(t *testing.T) {
			ns, pol, _ := setup(t, backend, "")
			runAll(t, ns, pol, jailStart...)
			r := admin(t, ns, pol, "status")
			assert.Equal(t, 0, r.Code, r.Stdout+r.Stderr)
			assert.NotContains(t, r.Stdout, "FAIL")
			assert.Contains(t, r.Stdout, "2 chains, 3 bans")
			ns.MustRun(t, "iptables-"+ipt(backend), "-F", "INPUT")
			r = admin(t, ns, pol, "status")
			assert.Equal(t, 1, r.Code)
			assert.Contains(t, r.Stdout, "ipv4 drift:")
			assert.Contains(t, r.Stdout, "1 missing")
		})
	}
}
