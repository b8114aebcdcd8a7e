package nftables

import (
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/policy"
)

// fail2ban's own order: actionstart, bans, actionstop; then what an admin
// or reconcile meets.
func TestSystemLifecycle(t *testing.T) {
	for _, layout := range layouts {
		t.Run(layout.name, func(t *testing.T) { testSystemLifecycle(t, layout.opts) })
	}
}

func testSystemLifecycle(t *testing.T, opts []Option) {
	tbl, ns := nsTable(t, opts...)
	sshd := Hook{Family: policy.IPv4, Chain: "f2b-sshd", Proto: "tcp", Ports: []policy.PortRange{pr(22, 22)}}
	sshd6 := sshd
	sshd6.Family = policy.IPv6
	mail := Hook{Family: policy.IPv4, Chain: "f2b-mail", Proto: "tcp", Ports: []policy.PortRange{pr(25, 25), pr(465, 465), pr(587, 587)}}
	start := func(b *Batch) {
		ensureBoth(b, sshd.Chain)
		b.EnsureChain(mail.Chain, policy.IPv4)
		for _, h := range []Hook{sshd, sshd6, mail} {
			b.EnsureHook(h)
		}
		b.SetVerdict(sshd.Chain, policy.IPv4, reject4)
		b.SetVerdict(sshd.Chain, policy.IPv6, reject6)
		b.SetVerdict(mail.Chain, policy.IPv4, drop)
		b.AddBans(sshd.Chain, bans(0, "192.0.2.7/32", "2001:db8:1:2::/64"))
		b.AddBans(mail.Chain, bans(time.Hour, "203.0.113.0/24"))
	}
	require.NoError(t, tbl.Do(start))

	t.Run("read back is the typed table", func(t *testing.T) {
		snap, err := tbl.ReadBack()
		require.NoError(t, err)
		assert.True(t, snap.Exists)
		assert.True(t, snap.BaseChain)
		assert.Empty(t, snap.Foreign)
		// Hooks are inserted at the top, as fail2ban's "-I INPUT".
		assert.Equal(t, []Hook{mail, sshd6, sshd}, snap.Hooks)
		require.Contains(t, snap.Chains, policy.Chain("f2b-sshd"))
		assert.Equal(t, map[policy.Family]policy.Target{policy.IPv4: reject4, policy.IPv6: reject6}, snap.Chains["f2b-sshd"].Verdicts)
		assert.Equal(t, map[policy.Family][]Element{
			policy.IPv4: {{Prefix: netip.MustParsePrefix("192.0.2.7/32")}},
			policy.IPv6: {{Prefix: netip.MustParsePrefix("2001:db8:1:2::/64")}},
		}, snap.Chains["f2b-sshd"].Bans)
		assert.True(t, snap.Chains["f2b-mail"].Returns(policy.IPv4), "the return rule holds where the family's part exists")
		assert.False(t, snap.Chains["f2b-mail"].Returns(policy.IPv6), "and not where it does not")
		mailBans := snap.Chains["f2b-mail"].Bans[policy.IPv4]
		require.Len(t, mailBans, 1)
		assert.Equal(t, netip.MustParsePrefix("203.0.113.0/24"), mailBans[0].Prefix)
		assert.Equal(t, time.Hour, mailBans[0].Timeout)
	})

	t.Run("a /64 is one interval element", func(t *testing.T) {
		out := ns.MustRun(t, "nft", "list", "set", "inet", DefaultTable, "f2b-sshd-v6")
		assert.Contains(t, out, "elements = { 2001:db8:1:2::/64 }")
		e, found, err := tbl.Check("f2b-sshd", netip.MustParsePrefix("2001:db8:1:2::7/128"))
		require.NoError(t, err)
		assert.True(t, found, "a member of the /64 is banned by it")
		assert.Equal(t, netip.MustParsePrefix("2001:db8:1:2::/64"), e.Prefix)
		_, found, err = tbl.Check("f2b-sshd", netip.MustParsePrefix("2001:db8:1:3::7/128"))
		require.NoError(t, err)
		assert.False(t, found, "the next /64 is not")
	})

	t.Run("ensuring everything again changes nothing", func(t *testing.T) {
		before := listTable(t, ns)
		require.NoError(t, tbl.Do(start))
		assert.Equal(t, before, listTable(t, ns))
	})

	t.Run("a new target replaces the family's rule in one transaction", func(t *testing.T) {
		require.NoError(t, tbl.Do(func(b *Batch) { b.SetVerdict(sshd.Chain, policy.IPv4, drop) }))
		snap, err := tbl.ReadBack()
		require.NoError(t, err)
		assert.Equal(t, drop, snap.Chains["f2b-sshd"].Verdicts[policy.IPv4])
		assert.Empty(t, snap.Foreign)
	})

	t.Run("a chain a hook jumps to cannot be deleted, and the error says why", func(t *testing.T) {
		err := tbl.Do(func(b *Batch) { b.DeleteChain(sshd.Chain, policy.IPv4) })
		require.Error(t, err)
		assert.Contains(t, err.Error(), "delete the hook first")
	})

	t.Run("actionstop of one family leaves the other's bans, verdict and hook", func(t *testing.T) {
		require.NoError(t, tbl.Do(func(b *Batch) {
			b.DeleteHook(sshd)
			b.FlushChain(sshd.Chain, policy.IPv4)
			b.DeleteChain(sshd.Chain, policy.IPv4)
		}))
		snap, err := tbl.ReadBack()
		require.NoError(t, err)
		assert.Equal(t, []Hook{mail, sshd6}, snap.Hooks)
		require.Contains(t, snap.Chains, policy.Chain("f2b-sshd"))
		assert.Equal(t, map[policy.Family]policy.Target{policy.IPv6: reject6}, snap.Chains["f2b-sshd"].Verdicts)
		assert.Equal(t, map[policy.Family][]Element{policy.IPv6: {{Prefix: netip.MustParsePrefix("2001:db8:1:2::/64")}}}, snap.Chains["f2b-sshd"].Bans)
		assert.Empty(t, snap.Foreign)
	})

	t.Run("actionstop of the other family deletes the chain", func(t *testing.T) {
		require.NoError(t, tbl.Do(func(b *Batch) {
			b.DeleteHook(sshd6)
			b.FlushChain(sshd.Chain, policy.IPv6)
			b.DeleteChain(sshd.Chain, policy.IPv6)
		}))
		snap, err := tbl.ReadBack()
		require.NoError(t, err)
		assert.Equal(t, []Hook{mail}, snap.Hooks)
		assert.NotContains(t, snap.Chains, policy.Chain("f2b-sshd"))
		assert.Empty(t, snap.Foreign, "the chain's sets went with it")
	})

	t.Run("a flush empties the family's set and drops its verdict", func(t *testing.T) {
		require.NoError(t, tbl.Do(func(b *Batch) { b.FlushChain(mail.Chain, policy.IPv4) }))
		snap, err := tbl.ReadBack()
		require.NoError(t, err)
		assert.Empty(t, snap.Chains["f2b-mail"].Verdicts)
		assert.Empty(t, snap.Chains["f2b-mail"].Bans[policy.IPv4])
	})

	t.Run("deleting what is not there is no error", func(t *testing.T) {
		require.NoError(t, tbl.Do(func(b *Batch) {
			b.DeleteHook(sshd)
			b.DeleteChain("f2b-gone", policy.IPv4)
			b.FlushChain("f2b-gone", policy.IPv6)
			b.RemoveBans(mail.Chain, prefixes("198.51.100.99/32"))
		}))
	})

	t.Run("a rule added by hand is foreign, not a hook", func(t *testing.T) {
		ns.MustRun(t, "nft", "add", "rule", "inet", DefaultTable, BaseChain, "tcp", "dport", "8080", "accept")
		snap, err := tbl.ReadBack()
		require.NoError(t, err)
		assert.Equal(t, []Hook{mail}, snap.Hooks)
		require.Len(t, snap.Foreign, 1)
		assert.Contains(t, snap.Foreign[0], `chain "input"`)
	})

	t.Run("a base chain moved off its priority is drift", func(t *testing.T) {
		ns.MustRun(t, "nft", "delete", "table", "inet", DefaultTable)
		ns.MustRun(t, "nft", "add", "table", "inet", DefaultTable)
		ns.MustRun(t, "nft", "add", "chain", "inet", DefaultTable, BaseChain, "{ type filter hook input priority 10; }")
		snap, err := tbl.ReadBack()
		require.NoError(t, err)
		assert.False(t, snap.BaseChain)
		require.Len(t, snap.Foreign, 1)
		assert.Contains(t, snap.Foreign[0], "priority filter - 1")
		err = tbl.Do(start)
		require.Error(t, err, "the kernel will not move a base chain")
		assert.Contains(t, err.Error(), "f2b-shim: hint:")
		t.Log(err)
	})

	t.Run("nft flush ruleset is drift that read back shows as nothing", func(t *testing.T) {
		ns.MustRun(t, "nft", "flush", "ruleset")
		snap, err := tbl.ReadBack()
		require.NoError(t, err)
		assert.False(t, snap.Exists)
		assert.Empty(t, snap.Chains)
		assert.Empty(t, snap.Hooks)
		_, found, err := tbl.Check(mail.Chain, netip.MustParsePrefix("203.0.113.0/24"))
		require.NoError(t, err)
		assert.False(t, found)
		// Repair is the same batch again.
		require.NoError(t, tbl.Do(start))
		snap, err = tbl.ReadBack()
		require.NoError(t, err)
		assert.Len(t, snap.Hooks, 3)
	})

	t.Run("prune deletes the whole table, twice without error", func(t *testing.T) {
		require.NoError(t, tbl.Do(func(b *Batch) { b.DeleteTable() }))
		require.NoError(t, tbl.Do(func(b *Batch) { b.DeleteTable() }))
		assert.NotContains(t, ns.MustRun(t, "nft", "list", "tables"), DefaultTable)
	})
}

