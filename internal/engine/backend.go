package engine

import (
	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
)

// Backend is one family's firewall, at the level of fail2ban's intent.
// Every method is idempotent, as fail2ban expects of iptables: making what
// exists, removing what is absent and banning twice succeed and change
// nothing (nftables refreshes a re-ban's timeout).
type Backend interface {
	// Apply carries out one judged change or check: make, flush or
	// delete a chain, add its return rule, hook it, ban or unban an
	// address, or check any of them.
	Apply(op policy.Operation) (firewall.Outcome, error)
	// Queue says what the next Apply is: op, under ticket. The backend
	// gathers what it can of it into its batch, written by Flush (new
	// bans; with nftables unbans too); anything else is applied at once,
	// after what the batch holds. Only a backend opened with a batch
	// gathers anything.
	Queue(op policy.Operation, ticket int)
	// Flush writes the batch: one iptables-restore, or one nftables
	// transaction. When that fails, each change is made on its own, so
	// that one bad ban does not fail its neighbours; it returns those
	// that still failed, by ticket.
	Flush() map[int]error
	// Read reads chain (every chain of the policy when "") and the hooks
	// into it from the live firewall into live, each judged by the
	// policy as if the mail host had sent it.
	Read(live *state.State, chain policy.Chain) (Read, error)
	// Missing names what the live firewall lacks of a recorded chain, as
	// cheaply as the backend can (the ordinary answer is "nothing"):
	// the chain and its return rule, its hooks, and probe, a recorded
	// ban the request names, when the backend checks bans one by one.
	Missing(chain policy.Chain, shape state.Shape, hooks []policy.Operation, probe *policy.Operation) ([]string, error)
	// PutBack puts back what the live firewall lacks of chains as s
	// records them (every chain of s when chains is empty), never half
	// built: one restore or one transaction. What the firewall holds
	// besides stays. It says what it put back.
	PutBack(s *state.State, chains []policy.Chain) (string, error)
}

// Read is what Backend.Read found besides what it put into the state.
type Read struct {
	// Exists says whether the chain asked for is there.
	Exists bool
	// Foreign lists what the shim's chains (or table) hold that the
	// policy refuses, and Duplicates rules that stand twice (a whole
	// read only).
	Foreign, Duplicates []string
}

// BatchKind says what a backend gathers into one change.
type BatchKind int

const (
	// NoBatch applies every change at once (one-shot requests, most
	// admin commands).
	NoBatch BatchKind = iota
	// StreamBatch gathers a stream batch's new bans (and, with
	// nftables, its unbans) while Queue is set.
	StreamBatch
	// LiftBatch gathers every unban (expire's chunks).
	LiftBatch
)
