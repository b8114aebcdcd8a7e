package integration

// The attacks of the hardening issue, each performed through the real
// binary against real iptables (and ipset) in a namespace, as a fully
// compromised mail host would: every one of them worked on the main
// before the fix.

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/internal/hostnet"
	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
	"github.com/f2b-shim/f2b-shim/test/nstest"
)

// countJumps counts the rules of a family's INPUT that jump to chain.
func countJumps(t *testing.T, ns *nstest.Netns, backend, bin, chain string) int {
	return strings.Count(ns.MustRun(t, bin+"-"+ipt(backend), "-S", "INPUT"), "-j "+chain+"\n")
}

// Finding 1: hooks and chains were unbounded; 999 hooks on one chain cut
// the proxy's connection rate 38-fold.
func TestHooksAndChainsAreBounded(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			ns, pol, _ := setup(t, backend, "max_chains = 3\nmax_hooks_per_chain = 4\n")
			for _, bin := range []string{"iptables", "ip6tables"} {
				runAll(t, ns, pol, bin+" -w -N "+chain)
				accepted := 0
				for n := 1; n <= 20; n++ {
					r := ns.Shim(t, shim, pol, fmt.Sprintf("%s -w -I INPUT -p tcp --dport %d:8080 -j %s", bin, n, chain))
					if r.Code == 0 {
						accepted++
						continue
					}
					assert.Equal(t, 3, r.Code, r.Stderr)
					assert.Contains(t, r.Stderr, "hook limit reached")
					assert.Contains(t, r.Stderr, "max_hooks_per_chain")
				}
				assert.Equal(t, 4, accepted, "%s: max_hooks_per_chain hooks, no more", bin)
				assert.Equal(t, 4, countJumps(t, ns, backend, bin, chain))

				// The same hook spelled another way is the hook already there.
				runAll(t, ns, pol, bin+" -w -D INPUT -p tcp --dport 1:8080 -j "+chain,
					bin+" -w -I INPUT -p tcp -m multiport --dports imaps,imap -j "+chain)
				for _, same := range []string{"-m multiport --dports 143,993", "-m multiport --dports 993,143,143", "-m multiport --dports imap,imaps"} {
					r := ns.Shim(t, shim, pol, bin+" -w -I INPUT -p tcp "+same+" -j "+chain)
					assert.Equal(t, 0, r.Code, r.Stderr)
				}
				assert.Equal(t, 4, countJumps(t, ns, backend, bin, chain), "%s: no second rule for the same hook", bin)

				for _, c := range []string{"b", "c"} {
					runAll(t, ns, pol, bin+" -w -N mail-remote-f2b-"+c)
				}
				r := ns.Shim(t, shim, pol, bin+" -w -N mail-remote-f2b-d")
				assert.Equal(t, 3, r.Code, r.Stderr)
				assert.Contains(t, r.Stderr, "max_chains")
				_, err := ns.Run(bin+"-"+ipt(backend), "-S", "mail-remote-f2b-d")
				assert.Error(t, err, "the chain past the limit was not made")
			}
		})
	}
}

