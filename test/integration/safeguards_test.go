package integration

// The enforcer-side safeguards, each through the real binary against
// real iptables (and ipset) in a namespace. Times are seconds, with the
// policy set short; nothing asserts on how long anything took.

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/test/e2e/lab"
	"github.com/f2b-shim/f2b-shim/test/nstest"
)

// TestMaxBanTime: a ban not made again within max_ban_time is lifted by
// "f2b-shim expire", audited as expired, and not brought back by
// restore; a re-ban refreshes it.
func TestMaxBanTime(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			t.Parallel() // each waits a few seconds, in its own namespace
			// A late step only makes more bans due; the margin that matters
			// is the refreshed ban's, 1.5 s.
			ns, pol, audit := setup(t, backend, `max_ban_time = "3s"`+"\n")
			runAll(t, ns, pol, jailStart...)
			runAll(t, ns, pol, "iptables -w -I "+chain+" 1 -s 203.0.113.70 -j DROP")
			time.Sleep(2000 * time.Millisecond)
			// Re-banned: fail2ban's bantime.increment, or a restart.
			runAll(t, ns, pol, "iptables -w -I "+chain+" 1 -s 203.0.113.70 -j DROP")
			time.Sleep(1500 * time.Millisecond)
			r := admin(t, ns, pol, "expire")
			require.Equal(t, 0, r.Code, r.Stderr)
			assert.Contains(t, r.Stdout, "3 bans expired", "the three bans of jailStart, not the refreshed one")
			v4 := banned(t, ns, backend, "iptables", chain)
			assert.Equal(t, []string{"203.0.113.70/32"}, v4)
			assert.Empty(t, banned(t, ns, backend, "ip6tables", chain))
			expired := 0
			for _, l := range auditLines(t, audit) {
				if l["result"] == "expired" {
					expired++
				}
			}
			assert.Equal(t, 3, expired, "each expiry is audited")

			// The proxy is down for longer than max_ban_time: a restore
			// does not bring the ban back.
			time.Sleep(3200 * time.Millisecond)
			rebooted := nstest.NewNetns(t)
			r = admin(t, rebooted, pol, "restore")
			require.Equal(t, 0, r.Code, r.Stderr)
			assert.Contains(t, r.Stdout, "1 ban expired while the proxy was down")
			assert.Empty(t, banned(t, rebooted, backend, "iptables", chain))
			r = admin(t, rebooted, pol, "reconcile")
			assert.Equal(t, 0, r.Code, "state and firewall agree: %s", r.Stdout)
		})
	}
}

// TestBanPrefixV6: with ban_prefix_v6 = 64 a ban of one IPv6 address bans
// its /64, which stays until every address banned in it is unbanned; a
// check answers for the address it names.
func TestBanPrefixV6(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			ns, pol, audit := setup(t, backend, "ban_prefix_v6 = 64\n")
			runAll(t, ns, pol, "ip6tables -w -N "+chain, "ip6tables -w -A "+chain+" -j RETURN")
			ban := func(a string) string { return "ip6tables -w -I " + chain + " 1 -s " + a + " -j DROP" }
			unban := func(a string) string { return "ip6tables -w -D " + chain + " -s " + a + " -j DROP" }
			check := func(a string) int {
				return ns.Shim(t, shim, pol, "ip6tables -w -C "+chain+" -s "+a+" -j DROP").Code
			}
			runAll(t, ns, pol, ban("2001:db8:1:2::10"), ban("2001:db8:1:2::20"))
			assert.Equal(t, []string{"2001:db8:1:2::/64"}, banned(t, ns, backend, "ip6tables", chain), "one /64, once")
			assert.Equal(t, "2001:db8:1:2::10/128", lastAuditOp(t, audit, 2)["member"])
			assert.Equal(t, 0, check("2001:db8:1:2::10"))
			assert.Equal(t, 1, check("2001:db8:1:2::30"), "an address in the /64 that was not banned checks false")

			runAll(t, ns, pol, unban("2001:db8:1:2::10"))
			assert.Equal(t, []string{"2001:db8:1:2::/64"}, banned(t, ns, backend, "ip6tables", chain), "still banned for ::20")
			assert.Equal(t, 1, check("2001:db8:1:2::10"))
			assert.Equal(t, 0, check("2001:db8:1:2::20"))
			runAll(t, ns, pol, unban("2001:db8:1:2::20"))
			assert.Empty(t, banned(t, ns, backend, "ip6tables", chain), "the last unban lifts the /64")

			// never_ban and min_prefix_v6 hold for the widened prefix.
			r := ns.Shim(t, shim, pol, ban("2001:db8:7::99"))
			assert.Equal(t, 0, r.Code, r.Stderr)
			ns.MustRun(t, "ip", "addr", "add", "2001:db8:8::1/64", "dev", "lo")
			r = ns.Shim(t, shim, pol, ban("2001:db8:8::99"))
			assert.Equal(t, 3, r.Code, "the /64 would hold the proxy's own address")
			assert.Contains(t, r.Stderr, "widened")
		})
	}
}

