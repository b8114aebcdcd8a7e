package firewall_test

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/firewall/fwtest"
	"github.com/f2b-shim/f2b-shim/internal/hostnet"
	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
)

const chain = "mail-remote-f2b-imap"

func op(t *testing.T, line string) policy.Operation {
	t.Helper()
	o, err := policy.Decide(policy.Default(), line, policy.Context{Client: netip.MustParseAddr("192.0.2.10"), LookupPort: hostnet.LookupPort})
	require.NoError(t, err)
	return o
}

// recorded is a backend with a record in a temp state_dir, kept as the
// shim keeps it: apply records every change that Apply carried out.
type recorded struct {
	firewall.Backend
	store *state.Store
}

func withRecord(t *testing.T, b firewall.Backend) *recorded {
	b.Policy.StateDir = t.TempDir()
	store, err := state.Open(b.Policy, hostnet.LookupPort, time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { store.Close() })
	b.Record, b.LookupPort = store, hostnet.LookupPort
	return &recorded{b, store}
}

func (r *recorded) apply(t *testing.T, o policy.Operation) (firewall.Outcome, error) {
	out, err := firewall.Apply(r.Backend, o)
	if err == nil && r.store != nil && state.Changes(o.Kind) {
		require.NoError(t, r.store.Record(o, out == firewall.Applied, time.Now()))
	}
	return out, err
}

func limit(n int) *policy.Policy {
	pol := policy.Default()
	pol.MaxBansPerChain = n
	return pol
}

func rules(t firewall.Table, maxBans int) firewall.Backend {
	return firewall.Backend{Table: t, Policy: limit(maxBans), LookupPort: hostnet.LookupPort}
}

func TestApplyFollowsFail2bansLifeCycle(t *testing.T) {
	const hook = "iptables -w -I INPUT -p tcp -m multiport --dports 143,993 -j " + chain
	steps := []struct {
		name string
		line string
		want firewall.Outcome
	}{
		{"a missing return rule checks false", "iptables -w -C " + chain + " -j RETURN", firewall.CheckFalse},
		{"the chain is created", "iptables -w -N " + chain, firewall.Applied},
		{"creating it again changes nothing", "iptables -w -N " + chain, firewall.Unchanged},
		{"the return rule is appended", "iptables -w -A " + chain + " -j RETURN", firewall.Applied},
		{"appending it again adds no duplicate", "iptables -w -A " + chain + " -j RETURN", firewall.Unchanged},
		{"a missing hook checks false", "iptables -w -C INPUT -p tcp -m multiport --dports 143,993 -j " + chain, firewall.CheckFalse},
		{"the 0.11 listing check is false before the hook", "iptables -n -L INPUT | grep -q '" + chain + `[ \t]'`, firewall.CheckFalse},
		{"the hook is inserted", hook, firewall.Applied},
		{"a second hook is not added", hook, firewall.Unchanged},
		{"the 0.11 listing check is true after the hook", "iptables -n -L INPUT | grep -q '" + chain + `[ \t]'`, firewall.CheckTrue},
		{"a ban is inserted", "iptables -w -I " + chain + " 1 -s 203.0.113.45 -j REJECT --reject-with icmp-port-unreachable", firewall.Applied},
		{"a duplicate ban changes nothing", "iptables -w -I " + chain + " 1 -s 203.0.113.45 -j REJECT", firewall.Unchanged},
		{"the ban checks true", "iptables -w -C " + chain + " -s 203.0.113.45 -j REJECT", firewall.CheckTrue},
		{"another address checks false", "iptables -w -C " + chain + " -s 203.0.113.46 -j REJECT", firewall.CheckFalse},
		{"unbanning an absent address succeeds unchanged", "iptables -w -D " + chain + " -s 203.0.113.46 -j REJECT", firewall.Unchanged},
		{"the ban is removed", "iptables -w -D " + chain + " -s 203.0.113.45 -j REJECT", firewall.Applied},
		{"the hook is removed", "iptables -w -D INPUT -p tcp -m multiport --dports 143,993 -j " + chain, firewall.Applied},
		{"removing it again succeeds unchanged", "iptables -w -D INPUT -p tcp -m multiport --dports 143,993 -j " + chain, firewall.Unchanged},
		{"the chain is flushed", "iptables -w -F " + chain, firewall.Applied},
		{"the chain is deleted", "iptables -w -X " + chain, firewall.Applied},
		{"flushing an absent chain succeeds unchanged", "iptables -w -F " + chain, firewall.Unchanged},
		{"deleting an absent chain succeeds unchanged", "iptables -w -X " + chain, firewall.Unchanged},
		{"unhooking with the chain gone succeeds unchanged", "iptables -w -D INPUT -p tcp --dport 143 -j " + chain, firewall.Unchanged},
		{"checking a hook with the chain gone is false", "iptables -w -C INPUT -p tcp --dport 143 -j " + chain, firewall.CheckFalse},
	}
	for _, backend := range []string{"rules", "rules with the record", "ipset", "ipset with the record"} {
		t.Run(backend, func(t *testing.T) {
			fake := fwtest.New()
			sets := fwtest.NewSets(fake)
			b := &recorded{Backend: rules(fake, 100)}
			if strings.HasPrefix(backend, "ipset") {
				b.Sets = sets
			}
			if strings.HasSuffix(backend, "with the record") {
				b = withRecord(t, b.Backend)
			}
			for _, s := range steps {
				t.Run(s.name, func(t *testing.T) {
					got, err := b.apply(t, op(t, s.line))
					require.NoError(t, err)
					assert.Equal(t, s.want, got)
				})
			}
			assert.Equal(t, "-P INPUT ACCEPT\n-P FORWARD ACCEPT\n-P OUTPUT ACCEPT\n", fake.Dump(), "stop leaves nothing behind")
			assert.Empty(t, sets.Names(), "stop leaves no set behind")
		})
	}
}

