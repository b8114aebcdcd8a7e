package nftables

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/f2b-shim/f2b-shim/policy"
)

// Hook is one rule of the base chain: packets of the family, of Proto, to
// one of Ports (every port when Ports is nil) go through the ban chain
// Chain. fail2ban hooks each family on its own (iptables and ip6tables),
// and removes each on its own, so a hook here has a family too.
type Hook struct {
	Family policy.Family
	Chain  policy.Chain
	Proto  string
	Ports  []policy.PortRange // sorted and merged; nil for all ports
}

// String is the hook as nft would show its match, for messages.
func (h Hook) String() string {
	if h.Ports == nil {
		return fmt.Sprintf("%s %s all ports -> %s", h.Family, h.Proto, h.Chain)
	}
	s := ""
	for i, r := range h.Ports {
		if i > 0 {
			s += ","
		}
		s += fmt.Sprint(r.Lo)
		if r.Hi != r.Lo {
			s += fmt.Sprintf("-%d", r.Hi)
		}
	}
	return fmt.Sprintf("%s %s ports %s -> %s", h.Family, h.Proto, s, h.Chain)
}

// protocols are the transport protocols whose header starts with the
// source and destination ports, so that "th dport" reads the port: the
// ones a fail2ban hook may name with a port match.
var protocols = map[string]byte{
	"tcp": unix.IPPROTO_TCP, "udp": unix.IPPROTO_UDP, "udplite": unix.IPPROTO_UDPLITE,
	"sctp": unix.IPPROTO_SCTP, "dccp": unix.IPPROTO_DCCP,
}

func protoName(n byte) (string, bool) {
	for name, v := range protocols {
		if v == n {
			return name, true
		}
	}
	return "", false
}

// check validates a hook before anything is queued.
func (h Hook) check() error {
	if err := errors.Join(checkChain(h.Chain), checkFamily(h.Family)); err != nil {
		return err
	}
	if _, ok := protocols[h.Proto]; !ok {
		return fmt.Errorf("f2b-shim: protocol %q has no ports nftables can match; use tcp, udp, udplite, sctp or dccp", h.Proto)
	}
	if h.Ports != nil && len(h.Ports) == 0 {
		return fmt.Errorf("f2b-shim: hook %s has an empty port list; pass nil for all ports", h)
	}
	for i, r := range h.Ports {
		if r.Lo == 0 || r.Lo > r.Hi || i > 0 && int(r.Lo) <= int(h.Ports[i-1].Hi)+1 {
			return fmt.Errorf("f2b-shim: hook %s: port ranges must be sorted, merged and from 1 to 65535 (policy's resolve does it)", h)
		}
	}
	return nil
}

// maxChainName keeps the longest set name, CHAIN-v4-addr, within the
// kernel's 255 bytes (NFT_SET_MAXNAMELEN minus the NUL). The policy's own
// limit, iptables' 28, is far below it.
const maxChainName = 255 - len("-v4-addr")

func checkChain(c policy.Chain) error {
	return checkName("chain", string(c), maxChainName)
}

// hookSet is the anonymous set of a multiport hook's ports: nft's own
// "th dport { 25, 465, 587 }". A single port or range needs none.
func hookSet(t *nftables.Table, h Hook) (*nftables.Set, []nftables.SetElement) {
	if len(h.Ports) < 2 {
		return nil, nil
	}
	s := &nftables.Set{Table: t, Anonymous: true, Constant: true, Interval: true, KeyType: nftables.TypeInetService}
	var elems []nftables.SetElement
	for _, r := range h.Ports {
		elems = append(elems, nftables.SetElement{Key: port(r.Lo)})
		if r.Hi < 65535 {
			elems = append(elems, nftables.SetElement{Key: port(r.Hi + 1), IntervalEnd: true})
		}
	}
	return s, elems
}

func port(p uint16) []byte { return binary.BigEndian.AppendUint16(nil, p) }

// hookExprs is the rule "meta nfproto F meta l4proto P [th dport PORTS]
// jump C"; set is the anonymous port set for a multiport hook, already
// added.
func hookExprs(h Hook, set *nftables.Set) []expr.Any {
	nfproto, _, _ := familyMatch(h.Family)
	e := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{nfproto}},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{protocols[h.Proto]}},
	}
	if h.Ports != nil {
		e = append(e, &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2})
		switch {
		case set != nil:
			e = append(e, &expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID})
		case h.Ports[0].Lo == h.Ports[0].Hi:
			e = append(e, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: port(h.Ports[0].Lo)})
		default:
			e = append(e, &expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: port(h.Ports[0].Lo), ToData: port(h.Ports[0].Hi)})
		}
	}
	return append(e, &expr.Verdict{Kind: expr.VerdictJump, Chain: string(h.Chain)})
}

