package policy

import (
	"net/netip"
	"strconv"
	"strings"
)

// Family is the address family a command works on, chosen by its binary.
type Family int

// The two families, named after the binary that manages them.
const (
	IPv4 Family = 4
	IPv6 Family = 6
)

// Binary is the iptables binary name for the family, as sent on the wire.
func (f Family) Binary() string {
	if f == IPv6 {
		return "ip6tables"
	}
	return "iptables"
}

// String returns "ipv4" or "ipv6", the form used in the audit log.
func (f Family) String() string {
	if f == IPv6 {
		return "ipv6"
	}
	return "ipv4"
}

// maxChainLen is iptables' own limit on a chain name (XT_EXTENSION_MAXNAMELEN
// minus the terminating NUL); a longer name would be refused by the kernel.
const maxChainLen = 28

// Chain is a syntactically valid iptables chain name. Whether the policy
// lets the client touch it is decided by Authorize, not by the type.
type Chain string

// parseChain accepts [A-Za-z0-9._-]+ of at most maxChainLen characters.
// A name that starts with "-" would read as an option to iptables.
func parseChain(word string) (Chain, error) {
	if word == "" || len(word) > maxChainLen {
		return "", wordErr("chain %q must be 1 to %d characters long; for a jail's chain, set a shorter name= in the jail's action, or a shorter chain_prefix on both sides", word, maxChainLen)
	}
	if word[0] == '-' {
		return "", wordErr("chain %q must not start with \"-\"", word)
	}
	for _, r := range word {
		if !isChainRune(r) {
			return "", wordErr("chain %q may only hold letters, digits, \".\", \"_\" and \"-\"", word)
		}
	}
	return Chain(word), nil
}

func isChainRune(r rune) bool {
	return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-'
}

// Match says how a hook rule selects ports.
type Match int

// The three hook shapes of fail2ban's iptables actions.
const (
	AllPorts  Match = iota // -p PROTO -j C
	OnePort                // -p PROTO --dport PORT -j C
	MultiPort              // -p PROTO -m multiport --dports PORTS -j C
)

// String names the match as fail2ban's action types do.
func (m Match) String() string {
	switch m {
	case OnePort:
		return "oneport"
	case MultiPort:
		return "multiport"
	default:
		return "allports"
	}
}

// Port is one entry of a port list: a number, a range Lo:Hi, or a service
// name that iptables resolves through /etc/services.
type Port struct {
	Lo, Hi uint16
	Name   string
}

// String renders the port the way iptables reads it.
func (p Port) String() string {
	switch {
	case p.Name != "":
		return p.Name
	case p.Lo == p.Hi:
		return strconv.Itoa(int(p.Lo))
	default:
		return strconv.Itoa(int(p.Lo)) + ":" + strconv.Itoa(int(p.Hi))
	}
}

// weight is how many of multiport's 15 slots the entry takes: a range takes two.
func (p Port) weight() int {
	if p.Name == "" && p.Lo != p.Hi {
		return 2
	}
	return 1
}

// maxMultiport is the xt_multiport limit (XT_MULTI_PORTS); iptables refuses more.
const maxMultiport = 15

// maxServiceName bounds a service name; the longest in Debian's
// /etc/services is well under this.
const maxServiceName = 32

func parsePort(word string) (Port, error) {
	if lo, hi, ok := strings.Cut(word, ":"); ok {
		a, errA := parsePortNumber(lo)
		b, errB := parsePortNumber(hi)
		if errA != nil || errB != nil || a > b {
			return Port{}, wordErr("port range %q must be two port numbers, low:high", word)
		}
		return Port{Lo: a, Hi: b}, nil
	}
	if word != "" && word[0] >= '0' && word[0] <= '9' {
		n, err := parsePortNumber(word)
		if err != nil {
			return Port{}, err
		}
		return Port{Lo: n, Hi: n}, nil
	}
	if !isServiceName(word) {
		return Port{}, wordErr("port %q is neither a number from 1 to 65535 nor a service name", word)
	}
	return Port{Name: word}, nil
}

func parsePortNumber(s string) (uint16, error) {
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 || s[0] == '0' {
		return 0, wordErr("port %q must be a number from 1 to 65535 without leading zeros", s)
	}
	return uint16(n), nil
}

// isServiceName accepts the shape of /etc/services names: a letter, then
// letters, digits, "-" or "_".
func isServiceName(s string) bool {
	if s == "" || len(s) > maxServiceName {
		return false
	}
	for i, r := range s {
		letter := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z'
		if i == 0 && !letter {
			return false
		}
		if !letter && !(r >= '0' && r <= '9') && r != '-' && r != '_' {
			return false
		}
	}
	return true
}

