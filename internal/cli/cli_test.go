package cli

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/internal/audit"
	"github.com/f2b-shim/f2b-shim/internal/engine"
	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/firewall/fwtest"
	"github.com/f2b-shim/f2b-shim/internal/hostnet"
	"github.com/f2b-shim/f2b-shim/policy"
)

const chain = "mail-remote-f2b-imap"

// harness runs the CLI against one fake table per family and a policy
// whose files live in a temp dir.
type harness struct {
	t         *testing.T
	pol       *policy.Policy
	tables    map[policy.Family]*fwtest.Fake
	sets      *fwtest.FakeSets
	deps      Deps
	syslogged []audit.Record
	// calls moves each forced call a second on, so that denials are not
	// coalesced (audit.Log.Write): these tests count one line per call.
	calls int
}

func newHarness(t *testing.T) *harness {
	dir := t.TempDir()
	v4, v6 := fwtest.New(), fwtest.New()
	h := &harness{t: t, pol: policy.Default(), sets: fwtest.NewSets(v4, v6), tables: map[policy.Family]*fwtest.Fake{policy.IPv4: v4, policy.IPv6: v6}}
	h.pol.AuditLog = filepath.Join(dir, "log", "audit.jsonl")
	h.pol.StateDir = filepath.Join(dir, "state")
	h.deps = Deps{
		Ports: engine.Ports{
			OpenTable: func(fam policy.Family, _ string, _ time.Duration) (firewall.Table, error) {
				return h.tables[fam], nil
			},
			Restore: func(fam policy.Family, _ string, _ time.Duration, script string) error {
				return h.tables[fam].Restore(script)
			},
			OpenSets: func() (firewall.Sets, error) { return h.sets, nil },
			Now:      func() time.Time { return time.Now().Add(time.Duration(h.calls) * time.Second) },
		},
		LoadPolicy: func(string) (*policy.Policy, error) { return h.pol, nil },
		Context: func(client netip.Addr) (policy.Context, error) {
			return policy.Context{Client: client, LocalAddrs: []netip.Addr{netip.MustParseAddr("192.0.2.7")}, LookupPort: hostnet.LookupPort}, nil
		},
		PrepareExec: func() error { return nil },
		Syslog: func(r audit.Record) error {
			h.syslogged = append(h.syslogged, r)
			return nil
		},
	}
	return h
}

// forced runs the shim as sshd would, with SSH_ORIGINAL_COMMAND = line.
func (h *harness) forced(line string) (int, string) {
	var stdout, stderr bytes.Buffer
	h.calls++
	env := Env{OriginalCommand: line, HasCommand: true, SSHConnection: "192.0.2.10 50022 192.0.2.7 22"}
	code := Run([]string{"--policy", "/etc/f2b-shim/policy.toml"}, env, &stdout, &stderr, h.deps)
	assert.Empty(h.t, stdout.String(), "the forced command prints nothing on stdout")
	return code, stderr.String()
}

func (h *harness) records() []audit.Record {
	data, err := os.ReadFile(h.pol.AuditLog)
	require.NoError(h.t, err)
	var out []audit.Record
	for _, line := range strings.Split(strings.TrimSuffix(string(data), "\n"), "\n") {
		var r audit.Record
		require.NoError(h.t, json.Unmarshal([]byte(line), &r), line)
		out = append(out, r)
	}
	return out
}

