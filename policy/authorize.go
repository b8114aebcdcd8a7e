package policy

import (
	"net/netip"
	"slices"
)

// Context is what Authorize knows about the connection and the proxy,
// gathered by the caller: the ssh client (from SSH_CONNECTION), the
// proxy's own addresses, and the hosts it depends on. None of them is
// ever banned, so that a mail host cannot cut the proxy off from itself,
// from its admins' path, or from its resolver and router.
type Context struct {
	Client     netip.Addr
	LocalAddrs []netip.Addr
	// Infrastructure are the proxy's nameservers and default gateways.
	Infrastructure []netip.Addr
	// LocalPorts is the proxy's ip_local_port_range; zero means unknown,
	// and DefaultLocalPorts is used.
	LocalPorts PortRange
	// LookupPort resolves a service name as iptables would
	// (/etc/services); nil resolves none.
	LookupPort func(proto, name string) (uint16, bool)
}

// alwaysNeverBan are ranges no ban may ever touch, whatever the policy
// says, each with what it is.
var alwaysNeverBan = []Protected{
	{netip.MustParsePrefix("0.0.0.0/8"), "the unspecified range, built in"},
	{netip.MustParsePrefix("127.0.0.0/8"), "loopback, built in"},
	{netip.MustParsePrefix("169.254.0.0/16"), "link-local, built in"},
	{netip.MustParsePrefix("224.0.0.0/4"), "multicast, built in"},
	{netip.MustParsePrefix("255.255.255.255/32"), "broadcast, built in"},
	{netip.MustParsePrefix("::/128"), "the unspecified address, built in"},
	{netip.MustParsePrefix("::1/128"), "loopback, built in"},
	{netip.MustParsePrefix("fe80::/10"), "link-local, built in"},
	{netip.MustParsePrefix("ff00::/8"), "multicast, built in"},
}

// Protected is a range no ban may touch, and why: the denial names the
// rule, so that the admin knows whether to fix the policy, the mail
// server's logging or nothing.
type Protected struct {
	Prefix netip.Prefix
	Why    string
}

// ownText is text of the shim's own in a denial, which deny does not
// cut as it cuts the client's words.
type ownText string

// The reasons for the ranges that come from the policy and the context.
const (
	whyNeverBan = "the policy's never_ban"
	whyClient   = "the ssh client, the mail host itself"
	// A mail server that logs the proxy's address instead of the
	// client's (no PROXY protocol) asks to ban the proxy: this says so.
	whyLocal = "an address of this proxy; a mail server that logs it instead of the client's address needs the PROXY protocol"
	whyInfra = "a nameserver or default gateway of this proxy"
)

// Operation is a Command that Authorize has allowed under a policy.
type Operation struct {
	Command
	// Member is the one address a ban, unban or check named when the
	// policy widens it (ban_prefix_v6, ban_prefix_v4): Source is then the
	// prefix that goes into the firewall, and Member the address it is
	// banned for. The prefix stays until every member is unbanned.
	Member netip.Prefix
}

// Decide parses a command line and authorizes it: the whole judgement
// the shim makes of a request, and of every line it reads back from its
// state or from the live firewall.
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
		// Only a hook that goes in needs its ports judged: removing or
		// checking one that an older policy allowed must keep working.
		if c.Kind == AddHook {
			if err := pol.checkHookPorts(c, ctx); err != nil {
				return Operation{}, err
			}
		}
	}
	op := Operation{Command: c}
	if c.isBan() {
		if err := pol.checkTarget(c.Target); err != nil {
			return Operation{}, err
		}
		if err := pol.checkSource(c.Source, ctx); err != nil {
			return Operation{}, err
		}
		if wide := pol.widen(c.Source); wide != c.Source {
			// never_ban and the minimum prefix hold for what goes in.
			if err := pol.checkSource(wide, ctx); err != nil {
				return Operation{}, deny("widened to %s (ban_prefix): %v", wide, err)
			}
			op.Member, op.Source = c.Source, wide
		}
	}
	return op, nil
}

// widen turns a ban of one address into a ban of its ban_prefix_v6 (or
// ban_prefix_v4) prefix; prefixes and unwidened families stay as they are.
func (pol *Policy) widen(src netip.Prefix) netip.Prefix {
	bits := pol.BanPrefixV4
	if src.Addr().Is6() {
		bits = pol.BanPrefixV6
	}
	if src.Bits() != src.Addr().BitLen() || bits >= src.Bits() || bits == 0 {
		return src
	}
	return netip.PrefixFrom(src.Addr(), bits).Masked()
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
	never := pol.NeverBanReasons(ctx)
	for _, nb := range never {
		if src.Overlaps(nb.Prefix) {
			return deny("address %q overlaps %s, which is never banned: %s", src, nb.Prefix, ownText(nb.Why))
		}
	}
	if !src.Addr().Is6() {
		return nil
	}
	// A ban inside a NAT64 prefix bans the IPv4 hosts it carries: judge
	// it as those, or a /64 there would ban every IPv4 client.
	for _, l := range pol.nat64Layouts() {
		if !src.Overlaps(l.Block) {
			continue
		}
		v4, everything := l.embeddedV4(src)
		if everything {
			return deny("address %q covers the whole NAT64 prefix in %s, and so every IPv4 host behind it", src, l.Block)
		}
		if v4.Bits() < pol.MinPrefixV4 {
			return deny("address %q carries the IPv4 range %s through NAT64 (%s), wider than the policy allows (at most /%d)", src, v4, l.Block, pol.MinPrefixV4)
		}
		for _, nb := range never {
			if nb.Prefix.Addr().Is4() && v4.Overlaps(nb.Prefix) {
				return deny("address %q carries the IPv4 range %s through NAT64 (%s), which overlaps %s, never banned: %s", src, v4, l.Block, nb.Prefix, ownText(nb.Why))
			}
		}
	}
	return nil
}

// NeverBanList is every range a ban may not touch: the policy's own list,
// the built-in special ranges, the ssh client, the proxy's addresses, its
// nameservers and its default gateways.
func (pol *Policy) NeverBanList(ctx Context) []netip.Prefix {
	var list []netip.Prefix
	for _, p := range pol.NeverBanReasons(ctx) {
		list = append(list, p.Prefix)
	}
	return list
}

// NeverBanReasons is NeverBanList with the reason for each range.
func (pol *Policy) NeverBanReasons(ctx Context) []Protected {
	list := slices.Clone(alwaysNeverBan)
	for _, p := range pol.NeverBan {
		list = append(list, Protected{p, whyNeverBan})
	}
	for _, g := range []struct {
		addrs []netip.Addr
		why   string
	}{{[]netip.Addr{ctx.Client}, whyClient}, {ctx.LocalAddrs, whyLocal}, {ctx.Infrastructure, whyInfra}} {
		for _, a := range g.addrs {
			if a.IsValid() {
				a = a.Unmap().WithZone("")
				list = append(list, Protected{netip.PrefixFrom(a, a.BitLen()), g.why})
			}
		}
	}
	return list
}