func TestRecordedBansReadTheChainOnlyOnce(t *testing.T) {
	fake := fwtest.New()
	b := withRecord(t, rules(fake, 3))
	// A chain and a ban made before the record existed (an upgrade, or
	// by hand): the record does not hold the chain in sync.
	require.NoError(t, fake.NewChain(chain))
	require.NoError(t, fake.Append(chain, "-j", "RETURN"))
	require.NoError(t, fake.Insert(chain, 1, "-s", "203.0.113.1/32", "-j", "DROP"))
	fake.Calls = nil
	ban := func(ip string) (firewall.Outcome, error) {
		return b.apply(t, op(t, "iptables -I "+chain+" 1 -s "+ip+" -j DROP"))
	}
	got, err := ban("203.0.113.1")
	require.NoError(t, err)
	assert.Equal(t, firewall.Unchanged, got, "the first ban learns the chain, and finds the old ban")
	assert.Equal(t, []string{"List " + chain}, fake.Calls)

	fake.Calls = nil
	for _, ip := range []string{"203.0.113.2", "203.0.113.3"} {
		got, err := ban(ip)
		require.NoError(t, err)
		assert.Equal(t, firewall.Applied, got)
	}
	assert.Equal(t, []string{"Insert " + chain + " 1 -s 203.0.113.2/32 -j DROP", "Insert " + chain + " 1 -s 203.0.113.3/32 -j DROP"}, fake.Calls,
		"after that, one iptables call per ban")
	got, err = ban("203.0.113.3")
	require.NoError(t, err)
	assert.Equal(t, firewall.Unchanged, got)
	_, err = ban("203.0.113.4")
	assert.ErrorIs(t, err, firewall.ErrLimit, "the record counts the bans")
	b.Policy.MaxBansPerChain = 10

	fake.Calls = nil
	got, err = b.apply(t, op(t, "iptables -D "+chain+" -s 203.0.113.2 -j DROP"))
	require.NoError(t, err)
	assert.Equal(t, firewall.Applied, got)
	assert.Equal(t, []string{"Delete " + chain + " -s 203.0.113.2/32 -j DROP"}, fake.Calls, "one iptables call per unban")
	got, err = ban("203.0.113.4")
	require.NoError(t, err, "the unban made room")
	assert.Equal(t, firewall.Applied, got)

	// An unban whose iptables call fails is not recorded: the ban is
	// neither lost from the chain nor doubled by the next ban of it.
	fake.Fail["Delete"] = errors.New("xtables lock held")
	_, err = b.apply(t, op(t, "iptables -D "+chain+" -s 203.0.113.4 -j DROP"))
	require.Error(t, err)
	delete(fake.Fail, "Delete")
	got, err = ban("203.0.113.4")
	require.NoError(t, err)
	assert.Equal(t, firewall.Unchanged, got, "the ban is still in the chain, once")
	rules, err := fake.List(chain)
	require.NoError(t, err)
	assert.Len(t, rules, 1+3+1, "-N, three bans, RETURN: %v", rules)

	// The chain goes behind the shim's back and comes back empty: the
	// flush fail2ban's repair sends empties the record too.
	require.NoError(t, fake.FlushChain(chain))
	_, err = b.apply(t, op(t, "iptables -F "+chain))
	require.NoError(t, err)
	got, err = ban("203.0.113.3")
	require.NoError(t, err)
	assert.Equal(t, firewall.Applied, got, "a ban the firewall lost is made again")

	// A reboot without restore: fail2ban creates the chain anew, and the
	// record of the old chain's bans goes with it.
	require.NoError(t, fake.FlushChain(chain))
	require.NoError(t, fake.DeleteChain(chain))
	got, err = b.apply(t, op(t, "iptables -N "+chain))
	require.NoError(t, err)
	assert.Equal(t, firewall.Applied, got)
	got, err = ban("203.0.113.3")
	require.NoError(t, err)
	assert.Equal(t, firewall.Applied, got, "the ban goes into the new chain")
}

