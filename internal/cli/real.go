package cli

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/audit"
	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/privilege"
	"github.com/f2b-shim/f2b-shim/policy"
)

// version is set at build time with -ldflags "-X github.com/f2b-shim/f2b-shim/internal/cli.version=v1.2.3".
var version string

// Version is the build's version: the -ldflags value, else the module
// version Go recorded, else "devel".
func Version() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "devel"
}

// RealDeps are the side effects of a real run.
func RealDeps() Deps {
	return Deps{
		LoadPolicy: LoadPolicyFile,
		OpenTable: func(fam policy.Family, backend string, wait time.Duration) (firewall.Table, error) {
			return firewall.Open(fam, backend, wait)
		},
		Restore:  firewall.Restore,
		OpenSets: func() (firewall.Sets, error) { return firewall.OpenIPSet() },
		RestoreSets: func(script string) error {
			s, err := firewall.OpenIPSet()
			if err != nil {
				return err
			}
			return s.Restore(script)
		},
		Syslog:      func(r audit.Record) error { return audit.SendSyslog("", "", r) },
		LocalAddrs:  localAddrs,
		PrepareExec: privilege.Prepare,
		Now:         time.Now,
	}
}

// maxPolicySize bounds the policy file; a real one is a few hundred bytes.
const maxPolicySize = 1 << 20

// LoadPolicyFile reads a policy file that only root can change. A policy
// that someone else could edit would let them widen what the mail host
// may do, so it is refused, with the command that fixes it.
func LoadPolicyFile(path string) (*policy.Policy, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%q is not a regular file", path)
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && sys.Uid != 0 {
		return nil, fmt.Errorf("%q is owned by uid %d, not root; run: chown root: %s", path, sys.Uid, path)
	}
	if st.Mode().Perm()&0o022 != 0 {
		return nil, fmt.Errorf("%q is writable by group or others (mode %04o); run: chmod go-w %s", path, st.Mode().Perm(), path)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxPolicySize+1))
	if err != nil {
		return nil, err
	}
	if len(data) > maxPolicySize {
		return nil, fmt.Errorf("%q is larger than %d bytes", path, maxPolicySize)
	}
	pol, err := policy.Parse(data)
	if err != nil {
		// The parse error may quote a line; policy files hold no secrets,
		// but never echo more than the parser's own message.
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	return pol, nil
}

// localAddrs lists this host's interface addresses, in the network
// namespace the shim runs in.
func localAddrs() ([]netip.Addr, error) {
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

// FinishWhatWasStarted makes the shim complete its one operation and
// write its audit line even when it is asked to stop halfway: sshd sends
// SIGHUP when the ssh client disconnects, writing to the dead channel
// raises SIGPIPE, and SIGTERM comes from anyone tidying up. Every wait in
// the shim is bounded by lock_timeout, so it always ends by itself soon;
// SIGKILL still stops it at once.
func FinishWhatWasStarted() {
	signal.Ignore(syscall.SIGHUP, syscall.SIGPIPE, syscall.SIGTERM)
}

// safePath is the only PATH the shim's children see.
const safePath = "/usr/sbin:/usr/bin:/sbin:/bin"

// CleanEnvironment replaces the process environment with a minimal one.
// go-iptables runs iptables with the process environment, and sshd may
// pass on variables the client chose (AcceptEnv); none of them may reach
// iptables.
func CleanEnvironment() {
	os.Clearenv()
	os.Setenv("PATH", safePath)
	os.Setenv("LC_ALL", "C")
}
