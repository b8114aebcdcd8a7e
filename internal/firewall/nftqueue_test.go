package firewall

import (
	"testing"

	"github.com/mdlayher/netlink"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/f2b-shim/f2b-shim/internal/nftables"
	"github.com/f2b-shim/f2b-shim/policy"
)

// elementMessages stands in for the kernel: it acknowledges everything,
// answers every dump with nothing, and counts the element messages of
// the transactions sent.
type elementMessages struct{ added, deleted int }

func (e *elementMessages) dial(req []netlink.Message) ([]netlink.Message, error) {
	var replies []netlink.Message
	for _, m := range req {
		switch uint16(m.Header.Type) & 0xff {
		case unix.NFT_MSG_NEWSETELEM:
			e.added++
		case unix.NFT_MSG_DELSETELEM:
			e.deleted++
		}
		if m.Header.Flags&netlink.Dump != 0 {
			replies = append(replies, netlink.Message{Header: netlink.Header{Type: netlink.Done, Flags: netlink.Multi, Sequence: m.Header.Sequence}, Data: []byte{0, 0, 0, 0}})
		} else if m.Header.Flags&netlink.Acknowledge != 0 {
			replies = append(replies, netlink.Message{Header: netlink.Header{Type: netlink.Error, Sequence: m.Header.Sequence}, Data: []byte{0, 0, 0, 0}})
		}
	}
	return replies, nil
}

func TestNFTQueueRefreshesOnlyWhatTheSetMayHold(t *testing.T) {
	line := func(s string) policy.Operation {
		op, err := policy.Decide(policy.Default(), s, policy.Context{})
		require.NoError(t, err)
		return op
	}
	ban := line("iptables -w -I mail-remote-f2b-c 1 -s 192.0.2.1 -j DROP")
	unban := line("iptables -w -D mail-remote-f2b-c -s 192.0.2.1 -j DROP")
	other := line("iptables -w -I mail-remote-f2b-c 1 -s 192.0.2.2 -j DROP")
	type queued struct {
		op    policy.Operation
		fresh bool
	}
	for _, tc := range []struct {
		name    string
		queue   []queued
		deletes bool
	}{
		{"bans the record does not hold are plain adds: no delete", []queued{{ban, true}, {other, true}}, false},
		{"a ban the record holds is refreshed (added, deleted, added)", []queued{{ban, false}}, true},
		{"a ban after an unban of its prefix in the batch is refreshed, though the record no longer holds it", []queued{{unban, false}, {ban, true}}, true},
		{"a ban sent twice in a batch is refreshed", []queued{{ban, true}, {ban, true}}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &elementMessages{}
			tbl, err := nftables.Open("", nftables.WithAddressSets(), nftables.WithTestDial(rec.dial))
			require.NoError(t, err)
			defer tbl.Close()
			q := &NFTQueue{Queue: true}
			b := Backend{Policy: policy.Default(), NFT: tbl, NFTQueue: q}
			for _, e := range tc.queue {
				q.add(b, e.op, e.fresh)
			}
			require.Empty(t, q.Flush())
			assert.Positive(t, rec.added)
			assert.Equal(t, tc.deletes, rec.deleted > 0, "element deletes: %d", rec.deleted)
		})
	}
}