func TestForcedCommand(t *testing.T) {
	h := newHarness(t)
	steps := []struct {
		name, line string
		code       int
		stderr     string
		result     string
	}{
		{"the chain is created", "iptables -w -N " + chain, ExitOK, "", "applied"},
		{"a repeated start changes nothing", "iptables -w -N " + chain, ExitOK, "", "unchanged"},
		{"a missing return rule checks false", "iptables -w -C " + chain + " -j RETURN", ExitCheckFalse, "", "check-false"},
		{"the return rule is added", "iptables -w -A " + chain + " -j RETURN", ExitOK, "", "applied"},
		{"a ban is applied", "iptables -w -I " + chain + " 1 -s 203.0.113.45 -j REJECT --reject-with icmp-port-unreachable", ExitOK, "", "applied"},
		{"a ban of the ssh client is denied", "iptables -w -I " + chain + " 1 -s 192.0.2.10 -j DROP", ExitDenied, `f2b-shim: denied: address "192.0.2.10/32" overlaps`, "denied"},
		{"a ban of the proxy itself is denied", "iptables -w -I " + chain + " 1 -s 192.0.2.7 -j DROP", ExitDenied, "never banned", "denied"},
		{"a foreign chain is denied", "iptables -w -F INPUT", ExitDenied, `f2b-shim: denied: chain "INPUT" is outside the allowed prefix "mail-remote-f2b-"`, "denied"},
		{"a ban into a missing v6 chain fails in the firewall", "ip6tables -w -I " + chain + " 1 -s 2001:db8::45 -j DROP", ExitFirewall, "f2b-shim: firewall:", "failed"},
	}
	for i, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			code, stderr := h.forced(s.line)
			assert.Equal(t, s.code, code, stderr)
			if s.stderr == "" {
				assert.Empty(t, stderr)
			} else {
				assert.Contains(t, stderr, s.stderr)
				assert.Equal(t, 1, strings.Count(stderr, "\n"), "one line on stderr: %q", stderr)
			}
			recs := h.records()
			require.Len(t, recs, i+1, "one audit line per invocation")
			r := recs[i]
			assert.Equal(t, s.line, string(r.Command))
			assert.Equal(t, s.result, r.Result)
			assert.Equal(t, s.code, r.Exit)
			assert.Equal(t, "192.0.2.10", r.ClientIP)
			assert.Equal(t, 50022, r.ClientPort)
			assert.Equal(t, "default", r.Policy)
			if s.code == ExitDenied {
				assert.Equal(t, audit.Deny, r.Decision)
				assert.NotEmpty(t, r.Reason)
			} else {
				assert.Equal(t, audit.Allow, r.Decision)
				require.NotNil(t, r.Op)
				assert.Equal(t, chain, r.Op.Chain)
			}
		})
	}
	assert.Equal(t, "-P INPUT ACCEPT\n-P FORWARD ACCEPT\n-P OUTPUT ACCEPT\n-N "+chain+"\n-A "+chain+" -s 203.0.113.45/32 -j REJECT --reject-with icmp-port-unreachable\n-A "+chain+" -j RETURN\n",
		h.tables[policy.IPv4].Dump())
}

func TestInteractiveLoginIsDenied(t *testing.T) {
	h := newHarness(t)
	var stdout, stderr bytes.Buffer
	code := Run([]string{"--policy", "p.toml"}, Env{SSHConnection: "192.0.2.10 1 192.0.2.7 22"}, &stdout, &stderr, h.deps)
	assert.Equal(t, ExitDenied, code)
	assert.Contains(t, stderr.String(), "an interactive login is not allowed")
	recs := h.records()
	require.Len(t, recs, 1)
	assert.Equal(t, "interactive login", string(recs[0].Reason))
}

func TestNothingIsAppliedWithoutAnAuditLog(t *testing.T) {
	h := newHarness(t)
	blocker := filepath.Join(t.TempDir(), "not-a-dir")
	require.NoError(t, os.WriteFile(blocker, nil, 0o600))
	h.pol.AuditLog = filepath.Join(blocker, "audit.jsonl")
	code, stderr := h.forced("iptables -w -N " + chain)
	assert.Equal(t, ExitSetup, code)
	assert.Contains(t, stderr, "cannot write the audit log")
	assert.Empty(t, h.tables[policy.IPv4].Calls, "the firewall was not touched")
}

func TestAFirewallErrorIsAudited(t *testing.T) {
	h := newHarness(t)
	h.tables[policy.IPv4].Fail["ChainExists"] = &firewall.CommandError{Status: 4, Stderr: "Another app is currently holding the xtables lock."}
	code, stderr := h.forced("iptables -w -N " + chain)
	assert.Equal(t, ExitFirewall, code)
	assert.Contains(t, stderr, "xtables lock")
	r := h.records()[0]
	assert.Equal(t, 4, r.IptablesStatus)
	assert.Contains(t, string(r.IptablesStderr), "xtables lock")
	assert.Equal(t, "failed", r.Result)
}

func TestABrokenPolicyChangesNothing(t *testing.T) {
	h := newHarness(t)
	h.deps.LoadPolicy = func(string) (*policy.Policy, error) { return nil, errors.New("unknown key") }
	code, stderr := h.forced("iptables -w -N " + chain)
	assert.Equal(t, ExitSetup, code)
	assert.Contains(t, stderr, "f2b-shim: policy: unknown key")
	assert.Empty(t, h.tables[policy.IPv4].Calls)
}

