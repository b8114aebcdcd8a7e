package cli

import (
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/test/nstest"
)

// TestRelayRestartsAfterAnUpgrade: a running relay whose binary is
// replaced (as a package upgrade renames the new file over it) notices
// within binaryCheck, says so in fail2ban's log, and ends with exit 0
// after acknowledging what it took, so that the action starts the new
// binary. Its outbox keeps what it took.
func TestRelayRestartsAfterAnUpgrade(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary and waits for the relay's check")
	}
	dir := t.TempDir()
	bin, err := nstest.BuildShim(dir)
	require.NoError(t, err)
	outbox := filepath.Join(dir, "outbox", "imap")
	cmd := exec.Command(bin, "relay", "--outbox", outbox, "--chain", "mail-remote-f2b-imap", "--proxy", "f2b-proxy", "--ssh", "/bin/false", "--drain", "1m", "--acks", "groups")
	in, err := cmd.StdinPipe()
	require.NoError(t, err)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	require.NoError(t, cmd.Start())
	_, err = io.WriteString(in, "start\nban 192.0.2.1\n")
	require.NoError(t, err)

	// The upgrade: a new file renamed over the old one.
	data, err := os.ReadFile(bin)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(bin+".new", data, 0o755))
	require.NoError(t, os.Rename(bin+".new", bin))

	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		require.NoError(t, err, errOut.String())
	case <-time.After(3 * binaryCheck):
		_ = cmd.Process.Kill()
		t.Fatalf("the relay still runs its replaced binary:\n%s", errOut.String())
	}
	in.Close()
	assert.Contains(t, errOut.String(), "info: the f2b-shim binary "+bin+" was replaced (an upgrade): this relay ends")
	assert.Equal(t, "ok 2\n", out.String())
	log, err := os.ReadFile(filepath.Join(outbox, "outbox.log"))
	require.NoError(t, err)
	assert.Contains(t, string(log), "2 ban 192.0.2.1/32")
}