func TestHooksAreComparedByEffect(t *testing.T) {
	for _, withSets := range []bool{false, true} {
		fake := fwtest.New()
		b := withRecord(t, rules(fake, 10))
		if withSets {
			b.Sets = fwtest.NewSets(fake)
		}
		b.Policy.MaxHooksPerChain = 3
		for _, l := range []string{"iptables -N " + chain, "iptables -I INPUT -p tcp -m multiport --dports imap,imaps -j " + chain} {
			_, err := b.apply(t, op(t, l))
			require.NoError(t, err)
		}
		steps := []struct {
			line string
			want firewall.Outcome
			err  error
		}{
			{"iptables -I INPUT -p tcp -m multiport --dports 993,143 -j " + chain, firewall.Unchanged, nil},
			{"iptables -C INPUT -p tcp -m multiport --dports 143,993 -j " + chain, firewall.CheckTrue, nil},
			{"iptables -C INPUT -p tcp -m multiport --dports 143,995 -j " + chain, firewall.CheckFalse, nil},
			{"iptables -I INPUT -p tcp --dport smtp -j " + chain, firewall.Applied, nil},
			{"iptables -I INPUT -p tcp -m multiport --dports 25 -j " + chain, firewall.Unchanged, nil},
			{"iptables -C INPUT -p tcp --dport 25 -j " + chain, firewall.CheckTrue, nil},
			{"iptables -I INPUT -p udp --dport 25 -j " + chain, firewall.Applied, nil},
			{"iptables -I INPUT -p tcp --dport 26 -j " + chain, 0, firewall.ErrLimit},
			{"iptables -D INPUT -p tcp -m multiport --dports imaps,imap -j " + chain, firewall.Applied, nil},
			{"iptables -C INPUT -p tcp -m multiport --dports 143,993 -j " + chain, firewall.CheckFalse, nil},
			{"iptables -I INPUT -p tcp --dport 26 -j " + chain, firewall.Applied, nil},
		}
		for _, s := range steps {
			got, err := b.apply(t, op(t, s.line))
			if s.err != nil {
				assert.ErrorIs(t, err, s.err, s.line)
				continue
			}
			require.NoError(t, err, s.line)
			assert.Equal(t, s.want, got, s.line)
		}
		rules, err := fake.List("INPUT")
		require.NoError(t, err)
		assert.Equal(t, []string{"-P INPUT ACCEPT",
			"-A INPUT -p tcp -m tcp --dport 26 -j " + chain,
			"-A INPUT -p udp -m udp --dport 25 -j " + chain,
			"-A INPUT -p tcp -m tcp --dport smtp -j " + chain}, rules, "(the fake keeps service names; iptables prints 25)")
	}
}

