package integration

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/test/nstest"
)

// healWipe takes the shim's rules out of the firewall behind its back,
// as a reload does; saved is what iptables-save printed before the bans.
type healWipe struct {
	name string
	run  func(t *testing.T, ns *nstest.Netns, backend, saved string)
	// nftOnly: "nft flush ruleset" does not touch iptables-legacy's tables.
	nftOnly bool
}

var healWipes = []healWipe{
	{"the ban chain flushed", func(t *testing.T, ns *nstest.Netns, backend, _ string) {
		ns.MustRun(t, "iptables-"+ipt(backend), "-F", chain)
	}, false},
	{"the hook deleted (iptables -F INPUT)", func(t *testing.T, ns *nstest.Netns, backend, _ string) {
		ns.MustRun(t, "iptables-"+ipt(backend), "-F", "INPUT")
	}, false},
	{"iptables -F; iptables -X", func(t *testing.T, ns *nstest.Netns, backend, _ string) {
		ns.MustRun(t, "iptables-"+ipt(backend), "-F")
		ns.MustRun(t, "iptables-"+ipt(backend), "-X")
	}, false},
	{"nft flush ruleset", func(t *testing.T, ns *nstest.Netns, _, _ string) {
		ns.MustRun(t, "nft", "flush", "ruleset")
	}, true},
	{"iptables-restore of a file saved before the bans", func(t *testing.T, ns *nstest.Netns, backend, saved string) {
		cmd := ns.Command("iptables-" + ipt(backend) + "-restore")
		cmd.Stdin = strings.NewReader(saved)
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "%s", out)
	}, false},
}

// TestWipesHealOnNftAndLegacy: on both iptables backends and both ban
// backends, with 50 bans in place, after each wipe: status exits 1; one
// new ban (one-shot or streamed) puts back every ban, the return rule
// and the hook; after the same wipe, "reconcile --fix --all" (what the
// timer runs) does too; and restore's reload does too.
func TestWipesHealOnNftAndLegacy(t *testing.T) {
	for _, backend := range backends {
		for _, w := range healWipes {
			if w.nftOnly && ipt(backend) != "nft" {
				continue
			}
			t.Run(backend+", "+w.name, func(t *testing.T) {
				t.Parallel() // each in its own namespace
				if w.nftOnly {
					nstest.RequireRoot(t, "nft")
				}
				ns, pol, _ := setup(t, backend, "max_new_bans_per_minute = 1000\n")
				saved := ns.MustRun(t, "iptables-"+ipt(backend)+"-save", "-t", "filter")
				runAll(t, ns, pol, jailStart[:3]...)
				var want []string
				for i := 1; i <= 50; i++ {
					runAll(t, ns, pol, fmt.Sprintf("iptables -w -I %s 1 -s 198.51.100.%d -j DROP", chain, i))
					want = append(want, fmt.Sprintf("198.51.100.%d/32", i))
				}
				whole := func(extra ...string) {
					t.Helper()
					all := append(append([]string{}, want...), extra...)
					assert.ElementsMatch(t, all, banned(t, ns, backend, "iptables", chain))
					rules := ns.Rules(t, "iptables", backend)
					assert.Contains(t, rules, "-A INPUT -p tcp -m multiport --dports 143,993 -j "+chain)
					assert.Contains(t, rules, "-A "+chain+" -j RETURN")
				}
				whole()
				for i, contact := range []string{"one-shot", "stream", "reconcile --fix --all", "restore (ExecReload)"} {
					w.run(t, ns, backend, saved)
					r := admin(t, ns, pol, "status")
					assert.Equal(t, 1, r.Code, "status sees the wipe at once:\n%s", r.Stdout)
					ban := fmt.Sprintf("iptables -w -I %s 1 -s 203.0.113.%d -j DROP", chain, 100+i)
					switch contact {
					case "one-shot":
						runAll(t, ns, pol, ban)
					case "stream":
						r := ns.Stream(t, shim, pol, ban+"\n")
						require.Equal(t, 0, r.Code, r.Stderr)
						assert.Equal(t, "1 0 applied\n", r.Stdout)
					case "reconcile --fix --all":
						r := allPolicies(t, ns, pol, "reconcile", "--fix", "--quiet")
						assert.Equal(t, 0, r.Code, r.Stdout+r.Stderr)
						runAll(t, ns, pol, ban)
					default:
						r := allPolicies(t, ns, pol, "restore")
						assert.Equal(t, 0, r.Code, r.Stdout+r.Stderr)
						runAll(t, ns, pol, ban)
					}
					want = append(want, fmt.Sprintf("203.0.113.%d/32", 100+i))
					whole()
					r = admin(t, ns, pol, "status")
					assert.Equal(t, 0, r.Code, "%s: healed:\n%s", contact, r.Stdout)
				}
			})
		}
	}
}