// Finding 2: a hook on every udp port plus a ban of the proxy's resolver
// stopped the proxy's DNS. Hooks must stay off every port and off the
// local port range, and the resolver and the gateway are never banned.
func TestBansCannotCutTheProxyOff(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			ns, pol, _ := setup(t, backend, "")
			ns.MustRun(t, "ip", "link", "add", "px0", "type", "veth", "peer", "name", "px1")
			ns.MustRun(t, "ip", "link", "set", "px0", "up")
			ns.MustRun(t, "ip", "addr", "add", "192.0.2.7/24", "dev", "px0")
			ns.MustRun(t, "ip", "route", "add", "default", "via", "192.0.2.1")
			ns.MustRun(t, "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=40000 40100")
			resolv := filepath.Join(t.TempDir(), "resolv.conf")
			require.NoError(t, os.WriteFile(resolv, []byte("nameserver 198.51.100.53\nnameserver 2001:db8:53::1\n"), 0o644))
			// The shim reads /etc/resolv.conf: give it this one, in a
			// private mount namespace, so the host's stays as it is.
			viaResolv := func(line string) nstest.Result {
				cmd := ns.Command("unshare", "--mount", "--propagation", "private", "sh", "-euc",
					`mount --bind "$RESOLV" /etc/resolv.conf; exec "$SHIM" --policy "$POLICY"`)
				cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "SHIM=" + shim, "POLICY=" + pol, "RESOLV=" + resolv,
					"SSH_ORIGINAL_COMMAND=" + line, "SSH_CONNECTION=192.0.2.10 50022 192.0.2.7 22"}
				return nstest.RunCmd(t, cmd)
			}
			require.Equal(t, 0, viaResolv("iptables -w -N "+chain).Code)
			require.Equal(t, 0, viaResolv("ip6tables -w -N "+chain).Code)
			for _, tt := range []struct{ line, want string }{
				{"iptables -w -I INPUT -p udp -j " + chain, "hook_ports"},
				{"iptables -w -I INPUT -p tcp -j " + chain, "every tcp port"},
				{"iptables -w -I INPUT -p udp --dport 39000:41000 -j " + chain, "local port range 40000:40100"},
				{"iptables -w -I INPUT -p tcp -m multiport --dports 143,40050 -j " + chain, "local port range"},
				{"iptables -w -I " + chain + " 1 -s 198.51.100.53 -j DROP", "never banned"},
				{"iptables -w -I " + chain + " 1 -s 198.51.100.0/24 -j DROP", "never banned"},
				{"ip6tables -w -I " + chain + " 1 -s 2001:db8:53::/64 -j DROP", "never banned"},
				{"iptables -w -I " + chain + " 1 -s 192.0.2.1 -j DROP", "never banned"},
			} {
				r := viaResolv(tt.line)
				assert.Equal(t, 3, r.Code, tt.line)
				assert.Contains(t, r.Stderr, tt.want, tt.line)
			}
			assert.Equal(t, 0, countJumps(t, ns, backend, "iptables", chain))
			r := viaResolv("iptables -w -I INPUT -p udp --dport 30000:39999 -j " + chain)
			assert.Equal(t, 0, r.Code, "ports below the local range are fine: %s", r.Stderr)
			r = viaResolv("iptables -w -I " + chain + " 1 -s 198.51.100.54 -j DROP")
			assert.Equal(t, 0, r.Code, "the resolver's neighbour is not the resolver: %s", r.Stderr)
		})
	}
	t.Run("hook_ports allows what the admin lists", func(t *testing.T) {
		ns, pol, _ := setup(t, "nft", `hook_ports = ["1:65535"]`+"\n")
		runAll(t, ns, pol, "iptables -w -N "+chain, "iptables -w -I INPUT -p udp -j "+chain)
	})
}

