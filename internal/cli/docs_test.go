package cli

import (
	"os"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/policy"
)

// TestDocsNameEveryPolicyKeyAndExitCode keeps the README, the man page and
// the usage text true to the code: every policy key and every exit code
// must be documented in each.
func TestDocsNameEveryPolicyKeyAndExitCode(t *testing.T) {
	keys := []string{"never_ban", "lock_timeout", "hook_ports", "nat64_prefixes", "max_ban_time", "stream_idle_timeout"} // decoded as text, see policy.Parse
	typ := reflect.TypeOf(policy.Policy{})
	for i := range typ.NumField() {
		if k := typ.Field(i).Tag.Get("toml"); k != "" && k != "-" {
			keys = append(keys, k)
		}
	}
	require.Len(t, keys, 27)
	codes := []int{ExitOK, ExitCheckFalse, ExitUsage, ExitDenied, ExitFirewall, ExitSetup}
	for _, doc := range []string{"../../README.md", "../../docs/f2b-shim.8", "../../examples/policy.toml"} {
		data, err := os.ReadFile(doc)
		require.NoError(t, err)
		text := string(data)
		for _, k := range keys {
			assert.True(t, strings.Contains(strings.ReplaceAll(text, `\-`, "-"), k), "%s does not document the policy key %q", doc, k)
		}
	}
	for _, doc := range []string{"../../README.md", "../../docs/f2b-shim.8"} {
		data, err := os.ReadFile(doc)
		require.NoError(t, err)
		for _, c := range codes {
			var marker string
			if strings.HasSuffix(doc, ".8") {
				marker = ".B " + strconv.Itoa(c) + "\n"
			} else {
				marker = "| " + strconv.Itoa(c) + " |"
			}
			assert.True(t, strings.Contains(string(data), marker), "%s does not document exit code %d", doc, c)
		}
	}
	for _, c := range codes {
		assert.True(t, strings.Contains(usage, "  "+strconv.Itoa(c)+" "), "usage does not document exit code %d", c)
	}
	for _, sub := range subcommands {
		assert.True(t, strings.Contains(usage, "f2b-shim "+sub+" "), "usage does not document %q", sub)
		for _, doc := range []string{"../../README.md", "../../docs/f2b-shim.8"} {
			data, err := os.ReadFile(doc)
			require.NoError(t, err)
			assert.True(t, strings.Contains(strings.ReplaceAll(string(data), `\-`, "-"), "f2b-shim "+sub), "%s does not document the subcommand %q", doc, sub)
		}
	}
}

// subcommands are the admin subcommands, each of which the README, the
// man page and the usage text name.
var subcommands = []string{"check", "restore", "list", "reconcile", "audit", "expire", "ban", "unban", "prune", "metrics", "status", "relay", "outbox"}
