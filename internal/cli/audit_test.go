package cli

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/internal/audit"
)

// TestAuditReview writes an audit log with two rotations, one gzipped,
// and reviews it with each filter.
func TestAuditReview(t *testing.T) {
	h := newHarness(t)
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.Local)
	h.deps.Now = func() time.Time { return now }
	rec := func(ago time.Duration, client, decision, kind, source, reason string) audit.Record {
		r := audit.Record{Time: now.Add(-ago), Policy: "mx1", ClientIP: client, Decision: decision, Result: "applied", Reason: audit.Text(reason)}
		if decision == audit.Deny {
			r.Result = "denied"
		}
		if kind != "" {
			r.Op = &audit.Op{Kind: kind, Chain: chain, Source: source}
		}
		r.SetCommand("iptables …")
		return r
	}
	lines := func(recs ...audit.Record) []byte {
		var b bytes.Buffer
		for _, r := range recs {
			data, err := json.Marshal(r)
			require.NoError(t, err)
			b.Write(append(data, '\n'))
		}
		return b.Bytes()
	}
	require.NoError(t, os.MkdirAll(h.pol.AuditLog[:strings.LastIndex(h.pol.AuditLog, "/")], 0o750))
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(lines(rec(50*time.Hour, "192.0.2.10", audit.Allow, "ban", "203.0.113.1/32", "")))
	zw.Close()
	require.NoError(t, os.WriteFile(h.pol.AuditLog+".2.gz", gz.Bytes(), 0o640))
	require.NoError(t, os.WriteFile(h.pol.AuditLog+".1", lines(
		rec(3*time.Hour, "192.0.2.10", audit.Allow, "ban", "203.0.113.2/32", ""),
		rec(3*time.Hour, "192.0.2.10", audit.Deny, "", "", `program "id" is not allowed`),
	), 0o640))
	require.NoError(t, os.WriteFile(h.pol.AuditLog, append(lines(
		rec(30*time.Minute, "192.0.2.11", audit.Allow, "ban", "203.0.113.2/32", ""),
		rec(10*time.Minute, "192.0.2.11", audit.Deny, "", "", `program "id" is not allowed`),
		rec(5*time.Minute, "192.0.2.10", audit.Allow, "unban", "198.51.100.0/24", ""),
	), []byte("{torn\n")...), 0o640))

	run := func(args ...string) (int, string, string) {
		var stdout, stderr bytes.Buffer
		code := Run(append([]string{"audit", "--policy", "p.toml"}, args...), Env{}, &stdout, &stderr, h.deps)
		return code, stdout.String(), stderr.String()
	}
	count := func(args ...string) int {
		code, out, _ := run(append(args, "--json")...)
		require.Equal(t, 0, code)
		return strings.Count(out, "\n")
	}
	assert.Equal(t, 6, count(), "every file, rotated and gzipped ones included")
	assert.Equal(t, 3, count("--since", "1h"))
	assert.Equal(t, 1, count("--until", "2026-11-24"))
	assert.Equal(t, 2, count("--denied"))
	assert.Equal(t, 2, count("--client", "192.0.2.11"))
	assert.Equal(t, 6, count("--client", "mx1"))
	assert.Equal(t, 2, count("--ip", "203.0.113.2"))
	assert.Equal(t, 1, count("--ip", "198.51.100.7"), "an address inside a banned prefix")
	assert.Equal(t, 4, count("--chain", chain))

	code, out, stderr := run()
	assert.Equal(t, 0, code)
	assert.Contains(t, stderr, "skipped", "the torn line is reported")
	assert.Contains(t, out, "TIME")
	assert.Contains(t, out, "mx1@192.0.2.11")

	code, out, _ = run("--denied", "--since", "1m")
	assert.Equal(t, 0, code)
	assert.Equal(t, "no audit records match in "+h.pol.AuditLog+" and its rotations\n", out, "a table of nothing is one clear line, as a summary of nothing is")

	_, out, _ = run("--summary")
	assert.Regexp(t, `mx1@192\.0\.2\.10\s+allow\s+3`, out)
	assert.Regexp(t, `program "…" is not allowed\s+2`, out, "denials grouped by kind, the client's words left out")
	assert.Regexp(t, `203\.0\.113\.2/32\s+2`, out)
	assert.Contains(t, out, "BANS PER HOUR")
	assert.Regexp(t, `11:00  #+\s+1`, out)

	code, _, stderr = run("--since", "soon")
	assert.Equal(t, ExitUsage, code)
	assert.Contains(t, stderr, "neither a duration")
	code, _, stderr = run("--since", "-2h")
	assert.Equal(t, ExitUsage, code, "a negative duration would mean the future")
	assert.Contains(t, stderr, "negative")
	assert.Equal(t, 2, count("--client", "mx1@192.0.2.11"), "--client takes what the table prints")
	for _, when := range []string{"yesterday", "today", "1d", "1d12h", "00:00"} {
		code, _, stderr = run("--since", when)
		assert.Equal(t, 0, code, "%s: %s", when, stderr)
	}
}

// TestAuditSaysWhatIsNotYetWritten: denials coalesced into the side file
// are not in the log until a later request writes them; audit says so,
// so that an admin looking right after an attack is not told too few.
func TestAuditSaysWhatIsNotYetWritten(t *testing.T) {
	h := newHarness(t)
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	h.deps.Now = func() time.Time { return now }
	for range 3 {
		code, _ := h.forced("id")
		require.Equal(t, ExitDenied, code)
	}
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"the table of denials", []string{"audit", "--denied"}},
		{"the summary", []string{"audit", "--summary"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := Run(append(tc.args, "--policy", "/etc/f2b-shim/policy.toml"), Env{}, &stdout, &stderr, h.deps)
			require.Equal(t, ExitOK, code, stderr.String())
			assert.Contains(t, stderr.String(), "2 more deny request(s) of the last second are counted and not yet written")
		})
	}
	t.Run("json output stays the log's lines only", func(t *testing.T) {
		var stdout, stderr bytes.Buffer
		require.Equal(t, ExitOK, Run([]string{"audit", "--json", "--policy", "/etc/f2b-shim/policy.toml"}, Env{}, &stdout, &stderr, h.deps))
		assert.Empty(t, stderr.String())
	})
}
