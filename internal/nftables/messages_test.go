package nftables

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/f2b-shim/f2b-shim/policy"
)

// recorder stands in for the kernel, as google/nftables' own tests do
// with nftest.Recorder: it keeps every netlink message the package sends,
// one slice per sendmsg, acknowledges each, and answers every dump with
// an empty table. failNext makes the next transaction's acknowledgement
// fail with that errno.
type recorder struct {
	sends    [][]netlink.Message
	failNext syscall.Errno
}

func (r *recorder) dial(req []netlink.Message) ([]netlink.Message, error) {
	if req == nil {
		return nil, nil
	}
	r.sends = append(r.sends, req)
	if r.failNext != 0 && len(req) > 1 {
		n := r.failNext
		r.failNext = 0
		return nil, n
	}
	var replies []netlink.Message
	for _, m := range req {
		if m.Header.Flags&netlink.Dump != 0 {
			replies = append(replies, netlink.Message{
				Header: netlink.Header{Type: netlink.Done, Flags: netlink.Multi, Sequence: m.Header.Sequence},
				Data:   []byte{0, 0, 0, 0},
			})
			continue
		}
		if m.Header.Flags&netlink.Acknowledge != 0 {
			replies = append(replies, netlink.Message{
				Header: netlink.Header{Type: netlink.Error, Sequence: m.Header.Sequence},
				Data:   []byte{0, 0, 0, 0},
			})
		}
	}
	return replies, nil
}

// transactions are the sends that are batches (BEGIN … END), not dumps.
func (r *recorder) transactions() [][]netlink.Message {
	var out [][]netlink.Message
	for _, s := range r.sends {
		if len(s) > 0 && s[0].Header.Type == netlink.HeaderType(unix.NFNL_MSG_BATCH_BEGIN) {
			out = append(out, s)
		}
	}
	return out
}

func recordedTable(t *testing.T) (*Table, *recorder) {
	t.Helper()
	rec := &recorder{}
	tbl, err := Open("", WithTestDial(rec.dial))
	require.NoError(t, err)
	t.Cleanup(func() { tbl.Close() })
	return tbl, rec
}

var msgNames = map[uint16]string{
	unix.NFT_MSG_NEWTABLE: "NEWTABLE", unix.NFT_MSG_DELTABLE: "DELTABLE",
	unix.NFT_MSG_NEWCHAIN: "NEWCHAIN", unix.NFT_MSG_DELCHAIN: "DELCHAIN",
	unix.NFT_MSG_NEWRULE: "NEWRULE", unix.NFT_MSG_DELRULE: "DELRULE",
	unix.NFT_MSG_NEWSET: "NEWSET", unix.NFT_MSG_DELSET: "DELSET",
	unix.NFT_MSG_NEWSETELEM: "NEWSETELEM", unix.NFT_MSG_DELSETELEM: "DELSETELEM",
}

func msgName(m netlink.Message) string {
	switch m.Header.Type {
	case netlink.HeaderType(unix.NFNL_MSG_BATCH_BEGIN):
		return "BATCH_BEGIN"
	case netlink.HeaderType(unix.NFNL_MSG_BATCH_END):
		return "BATCH_END"
	}
	if n, ok := msgNames[uint16(m.Header.Type)&0xff]; ok {
		return n
	}
	return fmt.Sprintf("type %#x", uint16(m.Header.Type))
}

// dump renders a transaction as nft --debug=netlink renders bytes: one
// message a block, named, with its flags and its payload 4 bytes a line.
func dump(msgs []netlink.Message) string {
	var b strings.Builder
	for _, m := range msgs {
		fmt.Fprintf(&b, "%s flags %#x\n", msgName(m), uint16(m.Header.Flags))
		for i := 0; i < len(m.Data); i += 4 {
			fmt.Fprintf(&b, "  % x\n", m.Data[i:min(i+4, len(m.Data))])
		}
	}
	return b.String()
}