// allPolicies runs an admin subcommand with --all --dir, for the
// directory that holds the test's one policy, as the units do.
func allPolicies(t *testing.T, ns *nstest.Netns, pol string, args ...string) nstest.Result {
	entries, err := os.ReadDir(filepath.Dir(pol))
	require.NoError(t, err)
	n := 0
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".toml") {
			n++
		}
	}
	require.Equal(t, 1, n, "the test's directory holds its one policy")
	cmd := ns.Command(shim, append(args, "--all", "--dir", filepath.Dir(pol))...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	return nstest.RunCmd(t, cmd)
}

// TestHealLeavesAHookWhoseParentChainIsGone: the admin deletes one of
// the policy's parent chains (their own chain, or docker's DOCKER-USER
// with docker gone) while a hook from it is recorded. That hook cannot
// be put back (iptables-restore refuses the whole repair), so the heal
// must not try: bans into the chain, still hooked from INPUT, go on
// landing, and each request heals nothing. Status still reports the
// lost hook as drift.
func TestHealLeavesAHookWhoseParentChainIsGone(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			t.Parallel() // each in its own namespace
			ns, pol, audit := setup(t, backend, "parent_chains = [\"INPUT\", \"ADMIN-IN\"]\n")
			ipt := "iptables-" + ipt(backend)
			ns.MustRun(t, ipt, "-N", "ADMIN-IN")
			runAll(t, ns, pol, jailStart[:3]...)
			runAll(t, ns, pol, "iptables -w -I ADMIN-IN -p tcp -m multiport --dports 143,993 -j "+chain,
				"iptables -w -I "+chain+" 1 -s 198.51.100.1 -j DROP")
			ns.MustRun(t, ipt, "-F", "ADMIN-IN")
			ns.MustRun(t, ipt, "-X", "ADMIN-IN")

			for i := 2; i <= 4; i++ {
				r := ns.Shim(t, shim, pol, fmt.Sprintf("iptables -w -I %s 1 -s 198.51.100.%d -j DROP", chain, i))
				assert.Equal(t, 0, r.Code, "a ban lands though a parent chain is gone: %s", r.Stderr)
			}
			r := ns.Stream(t, shim, pol, "iptables -w -I "+chain+" 1 -s 198.51.100.5 -j DROP\n")
			assert.Equal(t, "1 0 applied\n", r.Stdout, r.Stderr)
			assert.ElementsMatch(t, []string{"198.51.100.1/32", "198.51.100.2/32", "198.51.100.3/32", "198.51.100.4/32", "198.51.100.5/32"},
				banned(t, ns, backend, "iptables", chain))
			assert.Contains(t, ns.Rules(t, "iptables", backend), "-A INPUT -p tcp -m multiport --dports 143,993 -j "+chain)
			for _, l := range auditLines(t, audit) {
				assert.NotContains(t, fmt.Sprint(l["state"]), "repaired", "nothing could be put back, so nothing is said to be")
			}
			assert.Equal(t, 1, admin(t, ns, pol, "status").Code, "the lost hook is drift")

			// And the restore of a reload or a boot puts back the rest.
			ns.MustRun(t, ipt, "-F")
			ns.MustRun(t, ipt, "-X")
			r = allPolicies(t, ns, pol, "restore")
			assert.Equal(t, 0, r.Code, r.Stdout+r.Stderr)
			assert.Len(t, banned(t, ns, backend, "iptables", chain), 5)
		})
	}
}