func TestAdminSubcommands(t *testing.T) {
	h := newHarness(t)
	tests := []struct {
		name   string
		args   []string
		code   int
		stdout string
		stderr string
	}{
		{"check shows an allowed ban", []string{"check", "iptables -w -I " + chain + " 1 -s 203.0.113.45 -j DROP"}, ExitOK, "decision:  allowed", ""},
		{"check shows the canonical form", []string{"check", "iptables -I " + chain + " -s 203.0.113.45 -j DROP"}, ExitOK, "canonical: iptables -w -I " + chain + " 1 -s 203.0.113.45/32 -j DROP", ""},
		{"check shows a denial", []string{"check", "iptables -P INPUT ACCEPT"}, ExitDenied, `decision:  denied: option "-P" is not allowed`, ""},
		{"check without a command is a usage error", []string{"check"}, ExitUsage, "", "exactly one COMMAND"},
		{"an unknown flag is a usage error", []string{"--polcy", "x"}, ExitUsage, "", "flag provided but not defined"},
		{"an unknown subcommand is a usage error", []string{"frobnicate"}, ExitUsage, "", `unknown subcommand "frobnicate"`},
		{"version prints the version", []string{"version"}, ExitOK, "f2b-shim ", ""},
		{"help prints usage", []string{"help"}, ExitOK, "Exit status:", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := Run(tt.args, Env{}, &stdout, &stderr, h.deps)
			assert.Equal(t, tt.code, code)
			assert.Contains(t, stdout.String(), tt.stdout)
			assert.Contains(t, stderr.String(), tt.stderr)
		})
	}
	for _, f := range h.tables {
		assert.Empty(t, f.Calls, "admin subcommands never touch the firewall")
	}
}

func TestLoadPolicyFileRefusesUnsafeFiles(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, []byte("name = \"mx\"\n"), 0o600))
		require.NoError(t, os.Chmod(p, mode))
		return p
	}
	if os.Getuid() != 0 {
		t.Skip("the owner checks need root, to create a root-owned file and one owned by another user")
	}
	t.Run("a root-owned 0644 file is read", func(t *testing.T) {
		pol, err := LoadPolicyFile(write("ok.toml", 0o644))
		require.NoError(t, err)
		assert.Equal(t, "mx", pol.Name)
	})
	t.Run("a group-writable file is refused", func(t *testing.T) {
		_, err := LoadPolicyFile(write("g.toml", 0o664))
		require.Error(t, err)
		assert.Contains(t, err.Error(), "chmod go-w")
	})
	t.Run("a world-writable file is refused", func(t *testing.T) {
		_, err := LoadPolicyFile(write("o.toml", 0o602))
		assert.ErrorContains(t, err, "writable by group or others")
	})
	t.Run("a file owned by another user is refused", func(t *testing.T) {
		p := write("nobody.toml", 0o644)
		require.NoError(t, os.Chown(p, 65534, 65534))
		_, err := LoadPolicyFile(p)
		assert.ErrorContains(t, err, "not root; run: chown root:nogroup ", "the hint keeps the file's group, which the shim's user reads it through")
	})
	t.Run("a missing file is an error", func(t *testing.T) {
		_, err := LoadPolicyFile(filepath.Join(dir, "missing.toml"))
		assert.Error(t, err)
	})
}

func TestMissingCapabilitiesChangeNothing(t *testing.T) {
	h := newHarness(t)
	h.deps.PrepareExec = func() error { return errors.New("missing capabilities: run: setcap …") }
	code, stderr := h.forced("iptables -w -N " + chain)
	assert.Equal(t, ExitSetup, code)
	assert.Contains(t, stderr, "f2b-shim: setup: missing capabilities: run: setcap")
	assert.Empty(t, h.tables[policy.IPv4].Calls)
	r := h.records()[0]
	assert.Equal(t, "failed", r.Result)
	assert.Equal(t, audit.Allow, r.Decision, "the policy allowed it; the setup failed")

	denied, _ := h.forced("iptables -F INPUT")
	assert.Equal(t, ExitDenied, denied, "a request the policy refuses is refused as before")
}

func TestSyslogCopiesEveryRecordWhenAsked(t *testing.T) {
	h := newHarness(t)
	h.forced("iptables -w -N " + chain)
	assert.Empty(t, h.syslogged, "off by default")
	h.pol.Syslog = true
	h.forced("iptables -w -N " + chain)
	h.forced("id")
	require.Len(t, h.syslogged, 2)
	assert.Equal(t, h.records()[1:], h.syslogged, "syslog gets the same records as the file")
}

