package integration

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/test/nstest"
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

// TestConcurrentBansOnAFullAuditFilesystem: with 80 KiB free on the audit
// log's filesystem, 300 one-shot bans and two stream sessions of 200
// bans each, all at once. Each request reserved its room before it
// waited for the lock, from the same end of the log, so they shared the
// same blocks, and those that got the lock late acted with no room left:
// 16 of 300 one-shot bans were in the firewall without their audit line.
// Every ban in the firewall must have its line, and the log must end
// with a whole line and verify once space is freed.
func TestConcurrentBansOnAFullAuditFilesystem(t *testing.T) {
	for _, backend := range []string{"nft", "legacy"} {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			logDir, out := filepath.Join(dir, "log"), filepath.Join(dir, "out")
			require.NoError(t, os.MkdirAll(logDir, 0o750))
			require.NoError(t, os.MkdirAll(out, 0o750))
			ns, pol, _ := setup(t, backend, "")
			pol = nstest.WritePolicy(t, filepath.Dir(pol), fmt.Sprintf("name = \"it-%s\"\naudit_log = %q\nstate_dir = %q\niptables_backend = %q\n",
				ipt(backend), filepath.Join(logDir, "audit.jsonl"), filepath.Join(dir, "state"), ipt(backend)))
			for i, fam := range []string{"a", "b"} {
				var in strings.Builder
				for j := range 200 {
					fmt.Fprintf(&in, "iptables -w -I %s 1 -s 10.%d.%d.%d -j DROP\n", chain, 2+i, j/250, j%250+1)
				}
				require.NoError(t, os.WriteFile(filepath.Join(dir, "in-"+fam), []byte(in.String()), 0o644))
			}
			code, stdout, stderr := runPrivate(t, ns, pol, fmt.Sprintf(`D=%s; O=%s; I=%s
mount -t tmpfs -o size=512k none "$D"
SSH_ORIGINAL_COMMAND='iptables -w -N %s' "$SHIM" --policy "$POLICY"
dd if=/dev/zero of="$D/fill" bs=4k 2>/dev/null || true
truncate -s -80K "$D/fill"
set +e
for s in a b; do SSH_ORIGINAL_COMMAND='f2b-shim stream' "$SHIM" --policy "$POLICY" <"$I/in-$s" >"$O/replies-$s" 2>/dev/null & done
i=0; while [ $i -lt 300 ]; do
	i=$((i+1))
	SSH_ORIGINAL_COMMAND="iptables -w -I %s 1 -s 10.1.$((i/250)).$((i%%250+1)) -j DROP" "$SHIM" --policy "$POLICY" 2>/dev/null &
done
wait
cp "$D/audit.jsonl" "$O/full.jsonl"
rm "$D/fill"
"$SHIM" audit --verify --policy "$POLICY"; echo "verify=$?"
`, logDir, out, dir, chain, chain))
			require.Equal(t, 0, code, stderr)
			assert.Contains(t, stdout, "verify=0", "the chain holds after the full disk: %s", stdout)
			audited := map[string]bool{}
			for _, rec := range auditLines(t, filepath.Join(out, "full.jsonl")) {
				if op, ok := rec["op"].(map[string]any); ok && rec["result"] == "applied" {
					audited[fmt.Sprint(op["source"])] = true
				}
			}
			inFirewall := banned(t, ns, backend, "iptables", chain)
			t.Logf("%s: %d bans in the firewall, %d with an applied audit line", backend, len(inFirewall), len(audited))
			require.NotEmpty(t, inFirewall)
			for _, src := range inFirewall {
				assert.True(t, audited[src], "%s is in the firewall without its audit line", src)
			}
			full, err := os.ReadFile(filepath.Join(out, "full.jsonl"))
			require.NoError(t, err)
			assert.True(t, bytes.HasSuffix(full, []byte("\n")), "the log ends with a whole line")
		})
	}
}

