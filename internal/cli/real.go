package cli

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"os/user"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/audit"
	"github.com/f2b-shim/f2b-shim/internal/engine"
	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/hostnet"
	"github.com/f2b-shim/f2b-shim/internal/nftables"
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
		Ports: engine.Ports{
			OpenTable: func(fam policy.Family, backend string, wait time.Duration) (firewall.Table, error) {
				return firewall.Open(fam, backend, wait)
			},
			Restore:  firewall.Restore,
			OpenSets: func() (firewall.Sets, error) { return &firewall.NetlinkSets{}, nil },
			RestoreSets: func(script string) error {
				s, err := firewall.OpenIPSet()
				if err != nil {
					return err
				}
				return s.Restore(script)
			},
			OpenNFT: openNFT,
			Now:     time.Now,
		},
		LoadPolicy:        LoadPolicyFile,
		Syslog:            func(r audit.Record) error { return audit.SendSyslog("", "", r) },
		Context:           hostnet.Context,
		PrepareExec:       privilege.Prepare,
		DefaultPolicyFile: DefaultPolicyDir + "/policy.toml",
		Stdin:             os.Stdin,
	}
}

// nftTable is the process's one nftables connection (google/nftables
// v0.3.0 allows one per process, see package nftables). An admin command
// that goes through several policies opens their tables in turn.
var nftTable struct {
	sync.Mutex
	t *nftables.Table
}

func openNFT(name string) (firewall.NFT, error) {
	nftTable.Lock()
	defer nftTable.Unlock()
	if t := nftTable.t; t != nil {
		if t.Name() == name {
			return t, nil
		}
		_ = t.Close()
		nftTable.t = nil
	}
	// Single addresses go into a hash set beside the interval set: a ban
	// then costs the same at 50,000 bans as at none (docs/nftables.md).
	t, err := nftables.Open(name, nftables.WithAddressSets())
	if err != nil {
		return nil, err
	}
	nftTable.t = t
	return t, nil
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
		// Keep the group: in the least-privilege install it is f2b-shim's,
		// which must go on reading the file.
		group := strconv.Itoa(int(sys.Gid))
		if g, err := user.LookupGroupId(group); err == nil {
			group = g.Name
		}
		return nil, fmt.Errorf("%q is owned by uid %d, not root; run: chown root:%s %s", path, sys.Uid, group, path)
	}
	if st.Mode().Perm()&0o022 != 0 {
		return nil, fmt.Errorf("%q is writable by group or others (mode %04o); run: chmod go-w %s", path, st.Mode().Perm(), path)
	}
	data, err := readLimited(f, path)
	if err != nil {
		return nil, err
	}
	pol, err := policy.Parse(data)
	if err != nil {
		// The parse error may quote a line; policy files hold no secrets,
		// but never echo more than the parser's own message.
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	if err := checkSiblings(path, pol); err != nil {
		return nil, err
	}
	if pol.File, err = filepath.Abs(path); err != nil {
		return nil, err
	}
	return pol, nil
}

// DefaultPolicyDir is where the install puts policy files.
const DefaultPolicyDir = "/etc/f2b-shim"

// checkSiblings refuses a policy that a neighbour in the same directory
// could interfere with: a proxy that serves two mail hosts has one key
// and one policy file each, and their prefixes must not nest (or one
// mail host could flush the other's chains), nor may they share a state
// file. Neighbours that do not load are left to their own requests,
// which fail on them.
func checkSiblings(path string, pol *policy.Policy) error {
	others, err := filepath.Glob(filepath.Join(filepath.Dir(path), "*.toml"))
	if err != nil {
		return err
	}
	for _, other := range others {
		if filepath.Base(other) == filepath.Base(path) {
			continue
		}
		data, err := readSmall(other)
		if err != nil {
			continue
		}
		o, err := policy.Parse(data)
		if err != nil {
			continue
		}
		if policy.Nests(pol.ChainPrefix, o.ChainPrefix) {
			return fmt.Errorf("%s: chain_prefix %q and %q of %s nest, so one mail host could change the other's chains; give each policy a prefix that does not start with the other's", path, pol.ChainPrefix, o.ChainPrefix, other)
		}
		if pol.Backend == "nftables" && o.Backend == "nftables" && pol.NftablesTable == o.NftablesTable {
			return fmt.Errorf("%s: %s uses the same nftables_table %q, so each would see the other's chains as drift, and a prune of the last chain of one would take the table from the other; give each policy a table of its own", path, other, pol.NftablesTable)
		}
		if pol.Name == o.Name && pol.StateDir == o.StateDir {
			return fmt.Errorf("%s: %s has the same name %q and state_dir, so both would share one state file; give each policy its own name", path, other, pol.Name)
		}
	}
	return nil
}

func readSmall(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return readLimited(f, path)
}

// readLimited reads a policy file of at most maxPolicySize bytes.
func readLimited(f *os.File, path string) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(f, maxPolicySize+1))
	if err == nil && len(data) > maxPolicySize {
		err = fmt.Errorf("%q is larger than %d bytes", path, maxPolicySize)
	}
	return data, err
}

// LoadPolicyDir loads every policy file (*.toml) in dir, each checked as
// LoadPolicy checks it; the files that fail are reported in err, the
// others returned.
func LoadPolicyDir(dir string, deps Deps) (pols []*policy.Policy, err error) {
	paths, err := filepath.Glob(filepath.Join(dir, "*.toml"))
	if err != nil {
		return nil, err
	}
	if len(paths) == 0 {
		return nil, fmt.Errorf("no policy files (*.toml) in %s", dir)
	}
	var errs []error
	for _, p := range paths {
		pol, err := deps.LoadPolicy(p)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		pols = append(pols, pol)
	}
	return pols, errors.Join(errs...)
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