// TestMessagesGolden pins the bytes of a whole first batch: table, base
// chain, ban chain and sets, both verdict rules, a multiport hook and one
// ban of each family with a timeout. The system test TestSystemGolden
// shows what the kernel makes of the same calls.
func TestMessagesGolden(t *testing.T) {
	tbl, rec := recordedTable(t)
	require.NoError(t, tbl.Do(func(b *Batch) {
		ensureBoth(b, "f2b-sshd")
		b.SetVerdict("f2b-sshd", policy.IPv4, reject4)
		b.SetVerdict("f2b-sshd", policy.IPv6, drop)
		b.EnsureHook(Hook{Family: policy.IPv4, Chain: "f2b-sshd", Proto: "tcp", Ports: []policy.PortRange{pr(22, 22), pr(2222, 2223)}})
		b.AddBans("f2b-sshd", bans(time.Hour, "192.0.2.7/32", "2001:db8::/64"))
	}))
	txs := rec.transactions()
	require.Len(t, txs, 1, "one batch is one transaction")
	got := dump(txs[0])
	path := filepath.Join("testdata", "first-batch.netlink")
	if os.Getenv("F2B_SHIM_UPDATE_GOLDEN") != "" {
		require.NoError(t, os.WriteFile(path, []byte(got), 0o644))
	}
	want, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, strings.Split(string(want), "\n"), strings.Split(got, "\n"))
}

// attrs decodes a message's attributes after the nfgenmsg header.
func attrs(t *testing.T, m netlink.Message) map[uint16][]byte {
	t.Helper()
	ad, err := netlink.NewAttributeDecoder(m.Data[4:])
	require.NoError(t, err)
	out := map[uint16][]byte{}
	for ad.Next() {
		out[ad.Type()&^unix.NLA_F_NESTED] = ad.Bytes()
	}
	require.NoError(t, ad.Err())
	return out
}