// decodeHook reads a base chain rule back. ports resolves an anonymous
// set's elements. ok is false for a rule this package does not write.
func decodeHook(exprs []expr.Any, ports func(set string) ([]policy.PortRange, error)) (h Hook, ok bool, err error) {
	if len(exprs) != 5 && len(exprs) != 7 {
		return Hook{}, false, nil
	}
	var fam policy.Family
	for _, f := range []policy.Family{policy.IPv4, policy.IPv6} {
		nfproto, _, _ := familyMatch(f)
		want := []expr.Any{&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{nfproto}}}
		if exprsEqual(exprs[:2], want) {
			fam = f
		}
	}
	if fam == 0 {
		return Hook{}, false, nil
	}
	exprs = exprs[2:]
	meta, ok1 := exprs[0].(*expr.Meta)
	cmp, ok2 := exprs[1].(*expr.Cmp)
	verdict, ok3 := exprs[len(exprs)-1].(*expr.Verdict)
	if !ok1 || !ok2 || !ok3 || meta.Key != expr.MetaKeyL4PROTO || cmp.Op != expr.CmpOpEq || len(cmp.Data) != 1 || verdict.Kind != expr.VerdictJump {
		return Hook{}, false, nil
	}
	proto, known := protoName(cmp.Data[0])
	if !known {
		return Hook{}, false, nil
	}
	h = Hook{Family: fam, Chain: policy.Chain(verdict.Chain), Proto: proto}
	if len(exprs) == 3 {
		return h, true, nil
	}
	if p, ok := exprs[2].(*expr.Payload); !ok || p.Base != expr.PayloadBaseTransportHeader || p.Offset != 2 || p.Len != 2 {
		return Hook{}, false, nil
	}
	switch m := exprs[3].(type) {
	case *expr.Cmp:
		if m.Op != expr.CmpOpEq || len(m.Data) != 2 {
			return Hook{}, false, nil
		}
		p := binary.BigEndian.Uint16(m.Data)
		h.Ports = []policy.PortRange{{Lo: p, Hi: p}}
	case *expr.Range:
		if m.Op != expr.CmpOpEq || len(m.FromData) != 2 || len(m.ToData) != 2 {
			return Hook{}, false, nil
		}
		h.Ports = []policy.PortRange{{Lo: binary.BigEndian.Uint16(m.FromData), Hi: binary.BigEndian.Uint16(m.ToData)}}
	case *expr.Lookup:
		if m.Invert {
			return Hook{}, false, nil
		}
		if h.Ports, err = ports(m.SetName); err != nil {
			return Hook{}, false, err
		}
	default:
		return Hook{}, false, nil
	}
	return h, true, nil
}

// singlePorts turns a plain set's elements, one port each, into sorted
// and merged ranges, as the policy resolves a hook's ports.
func singlePorts(elems []nftables.SetElement) ([]policy.PortRange, error) {
	var out []policy.PortRange
	for _, e := range elems {
		if len(e.Key) != 2 {
			return nil, fmt.Errorf("port set element of %d bytes", len(e.Key))
		}
		p := binary.BigEndian.Uint16(e.Key)
		out = append(out, policy.PortRange{Lo: p, Hi: p})
	}
	slices.SortFunc(out, func(a, b policy.PortRange) int { return int(a.Lo) - int(b.Lo) })
	var merged []policy.PortRange
	for _, r := range out {
		if n := len(merged); n > 0 && int(r.Lo) <= int(merged[n-1].Hi)+1 {
			merged[n-1].Hi = max(merged[n-1].Hi, r.Hi)
			continue
		}
		merged = append(merged, r)
	}
	return merged, nil
}

// portRanges turns an anonymous interval set's elements back into ranges.
func portRanges(elems []nftables.SetElement) ([]policy.PortRange, error) {
	slices.SortFunc(elems, compareElements)
	var out []policy.PortRange
	for i := 0; i < len(elems); i++ {
		e := elems[i]
		if e.IntervalEnd {
			continue // nft's leading end element at 0, when it writes one
		}
		if len(e.Key) != 2 {
			return nil, fmt.Errorf("port set element of %d bytes", len(e.Key))
		}
		r := policy.PortRange{Lo: binary.BigEndian.Uint16(e.Key), Hi: 65535}
		if i+1 < len(elems) && elems[i+1].IntervalEnd {
			r.Hi = binary.BigEndian.Uint16(elems[i+1].Key) - 1
			i++
		}
		out = append(out, r)
	}
	return out, nil
}

// Ban chain rules: "meta nfproto ipv4 ip saddr @C-v4 VERDICT" and the IPv6
// counterpart. The nfproto match is what nft adds for "ip saddr" in an
// inet table: without it the IPv4 offset would be read from IPv6 headers.

