package engine_test

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/internal/audit"
	"github.com/f2b-shim/f2b-shim/internal/engine"
	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/hostnet"
	"github.com/f2b-shim/f2b-shim/internal/nftables"
	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
	"github.com/f2b-shim/f2b-shim/test/nstest"
)

// nftRig is an engine on the real nftables backend, in a fresh network
// namespace: nothing here touches the host's firewall. google/nftables
// allows one table per process, so these tests do not run in parallel.
type nftRig struct {
	*rig
	ns *nstest.Netns
}

func newNFTRig(t *testing.T) *nftRig {
	nstest.RequireRoot(t, "nft")
	ns := nstest.NewNetns(t)
	f, err := os.Open(filepath.Join("/var/run/netns", ns.Name))
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	tbl, err := nftables.Open("", nftables.WithNetNS(int(f.Fd())), nftables.WithAddressSets())
	require.NoError(t, err)
	t.Cleanup(func() { tbl.Close() })

	pol := policy.Default()
	pol.Name, pol.StateDir, pol.Backend, pol.MaxBanTime = "test", t.TempDir(), "nftables", time.Hour
	ctx := policy.Context{LocalAddrs: []netip.Addr{netip.MustParseAddr("192.0.2.1")}, LookupPort: hostnet.LookupPort}
	r := &rig{t: t, now: time.Now()}
	r.e = &engine.Engine{Pol: pol, Ctx: ctx, Deadline: time.Now().Add(time.Minute), Ports: engine.Ports{
		OpenNFT: func(string) (firewall.NFT, error) { return tbl, nil },
		Now:     func() time.Time { return r.now },
	}}
	store, err := state.Open(pol, ctx.LookupPort, time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { store.Close() })
	r.store = store
	return &nftRig{rig: r, ns: ns}
}

// drift compares the record with the live table, as reconcile does.
func (r *nftRig) drift() []string {
	want, _, err := r.store.Load(r.e.Ctx)
	require.NoError(r.t, err)
	var out []string
	for _, fam := range engine.Families {
		b, err := r.e.Open(fam, r.store, engine.NoBatch)
		require.NoError(r.t, err)
		live := state.New(r.e.Ctx.LookupPort)
		got, err := b.Read(live, "")
		require.NoError(r.t, err)
		out = append(out, got.Foreign...)
		for _, name := range want.Tables[fam].ChainNames() {
			wc, lc := want.Tables[fam].Chains[name], live.Tables[fam].Chains[name]
			if lc == nil {
				out = append(out, fmt.Sprintf("%s chain %s missing", fam, name))
				continue
			}
			if wc.Len() != lc.Len() || wc.Return != lc.Return {
				out = append(out, fmt.Sprintf("%s chain %s: %d bans live, %d recorded", fam, name, lc.Len(), wc.Len()))
			}
		}
		if len(want.Tables[fam].Hooks) != len(live.Tables[fam].Hooks) {
			out = append(out, fmt.Sprintf("%s: %d hooks live, %d recorded", fam, len(live.Tables[fam].Hooks), len(want.Tables[fam].Hooks)))
		}
	}
	return out
}

func TestNFTablesBackendLifeCycle(t *testing.T) {
	r := newNFTRig(t)
	r.start(10)
	for _, line := range []string{
		"ip6tables -w -I INPUT -p tcp --dport 22 -j " + chain,
		"ip6tables -w -I " + chain + " 1 -s 2001:db8::7 -j DROP",
		"iptables -w -I " + chain + " 1 -s 198.51.100.0/24 -j REJECT --reject-with icmp-port-unreachable",
	} {
		out, err := r.serve(line)
		require.NoError(t, err, line)
		assert.Equal(t, firewall.Applied, out, line)
	}
	assert.Empty(t, r.drift(), "the table holds what the record says")

	tests := []struct {
		line string
		want firewall.Outcome
	}{
		{ban(0), firewall.Unchanged},
		{"iptables -w -C " + chain + " -s 203.0.113.1 -j REJECT --reject-with icmp-port-unreachable", firewall.CheckTrue},
		{"iptables -w -C " + chain + " -s 203.0.113.99 -j REJECT --reject-with icmp-port-unreachable", firewall.CheckFalse},
		{"iptables -w -C " + chain + " -j RETURN", firewall.CheckTrue},
		{"iptables -w -C INPUT -p tcp -m multiport --dports 25,22 -j " + chain, firewall.CheckTrue},
		{"iptables -w -I INPUT -p tcp -m multiport --dports 25,22 -j " + chain, firewall.Unchanged},
		{"iptables -w -D " + chain + " -s 203.0.113.1 -j REJECT --reject-with icmp-port-unreachable", firewall.Applied},
		{"iptables -w -D " + chain + " -s 203.0.113.1 -j REJECT --reject-with icmp-port-unreachable", firewall.Unchanged},
		{"iptables -w -N " + chain, firewall.Unchanged},
	}
	for _, tt := range tests {
		t.Run(tt.line, func(t *testing.T) {
			out, err := r.serve(tt.line)
			require.NoError(t, err)
			assert.Equal(t, tt.want, out)
		})
	}
	assert.Empty(t, r.drift())
	elems := r.ns.MustRun(t, "nft", "list", "set", "inet", nftables.DefaultTable, chain+"-v4-addr")
	assert.Regexp(t, `203\.0\.113\.2 timeout 1h expires`, elems, "max_ban_time is the element's timeout")
	assert.NotContains(t, elems, "203.0.113.1 ", "the unban lifted it")

	// fail2ban's stop: unhook, flush, delete, both families.
	for _, line := range []string{
		"iptables -w -D INPUT -p tcp -m multiport --dports 22,25 -j " + chain,
		"iptables -w -F " + chain,
		"iptables -w -X " + chain,
		"ip6tables -w -D INPUT -p tcp --dport 22 -j " + chain,
		"ip6tables -w -F " + chain,
		"ip6tables -w -X " + chain,
	} {
		out, err := r.serve(line)
		require.NoError(t, err, line)
		assert.Equal(t, firewall.Applied, out, line)
	}
	assert.NotContains(t, r.ns.MustRun(t, "nft", "list", "ruleset"), "chain "+chain)
	require.NoError(t, r.e.DropEmptyTable())
	assert.Empty(t, strings.TrimSpace(r.ns.MustRun(t, "nft", "list", "ruleset")), "an empty table goes")
}

