package firewall

import (
	"errors"
	"strings"
)

// Batched is a Table for a stream's batch with the rule backend: the
// inserts of new bans ("-I CHAIN 1 -s ADDR -j TARGET") are queued while
// Queue is set, and written together with one iptables-restore --noflush
// at Flush, instead of one iptables process each. Any other call writes
// the queue first, so the table sees every change in the order it was
// asked for.
//
// iptables-restore applies a script all or nothing. When it fails, Flush
// inserts the queued rules one by one, so that each ban gets its own true
// result: a ban that fails must not fail its neighbours.
type Batched struct {
	Table
	// Restore runs one iptables-restore --noflush script.
	Restore func(script string) error
	// Queue, when set, queues the next Insert under Ticket.
	Queue bool
	// QueueDeletes, when set, queues every Delete under Ticket as well:
	// expire lifts a chunk of bans with one iptables-restore. A queued
	// delete of a rule that is not there is no failure (the ban is gone
	// either way).
	QueueDeletes bool
	Ticket       int
	queue        []queued
	failed       map[int]error
}

type queued struct {
	ticket int
	chain  string
	spec   []string
	delete bool
}

// Insert queues a ban's insert, or writes the queue and inserts.
func (b *Batched) Insert(chain string, pos int, spec ...string) error {
	if b.Queue && pos == 1 {
		b.queue = append(b.queue, queued{b.Ticket, chain, spec, false})
		return nil
	}
	b.flush()
	return b.Table.Insert(chain, pos, spec...)
}

// The other calls see the queued inserts first.

func (b *Batched) ChainExists(chain string) (bool, error) {
	b.flush()
	return b.Table.ChainExists(chain)
}
func (b *Batched) NewChain(chain string) error    { b.flush(); return b.Table.NewChain(chain) }
func (b *Batched) FlushChain(chain string) error  { b.flush(); return b.Table.FlushChain(chain) }
func (b *Batched) DeleteChain(chain string) error { b.flush(); return b.Table.DeleteChain(chain) }
func (b *Batched) Exists(chain string, spec ...string) (bool, error) {
	b.flush()
	return b.Table.Exists(chain, spec...)
}
func (b *Batched) Append(chain string, spec ...string) error {
	b.flush()
	return b.Table.Append(chain, spec...)
}
func (b *Batched) Delete(chain string, spec ...string) error {
	if b.QueueDeletes {
		b.queue = append(b.queue, queued{b.Ticket, chain, spec, true})
		return nil
	}
	b.flush()
	return b.Table.Delete(chain, spec...)
}
func (b *Batched) List(chain string) ([]string, error) { b.flush(); return b.Table.List(chain) }
func (b *Batched) ListChains() ([]string, error)       { b.flush(); return b.Table.ListChains() }

// Flush writes the queue, and returns the queued inserts that failed
// since the last Flush, by ticket.
func (b *Batched) Flush() map[int]error {
	b.flush()
	failed := b.failed
	b.failed = nil
	return failed
}

func (b *Batched) flush() {
	q := b.queue
	b.queue = nil
	if len(q) == 0 {
		return
	}
	var script strings.Builder
	script.WriteString("*filter\n")
	for _, e := range q {
		if e.delete {
			script.WriteString("-D " + e.chain + " " + strings.Join(e.spec, " ") + "\n")
			continue
		}
		script.WriteString("-I " + e.chain + " 1 " + strings.Join(e.spec, " ") + "\n")
	}
	script.WriteString("COMMIT\n")
	if err := b.Restore(script.String()); err == nil {
		return
	}
	for _, e := range q {
		var err error
		if e.delete {
			var ce *CommandError
			if err = b.Table.Delete(e.chain, e.spec...); errors.As(err, &ce) && notThere(ce.Stderr) {
				err = nil
			}
		} else {
			err = b.Table.Insert(e.chain, 1, e.spec...)
		}
		if err != nil {
			if b.failed == nil {
				b.failed = map[int]error{}
			}
			b.failed[e.ticket] = err
		}
	}
}
