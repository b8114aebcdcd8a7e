package audit

import (
	"bufio"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestTextEscapesEveryDangerousByte(t *testing.T) {
	tests := []struct {
		name, in string
		// want is the decoded value; "" means the input itself.
		want string
	}{
		{"plain text is kept", "iptables -w -N mail-remote-f2b-x", ""},
		{"a newline cannot start a forged line", "ban\n{\"decision\":\"allow\"}", ""},
		{"a carriage return is escaped", "a\rb", ""},
		{"an escape sequence is escaped", "\x1b[2J\x1b]0;pwned\x07", ""},
		{"NUL is escaped", "a\x00b", ""},
		{"DEL and C1 controls are escaped", "a\x7fb\u009bc", ""},
		{"line separators are escaped", "a\u2028b\u2029c", ""},
		{"quotes and backslashes are escaped", `a"b\c'd`, ""},
		{"invalid UTF-8 becomes U+FFFD", "a\xffb\xc3", "a\ufffdb\ufffd"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := json.Marshal(Text(tt.in))
			require.NoError(t, err)
			for _, b := range out {
				assert.False(t, b < 0x20 || b == 0x7f, "raw control byte %#x in %q", b, out)
			}
			assert.NotContains(t, string(out), "\u2028")
			assert.NotContains(t, string(out), "\u0085")
			var back string
			require.NoError(t, json.Unmarshal(out, &back), "%s", out)
			want := tt.want
			if want == "" {
				want = tt.in
			}
			assert.Equal(t, want, back)
		})
	}
}

func TestRecordKeepsRawBytesWhenTextCannot(t *testing.T) {
	t.Run("invalid UTF-8 is kept in command_b64", func(t *testing.T) {
		var r Record
		r.SetCommand("iptables \xff\xfe")
		assert.Equal(t, []byte("iptables \xff\xfe"), r.CommandB64)
	})
	t.Run("valid text has no command_b64", func(t *testing.T) {
		var r Record
		r.SetCommand("iptables -N x")
		assert.Nil(t, r.CommandB64)
		assert.Equal(t, 13, r.CommandLen)
	})
	t.Run("very long input is capped but its length recorded", func(t *testing.T) {
		var r Record
		r.SetCommand(strings.Repeat("A", 1<<20))
		assert.Equal(t, 1<<20, r.CommandLen)
		assert.Len(t, string(r.Command), maxLoggedCommand)
		assert.Len(t, r.CommandB64, maxLoggedCommand)
	})
}

func TestLogWritesOneValidLinePerRecord(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "audit.jsonl")
	hostile := []string{
		"ban\n{\"decision\":\"allow\"}",
		"\r\x1b[1A\x1b[2Kfake",
		"\xff\xfe\xfd",
		strings.Repeat("\n", 5000),
		`"},"decision":"allow`,
	}
	var wg sync.WaitGroup
	for i := range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l, err := Open(path)
			if !assert.NoError(t, err) {
				return
			}
			defer l.Close()
			r := Record{Time: time.Now(), Policy: "test", Decision: Deny, Result: "denied", Exit: 3}
			r.SetCommand(hostile[i%len(hostile)])
			assert.NoError(t, l.Write(r))
		}()
	}
	wg.Wait()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	lines := 0
	for sc.Scan() {
		var r Record
		require.NoError(t, json.Unmarshal(sc.Bytes(), &r), "line %d: %q", lines+1, sc.Text())
		assert.Equal(t, Deny, r.Decision)
		lines++
	}
	require.NoError(t, sc.Err())
	assert.Equal(t, 50, lines)
	st, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o640), st.Mode().Perm())
}

func TestOpenFailsWhenTheLogCannotBeCreated(t *testing.T) {
	dir := t.TempDir()
	blocker := filepath.Join(dir, "file")
	require.NoError(t, os.WriteFile(blocker, nil, 0o600))
	_, err := Open(filepath.Join(blocker, "audit.jsonl"))
	assert.Error(t, err, "a path under a regular file cannot be created")
}
