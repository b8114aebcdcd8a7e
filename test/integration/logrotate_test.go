package integration

import (
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/test/nstest"
)

// TestLogrotateAndAuditReview rotates the audit log with the shipped
// examples/logrotate/f2b-shim, twice, and reviews every rotation.
func TestLogrotateAndAuditReview(t *testing.T) {
	nstest.RequireRoot(t, "logrotate")
	ns, pol, audit := setup(t, "nft", "")
	rotate := shippedLogrotate(t, audit)
	runAll(t, ns, pol, "iptables -w -N "+chain, "iptables -w -I "+chain+" 1 -s 203.0.113.1 -j DROP")
	rotate()
	runAll(t, ns, pol, "iptables -w -I "+chain+" 1 -s 203.0.113.2 -j DROP")
	rotate()
	runAll(t, ns, pol, "iptables -w -I "+chain+" 1 -s 203.0.113.3 -j DROP")
	for _, f := range []string{audit, audit + ".1", audit + ".2.gz"} {
		_, err := os.Stat(f)
		require.NoError(t, err, "logrotate made %s", f)
	}
	r := admin(t, ns, pol, "audit", "--json")
	require.Equal(t, 0, r.Code, r.Stderr)
	assert.Equal(t, 4, strings.Count(r.Stdout, "\n"), "the current log and both rotations")
	r = admin(t, ns, pol, "audit", "--ip", "203.0.113.1")
	assert.Contains(t, r.Stdout, "203.0.113.1/32", "found in the gzipped rotation")
	r = admin(t, ns, pol, "audit", "--summary")
	assert.Regexp(t, `it-nft@192\.0\.2\.10\s+allow\s+4`, r.Stdout)
}