// TestHealAfterMaxBansPerChainChanged: with the set backend, the admin
// changes max_bans_per_chain, then the firewall is wiped. The live set
// (made with the old maxelem) makes "ipset restore"'s "create -exist"
// fail, and a set made anew must hold the recorded bans though they
// are more than the new limit: otherwise no repair, no timer and no
// reload ever puts the chain back, and every ban into it fails. New
// bans still stop at the limit.
func TestHealAfterMaxBansPerChainChanged(t *testing.T) {
	for _, backend := range []string{"nft+ipset", "legacy+ipset"} {
		for _, c := range []struct {
			name, limit string
			wipe        func(ns *nstest.Netns, ipt string)
			later       int // the exit of a new ban after the heal
		}{
			{"raised, the ban chain flushed", "60000", func(ns *nstest.Netns, ipt string) {
				ns.MustRun(t, ipt, "-F", chain)
			}, 0},
			{"lowered below the bans, everything wiped", "2", func(ns *nstest.Netns, ipt string) {
				ns.MustRun(t, ipt, "-F")
				ns.MustRun(t, ipt, "-X")
				ns.MustRun(t, "ipset", "destroy")
			}, 3},
		} {
			t.Run(backend+", "+c.name, func(t *testing.T) {
				t.Parallel() // each in its own namespace
				ns, pol, _ := setup(t, backend, "")
				runAll(t, ns, pol, jailStart[:3]...)
				var want []string
				for i := 1; i <= 4; i++ {
					runAll(t, ns, pol, fmt.Sprintf("iptables -w -I %s 1 -s 198.51.100.%d -j DROP", chain, i))
					want = append(want, fmt.Sprintf("198.51.100.%d/32", i))
				}
				f, err := os.OpenFile(pol, os.O_APPEND|os.O_WRONLY, 0)
				require.NoError(t, err)
				_, err = fmt.Fprintf(f, "max_bans_per_chain = %s\n", c.limit)
				require.NoError(t, errors.Join(err, f.Close()))
				c.wipe(ns, "iptables-"+ipt(backend))

				r := ns.Shim(t, shim, pol, "iptables -w -I "+chain+" 1 -s 198.51.100.4 -j DROP")
				require.Equal(t, 0, r.Code, "a re-ban heals the chain: %s", r.Stderr)
				assert.ElementsMatch(t, want, banned(t, ns, backend, "iptables", chain))
				assert.Contains(t, ns.Rules(t, "iptables", backend), "-A INPUT -p tcp -m multiport --dports 143,993 -j "+chain)
				r = ns.Shim(t, shim, pol, "iptables -w -I "+chain+" 1 -s 198.51.100.9 -j DROP")
				assert.Equal(t, c.later, r.Code, r.Stderr)

				c.wipe(ns, "iptables-"+ipt(backend))
				r = allPolicies(t, ns, pol, "reconcile", "--fix", "--quiet")
				assert.Equal(t, 0, r.Code, "the timer heals it too: %s", r.Stdout+r.Stderr)
				assert.Equal(t, 0, admin(t, ns, pol, "status").Code)
				r = allPolicies(t, ns, pol, "restore", "--sets-only")
				assert.Equal(t, 0, r.Code, "netfilter-persistent's plugin, with the sets there: %s", r.Stdout+r.Stderr)
			})
		}
	}
}

// TestHealDoesNotReviveAnOwnAddressInASet: with the set backend a wipe
// of the chains leaves the sets, with what they held. A ban made before
// its address became one of the proxy's own stays in its set, where the
// policy now refuses it; the heal that puts the set's rule back must
// not bring that ban back into force with it (restore flushes the set
// and so does not either).
func TestHealDoesNotReviveAnOwnAddressInASet(t *testing.T) {
	for _, backend := range []string{"nft+ipset", "legacy+ipset"} {
		t.Run(backend, func(t *testing.T) {
			t.Parallel() // each in its own namespace
			ns, pol, _ := setup(t, backend, "")
			runAll(t, ns, pol, jailStart[:3]...)
			for i := 6; i <= 8; i++ {
				runAll(t, ns, pol, fmt.Sprintf("iptables -w -I %s 1 -s 198.51.100.%d -j DROP", chain, i))
			}
			ns.MustRun(t, "ip", "addr", "add", "198.51.100.7/32", "dev", "lo")
			ns.MustRun(t, "iptables-"+ipt(backend), "-F")
			ns.MustRun(t, "iptables-"+ipt(backend), "-X")

			runAll(t, ns, pol, "iptables -w -I "+chain+" 1 -s 198.51.100.9 -j DROP")
			assert.ElementsMatch(t, []string{"198.51.100.6/32", "198.51.100.8/32", "198.51.100.9/32"}, banned(t, ns, backend, "iptables", chain),
				"the proxy's own address is not banned again")
		})
	}
}

