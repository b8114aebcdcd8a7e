package integration

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	auditpkg "github.com/f2b-shim/f2b-shim/internal/audit"
	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/policy"
	"github.com/f2b-shim/f2b-shim/test/nstest"
)

const chain = "mail-remote-f2b-imap"

// backends are the variants every system test runs on: iptables-nft or
// iptables-legacy, and after "+ipset" the policy's set backend.
var backends = []string{"nft", "legacy", "nft+ipset", "legacy+ipset"}

// ipt is the iptables backend of a variant, "nft" or "legacy".
func ipt(backend string) string { b, _, _ := strings.Cut(backend, "+"); return b }

func usesSets(backend string) bool { return strings.HasSuffix(backend, "+ipset") }

// banned lists the sources a chain bans, "address/bits", sorted: its
// "-s" rules, or with the set backend the members of its sets.
func banned(t *testing.T, ns *nstest.Netns, backend, bin, chain string) []string {
	var out []string
	for _, r := range strings.Split(ns.MustRun(t, bin+"-"+ipt(backend), "-S", chain), "\n") {
		f := strings.Fields(r)
		switch {
		case len(f) > 3 && f[2] == "-s":
			out = append(out, f[3])
		case len(f) > 5 && f[2] == "-m" && f[3] == "set":
			for _, m := range strings.Fields(strings.SplitN(ns.MustRun(t, "ipset", "list", f[5]), "Members:\n", 2)[1]) {
				if !strings.Contains(m, "/") {
					m += map[string]string{"iptables": "/32", "ip6tables": "/128"}[bin]
				}
				out = append(out, m)
			}
		}
	}
	slices.Sort(out)
	return out
}

// setsOf lists the ipsets in the namespace.
func setsOf(t *testing.T, ns *nstest.Netns) string { return ns.MustRun(t, "ipset", "list", "-n") }

// setup makes a namespace and a policy for one backend, with the audit
// log and state in a temp dir.
func setup(t *testing.T, backend string, extra string) (*nstest.Netns, string, string) {
	nstest.RequireRoot(t, "iptables-"+ipt(backend), "ipset")
	dir := t.TempDir()
	audit := filepath.Join(dir, "audit.jsonl")
	bans := "rules"
	if usesSets(backend) {
		bans = "ipset"
	}
	pol := nstest.WritePolicy(t, dir, fmt.Sprintf("name = \"it-%s\"\naudit_log = %q\nstate_dir = %q\niptables_backend = %q\nbackend = %q\n%s",
		ipt(backend), audit, filepath.Join(dir, "state"), ipt(backend), bans, extra))
	return nstest.NewNetns(t), pol, audit
}

func auditLines(t *testing.T, path string) []map[string]any {
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	var out []map[string]any
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var m map[string]any
		require.NoError(t, json.Unmarshal(sc.Bytes(), &m), "audit line %q", sc.Text())
		out = append(out, m)
	}
	require.NoError(t, sc.Err())
	return out
}

const policyLines = "-P INPUT ACCEPT\n-P FORWARD ACCEPT\n-P OUTPUT ACCEPT\n"

// TestFail2banActionSequence plays what fail2ban 1.0's proxy action sends
// over a jail's life, and checks the real firewall after each phase.
func TestFail2banActionSequence(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			ns, pol, audit := setup(t, backend, "")
			playSequence(t, backend, ns, audit, func(line string) nstest.Result { return ns.Shim(t, shim, pol, line) })
		})
	}
}

