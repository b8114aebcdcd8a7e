package policy

import (
	"net/netip"
	"slices"
)

// Context is what Authorize knows about the connection, gathered by the
// caller: the ssh client (from SSH_CONNECTION) and the proxy's own
// addresses. Both are never banned, so that a mail host cannot cut the
// proxy off from itself or from its admins' path.
type Context struct {
	Client     netip.Addr
	LocalAddrs []netip.Addr
}

// alwaysNeverBan are ranges no ban may ever touch, whatever the policy says:
// unspecified, loopback, link-local, multicast and broadcast.
var alwaysNeverBan = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("169.254.0.0/16"),
	netip.MustParsePrefix("224.0.0.0/4"),
	netip.MustParsePrefix("255.255.255.255/32"),
	netip.MustParsePrefix("::/128"),
	netip.MustParsePrefix("::1/128"),
	netip.MustParsePrefix("fe80::/10"),
	netip.MustParsePrefix("ff00::/8"),
}

// Operation is a Command that Authorize has allowed under a policy.
type Operation struct {
	Command
}

// Decide parses a command line and authorizes it: the whole judgement
// the shim makes of a request, and of every line it reads back from its
// journal or from the live firewall.
func Decide(pol *Policy, line string, ctx Context) (Operation, error) {
	c, err := ParseCommand(line)
	if err != nil {
		return Operation{}, err
	}
	return Authorize(pol, c, ctx)
}

// Authorize checks a parsed command against the policy. It returns the
// operation to carry out, or a *Denial whose reason names the word at fault.
func Authorize(pol *Policy, c Command, ctx Context) (Operation, error) {
	if err := pol.checkBanChain(c.BanChain()); err != nil {
		return Operation{}, err
	}
	if c.isHook() {
		if !slices.Contains(pol.ParentChains, string(c.Chain)) {
			return Operation{}, deny("chain %q is not a parent chain of the policy %v", c.Chain, pol.ParentChains)
		}
		if c.Kind != CheckHookListed && !slices.Contains(pol.Protocols, c.Proto) {
			return Operation{}, deny("protocol %q is not allowed by the policy %v", c.Proto, pol.Protocols)
		}
	}
	if c.isBan() {
		if err := pol.checkTarget(c.Target); err != nil {
			return Operation{}, err
		}
		if err := pol.checkSource(c.Source, ctx); err != nil {
			return Operation{}, err
		}
	}
	return Operation{Command: c}, nil
}

func (pol *Policy) checkBanChain(c Chain) error {
	if len(c) <= len(pol.ChainPrefix) || string(c[:len(pol.ChainPrefix)]) != pol.ChainPrefix {
		return deny("chain %q is outside the allowed prefix %q", c, pol.ChainPrefix)
	}
	return nil
}

func (pol *Policy) checkTarget(t Target) error {
	name := map[TargetKind]string{Drop: "DROP", Reject: "REJECT"}[t.Kind]
	if !slices.Contains(pol.Targets, name) {
		return deny("target %q is not allowed by the policy %v", name, pol.Targets)
	}
	if t.Kind == Reject && !slices.Contains(pol.RejectWith, t.RejectWith) {
		return deny("reject type %q is not allowed by the policy", t.RejectWith)
	}
	return nil
}

func (pol *Policy) checkSource(src netip.Prefix, ctx Context) error {
	minBits := pol.MinPrefixV4
	if src.Addr().Is6() {
		minBits = pol.MinPrefixV6
	}
	if src.Bits() < minBits {
		return deny("address %q is wider than the policy allows (at most /%d)", src, minBits)
	}
	for _, nb := range pol.NeverBanList(ctx) {
		if src.Overlaps(nb) {
			return deny("address %q overlaps %s, which is never banned", src, nb)
		}
	}
	return nil
}

// NeverBanList is every range a ban may not touch: the policy's own list,
// the built-in special ranges, the ssh client and the proxy's addresses.
func (pol *Policy) NeverBanList(ctx Context) []netip.Prefix {
	list := slices.Concat(alwaysNeverBan, pol.NeverBan)
	for _, a := range append([]netip.Addr{ctx.Client}, ctx.LocalAddrs...) {
		if a.IsValid() {
			a = a.Unmap().WithZone("")
			list = append(list, netip.PrefixFrom(a, a.BitLen()))
		}
	}
	return list
}