func TestMessages(t *testing.T) {
	t.Run("nothing is created exclusively, so ensuring twice changes nothing", func(t *testing.T) {
		tbl, rec := recordedTable(t)
		require.NoError(t, tbl.Do(func(b *Batch) { ensureBoth(b, "c"); b.AddBans("c", bans(0, "192.0.2.1/32")) }))
		for _, m := range rec.transactions()[0] {
			assert.Zero(t, m.Header.Flags&netlink.Excl, "%s has NLM_F_EXCL", msgName(m))
		}
	})

	t.Run("a new ban is a plain add, and a ban that may be there is added, deleted and added again", func(t *testing.T) {
		// A delete makes the process wait for an RCU grace period when it
		// closes its socket (AddNewBans): a one-shot ban the record does
		// not hold sends none.
		for _, addr := range []bool{false, true} {
			var opts []Option
			if addr {
				opts = append(opts, WithAddressSets())
			}
			for _, tc := range []struct {
				fresh bool
				want  []string
			}{
				{true, []string{"BATCH_BEGIN", "NEWSETELEM", "BATCH_END"}},
				{false, []string{"BATCH_BEGIN", "NEWSETELEM", "DELSETELEM", "NEWSETELEM", "BATCH_END"}},
			} {
				rec := &recorder{}
				tbl, err := Open("", append(opts, WithTestDial(rec.dial))...)
				require.NoError(t, err)
				require.NoError(t, tbl.Do(func(b *Batch) {
					if tc.fresh {
						b.AddNewBans("c", bans(time.Hour, "192.0.2.1/32"))
					} else {
						b.AddBans("c", bans(time.Hour, "192.0.2.1/32"))
					}
				}))
				require.NoError(t, tbl.Close())
				txs := rec.transactions()
				require.Len(t, txs, 1)
				var got []string
				for _, m := range txs[0] {
					got = append(got, msgName(m))
				}
				assert.Equal(t, tc.want, got, "address sets %v, new %v", addr, tc.fresh)
			}
		}
	})

	t.Run("whether a chain's part exists is read from the sets alone, without its chains or rules", func(t *testing.T) {
		// Part runs twice in every one-shot request (the heal's check,
		// the ban's): each dump is a round trip to the kernel.
		tbl, rec := recordedTable(t)
		_, err := tbl.Part("c", policy.IPv4)
		require.NoError(t, err)
		require.NotEmpty(t, rec.sends)
		for _, send := range rec.sends {
			for _, m := range send {
				typ := uint16(m.Header.Type) & 0xff
				assert.NotContains(t, []uint16{unix.NFT_MSG_GETCHAIN, unix.NFT_MSG_GETRULE}, typ, "Part read the chains or rules")
			}
		}
	})

	t.Run("100,000 bans are one transaction of messages under the 16-bit attribute limit", func(t *testing.T) {
		tbl, rec := recordedTable(t)
		many := make([]Ban, 100_000)
		base := netip.MustParseAddr("2001:db8::")
		for i := range many {
			a := base.As16()
			a[12], a[13], a[14], a[15] = byte(i>>24), byte(i>>16), byte(i>>8), byte(i)
			many[i] = Ban{Prefix: netip.PrefixFrom(netip.AddrFrom16(a), 128), Timeout: 30 * 24 * time.Hour}
		}
		require.NoError(t, tbl.Do(func(b *Batch) { ensureBoth(b, "c"); b.AddBans("c", many) }))
		txs := rec.transactions()
		require.Len(t, txs, 1)
		counts := map[string]int{}
		for _, m := range txs[0] {
			name := msgName(m)
			if name != "NEWSETELEM" && name != "DELSETELEM" {
				continue
			}
			list := attrs(t, m)[unix.NFTA_SET_ELEM_LIST_ELEMENTS]
			require.NotNil(t, list)
			assert.Less(t, len(list)+4, 1<<16, "the element list attribute's length fits 16 bits")
			ad, err := netlink.NewAttributeDecoder(list)
			require.NoError(t, err)
			n := 0
			for ad.Next() {
				n++
			}
			assert.LessOrEqual(t, n, maxElementsPerMessage)
			counts[name] += n
		}
		// Added, deleted and added again: start and end of each prefix.
		assert.Equal(t, map[string]int{"NEWSETELEM": 400_000, "DELSETELEM": 200_000}, counts)
	})

	t.Run("without chunks the library would send a corrupt element list", func(t *testing.T) {
		// The pitfall the chunks avoid: the library marshals all elements
		// of one call into one attribute, and its 16-bit length wraps
		// without an error. 1,000 IPv6 prefixes with timeouts are 2,000
		// elements, about 84 KiB.
		var ps []string
		for i := range 1000 {
			ps = append(ps, fmt.Sprintf("2001:db8::%x/128", i*2))
		}
		rec := &recorder{}
		conn, err := nftables.New(nftables.WithTestDial(rec.dial))
		require.NoError(t, err)
		tbl := &nftables.Table{Name: DefaultTable, Family: nftables.TableFamilyINet}
		set := &nftables.Set{Table: tbl, Name: "c-v6", ID: 1, KeyType: nftables.TypeIP6Addr, Interval: true, HasTimeout: true}
		require.NoError(t, conn.SetAddElements(set, elementsOf(bans(time.Hour, ps...))))
		require.NoError(t, conn.Flush())
		msg := rec.transactions()[0][1]
		ad, err := netlink.NewAttributeDecoder(msg.Data[4:])
		require.NoError(t, err)
		var list []byte
		for ad.Next() {
			if ad.Type()&^unix.NLA_F_NESTED == unix.NFTA_SET_ELEM_LIST_ELEMENTS {
				list = ad.Bytes()
			}
		}
		assert.Less(t, len(list), 2000*24, "the attribute's length wrapped: the kernel would read a fraction of the list")
	})

	t.Run("the largest batch allowed fits the send buffer, and one ban more is refused", func(t *testing.T) {
		tbl, rec := recordedTable(t)
		many := make([]Ban, maxBansPerTransaction)
		for i := range many {
			many[i] = Ban{Prefix: benchPrefix(i).Masked(), Timeout: 30 * 24 * time.Hour}
		}
		require.NoError(t, tbl.Do(func(b *Batch) { ensureBoth(b, "c"); b.AddBans("c", many) }))
		size := 0
		for _, m := range rec.transactions()[0] {
			size += int(m.Header.Length)
			if m.Header.Length == 0 {
				size += 16 + len(m.Data)
			}
		}
		assert.Greater(t, size, 3*maxBansPerTransaction*2*36, "every element was counted")
		assert.Less(t, size, maxTransactionBytes)
		err := tbl.Do(func(b *Batch) { b.AddBans("c", append(many, Ban{Prefix: benchPrefix(-1)})) })
		require.Error(t, err)
		assert.Contains(t, err.Error(), "split it")
		assert.Len(t, rec.transactions(), 1, "nothing more was sent")
	})

	t.Run("a timeout goes on an interval's start, never on its end", func(t *testing.T) {
		for _, e := range elementsOf(bans(time.Minute, "192.0.2.0/24", "2001:db8::/64")) {
			if e.IntervalEnd {
				assert.Zero(t, e.Timeout)
			} else {
				assert.Equal(t, time.Minute, e.Timeout)
			}
		}
	})

	t.Run("a batch of bans that meets ENOBUFS is sent once more, the same", func(t *testing.T) {
		tbl, rec := recordedTable(t)
		rec.failNext = syscall.ENOBUFS
		require.NoError(t, tbl.Do(func(b *Batch) { ensureBoth(b, "c"); b.AddBans("c", bans(time.Hour, "192.0.2.1/32")) }))
		txs := rec.transactions()
		require.Len(t, txs, 2)
		assert.Equal(t, strings.Split(dump(txs[0]), "\n"), strings.Split(dump(txs[1]), "\n"))
		assert.Equal(t, 1, tbl.retried)
	})

	t.Run("a batch that changes rules and meets ENOBUFS is not replayed and says so", func(t *testing.T) {
		tbl, rec := recordedTable(t)
		rec.failNext = syscall.ENOBUFS
		err := tbl.Do(func(b *Batch) { ensureBoth(b, "c"); b.SetVerdict("c", policy.IPv4, drop) })
		require.Error(t, err)
		assert.Contains(t, err.Error(), "may or may not have been applied")
		assert.Len(t, rec.transactions(), 1)
	})

	t.Run("with address sets a single address goes to the hash set, a prefix to the interval set", func(t *testing.T) {
		rec := &recorder{}
		tbl, err := Open("", WithTestDial(rec.dial), WithAddressSets())
		require.NoError(t, err)
		t.Cleanup(func() { tbl.Close() })
		require.NoError(t, tbl.Do(func(b *Batch) {
			b.EnsureChain("c", policy.IPv4)
			b.AddBans("c", bans(time.Hour, "192.0.2.7/32", "198.51.100.0/24"))
		}))
		elements := map[string]int{}
		for _, m := range rec.transactions()[0] {
			if msgName(m) != "NEWSETELEM" {
				continue
			}
			a := attrs(t, m)
			ad, err := netlink.NewAttributeDecoder(a[unix.NFTA_SET_ELEM_LIST_ELEMENTS])
			require.NoError(t, err)
			for ad.Next() {
				elements[strings.TrimRight(string(a[unix.NFTA_SET_ELEM_LIST_SET]), "\x00")]++
			}
		}
		// Added twice (add, delete, add): one element for the address,
		// start and end for the prefix.
		assert.Equal(t, map[string]int{"c-v4-addr": 2, "c-v4": 4}, elements)
	})

	t.Run("an unban is an add and a delete of the same elements", func(t *testing.T) {
		tbl, rec := recordedTable(t)
		require.NoError(t, tbl.Do(func(b *Batch) { b.RemoveBans("c", prefixes("192.0.2.0/24")) }))
		var names []string
		for _, m := range rec.transactions()[0] {
			names = append(names, msgName(m))
		}
		assert.Equal(t, []string{"BATCH_BEGIN", "NEWSETELEM", "DELSETELEM", "BATCH_END"}, names)
		tx := rec.transactions()[0]
		assert.True(t, bytes.Equal(attrs(t, tx[1])[unix.NFTA_SET_ELEM_LIST_ELEMENTS], attrs(t, tx[2])[unix.NFTA_SET_ELEM_LIST_ELEMENTS]))
	})
}

