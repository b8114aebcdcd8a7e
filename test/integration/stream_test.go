package integration

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// banLines are n ban requests for distinct addresses (firewall rules
// only: no packet is ever sent to them).
func banLines(fam string, n int) []string {
	lines := make([]string, n)
	for i := range n {
		if fam == "ip6tables" {
			lines[i] = fmt.Sprintf("ip6tables -w -I %s 1 -s 2001:db8:%x:%x::1 -j DROP", chain, i>>16, i&0xffff)
		} else {
			lines[i] = fmt.Sprintf("iptables -w -I %s 1 -s 10.%d.%d.%d -j DROP", chain, i>>16&255, i>>8&255, i&255)
		}
	}
	return lines
}

// TestStreamTenThousandBans sends 10,000 bans in one stream session: all
// land, each has its reply and its audit line, and the time is logged
// (scripts/bench measures it; no test asserts a time).
func TestStreamTenThousandBans(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			ns, pol, audit := setup(t, backend, "max_new_bans_per_minute = 20000\n")
			runAll(t, ns, pol, jailStart...)
			lines := banLines("iptables", 10000)
			start := time.Now()
			r := ns.Stream(t, shim, pol, strings.Join(lines, "\n")+"\n")
			took := time.Since(start)
			require.Equal(t, 0, r.Code, r.Stderr)
			replies := strings.Split(strings.TrimSuffix(r.Stdout, "\n"), "\n")
			require.Len(t, replies, len(lines))
			for i, rep := range replies {
				require.Equal(t, fmt.Sprintf("%d 0 applied", i+1), rep)
			}
			t.Logf("%s: 10,000 bans through one stream in %s (%.0f bans/s)", backend, took.Round(time.Millisecond), 10000/took.Seconds())
			assert.Len(t, banned(t, ns, backend, "iptables", chain), 10000+2)
			allowed, sessions := 0, map[any]bool{}
			for _, rec := range auditLines(t, audit) {
				if rec["session"] != nil && rec["decision"] == "allow" && rec["result"] == "applied" {
					allowed++
					sessions[rec["session"]] = true
				}
			}
			assert.Equal(t, 10000, allowed, "one allow line per ban")
			assert.Len(t, sessions, 1)
		})
	}
}