// Finding 6: iptables prints "--dport smtp" back as "-m tcp --dport 25";
// the live-rule reader refused it, so reconcile saw drift after a clean
// start, and a state rebuilt from the firewall lost the hook. Every rule
// the shim makes must read back as the operation that made it.
func TestEveryRuleReadsBackAsItsOperation(t *testing.T) {
	adds := map[string][]string{
		"iptables": {
			"-I INPUT -p tcp --dport smtp -j " + chain,
			"-I INPUT -p udp --dport 1000:2000 -j " + chain,
			"-I INPUT -p tcp -m multiport --dports pop3,pop3s,imap,imaps,sieve -j " + chain,
			"-I INPUT -p tcp -m multiport --dports 25,1000:2000 -j " + chain,
			"-A " + chain + " -j RETURN",
			"-I " + chain + " 1 -s 203.0.113.4 -j REJECT",
			"-I " + chain + " 1 -s 203.0.113.0/24 -j REJECT --reject-with icmp-host-prohibited",
			"-I " + chain + " 1 -s 198.51.100.7 -j DROP",
		},
		"ip6tables": {
			"-I INPUT -p tcp --dport 587 -j " + chain,
			"-I INPUT -p tcp -m multiport --dports 143,993 -j " + chain,
			"-A " + chain + " -j RETURN",
			"-I " + chain + " 1 -s 2001:db8:45::1 -j REJECT",
			"-I " + chain + " 1 -s 2001:db8:46::/64 -j DROP",
		},
	}
	ctx := policy.Context{LookupPort: hostnet.LookupPort}
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			ns, pol, _ := setup(t, backend, "")
			for bin, lines := range adds {
				runAll(t, ns, pol, bin+" -w -N "+chain)
				fam := map[string]policy.Family{"iptables": policy.IPv4, "ip6tables": policy.IPv6}[bin]
				for _, l := range lines {
					runAll(t, ns, pol, bin+" -w "+l)
					want, err := policy.Decide(policy.Default(), bin+" -w "+l, ctx)
					require.NoError(t, err)
					if want.Kind == policy.AddBan && usesSets(backend) {
						continue // a ban is a set member there; reconcile below reads it
					}
					wantEffect, _ := policy.HookEffect(want, hostnet.LookupPort)
					parent := string(want.Chain)
					found := false
					for _, saved := range strings.Split(ns.MustRun(t, bin+"-"+ipt(backend), "-S", parent), "\n") {
						c, err := policy.ParseSaved(fam, saved)
						if err != nil {
							continue
						}
						got := policy.Operation{Command: c}
						if want.Kind == policy.AddHook {
							e, _ := policy.HookEffect(got, hostnet.LookupPort)
							found = found || e == wantEffect
						} else {
							found = found || got.CommandLine() == want.CommandLine()
						}
					}
					assert.True(t, found, "%s: %q is not read back from iptables -S", backend, l)
				}
			}
			r := admin(t, ns, pol, "reconcile")
			assert.Equal(t, 0, r.Code, "no drift right after a clean start: %s%s", r.Stdout, r.Stderr)
			r = admin(t, ns, pol, "reconcile", "--fix")
			assert.Equal(t, 0, r.Code, r.Stdout)
			assert.NotContains(t, r.Stdout, "re-applied")

			// A reboot, and a restore from the state: every hook comes back.
			rebooted := nstest.NewNetns(t)
			r = admin(t, rebooted, pol, "restore")
			require.Equal(t, 0, r.Code, r.Stderr)
			for bin := range adds {
				// Hooks may come back in another order; each is there once.
				sorted := func(rules string) []string { l := strings.Split(rules, "\n"); slices.Sort(l); return l }
				assert.Equal(t, sorted(ns.Rules(t, bin, backend)), sorted(rebooted.Rules(t, bin, backend)), "%s after restore", bin)
			}
		})
	}
}

// Finding 7: ip6tables-legacy -C ignores match data, so with a
// "--dport 8080" hook in place a "--dport 9999" hook was reported
// unchanged, never installed, and yet recorded.
func TestHookChecksDoNotTrustIptablesC(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			ns, pol, audit := setup(t, backend, "")
			for _, bin := range []string{"iptables", "ip6tables"} {
				runAll(t, ns, pol, bin+" -w -N "+chain, bin+" -w -I INPUT -p tcp --dport 8080 -j "+chain)
				r := ns.Shim(t, shim, pol, bin+" -w -C INPUT -p tcp --dport 9999 -j "+chain)
				assert.Equal(t, 1, r.Code, "%s: a different hook checks false", bin)
				r = ns.Shim(t, shim, pol, bin+" -w -C INPUT -p tcp -m multiport --dports 1,2 -j "+chain)
				assert.Equal(t, 1, r.Code, "%s: a multiport hook of another port set checks false", bin)
				runAll(t, ns, pol, bin+" -w -I INPUT -p tcp --dport 9999 -j "+chain)
				assert.Equal(t, "applied", lastAudit(t, audit)["result"], bin)
				assert.Contains(t, ns.MustRun(t, bin+"-"+ipt(backend), "-S", "INPUT"), "--dport 9999 -j "+chain, "%s: the hook is really there", bin)
				runAll(t, ns, pol, bin+" -w -D INPUT -p tcp --dport 9999 -j "+chain)
				rules := ns.MustRun(t, bin+"-"+ipt(backend), "-S", "INPUT")
				assert.NotContains(t, rules, "--dport 9999", bin)
				assert.Contains(t, rules, "--dport 8080", "%s: removing one hook leaves the other", bin)
			}
		})
	}
}

