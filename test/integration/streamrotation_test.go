package integration

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/test/nstest"
)

// TestStreamRotationDuringABatchKeepsTheChain rotates the audit log with
// the shipped logrotate file again and again while a session bans 6,000
// addresses in large batches and one-shot calls write between the
// rotations: every ban of the session has its audit line, and the chain
// holds across every rotation. Before the session moved to the new file
// at write time, a batch that had checked for a rotation before acting
// appended to the rotated file after the line a one-shot call had
// linked the new file to (the chain broke in about half of the runs).
func TestStreamRotationDuringABatchKeepsTheChain(t *testing.T) {
	nstest.RequireRoot(t, "logrotate")
	ns, pol, audit := startedJail(t, "nft", "max_new_bans_per_minute = 1000000\n")
	rotate := shippedLogrotate(t, audit)
	s := startSession(t, ns, pol)
	lines := banLines("iptables", 6000)
	go func() {
		for i := 0; i < len(lines); i += 1000 {
			_, _ = s.in.Write([]byte(strings.Join(lines[i:i+1000], "\n") + "\n"))
		}
	}()
	got := 0
	for round := 0; got < len(lines) && round < 200; round++ {
		rotate()
		r := ns.Shim(t, shim, pol, fmt.Sprintf("iptables -w -I %s 1 -s 198.51.100.%d -j DROP", chain, round%250+1))
		require.Equal(t, 0, r.Code, r.Stderr)
		// The replies that came meanwhile.
		for len(s.replies) > 0 {
			<-s.replies
			got++
		}
	}
	for ; got < len(lines); got++ {
		select {
		case _, ok := <-s.replies:
			require.True(t, ok, "the session ended after %d replies: %s", got, s.stderr.String())
		case <-time.After(2 * time.Minute):
			t.Fatalf("no reply after %d", got)
		}
	}
	require.NoError(t, s.in.Close())
	require.Equal(t, 0, s.wait(time.Minute), s.stderr.String())
	r := verifyAudit(t, ns, pol)
	assert.Equal(t, 0, r.Code, r.Stdout+r.Stderr)
	m, _ := filepath.Glob(audit + "*")
	seen := map[string]bool{}
	for _, name := range m {
		if strings.HasSuffix(name, ".coalesce") || strings.HasSuffix(name, ".state") {
			continue
		}
		data, err := os.ReadFile(name)
		require.NoError(t, err)
		if strings.HasSuffix(name, ".gz") {
			zr, err := gzip.NewReader(bytes.NewReader(data))
			require.NoError(t, err)
			data, err = io.ReadAll(zr)
			require.NoError(t, err)
		}
		for _, l := range strings.Split(string(data), "\n") {
			if strings.Contains(l, `"session"`) && strings.Contains(l, `"result":"applied"`) {
				var rec map[string]any
				require.NoError(t, json.Unmarshal([]byte(l), &rec))
				seen[rec["op"].(map[string]any)["source"].(string)] = true
			}
		}
	}
	t.Logf("%d files; %d session bans audited", len(m), len(seen))
	assert.Len(t, seen, len(lines), "every ban of the session has its audit line")
}
