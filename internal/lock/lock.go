// Package lock serialises the shim's read-check-modify sequences across
// processes with an flock(2) on a file in state_dir.
//
// flock is released by the kernel when the holder dies, so a shim killed
// by fail2ban's action timeout (even with SIGKILL) never leaves it stuck.
package lock

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// pollInterval is how often a waiting shim retries. flock has no timed
// wait; polling keeps every wait bounded by the caller's deadline.
const pollInterval = 5 * time.Millisecond

// Lock is a held lock.
type Lock struct {
	f *os.File
}

// ErrTimeout is returned when the lock is still held at the deadline.
var ErrTimeout = errors.New("timed out waiting for the lock")

// Acquire takes the exclusive lock on dir/name, creating dir if needed,
// and gives up at deadline.
func Acquire(dir, name string, deadline time.Time) (*Lock, error) {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, name)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return &Lock{f: f}, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("locking %s: %w", path, err)
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("%w %s; another f2b-shim is still working (see \"fuser -v %s\")", ErrTimeout, path, path)
		}
		time.Sleep(pollInterval)
	}
}

// Release gives the lock up.
func (l *Lock) Release() error {
	return l.f.Close() // closing the last descriptor drops the flock
}
