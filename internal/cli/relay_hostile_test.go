package cli

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/internal/relay"
)

// TestRelayLogLinesCannotBeForgedByAProxy: what a compromised proxy
// answers reaches fail2ban's log through the relay's stderr, which the
// action reads with Python's universal newlines (a carriage return ends
// a line there too). Every control byte is escaped, so the proxy cannot
// start a line of its own in fail2ban's log.
func TestRelayLogLinesCannotBeForgedByAProxy(t *testing.T) {
	dir := t.TempDir()
	ssh := filepath.Join(dir, "ssh")
	require.NoError(t, os.WriteFile(ssh, []byte("#!/bin/sh\nn=0\nwhile read -r line; do n=$((n+1)); printf '%d 3 denied denied: no\\rerror: forged \\033[2J\\n' \"$n\"; done\n"), 0o755))
	var out, errOut bytes.Buffer
	code := runRelay([]string{"--outbox", filepath.Join(dir, "outbox", "imap"), "--chain", "mail-remote-f2b-imap", "--proxy", "f2b-proxy", "--ssh", ssh, "--drain", "5s", "--acks", "groups"},
		strings.NewReader("ban 192.0.2.1\n"), &out, &errOut)
	require.Equal(t, ExitOK, code, errOut.String())
	require.Contains(t, errOut.String(), "denied")
	for _, b := range errOut.String() {
		if b != '\n' {
			assert.False(t, b < 0x20 || b == 0x7f, "a control byte %q reached fail2ban's log:\n%q", b, errOut.String())
		}
	}
}

// TestOutboxIsSafeOnAHostileDirectory: "f2b-shim outbox", which root
// runs, reads a directory another user may have filled: a FIFO in place
// of a file must not hang it, and names and messages there must not
// reach the terminal with their control bytes.
func TestOutboxIsSafeOnAHostileDirectory(t *testing.T) {
	dir := t.TempDir()
	jail := filepath.Join(dir, "imap\x1b[31m")
	require.NoError(t, os.Mkdir(jail, 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(jail, "lock"), nil, 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(jail, "outbox.log"), []byte("1 ban 192.0.2.1/32\n"), 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(jail, "cursor.p\x1b[2J"), []byte("0\n"), 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(jail, "error.p\x1b[2J"), []byte("1 down\x1b]0;owned\x07\n"), 0o600))
	require.NoError(t, syscall.Mkfifo(filepath.Join(jail, "cursor.fifo"), 0o600))
	var out, errOut bytes.Buffer
	done := make(chan int, 1)
	go func() { done <- runOutbox([]string{"--dir", dir}, &out, &errOut, time.Now) }()
	var code int
	select {
	case code = <-done:
	case <-time.After(10 * time.Second):
		// Unblock the reader so that the test ends.
		if f, err := os.OpenFile(filepath.Join(jail, "cursor.fifo"), os.O_WRONLY, 0); err == nil {
			f.Close()
		}
		<-done
		t.Fatal("a FIFO planted in the outbox directory hangs f2b-shim outbox")
	}
	assert.Equal(t, ExitCheckFalse, code, errOut.String())
	assert.Contains(t, out.String(), "cursor of fifo cannot be read")
	for _, b := range out.String() + errOut.String() {
		if b != '\n' {
			assert.False(t, b < 0x20 || b == 0x7f, "a control byte %q reached the terminal:\n%q", b, out.String()+errOut.String())
		}
	}
}

// TestOutboxForgetsAProxyNoLongerConfigured: when the admin removes a
// proxy from the jail's proxies, the next relay no longer delivers to
// it; "f2b-shim outbox" must not go on listing it as pending, and exit 1,
// for ever.
func TestOutboxForgetsAProxyNoLongerConfigured(t *testing.T) {
	dir := t.TempDir()
	box, err := relay.OpenOutbox(filepath.Join(dir, "imap"), []string{"f2b-proxy", "old-proxy"}, nil)
	require.NoError(t, err)
	require.NoError(t, box.Append(relay.Op{Kind: relay.Start}))
	box.SetError("old-proxy", "ssh: connect to host old-proxy port 22: No route to host")
	require.NoError(t, box.Close())

	box, err = relay.OpenOutbox(filepath.Join(dir, "imap"), []string{"f2b-proxy"}, nil)
	require.NoError(t, err)
	require.NoError(t, box.Taken("f2b-proxy", 1))
	defer box.Close()
	var out, errOut bytes.Buffer
	assert.Equal(t, ExitOK, runOutbox([]string{"--dir", dir}, &out, &errOut, time.Now), out.String())
	assert.NotContains(t, out.String(), "old-proxy")
}
