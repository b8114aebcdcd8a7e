package lock

import (
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestLockExcludesAndTimesOut(t *testing.T) {
	dir := t.TempDir()
	held, err := Acquire(dir, "lock", time.Now().Add(time.Second))
	require.NoError(t, err)

	t.Run("a second holder gives up at its deadline", func(t *testing.T) {
		_, err := Acquire(dir, "lock", time.Now().Add(50*time.Millisecond))
		assert.ErrorIs(t, err, ErrTimeout)
	})
	require.NoError(t, held.Release())

	t.Run("after release it can be taken again", func(t *testing.T) {
		l, err := Acquire(dir, "lock", time.Now().Add(time.Second))
		require.NoError(t, err)
		require.NoError(t, l.Release())
	})

	t.Run("holders never overlap", func(t *testing.T) {
		var mu sync.Mutex
		inside, maxInside := 0, 0
		var wg sync.WaitGroup
		for range 20 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				l, err := Acquire(dir, "lock", time.Now().Add(10*time.Second))
				if !assert.NoError(t, err) {
					return
				}
				mu.Lock()
				inside++
				maxInside = max(maxInside, inside)
				mu.Unlock()
				time.Sleep(time.Millisecond)
				mu.Lock()
				inside--
				mu.Unlock()
				assert.NoError(t, l.Release())
			}()
		}
		wg.Wait()
		assert.Equal(t, 1, maxInside)
	})
}
