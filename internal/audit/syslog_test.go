package audit

import (
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestSendSyslog(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "log")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	require.NoError(t, err)
	defer conn.Close()
	read := func() string {
		buf := make([]byte, 8192)
		require.NoError(t, conn.SetReadDeadline(time.Now().Add(5*time.Second)))
		n, err := conn.Read(buf)
		require.NoError(t, err)
		return string(buf[:n])
	}
	deny := Record{Policy: "mx1", Decision: Deny, Result: "denied", Reason: "no\nforged line"}
	deny.SetCommand("id\n{\"decision\":\"allow\"}")
	require.NoError(t, SendSyslog("unixgram", sock, deny))
	msg := read()
	assert.True(t, strings.HasPrefix(msg, "<84>"), "authpriv.warning is priority 84: %q", msg)
	assert.Contains(t, msg, "f2b-shim[")
	assert.Contains(t, msg, `"decision":"deny"`)
	assert.NotContains(t, msg, "\n{", "the record stays one line")

	require.NoError(t, SendSyslog("unixgram", sock, Record{Decision: Allow, Result: "applied"}))
	assert.True(t, strings.HasPrefix(read(), "<86>"), "authpriv.info is priority 86")
}
