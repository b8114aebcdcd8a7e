package policy

import (
	"net/netip"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestDefaultPolicyIsValid(t *testing.T) {
	pol := Default()
	require.NoError(t, pol.Validate())
	assert.Equal(t, "mail-remote-f2b-", pol.ChainPrefix)
	assert.Equal(t, []string{"INPUT"}, pol.ParentChains)
	assert.Contains(t, pol.RejectWith, "icmp-port-unreachable")
	assert.Contains(t, pol.RejectWith, "icmp6-port-unreachable")
}

func TestParsePolicy(t *testing.T) {
	t.Run("an empty file gives the defaults", func(t *testing.T) {
		pol, err := Parse(nil)
		require.NoError(t, err)
		assert.Equal(t, Default(), pol)
	})
	t.Run("every key is read", func(t *testing.T) {
		pol, err := Parse([]byte(`
name = "mx1"
chain_prefix = "mail-f2b-remote-"
parent_chains = ["INPUT", "DOCKER-USER"]
protocols = ["tcp"]
targets = ["DROP"]
reject_with = ["icmp-host-prohibited"]
min_prefix_v4 = 32
min_prefix_v6 = 128
never_ban = ["198.51.100.0/24", "2001:db8:1::1"]
max_bans_per_chain = 100
audit_log = "/tmp/audit.jsonl"
state_dir = "/tmp/state"
lock_timeout = "3s"
iptables_backend = "legacy"
`))
		require.NoError(t, err)
		assert.Equal(t, "mx1", pol.Name)
		assert.Equal(t, "mail-f2b-remote-", pol.ChainPrefix)
		assert.Equal(t, []string{"INPUT", "DOCKER-USER"}, pol.ParentChains)
		assert.Equal(t, []string{"tcp"}, pol.Protocols)
		assert.Equal(t, []string{"DROP"}, pol.Targets)
		assert.Equal(t, []string{"icmp-host-prohibited"}, pol.RejectWith)
		assert.Equal(t, 32, pol.MinPrefixV4)
		assert.Equal(t, 128, pol.MinPrefixV6)
		assert.Equal(t, []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24"), netip.MustParsePrefix("2001:db8:1::1/128")}, pol.NeverBan)
		assert.Equal(t, 100, pol.MaxBansPerChain)
		assert.Equal(t, "/tmp/audit.jsonl", pol.AuditLog)
		assert.Equal(t, "/tmp/state", pol.StateDir)
		assert.Equal(t, 3*time.Second, pol.LockTimeout)
		assert.Equal(t, "legacy", pol.IptablesBackend)
	})
	bad := []struct {
		name, toml, want string
	}{
		{"an unknown key is an error", `chain_prefixx = "x-"`, "unknown key"},
		{"broken TOML is an error", `name = `, "not valid TOML"},
		{"a wrong type is an error", `min_prefix_v4 = "24"`, "not valid TOML"},
		{"a bad duration is an error", `lock_timeout = "soon"`, "lock_timeout"},
		{"a lock timeout past fail2ban's is an error", `lock_timeout = "90s"`, "lock_timeout"},
		{"a bad never_ban entry is an error", `never_ban = ["example.com"]`, "never_ban"},
		{"a parent inside the prefix is an error", `parent_chains = ["mail-remote-f2b-x"]`, "must not start with"},
		{"no parent chain is an error", `parent_chains = []`, "at least one"},
		{"ACCEPT as a target is an error", `targets = ["ACCEPT"]`, "targets"},
		{"an unknown reject type is an error", `reject_with = ["tcp-reset"]`, "reject_with"},
		{"a /0 minimum is an error", `min_prefix_v4 = 0`, "min_prefix_v4"},
		{"a relative audit log is an error", `audit_log = "audit.jsonl"`, "audit_log"},
		{"an unknown backend is an error", `iptables_backend = "nftables"`, "iptables_backend"},
		{"a prefix as long as a chain is an error", `chain_prefix = "mail-remote-f2b-abcdefghijkl"`, "chain_prefix"},
		{"a name with spaces is an error", `name = "a b"`, "name"},
		{"an unknown firewall backend is an error", `backend = "pf"`, "backend"},
		{"the nftables backend hooks into INPUT only", "backend = \"nftables\"\nparent_chains = [\"INPUT\", \"FORWARD\"]", "parent_chains"},
		{"a table name nft would need quoted is an error", `nftables_table = "f2b-shim"`, "nftables_table"},
		{"a table name longer than 64 is an error", `nftables_table = "` + strings.Repeat("t", 65) + `"`, "nftables_table"},
		{"Debian's own table is not the shim's", `nftables_table = "filter"`, "nftables_table"},
		{"firewalld's table is not the shim's, in any case", `nftables_table = "FirewallD"`, "nftables_table"},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.toml))
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
}

func TestExamplePolicyParses(t *testing.T) {
	data, err := os.ReadFile("../examples/policy.toml")
	require.NoError(t, err)
	pol, err := Parse(data)
	require.NoError(t, err)
	assert.Equal(t, Default(), pol, "the keys it sets hold the defaults; other values are commented out")
	// Each commented-out example parses when uncommented.
	examples := 0
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "# "); ok && regexp.MustCompile(`^[a-z0-9_]+ = `).MatchString(rest) {
			examples++
			_, err := Parse([]byte(rest))
			assert.NoError(t, err, rest)
		}
	}
	assert.GreaterOrEqual(t, examples, 4)
}