func TestSystemHundredThousandBans(t *testing.T) {
	for _, layout := range layouts {
		t.Run(layout.name, func(t *testing.T) { testSystemHundredThousandBans(t, layout.opts) })
	}
}

func testSystemHundredThousandBans(t *testing.T, opts []Option) {
	tbl, _ := nsTable(t, opts...)
	many := make([]Ban, 100_000)
	for i := range many {
		// 100,000 addresses only fit documentation space as IPv6.
		a := netip.MustParseAddr("2001:db8::").As16()
		a[12], a[13], a[14], a[15] = byte(i>>24), byte(i>>16), byte(i>>8), byte(i)
		many[i] = Ban{Prefix: netip.PrefixFrom(netip.AddrFrom16(a), 128), Timeout: 30 * 24 * time.Hour}
	}
	require.NoError(t, tbl.Do(func(b *Batch) { ensureBoth(b, "f2b-many"); b.AddBans("f2b-many", many) }))
	snap, err := tbl.ReadBack()
	require.NoError(t, err)
	assert.Len(t, snap.Chains["f2b-many"].Bans[policy.IPv6], 100_000)
	// Each read of a set this large costs seconds: the kernel resumes a
	// dump by walking the set from its start again, so one read is enough.
	// And all of them out again, in one transaction too.
	ps := make([]netip.Prefix, len(many))
	for i, b := range many {
		ps[i] = b.Prefix
	}
	require.NoError(t, tbl.Do(func(b *Batch) { b.RemoveBans("f2b-many", ps) }))
	snap, err = tbl.ReadBack()
	require.NoError(t, err)
	assert.Empty(t, snap.Chains["f2b-many"].Bans[policy.IPv6])
}

