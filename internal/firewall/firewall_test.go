package firewall_test

import (
	"errors"
	"fmt"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/firewall/fwtest"
	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
)

const chain = "mail-remote-f2b-imap"

func op(t *testing.T, line string) policy.Operation {
	t.Helper()
	o, err := policy.Decide(policy.Default(), line, policy.Context{Client: netip.MustParseAddr("192.0.2.10")})
	require.NoError(t, err)
	return o
}

func limit(n int) *policy.Policy {
	pol := policy.Default()
	pol.MaxBansPerChain = n
	return pol
}

func rules(t firewall.Table, maxBans int) firewall.Backend {
	return firewall.Backend{Table: t, Policy: limit(maxBans)}
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
	for _, backend := range []string{"rules", "rules with the index", "ipset"} {
		t.Run(backend, func(t *testing.T) {
			fake, sets := fwtest.New(), fwtest.NewSets()
			b := rules(fake, 100)
			switch backend {
			case "ipset":
				b.Sets = sets
			case "rules with the index":
				b.Index = state.Index{Dir: t.TempDir()}
			}
			for _, s := range steps {
				t.Run(s.name, func(t *testing.T) {
					got, err := firewall.Apply(b, op(t, s.line))
					require.NoError(t, err)
					assert.Equal(t, s.want, got)
				})
			}
			assert.Equal(t, "-P INPUT ACCEPT\n-P FORWARD ACCEPT\n-P OUTPUT ACCEPT\n", fake.Dump(), "stop leaves nothing behind")
			assert.Empty(t, sets.Names(), "stop leaves no set behind")
		})
	}
}

func TestIndexedBansReadTheChainOnlyOnce(t *testing.T) {
	fake := fwtest.New()
	idx := state.Index{Dir: t.TempDir()}
	b := firewall.Backend{Table: fake, Policy: limit(3), Index: idx}
	for _, l := range []string{"iptables -N " + chain, "iptables -A " + chain + " -j RETURN"} {
		_, err := firewall.Apply(b, op(t, l))
		require.NoError(t, err)
	}
	// A ban made before the index existed (an upgrade, or by hand).
	require.NoError(t, fake.Insert(chain, 1, "-s", "203.0.113.1/32", "-j", "DROP"))
	fake.Calls = nil
	ban := func(ip string) (firewall.Outcome, error) {
		return firewall.Apply(b, op(t, "iptables -I "+chain+" 1 -s "+ip+" -j DROP"))
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
	assert.ErrorIs(t, err, firewall.ErrBanLimit, "the index counts the bans")
	b.Policy = limit(10)

	fake.Calls = nil
	got, err = firewall.Apply(b, op(t, "iptables -D "+chain+" -s 203.0.113.2 -j DROP"))
	require.NoError(t, err)
	assert.Equal(t, firewall.Applied, got)
	assert.Equal(t, []string{"Delete " + chain + " -s 203.0.113.2/32 -j DROP"}, fake.Calls, "one iptables call per unban")
	got, err = ban("203.0.113.4")
	require.NoError(t, err, "the unban made room")
	assert.Equal(t, firewall.Applied, got)

	// A shim killed after marking a ban: the next ban of that address
	// asks the chain instead of trusting the index.
	pending := op(t, "iptables -I "+chain+" 1 -s 203.0.113.9 -j DROP")
	require.NoError(t, idx.MarkPending(pending))
	require.NoError(t, fake.Insert(chain, 1, pending.RuleSpec()...)) // its iptables call went through
	got, err = ban("203.0.113.9")
	require.NoError(t, err)
	assert.Equal(t, firewall.Unchanged, got, "the killed shim's ban is not doubled")
	rules, err := fake.List(chain)
	require.NoError(t, err)
	assert.Len(t, rules, 1+3+1+1, "-N, three bans, the killed one once, RETURN: %v", rules)

	// An unban whose iptables call fails: the ban is neither lost from
	// the chain nor doubled by the next ban of that address.
	fake.Fail["Delete"] = errors.New("xtables lock held")
	_, err = firewall.Apply(b, op(t, "iptables -D "+chain+" -s 203.0.113.9 -j DROP"))
	require.Error(t, err)
	delete(fake.Fail, "Delete")
	got, err = ban("203.0.113.9")
	require.NoError(t, err)
	assert.Equal(t, firewall.Unchanged, got, "the ban is still in the chain, once")
	rules, err = fake.List(chain)
	require.NoError(t, err)
	assert.Len(t, rules, 6)

	// The chain goes behind the shim's back and comes back empty: the
	// flush fail2ban's repair sends makes the index forget it.
	require.NoError(t, fake.FlushChain(chain))
	_, err = firewall.Apply(b, op(t, "iptables -F "+chain))
	require.NoError(t, err)
	got, err = ban("203.0.113.3")
	require.NoError(t, err)
	assert.Equal(t, firewall.Applied, got, "a ban the firewall lost is made again")
}

func TestSetBackendKeepsTheChainShort(t *testing.T) {
	fake, sets := fwtest.New(), fwtest.NewSets()
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
		assert.ErrorIs(t, err, firewall.ErrBanLimit)
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