// playSequence runs fail2ban's life cycle through invoke, which runs the
// shim one way or another, and checks the firewall and the audit log.
func playSequence(t *testing.T, backend string, ns *nstest.Netns, audit string, invoke func(line string) nstest.Result) {
	calls, denials := 0, 0
	shimRun := func(line string) nstest.Result {
		calls++
		return invoke(line)
	}
	run := func(line string, want int) {
		t.Helper()
		r := shimRun(line)
		require.Equal(t, want, r.Code, "%s\nstderr: %s", line, r.Stderr)
	}
	hook4 := "-p tcp -m multiport --dports 143,993 -j " + chain
	start := func(bin string) {
		// fail2ban's actionstart: { -C return } || { -N || true; -A return }, then { -C hook } || -I hook.
		if shimRun(bin+" -w -C "+chain+" -j RETURN").Code != 0 {
			run(bin+" -w -N "+chain, 0)
			run(bin+" -w -A "+chain+" -j RETURN", 0)
		}
		if shimRun(bin+" -w -C INPUT "+hook4).Code != 0 {
			run(bin+" -w -I INPUT "+hook4, 0)
		}
	}

	t.Run("start", func(t *testing.T) {
		run("iptables -w -C "+chain+" -j RETURN", 1)
		start("iptables")
		start("ip6tables")
	})
	t.Run("repeated start adds nothing", func(t *testing.T) {
		start("iptables")
		run("iptables -w -N "+chain, 0)
		run("iptables -w -A "+chain+" -j RETURN", 0)
		run("iptables -w -I INPUT "+hook4, 0)
		run("iptables --wait=5 -C INPUT "+hook4, 0)
		run("iptables -w -n -L INPUT | grep -q '"+chain+`[ \t]'`, 0)
	})
	t.Run("bans, a duplicate ban and the checks", func(t *testing.T) {
		run("iptables -w -I "+chain+" 1 -s 203.0.113.45 -j REJECT --reject-with icmp-port-unreachable", 0)
		run("iptables -w -I "+chain+" 1 -s 198.51.100.0/24 -j DROP", 0)
		run("iptables -w -I "+chain+" 1 -s 203.0.113.45 -j REJECT --reject-with icmp-port-unreachable", 0)
		run("iptables -w -C "+chain+" -s 203.0.113.45 -j REJECT --reject-with icmp-port-unreachable", 0)
		run("iptables -w -C "+chain+" -s 203.0.113.45 -j REJECT", 0)
		run("iptables -w -C "+chain+" -s 203.0.113.46 -j REJECT", 1)
		run("iptables -w -D "+chain+" -s 203.0.113.46 -j REJECT --reject-with icmp-port-unreachable", 0)
		run("ip6tables -w -I "+chain+" 1 -s 2001:db8:45::1 -j REJECT --reject-with icmp6-port-unreachable", 0)
		run("ip6tables -w -I "+chain+" 1 -s 2001:db8:45::1 -j REJECT --reject-with icmp6-port-unreachable", 0)
		run("ip6tables -w -C "+chain+" -s 2001:db8:45::1 -j REJECT --reject-with icmp6-port-unreachable", 0)
	})
	t.Run("the firewall holds exactly the chain, the hook and the bans", func(t *testing.T) {
		if usesSets(backend) {
			drop4 := firewall.SetName(policy.IPv4, chain, policy.Target{Kind: policy.Drop})
			rej4 := firewall.SetName(policy.IPv4, chain, policy.Target{Kind: policy.Reject, RejectWith: "icmp-port-unreachable"})
			rej6 := firewall.SetName(policy.IPv6, chain, policy.Target{Kind: policy.Reject, RejectWith: "icmp6-port-unreachable"})
			assert.Equal(t, policyLines+
				"-N "+chain+"\n"+
				"-A INPUT -p tcp -m multiport --dports 143,993 -j "+chain+"\n"+
				"-A "+chain+" -m set --match-set "+drop4+" src -j DROP\n"+
				"-A "+chain+" -m set --match-set "+rej4+" src -j REJECT --reject-with icmp-port-unreachable\n"+
				"-A "+chain+" -j RETURN\n", ns.Rules(t, "iptables", backend))
			assert.Equal(t, policyLines+
				"-N "+chain+"\n"+
				"-A INPUT -p tcp -m multiport --dports 143,993 -j "+chain+"\n"+
				"-A "+chain+" -m set --match-set "+rej6+" src -j REJECT --reject-with icmp6-port-unreachable\n"+
				"-A "+chain+" -j RETURN\n", ns.Rules(t, "ip6tables", backend))
			assert.Equal(t, []string{"198.51.100.0/24", "203.0.113.45/32"}, banned(t, ns, backend, "iptables", chain))
			assert.Equal(t, []string{"2001:db8:45::1/128"}, banned(t, ns, backend, "ip6tables", chain))
			return
		}
		assert.Equal(t, policyLines+
			"-N "+chain+"\n"+
			"-A INPUT -p tcp -m multiport --dports 143,993 -j "+chain+"\n"+
			"-A "+chain+" -s 198.51.100.0/24 -j DROP\n"+
			"-A "+chain+" -s 203.0.113.45/32 -j REJECT --reject-with icmp-port-unreachable\n"+
			"-A "+chain+" -j RETURN\n", ns.Rules(t, "iptables", backend))
		assert.Equal(t, policyLines+
			"-N "+chain+"\n"+
			"-A INPUT -p tcp -m multiport --dports 143,993 -j "+chain+"\n"+
			"-A "+chain+" -s 2001:db8:45::1/128 -j REJECT --reject-with icmp6-port-unreachable\n"+
			"-A "+chain+" -j RETURN\n", ns.Rules(t, "ip6tables", backend))
	})
	t.Run("denials leave every table unchanged", func(t *testing.T) {
		before := ns.Save(t, backend)
		for _, line := range []string{
			"iptables -F INPUT",
			"iptables -w -X",
			"iptables -t nat -N " + chain,
			"iptables -P INPUT DROP",
			"iptables -I " + chain + " 1 -s 0.0.0.0/0 -j DROP",
			"iptables -I " + chain + " 1 -s 203.0.113.9 -j ACCEPT",
			"iptables -I " + chain + " 1 -s 192.0.2.10 -j DROP",
			"iptables -I INPUT -p tcp -j ACCEPT",
			"iptables -N " + chain + "x; iptables -F INPUT",
			"iptables -n -L INPUT | sh",
			"id",
		} {
			r := shimRun(line)
			denials++
			assert.Equal(t, 3, r.Code, line)
			assert.True(t, strings.HasPrefix(r.Stderr, "f2b-shim: denied: "), "%s: %q", line, r.Stderr)
		}
		assert.Equal(t, before, ns.Save(t, backend))
	})
	t.Run("stop removes everything", func(t *testing.T) {
		for _, bin := range []string{"iptables", "ip6tables"} {
			run(bin+" -w -D INPUT "+hook4, 0)
			run(bin+" -w -F "+chain, 0)
			run(bin+" -w -X "+chain, 0)
			run(bin+" -w -X "+chain, 0) // a second stop is harmless
			run(bin+" -w -n -L INPUT | grep -q '"+chain+`[ \t]'`, 1)
		}
		assert.Equal(t, policyLines, ns.Rules(t, "iptables", backend))
		assert.Equal(t, policyLines, ns.Rules(t, "ip6tables", backend))
		assert.Empty(t, setsOf(t, ns), "no set is left behind")
	})
	t.Run("every invocation left one audit line, or a count on a coalesced one", func(t *testing.T) {
		// The requests come quickly from one client: the first denial
		// (or unchanged, check, ... result) of each second is logged in
		// full, the rest counted (audit.Log.Write).
		// Repeats that change nothing may still be counted in the side
		// file, waiting for a later second.
		pending, err := auditpkg.Pending(audit)
		require.NoError(t, err)
		recorded, denied := pending[auditpkg.Allow]+pending[auditpkg.Deny], pending[auditpkg.Deny]
		for _, l := range auditLines(t, audit) {
			n := 1
			if c, ok := l["count"].(float64); ok {
				n = int(c)
			}
			recorded += n
			if l["decision"] == "deny" {
				denied += n
			}
		}
		assert.Equal(t, calls, recorded)
		assert.Equal(t, denials, denied)
	})
}