// Finding 8: a /64 over the NAT64 prefix banned every IPv4 host reached
// through it, and a /120 there got past a never_ban of the IPv4 /24.
func TestNAT64BansAreJudgedAsIPv4(t *testing.T) {
	ns, pol, _ := setup(t, "nft", `never_ban = ["198.51.100.0/24"]`+"\n")
	runAll(t, ns, pol, "ip6tables -w -N "+chain)
	for _, src := range []string{"64:ff9b::/64", "64:ff9b::/96", "64:ff9b::c633:6400/120", "64:ff9b::cb00:0/104"} {
		r := ns.Shim(t, shim, pol, "ip6tables -w -I "+chain+" 1 -s "+src+" -j DROP")
		assert.Equal(t, 3, r.Code, src)
		assert.Contains(t, r.Stderr, "NAT64", src)
	}
	runAll(t, ns, pol, "ip6tables -w -I "+chain+" 1 -s 64:ff9b::cb00:7100/120 -j DROP")
	assert.Equal(t, []string{"64:ff9b::cb00:7100/120"}, banned(t, ns, "nft", "ip6tables", chain))
}

// Finding 9: a 4,084-byte command made a 24,693-byte audit line, and a
// flood of denials wrote one line each. Lines are at most 4 KiB, and a
// client's denials are coalesced per second, every one still counted.
func TestDenialFloodIsBoundedAndCounted(t *testing.T) {
	ns, pol, audit := setup(t, "nft", "")
	const flood = 200
	worst := "iptables -N " + strings.Repeat("\x01\u2028\"", 4080/6)
	for range flood {
		r := ns.Shim(t, shim, pol, worst)
		require.Equal(t, 3, r.Code)
	}
	runAll(t, ns, pol, "iptables -w -N "+chain) // flushes the last count
	data, err := os.ReadFile(audit)
	require.NoError(t, err)
	lines := strings.Split(strings.TrimSuffix(string(data), "\n"), "\n")
	longest, counted := 0, 0
	for _, l := range auditLines(t, audit) {
		if l["decision"] == "deny" {
			counted++
			if c, ok := l["count"].(float64); ok {
				counted += int(c) - 1
			}
		}
	}
	for _, l := range lines {
		longest = max(longest, len(l)+1)
	}
	assert.Equal(t, flood, counted, "every denial is counted")
	assert.Less(t, len(lines), flood/4, "the flood is coalesced")
	assert.LessOrEqual(t, longest, 4096)
	t.Logf("%d denials in %d audit lines (%d bytes); the longest line is %d bytes", flood, len(lines), len(data), longest)
}