func TestSystemBatchSeesItself(t *testing.T) {
	for _, layout := range layouts {
		t.Run(layout.name, func(t *testing.T) { testSystemBatchSeesItself(t, layout.opts) })
	}
}

func testSystemBatchSeesItself(t *testing.T, opts []Option) {
	tbl, _ := nsTable(t, opts...)
	h := Hook{Family: policy.IPv4, Chain: "c", Proto: "tcp", Ports: []policy.PortRange{pr(22, 22)}}
	require.NoError(t, tbl.Do(func(b *Batch) {
		ensureBoth(b, "c")
		b.EnsureHook(h)
		b.EnsureHook(h)
		b.SetVerdict("c", policy.IPv4, reject4)
		b.SetVerdict("c", policy.IPv4, drop)
	}))
	snap, err := tbl.ReadBack()
	require.NoError(t, err)
	assert.Equal(t, []Hook{h}, snap.Hooks, "a hook ensured twice in a batch is added once")
	assert.Equal(t, map[policy.Family]policy.Target{policy.IPv4: drop}, snap.Chains["c"].Verdicts, "the last verdict of a batch wins")
	assert.Empty(t, snap.Foreign)

	require.NoError(t, tbl.Do(func(b *Batch) {
		b.SetVerdict("c", policy.IPv4, reject4)
		b.SetVerdict("c", policy.IPv4, drop)
		b.SetVerdict("c", policy.IPv4, reject4)
	}))
	snap, err = tbl.ReadBack()
	require.NoError(t, err)
	assert.Equal(t, map[policy.Family]policy.Target{policy.IPv4: reject4}, snap.Chains["c"].Verdicts, "the kernel's old verdict is replaced once")
	assert.Empty(t, snap.Foreign, "and not left beside the new one")

	require.NoError(t, tbl.Do(func(b *Batch) {
		b.AddBans("c", append(bans(time.Minute, "192.0.2.1/32", "198.51.100.0/24"), bans(time.Hour, "192.0.2.1/32", "198.51.100.0/24")...))
		b.RemoveBans("c", prefixes("203.0.113.0/24", "203.0.113.0/24"))
	}), "a prefix twice in one call is one ban")
	e, found, err := tbl.Check("c", netip.MustParsePrefix("192.0.2.1/32"))
	require.NoError(t, err)
	require.True(t, found)
	assert.Equal(t, time.Hour, e.Timeout, "the last of the duplicates counts")

	require.NoError(t, tbl.Do(func(b *Batch) {
		b.SetVerdict("c", policy.IPv4, drop)
		b.AddBans("c", bans(0, "192.0.2.1/32"))
		b.FlushChain("c", policy.IPv4)
	}))
	snap, err = tbl.ReadBack()
	require.NoError(t, err)
	assert.Empty(t, snap.Chains["c"].Verdicts, "a flush after a verdict in one batch leaves none")
	assert.Empty(t, snap.Chains["c"].Bans[policy.IPv4], "nor the batch's bans")
	assert.Empty(t, snap.Foreign)
}

