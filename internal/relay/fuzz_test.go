package relay

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// FuzzOutboxLoad: whatever the outbox file holds (torn lines, glued
// records, foreign bytes), the relay starts, keeps only records it can
// parse, leaves a file of whole lines once it appends, and a second load
// finds exactly what the first one kept plus the append.
func FuzzOutboxLoad(f *testing.F) {
	f.Add([]byte("339 start\n340 ban 192.0.2.1/32\n341 ban 203341 ban 198.51.100.1/32\n342 ban 198.51.100.2/32\n344 ban 198.51.1"))
	f.Add([]byte("#seq 9\n3 ban 2001:db8::1/128 @1764547200\n7 flush\n8 stop @1\n"))
	f.Add([]byte("1 ban 192.0.2.1/32\n1 ban 192.0.2.2/32\n\n\x00\xff 2 unban 192.0.2.1/32\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		dir := t.TempDir()
		require.NoError(t, os.WriteFile(filepath.Join(dir, logName), data, 0o600))
		o, err := OpenOutbox(dir, []string{"p"}, nil)
		require.NoError(t, err)
		first := live(o)
		seq := o.seq
		o.NoSync = true
		require.NoError(t, o.Append(Op{Kind: Ban, Addr: mustPrefix("203.0.113.1")}))
		require.NoError(t, o.Close())
		file, err := os.ReadFile(filepath.Join(dir, logName))
		require.NoError(t, err)
		assert.True(t, bytes.HasSuffix(file, []byte("\n")), "the file ends with a whole line")

		o, err = OpenOutbox(dir, []string{"p"}, nil)
		require.NoError(t, err)
		defer o.Close()
		want := append(deleteAddr(first, "203.0.113.1/32"), "ban 203.0.113.1/32")
		assert.Equal(t, want, live(o))
		assert.Equal(t, seq+1, o.seq, "numbers never go back")
	})
}

// deleteAddr drops the ban or unban of addr, which a new ban supersedes.
func deleteAddr(ops []string, addr string) []string {
	var out []string
	for _, s := range ops {
		if s != "ban "+addr && s != "unban "+addr {
			out = append(out, s)
		}
	}
	return out
}