// Finding 10: chain_prefix "FORW" passed, and then "iptables -F FORWARD"
// was allowed; "f2b-" exposed the proxy's own fail2ban chains.
func TestPrefixesThatReachOtherChainsAreRefused(t *testing.T) {
	for _, prefix := range []string{"FORW", "f2b-", "f2b-mail-"} {
		ns, pol, _ := setup(t, "legacy", fmt.Sprintf("chain_prefix = %q\n", prefix))
		ns.MustRun(t, "iptables-legacy", "-A", "FORWARD", "-s", "203.0.113.1", "-j", "DROP")
		ns.MustRun(t, "iptables-legacy", "-N", "f2b-mail-sshd")
		before := ns.Save(t, "legacy")
		for _, line := range []string{"iptables -w -F FORWARD", "iptables -w -F f2b-mail-sshd", "iptables -w -X f2b-mail-sshd"} {
			r := ns.Shim(t, shim, pol, line)
			assert.Equal(t, 5, r.Code, "%s with prefix %q", line, prefix)
			assert.Contains(t, r.Stderr, "chain_prefix")
		}
		assert.Equal(t, before, ns.Save(t, "legacy"), prefix)
	}
}

// Finding 4: two policies in one state_dir, one per mail host: one's
// compaction dropped the other's journal lines. Now each has its own
// state and lock, prefixes that nest are refused, and restore --all
// brings both back.
func TestTwoPoliciesShareAStateDir(t *testing.T) {
	nstest.RequireRoot(t, "iptables-nft")
	dir := t.TempDir()
	polDir := filepath.Join(dir, "etc")
	require.NoError(t, os.Mkdir(polDir, 0o755))
	write := func(name, prefix string) string {
		p := filepath.Join(polDir, name+".toml")
		require.NoError(t, os.WriteFile(p, []byte(fmt.Sprintf("name = %q\nchain_prefix = %q\naudit_log = %q\nstate_dir = %q\niptables_backend = \"nft\"\n",
			name, prefix, filepath.Join(dir, name+".jsonl"), filepath.Join(dir, "state"))), 0o644))
		return p
	}
	a, b := write("mx1", "mail-remote-mx1-"), write("mx2", "mail-remote-mx2-")
	ns := nstest.NewNetns(t)
	runAll(t, ns, a, "iptables -w -N mail-remote-mx1-imap", "iptables -w -I mail-remote-mx1-imap 1 -s 203.0.113.1 -j DROP")
	for i := range 50 {
		runAll(t, ns, b, "iptables -w -N mail-remote-mx2-imap", fmt.Sprintf("iptables -w -I mail-remote-mx2-imap 1 -s 198.51.100.%d -j DROP", i+1))
	}
	r := admin(t, ns, a, "list")
	assert.Contains(t, r.Stdout, "203.0.113.1/32")
	assert.NotContains(t, r.Stdout, "198.51.100.")
	r = admin(t, ns, b, "list", "--json")
	assert.Equal(t, 50, strings.Count(r.Stdout, `"type": "ban"`))
	assert.Empty(t, r.Stderr)

	rebooted := nstest.NewNetns(t)
	cmd := rebooted.Command(shim, "restore", "--all", "--dir", polDir)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	r = nstest.RunCmd(t, cmd)
	require.Equal(t, 0, r.Code, r.Stderr)
	assert.Contains(t, r.Stdout, `policy "mx1": restored ipv4: 1 chain, 1 ban,`)
	assert.Contains(t, r.Stdout, `policy "mx2": restored ipv4: 1 chain, 50 bans`)
	assert.Equal(t, ns.Rules(t, "iptables", "nft"), rebooted.Rules(t, "iptables", "nft"))

	nested := write("mx3", "mail-remote-mx1-x")
	r = ns.Shim(t, shim, nested, "iptables -w -F mail-remote-mx1-xa")
	assert.Equal(t, 5, r.Code)
	assert.Contains(t, r.Stderr, "nest")
	r = ns.Shim(t, shim, a, "iptables -w -N mail-remote-mx1-imap")
	assert.Equal(t, 5, r.Code, "the policy that nests is refused too, until the admin fixes one")
}