func TestChainLimit(t *testing.T) {
	b := withRecord(t, rules(fwtest.New(), 10))
	b.Policy.MaxChains = 2
	for _, name := range []string{"a", "b"} {
		got, err := b.apply(t, op(t, "iptables -N mail-remote-f2b-"+name))
		require.NoError(t, err)
		assert.Equal(t, firewall.Applied, got)
	}
	_, err := b.apply(t, op(t, "iptables -N mail-remote-f2b-c"))
	assert.ErrorIs(t, err, firewall.ErrLimit)
	_, err = b.apply(t, op(t, "ip6tables -N mail-remote-f2b-c"))
	assert.NoError(t, err, "the limit is per family")
	_, err = b.apply(t, op(t, "iptables -X mail-remote-f2b-a"))
	require.NoError(t, err)
	_, err = b.apply(t, op(t, "iptables -N mail-remote-f2b-c"))
	assert.NoError(t, err, "deleting a chain makes room")
}

func TestSetBackendKeepsTheChainShort(t *testing.T) {
	fake := fwtest.New()
	sets := fwtest.NewSets(fake)
	b := firewall.Backend{Table: fake, Sets: sets, Policy: limit(1000)}
	for _, l := range []string{"iptables -N " + chain, "iptables -A " + chain + " -j RETURN"} {
		_, err := firewall.Apply(b, op(t, l))
		require.NoError(t, err)
	}
	for i := range 200 {
		_, err := firewall.Apply(b, op(t, fmt.Sprintf("iptables -I %s 1 -s 198.51.%d.%d -j DROP", chain, 100+i/100, i%100)))
		require.NoError(t, err)
	}
	_, err := firewall.Apply(b, op(t, "iptables -I "+chain+" 1 -s 203.0.113.1 -j REJECT"))
	require.NoError(t, err)
	rules, err := fake.List(chain)
	require.NoError(t, err)
	assert.Len(t, rules, 4, "-N, one set rule per target in use, RETURN: %v", rules)
	drop := firewall.SetName(policy.IPv4, chain, policy.Target{Kind: policy.Drop})
	members, err := sets.Members(drop)
	require.NoError(t, err)
	assert.Len(t, members, 200)
	assert.Equal(t, "-A "+chain+" -m set --match-set "+drop+" src -j DROP", rules[2])
}

func TestApplyRefusesBansPastTheLimit(t *testing.T) {
	fake := fwtest.New()
	for _, l := range []string{"iptables -N " + chain, "iptables -A " + chain + " -j RETURN",
		"iptables -I " + chain + " 1 -s 203.0.113.1 -j DROP", "iptables -I " + chain + " 1 -s 203.0.113.2 -j DROP"} {
		_, err := firewall.Apply(rules(fake, 2), op(t, l))
		require.NoError(t, err)
	}
	t.Run("a third ban is refused", func(t *testing.T) {
		_, err := firewall.Apply(rules(fake, 2), op(t, "iptables -I "+chain+" 1 -s 203.0.113.3 -j DROP"))
		assert.ErrorIs(t, err, firewall.ErrLimit)
	})
	t.Run("a duplicate of a ban in place still succeeds", func(t *testing.T) {
		got, err := firewall.Apply(rules(fake, 2), op(t, "iptables -I "+chain+" 1 -s 203.0.113.2 -j DROP"))
		require.NoError(t, err)
		assert.Equal(t, firewall.Unchanged, got)
	})
	t.Run("an unban still works", func(t *testing.T) {
		got, err := firewall.Apply(rules(fake, 2), op(t, "iptables -D "+chain+" -s 203.0.113.1 -j DROP"))
		require.NoError(t, err)
		assert.Equal(t, firewall.Applied, got)
	})
}