// lastAuditOp is the op of the n-th last audit line.
func lastAuditOp(t *testing.T, path string, n int) map[string]any {
	lines := auditLines(t, path)
	require.GreaterOrEqual(t, len(lines), n)
	op, _ := lines[len(lines)-n]["op"].(map[string]any)
	return op
}

// TestBanQuota: past max_new_bans_per_minute, bans are refused (exit 3)
// while unbans and bans already in place go through, one-shot and
// restore alike.
func TestBanQuota(t *testing.T) {
	for _, backend := range []string{"nft", "legacy+ipset"} {
		t.Run(backend, func(t *testing.T) {
			ns, pol, audit := setup(t, backend, "max_new_bans_per_minute = 3\n")
			runAll(t, ns, pol, "iptables -w -N "+chain)
			for i := 1; i <= 3; i++ {
				runAll(t, ns, pol, fmt.Sprintf("iptables -w -I %s 1 -s 203.0.113.%d -j DROP", chain, i))
			}
			r := ns.Shim(t, shim, pol, "iptables -w -I "+chain+" 1 -s 203.0.113.4 -j DROP")
			assert.Equal(t, 3, r.Code, r.Stderr)
			assert.Contains(t, r.Stderr, "max_new_bans_per_minute")
			assert.NotContains(t, banned(t, ns, backend, "iptables", chain), "203.0.113.4/32")
			runAll(t, ns, pol, "iptables -w -I "+chain+" 1 -s 203.0.113.2 -j DROP") // already there: not new
			runAll(t, ns, pol, "iptables -w -D "+chain+" -s 203.0.113.2 -j DROP")   // unbans always work
			assert.Equal(t, "denied", auditLines(t, audit)[4]["result"])
			r = admin(t, ns, pol, "restore")
			assert.Equal(t, 0, r.Code, "restore does not count: %s", r.Stderr)
		})
	}
}

// TestDryRun: every request is judged, audited and answered, and nothing
// reaches the firewall or the state.
func TestDryRun(t *testing.T) {
	ns, pol, audit := setup(t, "nft", "dry_run = true\n")
	before := ns.Save(t, "nft")
	for i, line := range jailStart {
		// Each from its own client: one client's dry-run results within
		// a second are coalesced in the log, and this test reads each.
		r := ns.ShimFrom(t, shim, pol, line, fmt.Sprintf("2001:db8:ffff::%x", i+1))
		require.Equal(t, 0, r.Code, "%s: %s", line, r.Stderr)
	}
	assert.Equal(t, before, ns.Save(t, "nft"))
	r := ns.Shim(t, shim, pol, "iptables -w -F INPUT")
	assert.Equal(t, 3, r.Code, "denials are denials")
	lines := auditLines(t, audit)
	require.Len(t, lines, len(jailStart)+1)
	for _, l := range lines[:len(jailStart)] {
		assert.Equal(t, "dry-run", l["result"])
	}
	r = admin(t, ns, pol, "list", "--json")
	assert.Equal(t, "[]\n", r.Stdout, "the state holds nothing")
}

