package policy

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// PortRange is an inclusive range of port numbers.
type PortRange struct{ Lo, Hi uint16 }

// DefaultLocalPorts is Linux's default ip_local_port_range, used when the
// caller could not read the proxy's own.
var DefaultLocalPorts = PortRange{32768, 60999}

// allPorts is what a hook without a port match covers.
var allPorts = []PortRange{{1, 65535}}

// resolve turns a port list into sorted, merged numeric ranges, naming
// service names through lookup as iptables does through /etc/services.
func resolve(proto string, ports []Port, lookup func(proto, name string) (uint16, bool)) ([]PortRange, error) {
	var out []PortRange
	for _, p := range ports {
		if p.Name == "" {
			out = append(out, PortRange{p.Lo, p.Hi})
			continue
		}
		var n uint16
		ok := false
		if lookup != nil {
			n, ok = lookup(proto, p.Name)
		}
		if !ok {
			return nil, fmt.Errorf("service name %q is not a %s port this proxy knows (/etc/services); use the port number", p.Name, proto)
		}
		out = append(out, PortRange{n, n})
	}
	return merge(out), nil
}

func merge(rs []PortRange) []PortRange {
	slices.SortFunc(rs, func(a, b PortRange) int { return int(a.Lo) - int(b.Lo) })
	var out []PortRange
	for _, r := range rs {
		if n := len(out); n > 0 && int(r.Lo) <= int(out[n-1].Hi)+1 {
			out[n-1].Hi = max(out[n-1].Hi, r.Hi)
			continue
		}
		out = append(out, r)
	}
	return out
}

// hookPorts is the set of ports a hook matches.
func (c Command) hookPorts(lookup func(proto, name string) (uint16, bool)) ([]PortRange, error) {
	if c.Match == AllPorts {
		return allPorts, nil
	}
	return resolve(c.Proto, c.Ports, lookup)
}

// checkHookPorts keeps a hook off the ports that the proxy's own traffic
// comes back on. Replies to the proxy's outbound connections (DNS, its
// backends, NTP, health checks) arrive on INPUT at ports from the local
// port range; a hook on them would let a ban of the proxy's resolver or
// backend cut the proxy off. hook_ports lets the admin allow-list ports
// explicitly instead.
func (pol *Policy) checkHookPorts(c Command, ctx Context) error {
	ports, err := c.hookPorts(ctx.LookupPort)
	if err != nil {
		return &Denial{Reason: err.Error()}
	}
	if len(pol.HookPorts) > 0 {
		allowed, err := resolve(c.Proto, pol.HookPorts, ctx.LookupPort)
		if err != nil {
			return deny("hook_ports: %v", err)
		}
		for _, r := range ports {
			if !covered(r, allowed) {
				return deny("hook on %s ports %s is outside the policy's hook_ports", c.Proto, rangeString(r))
			}
		}
		return nil
	}
	if c.Match == AllPorts {
		return deny("a hook on every %s port would also catch the replies to this proxy's own connections; match the service's ports (fail2ban type=multiport), or list the ports in the policy's hook_ports", c.Proto)
	}
	local := ctx.LocalPorts
	if local == (PortRange{}) {
		local = DefaultLocalPorts
	}
	for _, r := range ports {
		if r.Lo <= local.Hi && local.Lo <= r.Hi {
			return deny("hook on %s ports %s overlaps this proxy's local port range %s, where replies to its own connections arrive; list the ports in the policy's hook_ports to allow it", c.Proto, rangeString(r), rangeString(local))
		}
	}
	return nil
}

func covered(r PortRange, allowed []PortRange) bool {
	for _, a := range allowed {
		if a.Lo <= r.Lo && r.Hi <= a.Hi {
			return true
		}
	}
	return false
}

func rangeString(r PortRange) string {
	if r.Lo == r.Hi {
		return strconv.Itoa(int(r.Lo))
	}
	return fmt.Sprintf("%d:%d", r.Lo, r.Hi)
}

// HookEffect names what a hook does: its parent, protocol, the set of
// ports it matches and the chain it jumps to. Two hooks with the same
// effect are the same hook however they are spelled ("imap,imaps",
// "993,143", or "--dport 143" against "--dports 143"), so the shim never
// adds a second one. lookup resolves service names.
func HookEffect(op Operation, lookup func(proto, name string) (uint16, bool)) (string, error) {
	ports, err := op.hookPorts(lookup)
	if err != nil {
		return "", err
	}
	s := make([]string, len(ports))
	for i, r := range ports {
		s[i] = rangeString(r)
	}
	return fmt.Sprintf("%s %s %s %s", op.Chain, op.Proto, strings.Join(s, ","), op.Jump), nil
}

// PortRanges is the set of ports a hook matches, sorted and merged, with
// service names resolved through lookup; nil when it matches every port
// ("-p tcp -j CHAIN"). The nftables backend builds its hook rules from it.
func (c Command) PortRanges(lookup func(proto, name string) (uint16, bool)) ([]PortRange, error) {
	if c.Match == AllPorts {
		return nil, nil
	}
	return resolve(c.Proto, c.Ports, lookup)
}
