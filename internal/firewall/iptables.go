package firewall

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/coreos/go-iptables/iptables"

	"github.com/f2b-shim/f2b-shim/policy"
)

// systemDirs is where iptables is looked for. The caller's PATH is never
// used, so nobody can slip another "iptables" in front of the real one.
var systemDirs = []string{"/usr/sbin", "/sbin", "/usr/bin", "/bin"}

// Binary returns the absolute path of the iptables binary for the family
// and the policy's iptables_backend ("auto", "nft" or "legacy").
func Binary(fam policy.Family, backend string) (string, error) {
	return find(fam, backend, "")
}

// find looks up iptables, or with suffix "-restore" iptables-restore, of
// the family and backend.
func find(fam policy.Family, backend, suffix string) (string, error) {
	name := fam.Binary()
	if backend == "nft" || backend == "legacy" {
		name += "-" + backend
	}
	name += suffix
	for _, dir := range systemDirs {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found in %s; install the iptables package, or set iptables_backend in the policy", name, strings.Join(systemDirs, ", "))
}

// Restore feeds script to iptables-restore --noflush of the family and
// backend: one call for any number of rules, so a reboot's worth of bans
// is back in seconds. Chains the script declares are flushed and
// refilled; nothing else is touched. wait bounds the xtables lock wait.
func Restore(fam policy.Family, backend string, wait time.Duration, script string) error {
	path, err := find(fam, backend, "-restore")
	if err != nil {
		return err
	}
	secs := max(1, int(math.Ceil(wait.Seconds())))
	_, err = runTool(path, script, "--noflush", "--wait", strconv.Itoa(secs))
	return err
}

// runTool runs an iptables or ipset tool with stdin, and returns its
// stdout, or a CommandError with its exit status and stderr.
func runTool(path, stdin string, args ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(path, args...)
	cmd.Stdin = strings.NewReader(stdin)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return "", &CommandError{Status: ee.ExitCode(), Stderr: stderr.String(), err: err}
		}
		return "", err
	}
	return stdout.String(), nil
}

// CommandError is a failed iptables call, with what the audit log needs.
type CommandError struct {
	Status int
	Stderr string
	err    error
}

func (e *CommandError) Error() string {
	msg := strings.TrimSpace(e.Stderr)
	if msg == "" {
		msg = e.err.Error()
	}
	return fmt.Sprintf("iptables exited with status %d: %s", e.Status, msg)
}

func (e *CommandError) Unwrap() error { return e.err }

// IPTables is the real Table, for the filter table of one family.
//
// go-iptables runs "iptables --version" when it is set up, to learn what
// the binary supports; that costs a process per request, as much as the
// ban itself. So the handle is made only when a call needs it, and the
// calls a ban, an unban and fail2ban's start make in the ordinary case
// (insert, append, delete, check a rule) run iptables directly, with the
// same arguments go-iptables gives them on every iptables this shim
// supports (1.6.2 and later: -C, --wait and --wait N all exist).
type IPTables struct {
	path  string
	proto iptables.Protocol
	wait  int
	ipt   *iptables.IPTables
}

// Open returns the real Table for a family and backend. wait bounds each
// iptables call's wait for the xtables lock ("--wait N").
func Open(fam policy.Family, backend string, wait time.Duration) (*IPTables, error) {
	path, err := Binary(fam, backend)
	if err != nil {
		return nil, err
	}
	proto := iptables.ProtocolIPv4
	if fam == policy.IPv6 {
		proto = iptables.ProtocolIPv6
	}
	return &IPTables{path: path, proto: proto, wait: max(1, int(math.Ceil(wait.Seconds())))}, nil
}

// handle is the go-iptables handle, made on first use.
func (t *IPTables) handle() (*iptables.IPTables, error) {
	if t.ipt != nil {
		return t.ipt, nil
	}
	ipt, err := iptables.New(iptables.IPFamily(t.proto), iptables.Path(t.path), iptables.Timeout(t.wait))
	if err != nil {
		return nil, fmt.Errorf("cannot run %s: %v", t.path, err)
	}
	t.ipt = ipt
	return ipt, nil
}

// change runs one rule change the way go-iptables would.
func (t *IPTables) change(args ...string) error {
	_, err := runTool(t.path, "", append([]string{"-t", table, "--wait", strconv.Itoa(t.wait)}, args...)...)
	return err
}

// wrap turns go-iptables' error into a CommandError with iptables' own
// stderr, which go-iptables keeps only inside its message.
func wrap(err error) error {
	var e *iptables.Error
	if !errors.As(err, &e) {
		return err
	}
	msg := e.Error()
	if _, after, ok := strings.Cut(msg, fmt.Sprintf("exit status %d: ", e.ExitStatus())); ok {
		msg = after
	}
	return &CommandError{Status: e.ExitStatus(), Stderr: msg, err: err}
}

const table = policy.Table

// ChainExists implements Table.
func (t *IPTables) ChainExists(chain string) (bool, error) {
	ipt, err := t.handle()
	if err != nil {
		return false, err
	}
	ok, err := ipt.ChainExists(table, chain)
	return ok, wrap(err)
}

// NewChain implements Table.
func (t *IPTables) NewChain(chain string) error { return t.change("-N", chain) }

// FlushChain implements Table. Apply only calls this for a chain it has
// seen.
func (t *IPTables) FlushChain(chain string) error { return t.change("-F", chain) }

// DeleteChain implements Table.
func (t *IPTables) DeleteChain(chain string) error { return t.change("-X", chain) }

// Exists implements Table: "iptables -C", run directly as go-iptables
// runs it (status 1: not there, also for a missing chain), without the
// "iptables --version" its handle costs: the check that a chain is still
// in place runs on every request.
func (t *IPTables) Exists(chain string, spec ...string) (bool, error) {
	err := t.change(append([]string{"-C", chain}, spec...)...)
	var ce *CommandError
	if errors.As(err, &ce) && ce.Status == 1 {
		return false, nil
	}
	return err == nil, err
}

// Insert implements Table.
func (t *IPTables) Insert(chain string, pos int, spec ...string) error {
	return t.change(append([]string{"-I", chain, strconv.Itoa(pos)}, spec...)...)
}

// Append implements Table.
func (t *IPTables) Append(chain string, spec ...string) error {
	return t.change(append([]string{"-A", chain}, spec...)...)
}

// Delete implements Table.
func (t *IPTables) Delete(chain string, spec ...string) error {
	return t.change(append([]string{"-D", chain}, spec...)...)
}

// ListChains implements Table.
func (t *IPTables) ListChains() ([]string, error) {
	ipt, err := t.handle()
	if err != nil {
		return nil, err
	}
	chains, err := ipt.ListChains(table)
	return chains, wrap(err)
}

// List implements Table: "iptables -S CHAIN", run directly as go-iptables
// runs it, without its handle's "iptables --version": the check that a
// chain's hooks are in place lists the parent chain on every request.
func (t *IPTables) List(chain string) ([]string, error) {
	out, err := runTool(t.path, "", "-t", table, "--wait", strconv.Itoa(t.wait), "-S", chain)
	if err != nil {
		return nil, err
	}
	var rules []string
	for _, l := range strings.Split(out, "\n") {
		if l != "" {
			rules = append(rules, l)
		}
	}
	return rules, nil
}