// TestAdminBanUnbanPrune: the admin's own changes are judged by the
// policy, audited with the admin's uid, and agree with restore and
// reconcile; prune retires a chain.
func TestAdminBanUnbanPrune(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			ns, pol, audit := setup(t, backend, "")
			runAll(t, ns, pol, jailStart...)
			r := admin(t, ns, pol, "ban", chain, "198.51.100.77")
			require.Equal(t, 0, r.Code, r.Stderr)
			assert.Contains(t, banned(t, ns, backend, "iptables", chain), "198.51.100.77/32")
			r = admin(t, ns, pol, "ban", chain, "127.0.0.1")
			assert.Equal(t, 3, r.Code, "never_ban holds for the admin too")
			r = admin(t, ns, pol, "unban", chain, "203.0.113.45")
			require.Equal(t, 0, r.Code, r.Stderr)
			assert.NotContains(t, banned(t, ns, backend, "iptables", chain), "203.0.113.45/32")
			last := auditLines(t, audit)
			assert.Equal(t, "f2b-shim unban "+chain+" 203.0.113.45", last[len(last)-1]["command"])
			assert.Equal(t, float64(os.Getuid()), last[len(last)-1]["uid"])
			r = admin(t, ns, pol, "reconcile")
			assert.Equal(t, 0, r.Code, "the state agrees with the admin: %s", r.Stdout)
			r = admin(t, ns, pol, "list")
			assert.Contains(t, r.Stdout, "198.51.100.77/32")
			assert.NotContains(t, r.Stdout, "203.0.113.45/32")

			r = admin(t, ns, pol, "prune", chain)
			require.Equal(t, 0, r.Code, r.Stderr)
			assert.Equal(t, policyLines, ns.Rules(t, "iptables", backend))
			assert.Equal(t, policyLines, ns.Rules(t, "ip6tables", backend))
			r = admin(t, ns, pol, "list", "--json")
			assert.Equal(t, "[]\n", r.Stdout, "the chain is forgotten")
			rebooted := nstest.NewNetns(t)
			r = admin(t, rebooted, pol, "restore")
			require.Equal(t, 0, r.Code, r.Stderr)
			assert.Equal(t, policyLines, rebooted.Rules(t, "iptables", backend), "restore does not bring it back")
		})
	}
}

// TestMetrics parses "f2b-shim metrics" with Prometheus' own parser, and
// finds the bans, drift and requests it made.
func TestMetrics(t *testing.T) {
	ns, pol, _ := setup(t, "nft", "")
	runAll(t, ns, pol, jailStart...)
	ns.Shim(t, shim, pol, "iptables -w -F INPUT")
	ns.MustRun(t, "iptables-nft", "-D", chain, "-s", "203.0.113.45", "-j", "REJECT")
	out := t.TempDir() + "/f2b-shim.prom"
	r := admin(t, ns, pol, "metrics", "--out", out)
	require.Equal(t, 0, r.Code, r.Stderr)
	f, err := os.Open(out)
	require.NoError(t, err)
	defer f.Close()
	parser := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := parser.TextToMetricFamilies(f)
	require.NoError(t, err)
	value := func(name string, labels map[string]string) float64 {
		fam, ok := fams[name]
		require.True(t, ok, "no metric %s", name)
		for _, m := range fam.Metric {
			match := true
			for k, v := range labels {
				found := false
				for _, l := range m.Label {
					found = found || l.GetName() == k && l.GetValue() == v
				}
				match = match && found
			}
			if match {
				switch {
				case m.Gauge != nil:
					return m.Gauge.GetValue()
				case m.Counter != nil:
					return m.Counter.GetValue()
				}
			}
		}
		t.Fatalf("no %s with %v", name, labels)
		return 0
	}
	assert.Equal(t, 2.0, value("f2b_shim_bans", map[string]string{"chain": chain, "family": "ipv4"}))
	assert.Equal(t, 1.0, value("f2b_shim_drift", map[string]string{"family": "ipv4", "kind": "missing"}))
	assert.Equal(t, 1.0, value("f2b_shim_requests_total", map[string]string{"decision": "deny", "result": "denied"}))
	assert.Equal(t, float64(len(jailStart)), value("f2b_shim_requests_total", map[string]string{"decision": "allow", "result": "applied"}))
	assert.Equal(t, 1.0, value("f2b_shim_up", nil))
	assert.Greater(t, value("f2b_shim_last_apply_timestamp_seconds", nil), float64(time.Now().Add(-time.Hour).Unix()))
}

