package cli

import (
	"bytes"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/internal/relay"
)

// TestOutboxShowsWhatIsPending: "f2b-shim outbox" lists each jail's
// outbox with what each proxy has not taken, the oldest one's age and
// the proxy's last error, and exits 1 while something is pending, 0 once
// every proxy has everything; a running relay's lock does not stop it.
func TestOutboxShowsWhatIsPending(t *testing.T) {
	dir := t.TempDir()
	box, err := relay.OpenOutbox(filepath.Join(dir, "imap"), []string{"f2b-proxy", "f2b-proxy2"}, nil)
	require.NoError(t, err)
	defer box.Close()
	require.NoError(t, box.Append(relay.Op{Kind: relay.Start}))
	for _, a := range []string{"192.0.2.1", "2001:db8::1"} {
		require.NoError(t, box.Append(relay.Op{Kind: relay.Ban, Addr: netip.MustParsePrefix(a + "/" + map[bool]string{true: "128", false: "32"}[netip.MustParseAddr(a).Is6()])}))
	}
	require.NoError(t, box.Taken("f2b-proxy", 3))
	box.SetError("f2b-proxy2", "ssh: connect to host f2b-proxy2 port 22: Connection refused")
	later := func() time.Time { return time.Now().Add(90 * time.Second) }

	var out, errOut bytes.Buffer
	code := runOutbox([]string{"--dir", dir}, &out, &errOut, later)
	assert.Equal(t, ExitCheckFalse, code, errOut.String())
	assert.Contains(t, out.String(), "imap ("+filepath.Join(dir, "imap")+"): 3 operation(s) kept\n")
	assert.Contains(t, out.String(), "  f2b-proxy: everything delivered\n")
	assert.Regexp(t, `  f2b-proxy2: 3 pending, the oldest 1m3\ds old; last error 1m3\ds ago: ssh: connect to host f2b-proxy2 port 22: Connection refused\n`, out.String())

	require.NoError(t, box.Taken("f2b-proxy2", 3))
	box.SetError("f2b-proxy2", "")
	out.Reset()
	assert.Equal(t, ExitOK, runOutbox([]string{"--dir", dir}, &out, &errOut, later))
	assert.Contains(t, out.String(), "  f2b-proxy2: everything delivered\n")

	out.Reset()
	assert.Equal(t, ExitOK, runOutbox([]string{"--dir", filepath.Join(dir, "none")}, &out, &errOut, later))
	assert.Contains(t, out.String(), "no outbox in")
	assert.Equal(t, ExitUsage, runOutbox([]string{"extra"}, &out, &errOut, later))
}
