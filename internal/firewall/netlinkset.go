package firewall

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/f2b-shim/f2b-shim/policy"
)

// NetlinkSets is the real Sets: it talks to the kernel's ipset over
// netlink (github.com/vishvananda/netlink), so that a ban with the set
// backend starts no process at all; the ipset tool took one per call.
// The shim's own CAP_NET_ADMIN (root's, or the binary's file capability)
// is what the kernel asks for.
//
// It keeps one netlink socket for all its calls: a stream's batch adds
// thousands of entries, and a socket per entry cost more than the entry.
type NetlinkSets struct{ h *netlink.Handle }

func (s *NetlinkSets) handle() (*netlink.Handle, error) {
	if s.h == nil {
		h, err := netlink.NewHandle(unix.NETLINK_NETFILTER)
		if err != nil {
			return nil, fmt.Errorf("netlink: %w", err)
		}
		s.h = h
	}
	return s.h, nil
}

// ErrNoSet is returned by Add when the set does not exist yet.
var ErrNoSet = errors.New("no such set")

func entry(cidr string) (*netlink.IPSetEntry, error) {
	p, err := netip.ParsePrefix(cidr)
	if err != nil {
		a, err2 := netip.ParseAddr(cidr)
		if err2 != nil {
			return nil, fmt.Errorf("set entry %q is not an address or prefix", cidr)
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	return &netlink.IPSetEntry{IP: net.IP(p.Addr().AsSlice()), CIDR: uint8(p.Bits())}, nil
}

func isErr(err error, code int) bool { return errors.Is(err, nl.IPSetError(code)) }

// ipsetHashFull is the kernel's "hash is full" (IPSET_ERR_HASH_FULL, the
// first type-specific code of hash types).
const ipsetHashFull = nl.IPSET_ERR_TYPE_SPECIFIC

func setErr(op, name string, err error) error {
	return fmt.Errorf("ipset %s %s: %w", op, name, err)
}

// target is the handle and the entry for cidr.
func (s *NetlinkSets) target(cidr string) (*netlink.Handle, *netlink.IPSetEntry, error) {
	h, err := s.handle()
	if err != nil {
		return nil, nil, err
	}
	e, err := entry(cidr)
	return h, e, err
}

// Create implements Sets: like "ipset create -exist".
func (s *NetlinkSets) Create(name string, fam policy.Family, maxelem int) error {
	h, err := s.handle()
	if err != nil {
		return err
	}
	family := uint8(syscall.AF_INET)
	if fam == policy.IPv6 {
		family = syscall.AF_INET6
	}
	err = h.IpsetCreate(name, "hash:net", netlink.IpsetCreateOptions{Replace: true, Family: family, MaxElements: uint32(maxelem)})
	if err != nil {
		return setErr("create", name, err)
	}
	return nil
}

// Add implements Sets.
func (s *NetlinkSets) Add(name, cidr string) (bool, error) {
	h, e, err := s.target(cidr)
	if err != nil {
		return false, err
	}
	err = h.IpsetAdd(name, e)
	switch {
	case err == nil:
		return true, nil
	case isErr(err, nl.IPSET_ERR_EXIST):
		return false, nil
	case isErr(err, ipsetHashFull):
		return false, ErrSetFull
	case errors.Is(err, syscall.ENOENT):
		return false, ErrNoSet
	}
	return false, setErr("add", name, err)
}

// Del implements Sets.
func (s *NetlinkSets) Del(name, cidr string) (bool, error) {
	h, e, err := s.target(cidr)
	if err != nil {
		return false, err
	}
	err = h.IpsetDel(name, e)
	if err == nil {
		return true, nil
	}
	if isErr(err, nl.IPSET_ERR_EXIST) || errors.Is(err, syscall.ENOENT) {
		return false, nil
	}
	return false, setErr("del", name, err)
}

// Test implements Sets.
func (s *NetlinkSets) Test(name, cidr string) (bool, error) {
	h, e, err := s.target(cidr)
	if err != nil {
		return false, err
	}
	ok, err := h.IpsetTest(name, e)
	if errors.Is(err, syscall.ENOENT) {
		return false, nil
	}
	if err != nil {
		return false, setErr("test", name, err)
	}
	return ok, nil
}

// Flush implements Sets.
func (s *NetlinkSets) Flush(name string) error {
	h, err := s.handle()
	if err != nil {
		return err
	}
	if err := h.IpsetFlush(name); err != nil && !errors.Is(err, syscall.ENOENT) {
		return setErr("flush", name, err)
	}
	return nil
}

// Destroy implements Sets.
func (s *NetlinkSets) Destroy(name string) error {
	h, err := s.handle()
	if err != nil {
		return err
	}
	if err := h.IpsetDestroy(name); err != nil && !errors.Is(err, syscall.ENOENT) {
		return setErr("destroy", name, err)
	}
	return nil
}

// Members implements Sets.
func (s *NetlinkSets) Members(name string) ([]string, error) {
	h, err := s.handle()
	if err != nil {
		return nil, err
	}
	r, err := h.IpsetList(name)
	if errors.Is(err, syscall.ENOENT) {
		return nil, nil
	}
	if err != nil {
		return nil, setErr("list", name, err)
	}
	out := make([]string, 0, len(r.Entries))
	for _, e := range r.Entries {
		a, ok := netip.AddrFromSlice(e.IP)
		if !ok {
			continue
		}
		out = append(out, netip.PrefixFrom(a.Unmap(), int(e.CIDR)).String())
	}
	return out, nil
}

// ipsetFlagListHeader asks a list for the set's header only
// (IPSET_FLAG_LIST_HEADER in linux/netfilter/ipset/ip_set.h), as
// "ipset list -t" does; vishvananda/netlink has no call for it.
const ipsetFlagListHeader = 1 << 2

// References is how many iptables rules use the set: the set backend's
// rule in the chain holds one. It reads only the set's header, so its cost
// does not grow with the set.
func (s *NetlinkSets) References(name string) (int, error) {
	req := nl.NewNetlinkRequest(nl.IPSET_CMD_LIST|(unix.NFNL_SUBSYS_IPSET<<8), nl.GetIpsetFlags(nl.IPSET_CMD_LIST))
	req.AddData(&nl.Nfgenmsg{NfgenFamily: uint8(unix.AF_NETLINK), Version: nl.NFNETLINK_V0})
	req.AddData(nl.NewRtAttr(nl.IPSET_ATTR_PROTOCOL, nl.Uint8Attr(nl.IPSET_PROTOCOL)))
	req.AddData(nl.NewRtAttr(nl.IPSET_ATTR_SETNAME, nl.ZeroTerminated(name)))
	req.AddData(&nl.Uint32Attribute{Type: nl.IPSET_ATTR_FLAGS | nl.NLA_F_NET_BYTEORDER, Value: ipsetFlagListHeader})
	msgs, err := req.Execute(unix.NETLINK_NETFILTER, 0)
	if errors.Is(err, syscall.ENOENT) {
		return 0, ErrNoSet
	}
	if err != nil {
		return 0, setErr("list -t", name, err)
	}
	for _, msg := range msgs {
		if len(msg) < nl.SizeofNfgenmsg {
			continue
		}
		attrs, err := nl.ParseRouteAttr(msg[nl.SizeofNfgenmsg:])
		if err != nil {
			return 0, setErr("list -t", name, err)
		}
		for _, a := range attrs {
			if a.Attr.Type&nl.NLA_TYPE_MASK != nl.IPSET_ATTR_DATA {
				continue
			}
			data, err := nl.ParseRouteAttr(a.Value)
			if err != nil {
				return 0, setErr("list -t", name, err)
			}
			for _, d := range data {
				if d.Attr.Type&nl.NLA_TYPE_MASK == nl.IPSET_ATTR_REFERENCES && len(d.Value) == 4 {
					return int(binary.BigEndian.Uint32(d.Value)), nil
				}
			}
		}
	}
	return 0, fmt.Errorf("ipset list -t %s: the kernel sent no reference count", name)
}