func parsePortList(word string) ([]Port, error) {
	var ports []Port
	slots := 0
	for _, part := range strings.Split(word, ",") {
		p, err := parsePort(part)
		if err != nil {
			return nil, err
		}
		slots += p.weight()
		ports = append(ports, p)
	}
	if slots > maxMultiport {
		return nil, wordErr("port list %q has more than %d ports (a range counts twice)", word, maxMultiport)
	}
	return ports, nil
}

func joinPorts(ports []Port) string {
	s := make([]string, len(ports))
	for i, p := range ports {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

// TargetKind is what a ban rule does with a packet.
type TargetKind int

// The only verdicts a ban may have. ACCEPT, LOG and jumps to chains are
// never representable, so they can never be authorized.
const (
	Drop TargetKind = iota + 1
	Reject
)

// Target is a ban's verdict. RejectWith is always set for Reject, to the
// family's default when the client sent a bare "-j REJECT".
type Target struct {
	Kind       TargetKind
	RejectWith string
}

// Args is the target as iptables arguments.
func (t Target) Args() []string {
	if t.Kind == Drop {
		return []string{"-j", "DROP"}
	}
	return []string{"-j", "REJECT", "--reject-with", t.RejectWith}
}

// String is the target as written on the wire, for messages and the audit log.
func (t Target) String() string { return strings.Join(t.Args()[1:], " ") }

// defaultReject is what iptables itself uses for a bare "-j REJECT".
func defaultReject(f Family) string {
	if f == IPv6 {
		return "icmp6-port-unreachable"
	}
	return "icmp-port-unreachable"
}

// rejectTypes lists the --reject-with types that iptables-extensions(8)
// documents for each family, by their full names only: the short aliases
// would make one word mean different things in the two families. tcp-reset
// is left out on purpose: a ban rule carries no "-p tcp", and iptables
// refuses tcp-reset without it.
var rejectTypes = map[string]Family{
	"icmp-net-unreachable":   IPv4,
	"icmp-host-unreachable":  IPv4,
	"icmp-port-unreachable":  IPv4,
	"icmp-proto-unreachable": IPv4,
	"icmp-net-prohibited":    IPv4,
	"icmp-host-prohibited":   IPv4,
	"icmp-admin-prohibited":  IPv4,
	"icmp6-no-route":         IPv6,
	"icmp6-adm-prohibited":   IPv6,
	"icmp6-addr-unreachable": IPv6,
	"icmp6-port-unreachable": IPv6,
	"icmp6-policy-fail":      IPv6,
	"icmp6-reject-route":     IPv6,
}

// RejectFamily is the family a documented reject type belongs to, or 0.
func RejectFamily(with string) Family { return rejectTypes[with] }

// maxAddrLen bounds an address word; the longest IPv6 CIDR text is 49 bytes.
const maxAddrLen = 64

// parseSource parses a ban address strictly: an address or CIDR of the
// command's family, with no zone, no leading zeros and no shorthand. An
// IPv4-mapped IPv6 address is judged as the IPv4 address it carries.
func parseSource(word string, fam Family) (netip.Prefix, error) {
	if len(word) > maxAddrLen {
		return netip.Prefix{}, wordErr("address %q is too long", word[:maxAddrLen]+"…")
	}
	var p netip.Prefix
	if strings.Contains(word, "/") {
		var err error
		if p, err = netip.ParsePrefix(word); err != nil {
			return netip.Prefix{}, wordErr("address %q is not an IP address or CIDR", word)
		}
	} else {
		a, err := netip.ParseAddr(word)
		if err != nil {
			return netip.Prefix{}, wordErr("address %q is not an IP address or CIDR", word)
		}
		if a.Zone() != "" {
			return netip.Prefix{}, wordErr("address %q has a zone; zones are not allowed", word)
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	if p.Addr().Is4In6() {
		if p.Bits() < 96 {
			return netip.Prefix{}, wordErr("address %q mixes IPv4-mapped and wider IPv6 space", word)
		}
		p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
	}
	if got := familyOf(p.Addr()); got != fam {
		return netip.Prefix{}, wordErr("address %q is %s but the command is %s; use %s", word, got, fam.Binary(), got.Binary())
	}
	return p.Masked(), nil
}

func familyOf(a netip.Addr) Family {
	if a.Is4() {
		return IPv4
	}
	return IPv6
}
