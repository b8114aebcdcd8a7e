package engine

import (
	"errors"
	"fmt"

	"github.com/f2b-shim/f2b-shim/internal/firewall"
)

// Probe asks the backend's firewall something harmless, for status: it
// says what answered, or why nothing did.
func Probe(b Backend) (what string, err error) {
	switch b := b.(type) {
	case *nft:
		_, err = b.b.NFT.Hooks()
		return fmt.Sprintf("nftables answers over netlink (table inet %s)", b.e.Pol.NftablesTable), err
	case *rules:
		what = "iptables answers"
		if _, err = b.b.Table.ListChains(); err != nil || b.b.Sets == nil {
			return what, err
		}
		// A set that does not exist is a fine answer: netlink works.
		if _, err = b.b.Sets.References("f2b-status-probe"); errors.Is(err, firewall.ErrNoSet) {
			err = nil
		}
		return what + "; ipset answers over netlink", err
	}
	return "the backend answers (a fake)", nil
}

// DropEmptyTable deletes the nftables backend's table once it holds
// nothing (prune of the last chain, uninstall): the table is the shim's
// own, and an empty one would stay on the proxy after the mail host is
// gone. A table that holds anything else, such as a rule an admin added,
// stays. Other backends have no table of their own.
func (e *Engine) DropEmptyTable() error {
	if e.Pol.Backend != "nftables" {
		return nil
	}
	t, err := e.Ports.OpenNFT(e.Pol.NftablesTable)
	if err != nil {
		return err
	}
	snap, err := t.ReadBack()
	if err != nil || !snap.Exists || len(snap.Chains) > 0 || len(snap.Hooks) > 0 || len(snap.Foreign) > 0 {
		return err
	}
	x := t.NewBatch()
	x.DeleteTable()
	return x.Commit()
}
