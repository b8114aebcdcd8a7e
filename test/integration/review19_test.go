package integration

import (
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestWidenedBansOfNewPrefixesCountMembers fills a chain's
// max_bans_per_chain with the members of one widened /64, then bans
// addresses of other /64s: each new prefix is a ban and a member, so
// none may pass the bound the first prefix's members reached. The bound
// counted bans alone for a new prefix, so the state held about three
// times max_bans_per_chain.
func TestWidenedBansOfNewPrefixesCountMembers(t *testing.T) {
	for _, backend := range []string{"nft", "legacy"} {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			ns, pol, _ := startedJail(t, backend, "ban_prefix_v6 = 64\nmax_new_bans_per_minute = 100000\nmax_bans_per_chain = 10\n")
			var in strings.Builder
			for i := range 20 {
				fmt.Fprintf(&in, "ip6tables -w -I %s 1 -s 2001:db8:6:4::%x -j DROP\n", chain, i+1)
			}
			for i := range 20 {
				fmt.Fprintf(&in, "ip6tables -w -I %s 1 -s 2001:db8:7:%x::1 -j DROP\n", chain, i+1)
			}
			r := ns.Stream(t, shim, pol, in.String())
			require.Equal(t, 0, r.Code, r.Stderr)
			taken := strings.Count(r.Stdout, " 0 applied") + strings.Count(r.Stdout, " 0 unchanged")
			t.Logf("%s: %d of 40 addresses taken with max_bans_per_chain = 10", backend, taken)
			// The jail's own ban, 2001:db8:45::1, is a ban and a member.
			assert.LessOrEqual(t, taken, 10-2, "bans and members together stay within max_bans_per_chain")
			assert.Contains(t, r.Stdout, "max_bans_per_chain")
		})
	}
}

// TestMetricsCountOnlyQuotaDenials: f2b_shim_quota_denials_total counts
// bans refused by max_new_bans_per_minute, not every line whose reason
// quotes those words: a denied command naming a chain
// "max_new_bans_per_minute" must not pass for a quota denial (the mail
// host could so raise a quota alert at will, or hide a real one among
// false ones).
func TestMetricsCountOnlyQuotaDenials(t *testing.T) {
	ns, pol, _ := setup(t, "nft", "max_new_bans_per_minute = 1\n")
	runAll(t, ns, pol, "iptables -w -N "+chain, "iptables -w -I "+chain+" 1 -s 203.0.113.6 -j DROP")
	r := ns.Shim(t, shim, pol, "iptables -w -I "+chain+" 1 -s 203.0.113.7 -j DROP")
	require.Equal(t, 3, r.Code, "the first ban used the quota: %s", r.Stderr)
	for i := range 3 {
		r = ns.ShimFrom(t, shim, pol, "iptables -w -N max_new_bans_per_minute", fmt.Sprintf("192.0.2.%d", 20+i))
		require.Equal(t, 3, r.Code, r.Stderr)
	}
	r = admin(t, ns, pol, "metrics")
	require.Equal(t, 0, r.Code, r.Stderr)
	assert.Contains(t, r.Stdout, `f2b_shim_quota_denials_total{policy="it-nft"} 1`+"\n", "the one quota denial, not the three denials that quote the key")
}