func TestRefusedBeforeAnyMessage(t *testing.T) {
	tests := []struct {
		name, want string
		fill       func(b *Batch)
	}{
		{"a chain name with a space", `chain name "a b"`, func(b *Batch) { ensureBoth(b, "a b") }},
		{"a chain name whose sets' names the kernel would refuse", "1 to 247 bytes", func(b *Batch) { ensureBoth(b, policy.Chain(strings.Repeat("c", 248))) }},
		{"an IPv4-mapped IPv6 ban", "unmap", func(b *Batch) { b.AddBans("c", bans(0, "::ffff:192.0.2.1/128")) }},
		{"a negative timeout", "timeout", func(b *Batch) { b.AddBans("c", bans(-time.Second, "192.0.2.1/32")) }},
		{"a sub-millisecond timeout", "at least 1ms", func(b *Batch) { b.AddBans("c", bans(time.Microsecond, "192.0.2.1/32")) }},
		{"an IPv6 reject type on the IPv4 rule", "not an ipv4 reject type", func(b *Batch) { b.SetVerdict("c", policy.IPv4, reject6) }},
		{"a hook on a protocol without ports", `protocol "icmp"`, func(b *Batch) { b.EnsureHook(Hook{Family: policy.IPv4, Chain: "c", Proto: "icmp"}) }},
		{"a hook with unsorted ports", "sorted", func(b *Batch) {
			b.EnsureHook(Hook{Family: policy.IPv4, Chain: "c", Proto: "tcp", Ports: []policy.PortRange{pr(80, 80), pr(22, 22)}})
		}},
		{"a hook without a family", "neither IPv4 nor IPv6", func(b *Batch) { b.EnsureHook(Hook{Chain: "c", Proto: "tcp"}) }},
		{"a hook with port 0", "from 1", func(b *Batch) {
			b.EnsureHook(Hook{Family: policy.IPv4, Chain: "c", Proto: "tcp", Ports: []policy.PortRange{pr(0, 22)}})
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tbl, rec := recordedTable(t)
			err := tbl.Do(func(b *Batch) { ensureBoth(b, "c"); tt.fill(b) })
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
			assert.True(t, strings.HasPrefix(err.Error(), "f2b-shim: "), err.Error())
			assert.Empty(t, rec.transactions(), "nothing was sent")
		})
	}
}

