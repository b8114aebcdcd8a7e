package engine

import (
	"time"

	"github.com/f2b-shim/f2b-shim/internal/lock"
	"github.com/f2b-shim/f2b-shim/internal/state"
)

// Held is the policy's lock and its state, opened under it: what every
// request, stream batch and admin command changes the firewall in. Each
// policy has its own lock and state, so policies that share a state_dir
// do not wait for each other.
type Held struct {
	Store *state.Store
	lock  *lock.Lock
}

// Take takes the policy's lock, waiting until the deadline, runs
// underLock (when set) while holding it, then opens the state. The caller
// keeps the lock until it has written its audit lines, so that the audit
// log records changes in the order they were made; underLock is where it
// reserves their room again (the room reserved before the wait shares
// its blocks with every request that waited too, and their lines have
// used them since). An error says which step failed (TakeError).
func (e *Engine) Take(underLock func() error) (*Held, error) {
	l, err := lock.Acquire(e.Pol.StateDir, e.Pol.Name+".lock", e.Deadline)
	if err != nil {
		return nil, &TakeError{StepLock, err}
	}
	if underLock != nil {
		if err := underLock(); err != nil {
			l.Release()
			return nil, &TakeError{StepUnderLock, err}
		}
	}
	store, err := state.Open(e.Pol, e.Ctx.LookupPort, max(time.Until(e.Deadline), 100*time.Millisecond))
	if err != nil {
		l.Release()
		return nil, &TakeError{StepState, err}
	}
	return &Held{Store: store, lock: l}, nil
}

// CloseState closes the state and keeps the lock: a stream batch is done
// with its state before it writes its audit lines.
func (h *Held) CloseState() {
	if h.Store != nil {
		h.Store.Close()
		h.Store = nil
	}
}

// Release closes the state and lets the lock go.
func (h *Held) Release() {
	h.CloseState()
	h.lock.Release()
}

// Step is a step of Take.
type Step int

// Take's steps, in order.
const (
	// StepLock: taking the lock; lock.ErrTimeout when another shim held
	// it too long, else state_dir is unusable.
	StepLock Step = iota + 1
	// StepUnderLock: the caller's underLock.
	StepUnderLock
	// StepState: opening the state file.
	StepState
)

// TakeError is Take's failure, with the step that failed. Nothing was
// changed, and the lock is not held.
type TakeError struct {
	Step Step
	Err  error
}

func (e *TakeError) Error() string { return e.Err.Error() }
func (e *TakeError) Unwrap() error { return e.Err }