// TestExpireOnAFullAuditFilesystem: expire (run by its timer) lifted due
// bans and then warned "not audited" when the audit log's filesystem was
// full (400 due bans: all lifted, none audited), which a mail host
// that fills the log can bring about. A due ban must stay until it can
// be audited, and go once there is room.
func TestExpireOnAFullAuditFilesystem(t *testing.T) {
	for _, backend := range []string{"nft", "legacy+ipset"} {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			logDir := filepath.Join(dir, "log")
			require.NoError(t, os.MkdirAll(logDir, 0o750))
			ns, pol, _ := setup(t, backend, "")
			bans := "rules"
			if usesSets(backend) {
				bans = "ipset"
			}
			pol = nstest.WritePolicy(t, filepath.Dir(pol), fmt.Sprintf("name = \"it-%s\"\naudit_log = %q\nstate_dir = %q\niptables_backend = %q\nbackend = %q\nmax_ban_time = \"1s\"\n",
				ipt(backend), filepath.Join(logDir, "audit.jsonl"), filepath.Join(dir, "state"), ipt(backend), bans))
			// More expiries than the log's room reserved at its last write
			// holds (64 KiB, about 130 lines).
			in := filepath.Join(dir, "in")
			require.NoError(t, os.WriteFile(in, []byte("iptables -w -N "+chain+"\n"+strings.Join(banLines("iptables", 400), "\n")+"\n"), 0o644))
			code, stdout, stderr := runPrivate(t, ns, pol, fmt.Sprintf(`D=%s
mount -t tmpfs -o size=4m none "$D"
SSH_ORIGINAL_COMMAND='f2b-shim stream' "$SHIM" --policy "$POLICY" <%[3]q >/dev/null
sleep 1.5
mv "$D/audit.jsonl" "$D/audit.jsonl.1" # rotated: the new log has no room reserved
dd if=/dev/zero of="$D/fill" bs=4k 2>/dev/null || true
dd if=/dev/zero of="$D/fill2" bs=512 2>/dev/null || true
set +e
"$SHIM" expire --policy "$POLICY"; echo "full=$?"
"$SHIM" list --policy "$POLICY" | grep -c ' ban '; echo
rm "$D/fill" "$D/fill2"
"$SHIM" expire --policy "$POLICY"; echo "room=$?"
"$SHIM" audit --verify --policy "$POLICY"; echo "verify=$?"
grep -c '"result":"expired"' "$D/audit.jsonl" "$D/audit.jsonl.1" || true
`, logDir, chain, in))
			require.Equal(t, 0, code, stderr)
			t.Log(stdout, stderr)
			assert.NotContains(t, stderr, "not audited", "nothing is changed without its audit line")
			assert.Contains(t, stdout, "full=5")
			assert.Contains(t, stdout, "room=0")
			assert.Contains(t, stdout, "verify=0")
			assert.Empty(t, banned(t, ns, backend, "iptables", chain), "the due bans went once there was room")
		})
	}
}

// TestMetricsWithAnUnreadableAuditLog: when the audit log cannot be read,
// f2b_shim_up is 0 and the counters read from it are absent, not 0 (or
// the part read before the error), which a monitor reads as a reset.
func TestMetricsWithAnUnreadableAuditLog(t *testing.T) {
	ns, pol, audit := startedJail(t, "nft", "")
	require.NoError(t, os.Rename(audit, audit+".1"))
	require.NoError(t, os.Mkdir(audit, 0o750)) // not a file: reading it fails
	r := admin(t, ns, pol, "metrics")
	assert.NotEqual(t, 0, r.Code)
	assert.Contains(t, r.Stdout, `f2b_shim_up{policy="it-nft"} 0`)
	for _, name := range []string{"f2b_shim_quota_denials_total{", "f2b_shim_expired_total{", "f2b_shim_requests_total{"} {
		assert.NotContains(t, r.Stdout, name, "a counter that was not read is absent")
	}
	assert.Contains(t, r.Stdout, `f2b_shim_drift{family="ipv4",kind="missing",policy="it-nft"} 0`, "the drift was measured")
}

// TestLoweredMaxStreamSessionsEndsTheSessionsPastIt: an admin lowers
// max_stream_sessions under open sessions (to cut a flood of them):
// the session past the new bound is refused at its next line and ends,
// as a lower limit holds for the next line; the one within it goes on.
// The open sessions kept their slots for as long as they were fed.
func TestLoweredMaxStreamSessionsEndsTheSessionsPastIt(t *testing.T) {
	ns, pol, _ := startedJail(t, "nft", "")
	base, err := os.ReadFile(pol)
	require.NoError(t, err)
	check := "iptables -w -C " + chain + " -s 192.0.2.99 -j DROP"
	first := startSession(t, ns, pol)
	assert.Equal(t, "1 1 check-false", first.send(t, check))
	second := startSession(t, ns, pol)
	assert.Equal(t, "1 1 check-false", second.send(t, check))
	require.NoError(t, os.WriteFile(pol+".new", append(base, "max_stream_sessions = 1\n"...), 0o644))
	require.NoError(t, os.Rename(pol+".new", pol))
	assert.Regexp(t, `^2 3 denied .*max_stream_sessions`, second.send(t, check))
	assert.Equal(t, 0, second.wait(30*time.Second), "the session past the bound ends: %s", second.stderr.String())
	assert.Equal(t, "2 1 check-false", first.send(t, check), "the session within the bound goes on")
	require.NoError(t, first.in.Close())
	assert.Equal(t, 0, first.wait(30*time.Second))
}