func TestOneTablePerProcess(t *testing.T) {
	rec := &recorder{}
	tbl, err := Open("", WithTestDial(rec.dial))
	require.NoError(t, err)
	_, err = Open("other", WithTestDial(rec.dial))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "already open")
	require.NoError(t, tbl.Close())
	again, err := Open("", WithTestDial(rec.dial))
	require.NoError(t, err)
	require.NoError(t, again.Close())
}

func TestExplain(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want string
	}{
		{"a missing capability", syscall.EPERM, "CAP_NET_ADMIN"},
		{"a missing chain", syscall.ENOENT, "ensure the chain"},
		{"a chain in use", syscall.EBUSY, "delete the hooks first"},
		{"an overlap", syscall.EEXIST, "overlaps"},
		{"a batch too large", syscall.EMSGSIZE, "split the batch"},
		{"a lost acknowledgement", syscall.ENOBUFS, "may or may not have been applied"},
		{"a moved base chain", syscall.EOPNOTSUPP, "shows nothing but the shim's chains"},
		// The message that failed comes first; ENOENT for what it would
		// have made follows, and must not hide it.
		{"the telling errno among its consequences", errors.Join(syscall.ENOENT, syscall.EEXIST, syscall.ENOENT), "overlaps"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := explain(fmt.Errorf("conn.Receive: %w", tt.err))
			assert.Contains(t, err.Error(), tt.want)
			assert.True(t, strings.HasPrefix(err.Error(), "f2b-shim: "))
			assert.ErrorIs(t, err, tt.err, "the kernel's errno stays reachable for the caller")
		})
	}
}