// TestParallelBans starts 100 shims at once, each banning another address.
// The host-wide lock must keep every rule and every audit line.
func TestParallelBans(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			ns, pol, audit := setup(t, backend, "")
			require.Equal(t, 0, ns.Shim(t, shim, pol, "iptables -w -N "+chain).Code)
			require.NoError(t, os.Remove(audit))
			const n = 100
			codes := make([]int, n)
			var wg sync.WaitGroup
			for i := range n {
				wg.Add(1)
				go func() {
					defer wg.Done()
					r := ns.Shim(t, shim, pol, fmt.Sprintf("iptables -w -I %s 1 -s 198.51.100.%d -j DROP", chain, i+1))
					codes[i] = r.Code
				}()
			}
			wg.Wait()
			for i, c := range codes {
				assert.Equal(t, 0, c, "ban %d", i+1)
			}
			bans := banned(t, ns, backend, "iptables", chain)
			assert.Len(t, bans, n, "one ban per address")
			assert.Len(t, slices.Compact(slices.Clone(bans)), n, "no ban twice")
			lines := auditLines(t, audit)
			assert.Len(t, lines, n)
			for _, l := range lines {
				assert.Equal(t, "applied", l["result"])
			}
		})
	}
}

func itoa(n int) string { return fmt.Sprint(n) }

func removeFile(path string) error { return os.Remove(path) }
