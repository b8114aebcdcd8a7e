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

	"github.com/f2b-shim/f2b-shim/internal/safefile"
)

// Lock is a held lock.
type Lock struct {
	f *os.File
	// Index is the slot a lock from Slot holds, from 0.
	Index int
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
	// Never through a link: in the least-privilege install the shim's
	// user owns dir, and root takes this lock too.
	f, err := safefile.Open(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	// A blocking flock lets the kernel hand the lock from one waiter to
	// the next; polling with LOCK_NB made hundreds of waiting shims spin
	// and starve the holder. flock has no timeout, so the wait runs in a
	// goroutine and is abandoned at the deadline.
	got := make(chan error, 1)
	go func() { got <- syscall.Flock(int(f.Fd()), syscall.LOCK_EX) }()
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	select {
	case err := <-got:
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("locking %s: %w", path, err)
		}
		return &Lock{f: f}, nil
	case <-timer.C:
		// Closing the file makes a flock that succeeds later drop the lock
		// again at once: the kernel releases it with the file's last
		// reference, which the blocked call holds.
		f.Close()
		return nil, fmt.Errorf("%w %s; another f2b-shim is still working (see \"fuser -v %s\")", ErrTimeout, path, path)
	}
}

// Release gives the lock up.
func (l *Lock) Release() error {
	return l.f.Close() // closing the last descriptor drops the flock
}

// ErrNoSlot is returned by Slot when every slot is taken.
var ErrNoSlot = errors.New("every slot is taken")

// Slot takes one of n slots, dir/name.0 to dir/name.(n-1), without
// waiting: a bound on how many holders may run at once, such as stream
// sessions. The kernel frees a slot when its holder ends, however it
// ends. Release gives it back.
func Slot(dir, name string, n int) (*Lock, error) {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, err
	}
	for i := range n {
		path := filepath.Join(dir, fmt.Sprintf("%s.%d", name, i))
		f, err := safefile.Open(path, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return nil, err
		}
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return &Lock{f: f, Index: i}, nil
		}
		f.Close()
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("locking %s: %w", path, err)
		}
	}
	return nil, ErrNoSlot
}
