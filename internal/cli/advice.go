package cli

import (
	"fmt"
	"io"
	"net/netip"
	"strings"

	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/state"

	"github.com/f2b-shim/f2b-shim/policy"
)

// Messages that tell the admin what to do next, kept apart from the
// subcommands that print them.

// plural is "1 ban", "2 bans".
func plural(n int, one string) string {
	if n == 1 {
		return fmt.Sprintf("%d %s", n, one)
	}
	return fmt.Sprintf("%d %ss", n, one)
}

// leftAdvice is the command that clears a drift "reconcile --fix" leaves
// for the admin: something in the firewall the state does not hold, which
// the shim does not remove on its own (an admin, or another tool, may have
// put it there on purpose). nftTable is the nftables backend's table, ""
// for the backends that run iptables.
func leftAdvice(d drift, nftTable string) string {
	bin := d.fam.Binary()
	if nftTable != "" && !strings.HasPrefix(d.what, "chain ") && !strings.HasPrefix(d.what, "ban ") {
		// The hooks and any other rule are in the shim's own table, which
		// iptables does not see (and a pure nftables proxy lacks it):
		// nft deletes a rule by its handle.
		chain := "input"
		if !strings.HasPrefix(d.what, "hook ") {
			chain = "CHAIN"
		}
		return fmt.Sprintf("find its handle with \"nft -a list table inet %s\", then: nft delete rule inet %s %s handle N", nftTable, nftTable, chain)
	}
	switch {
	case d.kind == "duplicate":
		rule, _, _ := strings.Cut(d.what, " (")
		return "delete the extra copies, one at a time: " + bin + " -D " + strings.TrimPrefix(rule, "-A ")
	case strings.HasPrefix(d.what, "chain "):
		name, _, _ := strings.Cut(strings.TrimPrefix(d.what, "chain "), " ")
		return "retire the chain with its hooks: f2b-shim prune " + name
	case strings.HasPrefix(d.what, "ban "):
		// "ban SOURCE in CHAIN (TARGET)"
		f := strings.Fields(d.what)
		if len(f) < 4 {
			break
		}
		return "lift it: f2b-shim unban " + f[3] + " " + bare(f[1]) + "; or, to keep it, lift it and ban it again with \"f2b-shim ban\", which records it"
	case strings.HasPrefix(d.what, "hook "):
		return "remove it: " + bin + " -D " + strings.TrimPrefix(d.what, "hook ")
	case strings.HasPrefix(d.what, "rule "):
		rule, _, _ := strings.Cut(strings.TrimPrefix(d.what, "rule "), " (not one")
		return "remove it, if nobody needs it: " + bin + " -D " + strings.TrimPrefix(rule, "-A ")
	}
	return "look at it with " + bin + " -S"
}

// bare drops a host prefix's length: "203.0.113.5/32" is "203.0.113.5".
func bare(s string) string {
	if p, err := netip.ParsePrefix(s); err == nil && p.IsSingleIP() {
		return p.Addr().String()
	}
	return s
}

// printLeftAdvice prints, under "reconcile --fix"'s last line, how to
// clear each drift it left.
func printLeftAdvice(w io.Writer, drifts []drift, nftTable string) {
	for _, d := range drifts {
		if d.fix == nil {
			fmt.Fprintf(w, "  %s %s %s\n    to clear: %s\n", d.kind, d.fam, d.what, leftAdvice(d, nftTable))
		}
	}
}

// noChainForBan says what to do about a ban by hand into a chain the
// firewall does not have: iptables' own answer ("chain ... is
// incompatible, use 'nft' tool" with iptables-nft) says nothing useful.
func (a *admin) noChainForBan(op policy.Operation) error {
	b, err := a.backend(op.Family)
	if err != nil {
		return nil // the ban itself reports it
	}
	got, err := b.Read(state.New(a.ctx.LookupPort), op.Chain)
	if err != nil || got.Exists {
		return nil
	}
	return fmt.Errorf("chain %q does not exist in the %s firewall: fail2ban creates it when the jail starts; ban into a chain that \"f2b-shim list\" shows, or start the jail first", op.Chain, op.Family)
}

// liveOnlyBan reports whether the firewall holds a ban that the state
// does not ("reconcile" lists it as unexpected): unban lifts it too.
func (a *admin) liveOnlyBan(op policy.Operation) bool {
	b, err := a.backend(op.Family)
	if err != nil || a.pol.Backend == "ipset" {
		return false
	}
	check := op
	check.Kind = policy.CheckBan
	out, err := b.Apply(check)
	return err == nil && out == firewall.CheckTrue
}

// printNoAuditRecords replaces an empty table's or summary's header with one line.
func printNoAuditRecords(w io.Writer, path string, filtered bool) {
	if filtered {
		fmt.Fprintf(w, "no audit records match in %s and its rotations\n", path)
		return
	}
	fmt.Fprintf(w, "no audit records yet in %s: the shim writes one for every request\n", path)
}
