package cli

import (
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/f2b-shim/f2b-shim/policy"
)

// TestLeftAdvice: what "reconcile --fix" tells the admin to run for a
// drift it leaves. On the nftables backend the hooks are rules of the
// shim's own table, which iptables neither sees nor, on a pure nftables
// proxy, exists to remove.
func TestLeftAdvice(t *testing.T) {
	hook := drift{kind: "unexpected", fam: policy.IPv4, what: "hook INPUT -p tcp -m multiport --dports 25 -j mail-remote-f2b-x"}
	chain := drift{kind: "unexpected", fam: policy.IPv6, what: "chain mail-remote-f2b-x (not in the state)"}
	ban := drift{kind: "unexpected", fam: policy.IPv4, what: "ban 203.0.113.9/32 in mail-remote-f2b-x (DROP)"}
	for _, c := range []struct {
		name     string
		d        drift
		nftTable string
		want     string
	}{
		{"an iptables hook is deleted with iptables", hook, "", "remove it: iptables -D INPUT -p tcp -m multiport --dports 25 -j mail-remote-f2b-x"},
		{"an nftables hook is deleted with nft, by its handle in the input chain", hook, "f2b_shim",
			`find its handle with "nft -a list table inet f2b_shim", then: nft delete rule inet f2b_shim input handle N`},
		{"an nftables chain is retired with prune, as with iptables", chain, "f2b_shim", "retire the chain with its hooks: f2b-shim prune mail-remote-f2b-x"},
		{"an nftables ban is lifted with unban, as with iptables", ban, "f2b_mx2", "lift it: f2b-shim unban mail-remote-f2b-x 203.0.113.9;"},
	} {
		t.Run(c.name, func(t *testing.T) { assert.Contains(t, leftAdvice(c.d, c.nftTable), c.want) })
	}
}