// TestReadBackKeepsARecordThePolicyRefusesNow: a failed request leaves
// its intent, and the next request reads the chain back. A recorded ban
// the policy refuses at that moment (here its address has just become
// one of the proxy's own; a never_ban edit or a resolver change does
// the same) is not put in force, but it must not be erased from the
// state either: no failure erases what the state holds.
func TestReadBackKeepsARecordThePolicyRefusesNow(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			t.Parallel() // each in its own namespace
			ns, pol, _ := setup(t, backend, "")
			runAll(t, ns, pol, jailStart[:3]...)
			for i := 6; i <= 8; i++ {
				runAll(t, ns, pol, fmt.Sprintf("iptables -w -I %s 1 -s 198.51.100.%d -j DROP", chain, i))
			}
			ns.MustRun(t, "ip", "addr", "add", "198.51.100.7/32", "dev", "lo")
			r := ns.Shim(t, shim, pol, "iptables -w -X "+chain)
			require.Equal(t, 4, r.Code, "a chain with rules in it cannot be deleted: %s", r.Stderr)
			r = ns.Shim(t, shim, pol, "iptables -w -C "+chain+" -s 198.51.100.6 -j DROP")
			require.Equal(t, 0, r.Code, r.Stderr)
			require.Contains(t, lastAuditState(t, pol), "cut short", "the chain was read back")
			ns.MustRun(t, "ip", "addr", "del", "198.51.100.7/32", "dev", "lo")

			out := admin(t, ns, pol, "list").Stdout
			for i := 6; i <= 8; i++ {
				assert.Contains(t, out, fmt.Sprintf(" 198.51.100.%d/32 ", i))
			}
		})
	}
}

// lastAuditState is the state field of the test policy's last audit line.
func lastAuditState(t *testing.T, pol string) string {
	lines := auditLines(t, filepath.Join(filepath.Dir(pol), "audit.jsonl"))
	require.NotEmpty(t, lines)
	return fmt.Sprint(lines[len(lines)-1]["state"])
}

// TestReBanAfterAnOlderSaveIsTrueOfTheFirewall: "iptables-restore" of a
// file saved after the jail started (netfilter-persistent's rules.v4,
// say) leaves the chain, its return rule and its hook, and loses the
// bans made since. A re-ban of one of those (one-shot, or streamed
// after a new ban) must not answer "unchanged" from the record alone:
// the heal finds the ban missing and puts back every lost one.
func TestReBanAfterAnOlderSaveIsTrueOfTheFirewall(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			t.Parallel() // each in its own namespace
			ns, pol, _ := setup(t, backend, "")
			runAll(t, ns, pol, jailStart[:3]...)
			runAll(t, ns, pol, "iptables -w -I "+chain+" 1 -s 198.51.100.1 -j DROP")
			saved := ns.MustRun(t, "iptables-"+ipt(backend)+"-save", "-t", "filter")
			want := []string{"198.51.100.1/32"}
			for i := 2; i <= 4; i++ {
				runAll(t, ns, pol, fmt.Sprintf("iptables -w -I %s 1 -s 198.51.100.%d -j DROP", chain, i))
				want = append(want, fmt.Sprintf("198.51.100.%d/32", i))
			}
			restoreSaved := func() {
				cmd := ns.Command("iptables-" + ipt(backend) + "-restore")
				cmd.Stdin = strings.NewReader(saved)
				out, err := cmd.CombinedOutput()
				require.NoError(t, err, "%s", out)
			}

			restoreSaved()
			runAll(t, ns, pol, "iptables -w -I "+chain+" 1 -s 198.51.100.3 -j DROP")
			assert.ElementsMatch(t, want, banned(t, ns, backend, "iptables", chain), "one-shot")

			restoreSaved()
			r := ns.Stream(t, shim, pol, "iptables -w -I "+chain+" 1 -s 198.51.100.9 -j DROP\niptables -w -I "+chain+" 1 -s 198.51.100.2 -j DROP\n")
			require.Equal(t, 0, r.Code, r.Stderr)
			assert.Equal(t, "1 0 applied\n2 0 unchanged\n", r.Stdout)
			assert.ElementsMatch(t, append(want, "198.51.100.9/32"), banned(t, ns, backend, "iptables", chain), "stream")
			assert.Equal(t, 0, admin(t, ns, pol, "status").Code)
		})
	}
}