func TestAdminConveniences(t *testing.T) {
	t.Run("without --policy the installed policy is read when it exists", func(t *testing.T) {
		h := newHarness(t)
		installed := filepath.Join(t.TempDir(), "policy.toml")
		var read []string
		h.deps.LoadPolicy = func(p string) (*policy.Policy, error) { read = append(read, p); return h.pol, nil }
		h.deps.DefaultPolicyFile = installed
		var out, errb bytes.Buffer
		Run([]string{"check", "iptables -N " + chain}, Env{}, &out, &errb, h.deps)
		assert.Empty(t, read, "no installed file: the built-in defaults")
		require.NoError(t, os.WriteFile(installed, nil, 0o644))
		Run([]string{"check", "iptables -N " + chain}, Env{}, &out, &errb, h.deps)
		assert.Equal(t, []string{installed}, read)
	})
	t.Run("flags may follow the arguments", func(t *testing.T) {
		h := newHarness(t)
		h.forced("iptables -w -N " + chain)
		var out, errb bytes.Buffer
		code := Run([]string{"list", chain, "--json", "--policy", "/etc/f2b-shim/policy.toml"}, Env{}, &out, &errb, h.deps)
		require.Equal(t, ExitOK, code, errb.String())
		assert.Contains(t, out.String(), `"type": "chain"`)
		code = Run([]string{"check", "iptables -N " + chain, "--client", "203.0.113.9"}, Env{}, &out, &errb, h.deps)
		assert.Equal(t, ExitOK, code, errb.String())
		code = Run([]string{"check", "--client", "203.0.113.9", "iptables -I " + chain + " 1 -s 203.0.113.9 -j DROP"}, Env{}, &out, &errb, h.deps)
		assert.Equal(t, ExitDenied, code, "--client is never banned, as the ssh client is")
	})
	t.Run("run from a shell, the binary prints usage and changes nothing", func(t *testing.T) {
		h := newHarness(t)
		var out, errb bytes.Buffer
		code := Run(nil, Env{}, &out, &errb, h.deps)
		assert.Equal(t, ExitUsage, code)
		assert.Contains(t, errb.String(), "Usage:")
		_, err := os.Stat(h.pol.AuditLog)
		assert.True(t, os.IsNotExist(err), "no audit line")
	})
	t.Run("--version and -V", func(t *testing.T) {
		for _, arg := range []string{"version", "--version", "-V"} {
			var out, errb bytes.Buffer
			assert.Equal(t, ExitOK, Run([]string{arg}, Env{}, &out, &errb, newHarness(t).deps))
			assert.True(t, strings.HasPrefix(out.String(), "f2b-shim "), arg)
		}
	})
}

func TestUnusableStateDirIsASetupError(t *testing.T) {
	h := newHarness(t)
	blocker := filepath.Join(t.TempDir(), "file")
	require.NoError(t, os.WriteFile(blocker, nil, 0o600))
	h.pol.StateDir = filepath.Join(blocker, "state")
	code, stderr := h.forced("iptables -w -N " + chain)
	assert.Equal(t, ExitSetup, code, "not a firewall failure")
	assert.Contains(t, stderr, "state_dir must be a directory")
	assert.Empty(t, h.tables[policy.IPv4].Calls, "nothing was changed")
}

// TestTwoNftablesPoliciesNeedTablesOfTheirOwn: each would see the other's
// chains as drift, and a prune of one's last chain would delete the table
// under the other.
func TestTwoNftablesPoliciesNeedTablesOfTheirOwn(t *testing.T) {
	dir := t.TempDir()
	write := func(name, text string) string {
		path := filepath.Join(dir, name+".toml")
		require.NoError(t, os.WriteFile(path, []byte(text), 0o644))
		return path
	}
	write("mx1", "name = \"mx1\"\nchain_prefix = \"mail-remote-mx1-\"\nbackend = \"nftables\"\n")
	tests := []struct {
		name, text, want string
	}{
		{"the same table is refused", "name = \"mx2\"\nchain_prefix = \"mail-remote-mx2-\"\nbackend = \"nftables\"\n", "same nftables_table"},
		{"a table of its own is fine", "name = \"mx2\"\nchain_prefix = \"mail-remote-mx2-\"\nbackend = \"nftables\"\nnftables_table = \"f2b_mx2\"\n", ""},
		{"another backend does not use the table", "name = \"mx2\"\nchain_prefix = \"mail-remote-mx2-\"\nbackend = \"ipset\"\n", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := write("mx2", tt.text)
			pol, err := policy.Parse([]byte(tt.text))
			require.NoError(t, err)
			err = checkSiblings(path, pol)
			if tt.want == "" {
				assert.NoError(t, err)
				return
			}
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
}

// TestAnAuditedChangeLeavesNoIntent: the intent stays until the change's
// audit line is written (state.Store.KeepIntent), and then goes: the next
// request has nothing to read back, in one-shot and in stream mode.
func TestAnAuditedChangeLeavesNoIntent(t *testing.T) {
	h := newHarness(t)
	for _, line := range []string{"iptables -w -N " + chain, "iptables -w -I " + chain + " 1 -s 203.0.113.9 -j DROP"} {
		code, stderr := h.forced(line)
		require.Equal(t, ExitOK, code, stderr)
	}
	code, _, stderr := h.stream("iptables -w -I " + chain + " 1 -s 203.0.113.10 -j DROP\niptables -w -I " + chain + " 1 -s 203.0.113.11 -j DROP\n")
	require.Equal(t, ExitOK, code, stderr)
	code, stderr = h.forced("iptables -w -I " + chain + " 1 -s 203.0.113.12 -j DROP")
	require.Equal(t, ExitOK, code, stderr)
	for _, r := range h.records() {
		assert.NotContains(t, string(r.State), "cut short", r.Command)
	}
}
