// Package hostnet reads what the proxy's own network looks like, for the
// policy's judgement: its addresses, the nameservers and default gateways
// it depends on, its local (ephemeral) port range, and service names.
// A ban must never cut the proxy off from any of them.
package hostnet

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"

	"github.com/f2b-shim/f2b-shim/policy"
)

// Files read here; variables so that tests can point them elsewhere.
var (
	ResolvConf = []string{"/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"}
	RouteV4    = "/proc/net/route"
	RouteV6    = "/proc/net/ipv6_route"
	PortRange  = "/proc/sys/net/ipv4/ip_local_port_range"
)

// maxFile bounds what is read of each file; real ones are a few KiB.
const maxFile = 1 << 20

// LocalAddrs lists this host's interface addresses, in the network
// namespace the shim runs in.
func LocalAddrs() ([]netip.Addr, error) {
	ifaddrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	var out []netip.Addr
	for _, ia := range ifaddrs {
		if p, err := netip.ParsePrefix(ia.String()); err == nil {
			out = append(out, p.Addr().Unmap())
		}
	}
	return out, nil
}

// Infrastructure lists the proxy's nameservers (resolv.conf, and
// systemd-resolved's upstreams when that file exists) and default
// gateways. Files that do not exist add nothing; a file that cannot be
// read is an error, so that the shim refuses rather than guesses.
func Infrastructure() ([]netip.Addr, error) {
	var out []netip.Addr
	for _, path := range ResolvConf {
		data, err := readFile(path)
		if os.IsNotExist(err) {
			continue
		}
		if err != nil {
			return nil, err
		}
		out = append(out, Nameservers(data)...)
	}
	for _, r := range []struct {
		path  string
		parse func([]byte) []netip.Addr
	}{{RouteV4, GatewaysV4}, {RouteV6, GatewaysV6}} {
		data, err := readFile(r.path)
		if os.IsNotExist(err) {
			continue
		}
		if err != nil {
			return nil, err
		}
		out = append(out, r.parse(data)...)
	}
	return out, nil
}

func readFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxFile+1))
	if err == nil && len(data) > maxFile {
		err = fmt.Errorf("%s is larger than %d bytes", path, maxFile)
	}
	return data, err
}

// Nameservers parses resolv.conf's "nameserver ADDR" lines.
func Nameservers(data []byte) []netip.Addr {
	var out []netip.Addr
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) >= 2 && f[0] == "nameserver" {
			if a, err := netip.ParseAddr(f[1]); err == nil {
				out = append(out, a.Unmap().WithZone(""))
			}
		}
	}
	return out
}

// GatewaysV4 parses /proc/net/route: the gateways of default routes
// (destination 00000000), in little-endian hex.
func GatewaysV4(data []byte) []netip.Addr {
	var out []netip.Addr
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 3 || f[1] != "00000000" {
			continue
		}
		b, err := hex.DecodeString(f[2])
		if err != nil || len(b) != 4 {
			continue
		}
		if a := netip.AddrFrom4([4]byte{b[3], b[2], b[1], b[0]}); !a.IsUnspecified() {
			out = append(out, a)
		}
	}
	return out
}

// GatewaysV6 parses /proc/net/ipv6_route: the next hops of default
// routes (destination ::/0).
func GatewaysV6(data []byte) []netip.Addr {
	var out []netip.Addr
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 5 || f[0] != strings.Repeat("0", 32) || f[1] != "00" {
			continue
		}
		b, err := hex.DecodeString(f[4])
		if err != nil || len(b) != 16 {
			continue
		}
		if a := netip.AddrFrom16([16]byte(b)); !a.IsUnspecified() {
			out = append(out, a)
		}
	}
	return out
}

// LocalPorts reads ip_local_port_range.
func LocalPorts() (policy.PortRange, error) {
	data, err := readFile(PortRange)
	if err != nil {
		return policy.PortRange{}, err
	}
	return ParsePortRange(data)
}

// ParsePortRange parses "32768\t60999\n".
func ParsePortRange(data []byte) (policy.PortRange, error) {
	f := strings.Fields(string(data))
	if len(f) != 2 {
		return policy.PortRange{}, fmt.Errorf("%s: %q is not two port numbers", PortRange, data)
	}
	lo, errLo := strconv.ParseUint(f[0], 10, 16)
	hi, errHi := strconv.ParseUint(f[1], 10, 16)
	if errLo != nil || errHi != nil || lo > hi || lo == 0 {
		return policy.PortRange{}, fmt.Errorf("%s: %q is not a port range", PortRange, data)
	}
	return policy.PortRange{Lo: uint16(lo), Hi: uint16(hi)}, nil
}

// LookupPort resolves a service name through /etc/services, as iptables
// does (Go's resolver reads the same file in a CGO_ENABLED=0 build).
func LookupPort(proto, name string) (uint16, bool) {
	n, err := net.LookupPort(proto, name)
	if err != nil || n < 1 || n > 65535 {
		return 0, false
	}
	return uint16(n), true
}

// Context gathers everything the policy needs to know about this proxy
// for one request from client.
func Context(client netip.Addr) (policy.Context, error) {
	ctx := policy.Context{Client: client, LookupPort: LookupPort}
	var err error
	if ctx.LocalAddrs, err = LocalAddrs(); err != nil {
		return ctx, fmt.Errorf("cannot list this proxy's addresses: %v", err)
	}
	if ctx.Infrastructure, err = Infrastructure(); err != nil {
		return ctx, fmt.Errorf("cannot read this proxy's nameservers and gateways: %v", err)
	}
	if ctx.LocalPorts, err = LocalPorts(); err != nil {
		return ctx, fmt.Errorf("cannot read this proxy's local port range: %v", err)
	}
	return ctx, nil
}