// SetName is the set that holds a ban chain's bans of one family. Sets
// and chains have separate namespaces, and the suffix maps every set name
// back to one chain.
func SetName(chain policy.Chain, fam policy.Family) string {
	if fam == policy.IPv6 {
		return string(chain) + "-v6"
	}
	return string(chain) + "-v4"
}

// AddrSetName is the hash set of single addresses (/32, /128) beside the
// interval set, in a table opened WithAddressSets.
func AddrSetName(chain policy.Chain, fam policy.Family) string {
	return SetName(chain, fam) + "-addr"
}

// setNames lists the family's sets of a chain that a verdict rule may match.
func setNames(chain policy.Chain, fam policy.Family) []string {
	return []string{SetName(chain, fam), AddrSetName(chain, fam)}
}

// icmpCodes maps iptables' --reject-with types to the ICMP (or ICMPv6)
// code of nftables' "reject with icmp(v6) type": the same packets go out.
var icmpCodes = map[string]uint8{
	"icmp-net-unreachable":   0,
	"icmp-host-unreachable":  1,
	"icmp-proto-unreachable": 2,
	"icmp-port-unreachable":  3,
	"icmp-net-prohibited":    9,
	"icmp-host-prohibited":   10,
	"icmp-admin-prohibited":  13,
	"icmp6-no-route":         0,
	"icmp6-adm-prohibited":   1,
	"icmp6-addr-unreachable": 3,
	"icmp6-port-unreachable": 4,
	"icmp6-policy-fail":      5,
	"icmp6-reject-route":     6,
}

// checkTarget refuses a target that has no nftables form for the family.
func checkTarget(fam policy.Family, t policy.Target) error {
	switch t.Kind {
	case policy.Drop:
		return nil
	case policy.Reject:
		if _, ok := icmpCodes[t.RejectWith]; ok && policy.RejectFamily(t.RejectWith) == fam {
			return nil
		}
		return fmt.Errorf("f2b-shim: reject type %q is not an %s reject type nftables knows", t.RejectWith, fam)
	}
	return fmt.Errorf("f2b-shim: target %v is neither DROP nor REJECT", t)
}

func familyMatch(fam policy.Family) (nfproto byte, offset, length uint32) {
	if fam == policy.IPv6 {
		return unix.NFPROTO_IPV6, 8, 16
	}
	return unix.NFPROTO_IPV4, 12, 4
}

func verdictExprs(set string, fam policy.Family, t policy.Target) []expr.Any {
	nfproto, off, n := familyMatch(fam)
	e := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{nfproto}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n},
		&expr.Lookup{SourceRegister: 1, SetName: set},
	}
	if t.Kind == policy.Drop {
		return append(e, &expr.Verdict{Kind: expr.VerdictDrop})
	}
	return append(e, &expr.Reject{Type: unix.NFT_REJECT_ICMP_UNREACH, Code: icmpCodes[t.RejectWith]})
}

// decodeVerdict reads a ban chain rule back: the family whose set it
// matches, the set, and its target. ok is false for a rule this package
// does not write.
func decodeVerdict(chain policy.Chain, exprs []expr.Any) (fam policy.Family, set string, t policy.Target, ok bool) {
	if len(exprs) != 5 {
		return 0, "", policy.Target{}, false
	}
	lookup, isLookup := exprs[3].(*expr.Lookup)
	if !isLookup {
		return 0, "", policy.Target{}, false
	}
	for _, fam := range []policy.Family{policy.IPv4, policy.IPv6} {
		if !slices.Contains(setNames(chain, fam), lookup.SetName) {
			continue
		}
		for _, t := range targets(fam) {
			if exprsEqual(exprs, verdictExprs(lookup.SetName, fam, t)) {
				return fam, lookup.SetName, t, true
			}
		}
	}
	return 0, "", policy.Target{}, false
}

// targets lists every target a family's ban chain rule can have.
func targets(fam policy.Family) []policy.Target {
	out := []policy.Target{{Kind: policy.Drop}}
	for with := range icmpCodes {
		if policy.RejectFamily(with) == fam {
			out = append(out, policy.Target{Kind: policy.Reject, RejectWith: with})
		}
	}
	return out
}

// exprsEqual compares rules by their wire form, which is what the kernel
// holds; the set ID of a lookup is a transaction-local handle and is left
// out.
func exprsEqual(a, b []expr.Any) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		x, y := a[i], b[i]
		if lx, ok := x.(*expr.Lookup); ok {
			ly, ok := y.(*expr.Lookup)
			if !ok || lx.SetName != ly.SetName || lx.SourceRegister != ly.SourceRegister || lx.Invert != ly.Invert {
				return false
			}
			continue
		}
		bx, errX := expr.Marshal(byte(nftables.TableFamilyINet), x)
		by, errY := expr.Marshal(byte(nftables.TableFamilyINet), y)
		if errX != nil || errY != nil || !bytes.Equal(bx, by) {
			return false
		}
	}
	return true
}