// A stream batch carries requests as they come: a ban and an unban of one
// address, a ban sent twice, a flush between two bans. The kernel's
// rbtree cannot change one element twice in a transaction, so the batch
// changes each prefix once, as its last request says.
func TestSystemOnePrefixTwiceInABatch(t *testing.T) {
	tests := []struct {
		name  string
		fill  func(b *Batch)
		wants []string
	}{
		{"a ban sent twice is one ban", func(b *Batch) {
			b.AddBans("c", bans(0, "192.0.2.1/32", "198.51.100.0/24"))
			b.AddBans("c", bans(0, "192.0.2.1/32", "198.51.100.0/24"))
		}, []string{"192.0.2.1/32", "198.51.100.0/24"}},
		{"a ban then its unban leaves nothing", func(b *Batch) {
			b.AddBans("c", bans(0, "192.0.2.1/32", "198.51.100.0/24"))
			b.RemoveBans("c", prefixes("192.0.2.1/32", "198.51.100.0/24"))
		}, nil},
		{"an unban then a ban leaves the ban", func(b *Batch) {
			b.RemoveBans("c", prefixes("192.0.2.1/32", "198.51.100.0/24"))
			b.AddBans("c", bans(0, "192.0.2.1/32", "198.51.100.0/24"))
		}, []string{"192.0.2.1/32", "198.51.100.0/24"}},
		{"a ban, a flush and the ban again leave the ban", func(b *Batch) {
			b.AddBans("c", bans(0, "192.0.2.1/32", "198.51.100.0/24"))
			b.FlushChain("c", policy.IPv4)
			b.SetVerdict("c", policy.IPv4, drop)
			b.AddBans("c", bans(0, "192.0.2.1/32", "198.51.100.0/24"))
		}, []string{"192.0.2.1/32", "198.51.100.0/24"}},
		{"a ban and a flush leave nothing", func(b *Batch) {
			b.AddBans("c", bans(0, "192.0.2.1/32", "198.51.100.0/24"))
			b.FlushChain("c", policy.IPv4)
			b.RemoveBans("c", prefixes("192.0.2.1/32"))
		}, nil},
	}
	for _, layout := range layouts {
		t.Run(layout.name, func(t *testing.T) {
			tbl, _ := nsTable(t, layout.opts...)
			for _, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					require.NoError(t, tbl.Do(func(b *Batch) { b.DeleteTable() }))
					// What is there before: one of the two, so that each
					// case meets an element the kernel holds.
					require.NoError(t, tbl.Do(func(b *Batch) {
						b.EnsureChain("c", policy.IPv4)
						b.SetVerdict("c", policy.IPv4, drop)
						b.AddBans("c", bans(0, "192.0.2.1/32"))
					}))
					require.NoError(t, tbl.Do(tt.fill))
					assert.Equal(t, tt.wants, elementPrefixes(t, tbl, "c", policy.IPv4))
				})
			}
		})
	}
}