var expires = regexp.MustCompile(`expires ([0-9]+)m`)

func TestNFTablesHealsAFlushedRulesetWithTheBansTimeLeft(t *testing.T) {
	r := newNFTRig(t)
	r.start(50)
	r.now = r.now.Add(20 * time.Minute) // the bans were made 20 minutes ago
	r.ns.MustRun(t, "nft", "flush", "ruleset")
	assert.NotEmpty(t, r.drift())
	out, err := r.serve(ban(60))
	require.NoError(t, err)
	assert.Equal(t, firewall.Applied, out)
	assert.Empty(t, r.drift(), "every ban, hook and chain is back")
	elems := r.ns.MustRun(t, "nft", "list", "set", "inet", nftables.DefaultTable, chain+"-v4-addr")
	m := expires.FindAllStringSubmatch(elems, -1)
	require.Len(t, m, 51)
	short := 0
	for _, e := range m {
		if e[1] < "40" {
			short++
		}
	}
	assert.Equal(t, 50, short, "a ban put back keeps what is left of max_ban_time (about 40 minutes), not a new hour")
}

func TestNFTablesStreamBatchIsOneTransactionAndFailsLineByLine(t *testing.T) {
	r := newNFTRig(t)
	r.start(0)
	for _, line := range []string{"iptables -w -N mail-remote-f2b-other", "iptables -w -A mail-remote-f2b-other -j RETURN"} {
		_, err := r.serve(line)
		require.NoError(t, err)
	}
	b, err := r.e.Open(policy.IPv4, r.store, engine.StreamBatch)
	require.NoError(t, err)
	var ops []policy.Operation
	for i := range 600 {
		c := chain
		if i%2 == 1 {
			c = "mail-remote-f2b-other"
		}
		op := r.op(fmt.Sprintf("iptables -w -I %s 1 -s 198.51.%d.%d -j DROP", c, 100+i/250, i%250+1))
		ops = append(ops, op)
		require.NoError(t, r.store.SetIntent(op))
		b.Queue(op, i)
		var rec audit.Record
		_, err := r.e.Serve(r.store, b, op, &rec, r.now)
		require.NoError(t, err)
	}
	assert.NotContains(t, r.ns.MustRun(t, "nft", "list", "ruleset"), "198.51.100.1", "nothing is sent before the flush")
	// The other chain goes behind the batch's back: the transaction
	// fails as a whole, and each ban is sent again on its own.
	r.ns.MustRun(t, "nft", "delete", "chain", "inet", nftables.DefaultTable, "mail-remote-f2b-other")
	failed := b.Flush()
	assert.Len(t, failed, 300, "only the bans into the missing chain fail")
	for i := range failed {
		assert.Equal(t, 1, i%2, "ban %d failed", i)
		require.NoError(t, engine.TakeBack(r.store, ops[i], r.now))
	}
	assert.Equal(t, 300, r.live4(chain))
	assert.Equal(t, 300, r.recorded(policy.IPv4))
}

// live4 counts the elements of a chain's IPv4 sets.
func (r *nftRig) live4(c string) int {
	n := 0
	for _, set := range []string{c + "-v4", c + "-v4-addr"} {
		out, err := r.ns.Run("nft", "list", "set", "inet", nftables.DefaultTable, set)
		if err == nil {
			n += strings.Count(out, "timeout 1h")
		}
	}
	return n
}

// TestNFTablesKeepsOneTargetPerChainPart: a chain part has one verdict
// rule for all its bans, so a ban with another target would change every
// ban's; it is refused until the chain is flushed (a jail's restart).
func TestNFTablesKeepsOneTargetPerChainPart(t *testing.T) {
	r := newNFTRig(t)
	r.start(2)
	drop := "iptables -w -I " + chain + " 1 -s 203.0.113.50 -j DROP"
	_, err := r.serve(drop)
	require.Error(t, err)
	assert.ErrorIs(t, err, firewall.ErrLimit)
	assert.Contains(t, err.Error(), "one target per chain")
	assert.Equal(t, 2, r.recorded(policy.IPv4))
	assert.Contains(t, r.ns.MustRun(t, "nft", "list", "chain", "inet", nftables.DefaultTable, chain), "reject", "the chain's bans keep their target")

	_, err = r.serve("iptables -w -F " + chain)
	require.NoError(t, err)
	out, err := r.serve(drop)
	require.NoError(t, err)
	assert.Equal(t, firewall.Applied, out, "after a flush any target goes")
	assert.Contains(t, r.ns.MustRun(t, "nft", "list", "chain", "inet", nftables.DefaultTable, chain), "drop")
}
