package nftables

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/policy"
)

// benchPrefix is the i-th /128 of 2001:db8::/32, documentation space.
func benchPrefix(i int) netip.Prefix {
	a := netip.MustParseAddr("2001:db8::").As16()
	a[10], a[11], a[12], a[13], a[14], a[15] = 0, 1, byte(i>>24), byte(i>>16), byte(i>>8), byte(i)
	return netip.PrefixFrom(netip.AddrFrom16(a), 128)
}

// BenchmarkAddBans measures bans per second into one chain's set, one
// transaction per batch, in a fresh namespace: a batch of 1 is a one-shot
// ban, a batch of 512 a stream's. "new" bans go into a set that grows;
// "reban" refreshes bans already there (add, delete, add). preload is how
// many bans the set held before. The bans are single IPv6 addresses, so
// "addrsets" (WithAddressSets) keeps them in the hash set.
//
//	go test -run '^$' -bench AddBans -count 5 ./internal/nftables/
func BenchmarkAddBans(b *testing.B) {
	layouts := []struct {
		name string
		opts []Option
	}{{"interval", nil}, {"addrsets", []Option{WithAddressSets()}}}
	for _, layout := range layouts {
		for _, kind := range []string{"new", "reban"} {
			for _, preload := range []int{0, 50_000} {
				for _, size := range []int{1, 512} {
					b.Run(fmt.Sprintf("%s/%s/preload=%d/batch=%d", layout.name, kind, preload, size), func(b *testing.B) {
						benchAddBans(b, layout.opts, kind == "reban", preload, size)
					})
				}
			}
		}
	}
}

func benchAddBans(b *testing.B, opts []Option, reban bool, preload, size int) {
	tbl, _ := nsTable(b, opts...)
	const chain = "f2b-bench"
	pool := preload
	if reban && pool < size {
		pool = size
	}
	pre := make([]Ban, pool)
	for i := range pre {
		pre[i] = Ban{Prefix: benchPrefix(i), Timeout: 30 * 24 * time.Hour}
	}
	require.NoError(b, tbl.Do(func(bt *Batch) { ensureBoth(bt, chain); bt.AddBans(chain, pre) }))
	next := pool
	batch := make([]Ban, size)
	b.ResetTimer()
	for n := 0; n < b.N; n++ {
		for i := range batch {
			if reban {
				batch[i] = pre[(n*size+i)%pool]
			} else {
				batch[i] = Ban{Prefix: benchPrefix(next), Timeout: 30 * 24 * time.Hour}
				next++
			}
		}
		if err := tbl.Do(func(bt *Batch) { bt.AddBans(chain, batch) }); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N*size)/b.Elapsed().Seconds(), "bans/s")
}

// BenchmarkSetKind compares, for the design note, what one ban costs in
// one transaction as the set grows, in the interval set this package uses
// and in a plain hash set of addresses (what a set of /32s and /128s, or
// of one fixed prefix length matched through a mask, could use instead).
// The kernel's rbtree, behind every single-field interval set, does work
// in proportion to the set at each commit; the hash does not.
func BenchmarkSetKind(b *testing.B) {
	for _, interval := range []bool{true, false} {
		for _, preload := range []int{0, 10_000, 50_000} {
			kind := "hash"
			if interval {
				kind = "interval"
			}
			b.Run(fmt.Sprintf("%s/preload=%d", kind, preload), func(b *testing.B) {
				benchSetKind(b, interval, preload)
			})
		}
	}
}

func benchSetKind(b *testing.B, interval bool, preload int) {
	tbl, _ := nsTable(b)
	set := &nftables.Set{Table: tbl.table, Name: "probe", ID: 1, KeyType: nftables.TypeIP6Addr, Interval: interval, HasTimeout: true}
	elements := func(from, n int) []nftables.SetElement {
		bans := make([]Ban, n)
		for i := range bans {
			bans[i] = Ban{Prefix: benchPrefix(from + i), Timeout: time.Hour}
		}
		if interval {
			return elementsOf(bans)
		}
		out := make([]nftables.SetElement, n)
		for i, ban := range bans {
			out[i] = nftables.SetElement{Key: keyOf(ban.Prefix.Addr()), Timeout: ban.Timeout}
		}
		return out
	}
	pre := elements(0, preload)
	require.NoError(b, tbl.flush(func(c *nftables.Conn) error {
		c.AddTable(tbl.table)
		if err := c.AddSet(set, nil); err != nil {
			return err
		}
		for s := 0; s < len(pre); s += maxElementsPerMessage {
			if err := c.SetAddElements(set, pre[s:min(s+maxElementsPerMessage, len(pre))]); err != nil {
				return err
			}
		}
		return nil
	}, true))
	b.ResetTimer()
	for n := 0; n < b.N; n++ {
		e := elements(preload+n, 1)
		if err := tbl.flush(func(c *nftables.Conn) error { return c.SetAddElements(set, e) }, true); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkReadBack measures what reconcile pays to read a chain's bans
// back. The kernel resumes a dump of a set by walking it from its start
// again, so the time grows faster than the set.
func BenchmarkReadBack(b *testing.B) {
	for _, preload := range []int{1_000, 10_000, 50_000} {
		b.Run(fmt.Sprintf("bans=%d", preload), func(b *testing.B) {
			tbl, _ := nsTable(b)
			pre := make([]Ban, preload)
			for i := range pre {
				pre[i] = Ban{Prefix: benchPrefix(i), Timeout: time.Hour}
			}
			require.NoError(b, tbl.Do(func(bt *Batch) { bt.EnsureChain("f2b-bench", policy.IPv6); bt.AddBans("f2b-bench", pre) }))
			b.ResetTimer()
			for n := 0; n < b.N; n++ {
				snap, err := tbl.ReadBack()
				if err != nil || len(snap.Chains["f2b-bench"].Bans[policy.IPv6]) != preload {
					b.Fatal(err)
				}
			}
		})
	}
}
