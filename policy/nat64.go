package policy

import (
	"net/netip"
)

// nat64Lengths are the NAT64 prefix lengths RFC 6052 defines.
var nat64Lengths = []int{32, 40, 48, 56, 64, 96}

// nat64Layout is a block of IPv6 space whose addresses carry IPv4
// addresses at the RFC 6052 position for a NAT64 prefix of length Embed.
type nat64Layout struct {
	Block netip.Prefix
	Embed int
}

// wellKnownNAT64 are judged unless the policy's nat64_prefixes say
// otherwise. 64:ff9b::/96 is the well-known prefix (RFC 6052).
// 64:ff9b:1::/48 is for local use (RFC 8215); it is judged as /96 NAT64
// prefixes carved from it, the common use: any ban there must be
// narrower than a /96, and its last 32 bits are the IPv4 it bans. A site
// that uses a prefix of another length there lists it in nat64_prefixes,
// which then replaces this reading of the block.
var wellKnownNAT64 = []nat64Layout{
	{netip.MustParsePrefix("64:ff9b::/96"), 96},
	{netip.MustParsePrefix("64:ff9b:1::/48"), 96},
}

// nat64Layouts is every layout the policy judges.
func (pol *Policy) nat64Layouts() []nat64Layout {
	var out []nat64Layout
	for _, l := range wellKnownNAT64 {
		replaced := false
		for _, p := range pol.NAT64Prefixes {
			replaced = replaced || p.Overlaps(l.Block)
		}
		if !replaced {
			out = append(out, l)
		}
	}
	for _, p := range pol.NAT64Prefixes {
		out = append(out, nat64Layout{p, p.Bits()})
	}
	return out
}

// v4Bit maps bit i (0 = most significant) of an embedded IPv4 address to
// its bit in the IPv6 address, per RFC 6052 section 2.2: the IPv4 bits
// follow the prefix, skipping bits 64 to 71 (the "u" octet).
func v4Bit(embed, i int) int {
	if embed == 96 {
		return 96 + i
	}
	b := embed + i
	if b >= 64 {
		b += 8
	}
	return b
}

// embeddedV4 is the IPv4 prefix that a ban inside the layout's block
// covers, and whether the ban covers a whole NAT64 prefix (every IPv4
// host reached through it).
func (l nat64Layout) embeddedV4(src netip.Prefix) (v4 netip.Prefix, everything bool) {
	if src.Bits() <= l.Embed {
		return netip.Prefix{}, true
	}
	a := src.Addr().As16()
	var out [4]byte
	bits := 0
	for i := 0; i < 32; i++ {
		b := v4Bit(l.Embed, i)
		if b >= src.Bits() {
			break
		}
		if a[b/8]&(0x80>>(b%8)) != 0 {
			out[i/8] |= 0x80 >> (i % 8)
		}
		bits = i + 1
	}
	return netip.PrefixFrom(netip.AddrFrom4(out), bits), false
}