// TestAuditChain: the audit log is a hash chain through the shipped
// logrotate's rotations; audit --verify finds an edit, an insertion and
// a removal.
func TestAuditChain(t *testing.T) {
	nstest.RequireRoot(t, "logrotate")
	ns, pol, audit := setup(t, "nft", "")
	runAll(t, ns, pol, jailStart[:4]...)
	rotate(t, audit)
	runAll(t, ns, pol, jailStart[4:]...)
	rotate(t, audit)
	runAll(t, ns, pol, "iptables -w -I "+chain+" 1 -s 203.0.113.50 -j DROP")
	r := admin(t, ns, pol, "audit", "--verify")
	require.Equal(t, 0, r.Code, r.Stdout+r.Stderr)
	assert.Contains(t, r.Stdout, "the chain holds: 10 lines")

	data, err := os.ReadFile(audit + ".1")
	require.NoError(t, err)
	lines := strings.SplitAfter(string(data), "\n")
	for name, tamper := range map[string]func([]string) []string{
		"edit": func(l []string) []string {
			l = append([]string{}, l...)
			l[1] = strings.Replace(l[1], `"exit":0`, `"exit":1`, 1)
			return l
		},
		"insert": func(l []string) []string { return append(append(append([]string{}, l[:2]...), l[1]), l[2:]...) },
		"remove": func(l []string) []string { return append(append([]string{}, l[:1]...), l[2:]...) },
	} {
		t.Run(name, func(t *testing.T) {
			require.NoError(t, os.WriteFile(audit+".1", []byte(strings.Join(tamper(lines), "")), 0o640))
			defer os.WriteFile(audit+".1", data, 0o640)
			r := admin(t, ns, pol, "audit", "--verify")
			assert.Equal(t, 1, r.Code, r.Stdout)
			assert.Contains(t, r.Stdout, "broken: "+audit+".1:")
		})
	}
}

// rotate runs the shipped logrotate file on the audit log, forced.
func rotate(t *testing.T, audit string) { shippedLogrotate(t, audit)() }

// shippedLogrotate writes the shipped examples/logrotate/f2b-shim for the
// test's audit log (as root: the test has no f2b-shim user), and returns
// what runs it, forced, as often as it is called.
func shippedLogrotate(t *testing.T, audit string) (rotate func()) {
	example, err := os.ReadFile(filepath.Join(lab.RepoRoot(), "examples", "logrotate", "f2b-shim"))
	require.NoError(t, err)
	conf := filepath.Join(t.TempDir(), "f2b-shim")
	require.NoError(t, os.WriteFile(conf, []byte(strings.NewReplacer(
		"/var/log/f2b-shim/audit.jsonl", audit,
		"create 0640 f2b-shim f2b-shim", "create 0640 root root",
	).Replace(string(example))), 0o644))
	return func() {
		out, err := exec.Command("logrotate", "--force", "--state", conf+".state", conf).CombinedOutput()
		require.NoError(t, err, "%s", out)
	}
}
