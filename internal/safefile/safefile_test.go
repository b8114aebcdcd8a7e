package safefile

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestAPlantedFIFOIsRefusedNotWaitedOn: opening a FIFO for reading
// waits for a writer, so a FIFO planted in place of a file would hang
// the root command that opens it (a restore at boot, "f2b-shim
// outbox"). It is refused at once, as any file that is not regular.
func TestAPlantedFIFOIsRefusedNotWaitedOn(t *testing.T) {
	for _, tc := range []struct {
		name string
		flag int
	}{
		{"opened for reading", os.O_RDONLY},
		{"opened for writing", os.O_WRONLY | os.O_APPEND | os.O_CREATE},
	} {
		t.Run("a FIFO "+tc.name+" is refused", func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "file")
			require.NoError(t, syscall.Mkfifo(path, 0o600))
			done := make(chan error, 1)
			go func() {
				f, err := Open(path, tc.flag, 0o600)
				if err == nil {
					f.Close()
				}
				done <- err
			}()
			select {
			case err := <-done:
				assert.Error(t, err)
			case <-time.After(5 * time.Second):
				// Let the blocked open through, so that the test ends.
				if f, err := os.OpenFile(path, os.O_RDWR, 0); err == nil {
					f.Close()
				}
				<-done
				t.Fatal("Open waited on a FIFO")
			}
		})
	}
	t.Run("a regular file still reads and writes", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "file")
		f, err := Open(path, os.O_RDWR|os.O_CREATE, 0o600)
		require.NoError(t, err)
		_, err = f.WriteString("x\n")
		require.NoError(t, err)
		require.NoError(t, f.Close())
		f, err = Open(path, os.O_RDONLY, 0)
		require.NoError(t, err)
		defer f.Close()
		b := make([]byte, 8)
		n, err := f.Read(b)
		require.NoError(t, err)
		assert.Equal(t, "x\n", string(b[:n]))
	})
}
