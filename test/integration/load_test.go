package integration

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestConcurrentLoad starts 500 shims at once: bans, duplicate bans and
// unbans of overlapping addresses, in two chains and both families. The
// firewall must end up exactly as if the audit log's operations had run
// one by one in the log's order, with no rule lost or doubled.
func TestConcurrentLoad(t *testing.T) {
	const n = 500
	chains := []string{"mail-remote-f2b-a", "mail-remote-f2b-b"}
	addrs := map[string][]string{"iptables": {}, "ip6tables": {}}
	for i := 1; i <= 6; i++ {
		addrs["iptables"] = append(addrs["iptables"], fmt.Sprintf("198.51.100.%d", i))
		addrs["ip6tables"] = append(addrs["ip6tables"], fmt.Sprintf("2001:db8:100::%d", i))
	}
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			ns, pol, audit := setup(t, backend, `lock_timeout = "50s"`)
			for _, bin := range []string{"iptables", "ip6tables"} {
				for _, c := range chains {
					require.Equal(t, 0, ns.Shim(t, shim, pol, bin+" -w -N "+c).Code)
					require.Equal(t, 0, ns.Shim(t, shim, pol, bin+" -w -A "+c+" -j RETURN").Code)
				}
			}
			require.NoError(t, removeFile(audit))

			rng := rand.New(rand.NewPCG(1, 2)) // fixed seed: the same mix every run
			lines := make([]string, n)
			for i := range lines {
				bin := []string{"iptables", "ip6tables"}[rng.IntN(2)]
				c, a := chains[rng.IntN(2)], addrs[bin][rng.IntN(6)]
				if rng.IntN(10) < 6 { // bans outnumber unbans, so duplicates happen
					lines[i] = fmt.Sprintf("%s -w -I %s 1 -s %s -j DROP", bin, c, a)
				} else {
					lines[i] = fmt.Sprintf("%s -w -D %s -s %s -j DROP", bin, c, a)
				}
			}
			codes := make([]int, n)
			var wg sync.WaitGroup
			for i, line := range lines {
				wg.Add(1)
				go func() {
					defer wg.Done()
					// Each from its own client: a client's repeats that
					// change nothing are coalesced in the log, and this
					// test replays every line.
					r := ns.ShimFrom(t, shim, pol, line, fmt.Sprintf("2001:db8:ffff::%x", i+1))
					codes[i] = r.Code
					if r.Code != 0 {
						t.Errorf("%s: exit %d: %s", line, r.Code, r.Stderr)
					}
				}()
			}
			wg.Wait()

			// Replay the audit log, in its order, on a model.
			recs := auditLines(t, audit)
			require.Len(t, recs, n, "exactly one audit line per invocation")
			model := map[string]bool{} // "family chain source" present
			sent := map[string]int{}
			for _, l := range lines {
				sent[l]++
			}
			for _, r := range recs {
				sent[r["command"].(string)]--
				op := r["op"].(map[string]any)
				key := fmt.Sprintf("%s %s %s", op["family"], op["chain"], op["source"])
				want := "unchanged"
				switch op["kind"] {
				case "ban":
					if !model[key] {
						want = "applied"
					}
					model[key] = true
				case "unban":
					if model[key] {
						want = "applied"
					}
					delete(model, key)
				}
				assert.Equal(t, want, r["result"], "%v: the log's order is the order the firewall saw", r["command"])
			}
			for l, left := range sent {
				assert.Zero(t, left, "%s: sent and logged counts differ", l)
			}
			var expected, actual []string
			for key := range model {
				expected = append(expected, key)
			}
			for _, bin := range []string{"iptables", "ip6tables"} {
				fam := map[string]string{"iptables": "ipv4", "ip6tables": "ipv6"}[bin]
				for _, c := range chains {
					for _, src := range banned(t, ns, backend, bin, c) {
						actual = append(actual, fmt.Sprintf("%s %s %s", fam, c, src))
					}
				}
			}
			slices.Sort(expected)
			slices.Sort(actual)
			assert.Equal(t, expected, actual, "the firewall equals the serial model, with no duplicate")
			t.Logf("%d invocations, %d bans in place at the end", n, len(actual))
		})
	}
}
