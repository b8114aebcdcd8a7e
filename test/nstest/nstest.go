// Package nstest runs the real f2b-shim binary against real iptables in
// network namespaces that each test creates and deletes, so that no test
// ever touches the host's own firewall.
package nstest

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/test/netns"
)

// RequireEnv is the variable that turns a skip into a failure. .ci/run
// sets it, so that CI never counts a skipped system test as passed.
const RequireEnv = "F2B_SHIM_REQUIRE_SYSTEM_TESTS"

// RequireRoot skips the test unless it runs as root with the tools it
// needs, and fails it instead when RequireEnv is set.
func RequireRoot(t testing.TB, tools ...string) {
	t.Helper()
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "root")
	}
	for _, tool := range append([]string{"ip"}, tools...) {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	if len(missing) == 0 {
		return
	}
	msg := fmt.Sprintf("system test needs %s (run .ci/run, or go test as root)", strings.Join(missing, ", "))
	if os.Getenv(RequireEnv) != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// BuildShim builds the f2b-shim binary, and f2b-shim-metrics beside it,
// into dir and returns the shim's path.
func BuildShim(dir string) (string, error) {
	_, self, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(self), "..", "..")
	// The version as scripts/install sets it (scripts/version).
	ldflags := ""
	if v, err := GitVersion(); err == nil {
		ldflags = "-X github.com/f2b-shim/f2b-shim/internal/cli.version=" + v
	}
	for _, name := range []string{"f2b-shim", "f2b-shim-metrics"} {
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags", ldflags, "-o", filepath.Join(dir, name), "./cmd/"+name)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			return "", fmt.Errorf("go build: %v\n%s", err, b)
		}
	}
	return filepath.Join(dir, "f2b-shim"), nil
}

// GitVersion is the checkout's version as scripts/version prints it (git
// describe, in the form a Debian version takes), which scripts/install
// and scripts/package build into the binaries.
func GitVersion() (string, error) {
	_, self, _, _ := runtime.Caller(0)
	out, err := exec.Command(filepath.Join(filepath.Dir(self), "..", "..", "scripts", "version")).Output()
	return strings.TrimSpace(string(out)), err
}

// Netns is a network namespace that lives as long as the test.
type Netns struct {
	*netns.NS
}

// NewNetns creates a namespace with loopback up and deletes it when the
// test ends, pass or fail.
func NewNetns(t testing.TB) *Netns {
	t.Helper()
	ns, err := netns.Add(netns.UniqueName(""))
	require.NoError(t, err)
	t.Cleanup(func() {
		if err := ns.Delete(); err != nil {
			t.Error(err)
		}
	})
	return &Netns{NS: ns}
}

// MustRun runs a command in the namespace and returns its stdout.
func (ns *Netns) MustRun(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := ns.Run(name, args...)
	require.NoError(t, err)
	return out
}

// Result is how a run of the shim ended.
type Result struct {
	Code           int
	Stdout, Stderr string
}

// Shim runs the shim binary in the namespace as sshd would: with
// SSH_ORIGINAL_COMMAND and SSH_CONNECTION set.
func (ns *Netns) Shim(t testing.TB, bin, policyPath, line string) Result {
	t.Helper()
	return ns.ShimFrom(t, bin, policyPath, line, "192.0.2.10")
}

// ShimFrom is Shim for a request from another ssh client address. The
// shim coalesces a client's denials within one second in the audit log,
// so a test that checks one audit line per denial sends them from
// different clients.
func (ns *Netns) ShimFrom(t testing.TB, bin, policyPath, line, client string) Result {
	t.Helper()
	cmd := ns.Command(bin, "--policy", policyPath)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "SSH_ORIGINAL_COMMAND=" + line, "SSH_CONNECTION=" + client + " 50022 192.0.2.7 22"}
	return RunCmd(t, cmd)
}

// Stream runs a stream session of the shim in the namespace, as sshd
// would for "ssh proxy f2b-shim stream", with input on its stdin.
func (ns *Netns) Stream(t testing.TB, bin, policyPath, input string) Result {
	t.Helper()
	cmd := ns.Command(bin, "--policy", policyPath)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "SSH_ORIGINAL_COMMAND=f2b-shim stream", "SSH_CONNECTION=192.0.2.10 50022 192.0.2.7 22"}
	cmd.Stdin = strings.NewReader(input)
	return RunCmd(t, cmd)
}

// RunCmd runs cmd and returns how it ended; only a failure to start it
// fails the test.
func RunCmd(t testing.TB, cmd *exec.Cmd) Result {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else {
		require.NoError(t, err)
	}
	return Result{Code: code, Stdout: stdout.String(), Stderr: stderr.String()}
}

// Save is every table of both families, as the given backend's
// iptables-save prints them, minus the comment lines with timestamps.
func (ns *Netns) Save(t testing.TB, backend string) string {
	t.Helper()
	backend, _, _ = strings.Cut(backend, "+")
	var all []string
	for _, bin := range []string{"iptables", "ip6tables"} {
		name := bin + "-save"
		if backend == "nft" || backend == "legacy" {
			name = bin + "-" + backend + "-save"
		}
		for _, line := range strings.Split(ns.MustRun(t, name), "\n") {
			if !strings.HasPrefix(line, "#") {
				all = append(all, line)
			}
		}
	}
	return strings.Join(all, "\n")
}

// Rules is "iptables -S" (or ip6tables) of the filter table for a backend.
func (ns *Netns) Rules(t testing.TB, fam, backend string) string {
	t.Helper()
	backend, _, _ = strings.Cut(backend, "+")
	return ns.MustRun(t, fam+"-"+backend, "-S")
}

// WritePolicy writes a root-owned 0644 policy file with the given TOML
// and returns its path.
func WritePolicy(t testing.TB, dir, toml string) string {
	t.Helper()
	p := filepath.Join(dir, "policy.toml")
	require.NoError(t, os.WriteFile(p, []byte(toml), 0o644))
	return p
}

// WaitFor polls ok every 10 ms until it holds, or fails after timeout.
func WaitFor(timeout time.Duration, ok func() bool) error {
	deadline := time.Now().Add(timeout)
	for !ok() {
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %s", timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil
}