// Finding 5: the service user owns state_dir and the log directory, and
// root's admin commands followed the links it left there.
func TestLinksInTheShimsDirectoriesAreNotFollowed(t *testing.T) {
	ns, pol, audit := setup(t, "nft", "")
	stateDir := filepath.Join(filepath.Dir(pol), "state")
	require.NoError(t, os.MkdirAll(stateDir, 0o750))
	// The directories belong to an unprivileged user, as in the
	// least-privilege install; the links are what that user can make.
	for _, d := range []string{stateDir, filepath.Dir(audit)} {
		require.NoError(t, os.Chown(d, 65534, 65534))
	}
	secret := filepath.Join(t.TempDir(), "root-only")
	require.NoError(t, os.WriteFile(secret, []byte("root's\n"), 0o600))
	missing := filepath.Join(t.TempDir(), "nologin")
	for _, tt := range []struct {
		name, link, target string
		args               []string
	}{
		{"the lock, for list", filepath.Join(stateDir, "it-nft.lock"), missing, []string{"list"}},
		{"the state file, for restore", filepath.Join(stateDir, "it-nft.db"), secret, []string{"restore"}},
		{"the audit log, for restore", audit, secret, []string{"restore"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			require.NoError(t, os.Symlink(tt.target, tt.link))
			defer os.Remove(tt.link)
			r := admin(t, ns, pol, tt.args...)
			assert.Contains(t, r.Stderr, "symbolic link", r.Stderr)
			_, err := os.Stat(missing)
			assert.ErrorIs(t, err, os.ErrNotExist, "the link's target was not created")
			data, err := os.ReadFile(secret)
			require.NoError(t, err)
			assert.Equal(t, "root's\n", string(data), "the link's target was not written")
		})
	}
	t.Run("a hard link to root's file", func(t *testing.T) {
		link := filepath.Join(stateDir, "it-nft.lock")
		require.NoError(t, os.RemoveAll(link))
		require.NoError(t, os.Link(secret, link))
		defer os.Remove(link)
		r := admin(t, ns, pol, "list")
		assert.NotEqual(t, 0, r.Code)
		assert.Contains(t, r.Stderr, "hard links")
	})
	t.Run("the shim's own files are still the user's after root's commands", func(t *testing.T) {
		r := admin(t, ns, pol, "list")
		require.Equal(t, 0, r.Code, r.Stderr)
		for _, f := range []string{filepath.Join(stateDir, "it-nft.lock"), filepath.Join(stateDir, "it-nft.db")} {
			uid, _ := fileOwner(t, f)
			assert.Equal(t, uint32(65534), uid, f)
		}
	})
}

// Finding 3: replaying the journal was quadratic; after 20,000 bans and
// 10,000 ban/unban cycles the next request held the lock for 132 s and a
// concurrent ban timed out. Now a request does work that grows with its
// own work only: with that history in the state, a ban and an unban
// through the binary finish within an ordinary lock_timeout (the figure
// is logged; on the old main they failed with exit 4).
func TestLongHistoryDoesNotSlowARequest(t *testing.T) {
	for _, backend := range []string{"nft", "legacy+ipset"} {
		t.Run(backend, func(t *testing.T) {
			ns, pol, _ := setup(t, backend, `lock_timeout = "10s"`+"\n")
			runAll(t, ns, pol, "iptables -w -N "+chain)
			p := loadPolicy(t, pol)
			s, err := state.Open(p, hostnet.LookupPort, time.Second)
			require.NoError(t, err)
			// The history in batches of 1,000 changes, as a busy proxy
			// builds it over weeks.
			var batch []policy.Operation
			for i := range 20000 {
				batch = append(batch, decideOp(t, fmt.Sprintf("iptables -w -I %s 1 -s 10.%d.%d.%d -j DROP", chain, i>>16&255, i>>8&255, i&255)))
				if i%2 == 0 {
					l := fmt.Sprintf(" %s -s 10.200.%d.%d -j DROP", chain, i>>9&255, i>>1&255)
					batch = append(batch, decideOp(t, "iptables -w -I"+l), decideOp(t, "iptables -w -D"+l))
				}
				if len(batch) >= 1000 {
					require.NoError(t, s.RecordBatch(batch, time.Now()))
					batch = nil
				}
			}
			require.NoError(t, s.RecordBatch(batch, time.Now()))
			require.NoError(t, s.Close())
			start := time.Now()
			runAll(t, ns, pol, "iptables -w -I "+chain+" 1 -s 203.0.113.5 -j DROP", "iptables -w -D "+chain+" -s 203.0.113.5 -j DROP")
			t.Logf("a ban and an unban after 20,000 bans and 10,000 ban/unban cycles: %s", time.Since(start).Round(time.Millisecond))
		})
	}
}

