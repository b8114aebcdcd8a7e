package nftables

import (
	"fmt"
	"net/netip"
)

// An interval set holds a prefix as two elements: its first address, and
// the address just past its last one flagged as an interval end, so the
// kernel matches [start, end). A prefix that runs to the top of the
// address space (0.0.0.0/0, 255.255.255.255/32, ::/0, …) has no address
// past its end; the start alone then opens an interval to the top, as nft
// itself sends it.

// prefixRange is the [start, end) of a prefix; open is true when the
// prefix reaches the last address of its family and end is unset.
func prefixRange(p netip.Prefix) (start, end netip.Addr, open bool) {
	p = p.Masked()
	start = p.Addr()
	last := lastAddr(p)
	end = last.Next()
	if !end.IsValid() {
		return start, netip.Addr{}, true
	}
	return start, end, false
}

// lastAddr is the highest address inside p.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// rangePrefix is the prefix that covers exactly [start, end); open means
// the range runs to the top of the family. ok is false when the range is
// no single CIDR prefix (something other than the shim wrote it).
func rangePrefix(start, end netip.Addr, open bool) (netip.Prefix, bool) {
	for bits := 0; bits <= start.BitLen(); bits++ {
		p := netip.PrefixFrom(start, bits)
		if p.Masked().Addr() != start {
			continue
		}
		s, e, o := prefixRange(p)
		if s == start && o == open && (open || e == end) {
			return p, true
		}
	}
	return netip.Prefix{}, false
}

// familyBytes is the key length of the family's set: 4 or 16 bytes.
func keyOf(a netip.Addr) []byte {
	if a.Is4() {
		b := a.As4()
		return b[:]
	}
	b := a.As16()
	return b[:]
}

// addrOf reads a set key back; the key's length says the family.
func addrOf(key []byte) (netip.Addr, error) {
	a, ok := netip.AddrFromSlice(key)
	if !ok {
		return netip.Addr{}, fmt.Errorf("set key of %d bytes is no IPv4 or IPv6 address", len(key))
	}
	return a, nil
}