func TestApplyPassesFirewallErrorsOn(t *testing.T) {
	fake := fwtest.New()
	boom := errors.New("iptables exploded")
	fake.Fail["NewChain"] = boom
	_, err := firewall.Apply(rules(fake, 10), op(t, "iptables -N "+chain))
	assert.ErrorIs(t, err, boom)

	_, err = firewall.Apply(rules(fwtest.New(), 10), op(t, "iptables -I "+chain+" 1 -s 203.0.113.1 -j DROP"))
	assert.Error(t, err, "a ban into a missing chain fails, as in iptables")
}

// TestSetBackendNoticesAFlushBehindItsBack: the ordinary set ban reads
// neither the chain nor the rule; a set whose rule is gone (an outside
// "iptables -F") says so by its reference count, and the rule comes back;
// a chain that is gone fails the ban, which makes fail2ban repair it.
func TestSetBackendNoticesAFlushBehindItsBack(t *testing.T) {
	fake := fwtest.New()
	sets := fwtest.NewSets(fake)
	b := firewall.Backend{Table: fake, Sets: sets, Policy: limit(100)}
	for _, l := range []string{"iptables -N " + chain, "iptables -A " + chain + " -j RETURN", "iptables -I " + chain + " 1 -s 203.0.113.1 -j DROP"} {
		_, err := firewall.Apply(b, op(t, l))
		require.NoError(t, err)
	}
	fake.Calls = nil
	got, err := firewall.Apply(b, op(t, "iptables -I "+chain+" 1 -s 203.0.113.2 -j DROP"))
	require.NoError(t, err)
	assert.Equal(t, firewall.Applied, got)
	assert.Empty(t, fake.Calls, "an ordinary ban runs no iptables")

	require.NoError(t, fake.FlushChain(chain))
	got, err = firewall.Apply(b, op(t, "iptables -I "+chain+" 1 -s 203.0.113.3 -j DROP"))
	require.NoError(t, err)
	assert.Equal(t, firewall.Applied, got)
	rules, err := fake.List(chain)
	require.NoError(t, err)
	assert.Contains(t, rules, "-A "+chain+" -m set --match-set "+firewall.SetName(policy.IPv4, chain, policy.Target{Kind: policy.Drop})+" src -j DROP", "the rule is back")

	require.NoError(t, fake.FlushChain(chain))
	require.NoError(t, fake.DeleteChain(chain))
	_, err = firewall.Apply(b, op(t, "iptables -I "+chain+" 1 -s 203.0.113.4 -j DROP"))
	assert.Error(t, err, "a ban into a chain that is gone fails")
}

// TestABatchedBanThatFailsDoesNotFailItsNeighbours: a batch's queued
// bans go to the firewall in one iptables-restore, all or nothing. When
// it fails, each ban is inserted on its own and gets its own true result:
// the ban into a chain that is gone fails, the bans around it land.
func TestABatchedBanThatFailsDoesNotFailItsNeighbours(t *testing.T) {
	f := fwtest.New()
	require.NoError(t, f.NewChain("mail-remote-f2b-a"))
	b := &firewall.Batched{Table: f, Restore: f.Restore, Queue: true}
	for i, c := range []string{"mail-remote-f2b-a", "mail-remote-f2b-gone", "mail-remote-f2b-a"} {
		b.Ticket = i
		require.NoError(t, b.Insert(c, 1, "-s", fmt.Sprintf("203.0.113.%d/32", i+1), "-j", "DROP"))
	}
	failed := b.Flush()
	require.Len(t, failed, 1)
	assert.Contains(t, failed, 1)
	rules, err := f.List("mail-remote-f2b-a")
	require.NoError(t, err)
	assert.Equal(t, []string{"-N mail-remote-f2b-a", "-A mail-remote-f2b-a -s 203.0.113.3/32 -j DROP", "-A mail-remote-f2b-a -s 203.0.113.1/32 -j DROP"}, rules)
	assert.Contains(t, f.Calls, "Restore 5", "one iptables-restore for the three bans, tried first")
}
