// Package engine carries out requests that the policy has judged: the
// work that one-shot mode, stream mode and the admin commands share. Its
// callers (package cli) own flags, output and exit codes; the safety
// argument is here.
//
// # The safety argument
//
// A request is judged whole (policy.Decide) before anything happens, and
// the audit log is opened with room for its line. Then, in this order:
//
//  0. Take: the policy's lock, waiting at most lock_timeout; the room for
//     the audit lines reserved again under it; the state opened. The lock
//     is held until the audit lines are written.
//  1. FinishCutShort: a change that an earlier shim started and never
//     recorded (killed, or its batch cut short) is read back from the
//     firewall into the record (state.ReadBack). Nothing is forgotten on
//     the way: what the firewall lacks stays recorded, as drift to put
//     back.
//  2. HealOnContact: the chain the request names is checked, cheaply,
//     against the record; what the firewall lost (a reload, a flush by
//     hand) is put back from the record before the request is carried
//     out, so that "unchanged" is true of the firewall.
//  3. The intent is written (state.Store.SetIntent) before the firewall is
//     touched, so a kill between the two is found by step 1.
//  4. Serve applies the change through a Backend and records it, which
//     clears the intent; the caller then writes the audit line and lets
//     the lock go, so the audit log records changes in the order they
//     were made.
//
// # Backends
//
// A Backend is one family's firewall at the level of fail2ban's intent:
// apply a judged operation (make or flush a chain, hook it, ban or unban
// an address), gather a batch's bans into one change, read the firewall
// back into a state, name what it lacks of the record, and put that
// back. Three implement it: iptables rules (one rule per ban, the
// default), ipsets, and nftables (the shim's own table over netlink, no
// program at all). enginetest.Recorder is the recording fake that unit
// tests use.
package engine

import (
	"fmt"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/policy"
)

// Ports are the engine's side effects, injected so that tests can
// replace them.
type Ports struct {
	// OpenTable opens the filter table of a family (rules and ipset).
	OpenTable func(fam policy.Family, backend string, wait time.Duration) (firewall.Table, error)
	// OpenSets opens ipset, for the set backend.
	OpenSets func() (firewall.Sets, error)
	// RestoreSets feeds an "ipset restore" script.
	RestoreSets func(script string) error
	// Restore feeds an iptables-restore script to the family's iptables-restore.
	Restore func(fam policy.Family, backend string, wait time.Duration, script string) error
	// OpenNFT opens the nftables backend's table (policy backend =
	// "nftables"), one per process: the library allows no more.
	OpenNFT func(table string) (firewall.NFT, error)
	Now     func() time.Time
}

// Engine is what one request, stream batch or admin command works with:
// the policy, what the policy knows of the proxy, the deadline that
// bounds every wait, and the side effects.
type Engine struct {
	Pol      *policy.Policy
	Ctx      policy.Context
	Deadline time.Time
	Ports    Ports
	// Open, when set, replaces Open (the unit tests' recording fake).
	OpenBackend func(fam policy.Family, rec firewall.Record, batch BatchKind) (Backend, error)
}

// Families are the two families, in the order the engine goes through
// them.
var Families = []policy.Family{policy.IPv4, policy.IPv6}

// FamChain names a chain of one family.
type FamChain struct {
	Fam   policy.Family
	Chain policy.Chain
}

// wait is how long a firewall program may wait for its lock: until the
// deadline, and at least a second.
func (e *Engine) wait() time.Duration { return max(time.Until(e.Deadline), time.Second) }

// Open opens the family's backend. rec, when set, is the shim's record
// (state.Store), which bounds chains and lets bans skip reading the
// firewall. batch says what the backend gathers into one change.
func (e *Engine) Open(fam policy.Family, rec firewall.Record, batch BatchKind) (Backend, error) {
	if e.OpenBackend != nil {
		return e.OpenBackend(fam, rec, batch)
	}
	fb := firewall.Backend{Policy: e.Pol, Record: rec, LookupPort: e.Ctx.LookupPort}
	var err error
	if e.Pol.Backend == "nftables" {
		if e.Ports.OpenNFT == nil {
			return nil, fmt.Errorf("the nftables backend is not available here")
		}
		if fb.NFT, err = e.Ports.OpenNFT(e.Pol.NftablesTable); err != nil {
			return nil, err
		}
		n := &nft{e: e, fam: fam, b: fb, kind: batch}
		if batch != NoBatch {
			n.b.NFTQueue = &firewall.NFTQueue{Queue: batch == LiftBatch}
			n.b.SetsInUse, n.b.NFTVerdicts = map[string]bool{}, map[string]policy.Target{}
		}
		return n, nil
	}
	if fb.Table, err = e.Ports.OpenTable(fam, e.Pol.IptablesBackend, e.wait()); err != nil {
		return nil, err
	}
	if e.Pol.Backend == "ipset" {
		if fb.Sets, err = e.Ports.OpenSets(); err != nil {
			return nil, err
		}
	}
	r := &rules{e: e, fam: fam, b: fb}
	if batch != NoBatch {
		r.b.SetsInUse = map[string]bool{}
	}
	if batch != NoBatch && fb.Sets == nil && e.Ports.Restore != nil {
		r.batched = &firewall.Batched{Table: fb.Table, QueueDeletes: batch == LiftBatch, Restore: func(script string) error {
			return e.Ports.Restore(fam, e.Pol.IptablesBackend, e.wait(), script)
		}}
		r.b.Table = r.batched
	}
	return r, nil
}