// TestUpgradedJournalDoesNotStallTheLock is finding 3 as an upgraded
// proxy meets it: the journal of earlier versions holds 20,000 bans and
// 10,000 ban/unban cycles. The first request imports it into the state;
// a second request, started a moment later, must get the lock within an
// ordinary lock_timeout. On the main before the state (a journal replayed
// and compacted under the lock, in O(n²)) the first held the lock for
// minutes and the second failed with exit 4.
func TestUpgradedJournalDoesNotStallTheLock(t *testing.T) {
	ns, pol, _ := setup(t, "nft", `lock_timeout = "10s"`+"\n")
	stateDir := filepath.Join(filepath.Dir(pol), "state")
	require.NoError(t, os.MkdirAll(stateDir, 0o750))
	var journal strings.Builder
	line := func(cmd string) { fmt.Fprintf(&journal, `{"time":"2026-11-25T01:00:00Z","command":%q}`+"\n", cmd) }
	line("iptables -w -N " + chain)
	for i := range 20000 {
		line(fmt.Sprintf("iptables -w -I %s 1 -s 10.%d.%d.%d/32 -j DROP", chain, i>>16&255, i>>8&255, i&255))
		if i%2 == 0 {
			l := fmt.Sprintf(" %s -s 10.200.%d.%d/32 -j DROP", chain, i>>9&255, i>>1&255)
			line("iptables -w -I" + l)
			line("iptables -w -D" + l)
		}
	}
	require.NoError(t, os.WriteFile(filepath.Join(stateDir, "journal.jsonl"), []byte(journal.String()), 0o640))
	// The firewall holds what the journal says, as on a proxy upgraded in
	// place.
	var rules strings.Builder
	rules.WriteString("*filter\n:" + chain + " - [0:0]\n")
	for i := range 20000 {
		fmt.Fprintf(&rules, "-A %s -s 10.%d.%d.%d/32 -j DROP\n", chain, i>>16&255, i>>8&255, i&255)
	}
	rules.WriteString("COMMIT\n")
	restore := ns.Command("iptables-nft-restore", "--noflush")
	restore.Stdin = strings.NewReader(rules.String())
	out, err := restore.CombinedOutput()
	require.NoError(t, err, "%s", out)
	first := make(chan nstest.Result, 1)
	go func() { first <- ns.Shim(t, shim, pol, "iptables -w -I "+chain+" 1 -s 203.0.113.5 -j DROP") }()
	time.Sleep(200 * time.Millisecond)
	second := ns.Shim(t, shim, pol, "iptables -w -I "+chain+" 1 -s 203.0.113.6 -j DROP")
	assert.Equal(t, 0, second.Code, "the second request got the lock: %s", second.Stderr)
	r := <-first
	assert.Equal(t, 0, r.Code, r.Stderr)
	r = admin(t, ns, pol, "list", "--json")
	assert.Equal(t, 20002, strings.Count(r.Stdout, `"type": "ban"`), "the journal's 20,000 bans, and the two new ones")
}

func fileOwner(t *testing.T, path string) (uint32, uint32) {
	out, err := exec.Command("stat", "-c", "%u %g", path).Output()
	require.NoError(t, err)
	var uid, gid uint32
	_, err = fmt.Sscan(string(out), &uid, &gid)
	require.NoError(t, err)
	return uid, gid
}
