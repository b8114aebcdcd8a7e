package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/test/nstest"
)

// TestProgramsPerBan counts the programs one ordinary one-shot ban and
// unban execute, the shim's own execve included, with strace: the shim,
// one iptables-restore that checks the chain is still in place (its
// return rule and hook: "heal on contact"), and with the rule backend one
// iptables (the set backend changes the set over netlink). A count, not a
// time: each process is a few milliseconds on every ban fail2ban sends.
func TestProgramsPerBan(t *testing.T) {
	want := map[string]int{"nft": 3, "legacy": 3, "nft+ipset": 2, "legacy+ipset": 2}
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			nstest.RequireRoot(t, "strace")
			ns, pol, audit := setup(t, backend, "")
			// A started jail with a ban: the chain, the set and its rule
			// are in place, as for every ban after fail2ban's first.
			runAll(t, ns, pol, jailStart...)
			for _, line := range []string{
				"iptables -w -I " + chain + " 1 -s 203.0.113.80 -j DROP",
				"iptables -w -D " + chain + " -s 203.0.113.80 -j DROP",
				"ip6tables -w -I " + chain + " 1 -s 2001:db8:80::1 -j DROP",
			} {
				trace := filepath.Join(t.TempDir(), "trace")
				cmd := ns.Command("strace", "-f", "-qq", "-e", "trace=execve", "-e", "signal=none", "-o", trace, shim, "--policy", pol)
				cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "SSH_ORIGINAL_COMMAND=" + line, "SSH_CONNECTION=192.0.2.10 50022 192.0.2.7 22"}
				r := nstest.RunCmd(t, cmd)
				require.Equal(t, 0, r.Code, r.Stderr)
				assert.Equal(t, "applied", lastAudit(t, audit)["result"], line)
				data, err := os.ReadFile(trace)
				require.NoError(t, err)
				var execs []string
				for _, l := range strings.Split(string(data), "\n") {
					if strings.Contains(l, "execve(") && !strings.Contains(l, "= -1 ") {
						execs = append(execs, l)
					}
				}
				assert.Len(t, execs, want[backend], "%s: %s", line, strings.Join(execs, "\n"))
			}
		})
	}
}
