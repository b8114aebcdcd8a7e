package firewall_test

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/firewall/fwtest"
)

// TestQueuedDeletesGoInOneScript: expire's deletes are one
// iptables-restore; when it fails, each is tried alone, a rule that is
// already gone is no failure, and only a real failure is reported, by
// its ticket.
func TestQueuedDeletesGoInOneScript(t *testing.T) {
	const chain = "mail-remote-f2b-x"
	rule := func(a string) []string { return []string{"-s", a, "-j", "DROP"} }
	for _, tc := range []struct {
		name       string
		restoreErr error
		failDelete error
		wantFailed []int
	}{
		{"one script for the chunk", nil, nil, nil},
		{"a failed script falls back to one by one, and a missing rule is no failure", errors.New("line 3 failed"), nil, nil},
		{"a real failure is reported by its ticket", errors.New("line 3 failed"), errors.New("no room"), []int{0, 1, 2}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fake := fwtest.New()
			require.NoError(t, fake.NewChain(chain))
			require.NoError(t, fake.Insert(chain, 1, rule("192.0.2.1/32")...))
			require.NoError(t, fake.Insert(chain, 1, rule("192.0.2.2/32")...))
			var scripts []string
			b := &firewall.Batched{Table: fake, QueueDeletes: true, Restore: func(s string) error {
				scripts = append(scripts, s)
				return tc.restoreErr
			}}
			if tc.failDelete != nil {
				fake.Fail["Delete"] = tc.failDelete
			}
			for i, a := range []string{"192.0.2.1/32", "192.0.2.2/32", "192.0.2.3/32"} {
				b.Ticket = i
				require.NoError(t, b.Delete(chain, rule(a)...), "queued")
			}
			failed := b.Flush()
			require.Len(t, scripts, 1)
			assert.Equal(t, "*filter\n-D "+chain+" -s 192.0.2.1/32 -j DROP\n-D "+chain+" -s 192.0.2.2/32 -j DROP\n-D "+chain+" -s 192.0.2.3/32 -j DROP\nCOMMIT\n", scripts[0])
			var got []int
			for i := range failed {
				got = append(got, i)
			}
			assert.ElementsMatch(t, tc.wantFailed, got)
			if tc.restoreErr != nil && tc.failDelete == nil {
				rules, err := fake.List(chain)
				require.NoError(t, err)
				assert.Equal(t, []string{"-N " + chain}, rules, "both rules went one by one")
			}
		})
	}
}
