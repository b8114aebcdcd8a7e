// Package enginetest has the recording fake of engine.Backend that the
// engine's unit tests use: a firewall kept as a state.State, with every
// call recorded, so that a test can take things away from it (a reload)
// and see what the engine asks for and puts back.
package enginetest

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/engine"
	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
)

// Firewall is the fake's live firewall, shared by the backends it opens
// (one per family, as the engine opens them).
type Firewall struct {
	Live *state.State
	// Calls records every call, in order: "Apply -I C 1 -s A -j DROP",
	// "Queue", "Flush 3", "Read C", "Missing C", "PutBack C,D".
	Calls []string
	// FailApply, when set, fails every Apply of an operation of this kind
	// before it changes anything.
	FailApply policy.Kind
	// FailFlush fails a batch's Flush for the gathered operations whose
	// source it names.
	FailFlush map[string]bool
	// FailRead fails every Read, as an unreadable firewall does.
	FailRead bool
}

// New is an empty firewall.
func New() *Firewall { return &Firewall{Live: state.New(nil)} }

// Open is engine.Engine.OpenBackend for this firewall.
func (f *Firewall) Open(fam policy.Family, _ firewall.Record, batch engine.BatchKind) (engine.Backend, error) {
	return &Recorder{f: f, fam: fam, batch: batch}, nil
}

// Count is how many recorded calls start with prefix.
func (f *Firewall) Count(prefix string) int {
	n := 0
	for _, c := range f.Calls {
		if strings.HasPrefix(c, prefix) {
			n++
		}
	}
	return n
}

// Recorder is one family's backend on the fake firewall.
type Recorder struct {
	f      *Firewall
	fam    policy.Family
	batch  engine.BatchKind
	queue  bool
	ticket int
	queued []queued
}

type queued struct {
	ticket int
	op     policy.Operation
}

// ErrFailed is what the fake's injected failures return.
var ErrFailed = errors.New("enginetest: injected failure")

func (r *Recorder) log(format string, a ...any) {
	r.f.Calls = append(r.f.Calls, fmt.Sprintf(format, a...))
}

func (r *Recorder) table() *state.Table { return r.f.Live.Tables[r.fam] }

func (r *Recorder) has(op policy.Operation) bool {
	c := r.table().Chains[op.BanChain()]
	if c == nil {
		return false
	}
	return slices.ContainsFunc(c.Bans(), func(b state.Ban) bool { return b.Op.Source == op.Source && b.Op.Target == op.Target })
}

// Apply changes the fake firewall as iptables would.
func (r *Recorder) Apply(op policy.Operation) (firewall.Outcome, error) {
	r.log("Apply %s", op.CommandLine())
	if op.Kind == r.f.FailApply {
		return 0, ErrFailed
	}
	if r.queue && (op.Kind == policy.AddBan || op.Kind == policy.DeleteBan) {
		r.queued = append(r.queued, queued{r.ticket, op})
		if op.Kind == policy.AddBan && r.has(op) || op.Kind == policy.DeleteBan && !r.has(op) {
			return firewall.Unchanged, nil
		}
		return firewall.Applied, nil
	}
	c := r.table().Chains[op.BanChain()]
	switch op.Kind {
	case policy.CheckBan:
		return check(r.has(op))
	case policy.CheckReturn:
		return check(c != nil && c.Return)
	case policy.CheckHook, policy.CheckHookListed:
		return check(slices.ContainsFunc(r.table().Hooks, func(h state.Hook) bool { return h.Op.Jump == op.Jump }))
	case policy.AddBan, policy.AddReturn, policy.AddHook:
		if c == nil {
			return 0, fmt.Errorf("chain %q does not exist", op.BanChain())
		}
		if op.Kind == policy.AddBan && r.has(op) || op.Kind == policy.AddReturn && c.Return {
			return firewall.Unchanged, nil
		}
	case policy.CreateChain:
		if c != nil {
			return firewall.Unchanged, nil
		}
	case policy.DeleteBan:
		if !r.has(op) {
			return firewall.Unchanged, nil
		}
	}
	r.f.Live.Apply(op, time.Time{})
	return firewall.Applied, nil
}

func check(ok bool) (firewall.Outcome, error) {
	if ok {
		return firewall.CheckTrue, nil
	}
	return firewall.CheckFalse, nil
}

// Queue gathers bans and unbans, when the backend was opened with a
// batch.
func (r *Recorder) Queue(op policy.Operation, ticket int) {
	r.log("Queue %d", ticket)
	r.queue, r.ticket = r.batch != engine.NoBatch, ticket
}

// Flush applies what was gathered, failing those FailFlush names.
func (r *Recorder) Flush() map[int]error {
	r.log("Flush %d", len(r.queued))
	var failed map[int]error
	for _, q := range r.queued {
		if r.f.FailFlush[q.op.Source.String()] {
			if failed == nil {
				failed = map[int]error{}
			}
			failed[q.ticket] = ErrFailed
			continue
		}
		r.f.Live.Apply(q.op, time.Time{})
	}
	r.queued = nil
	return failed
}

// Read copies the fake firewall's chain (or all of it) into live.
func (r *Recorder) Read(live *state.State, chain policy.Chain) (engine.Read, error) {
	r.log("Read %s", chain)
	if r.f.FailRead {
		return engine.Read{}, ErrFailed
	}
	t := r.table()
	var out engine.Read
	for _, name := range t.ChainNames() {
		if chain != "" && name != chain {
			continue
		}
		out.Exists = out.Exists || name == chain
		copyChain(live, r.fam, name, t)
	}
	return out, nil
}

func copyChain(to *state.State, fam policy.Family, name policy.Chain, t *state.Table) {
	c := t.Chains[name]
	create := policy.Operation{Command: policy.Command{Family: fam, Kind: policy.CreateChain, Chain: name}}
	to.Apply(create, time.Time{})
	if c.Return {
		ret := create
		ret.Kind = policy.AddReturn
		to.Apply(ret, time.Time{})
	}
	for _, b := range c.Bans() {
		to.Apply(b.Op, b.Since)
	}
	for _, h := range t.Hooks {
		if h.Op.Jump == name {
			to.Apply(h.Op, h.Since)
		}
	}
}

// Missing compares the fake firewall with the recorded shape.
func (r *Recorder) Missing(chain policy.Chain, shape state.Shape, hooks []policy.Operation, probe *policy.Operation) ([]string, error) {
	r.log("Missing %s", chain)
	c := r.table().Chains[chain]
	if c == nil || shape.Return && !c.Return {
		return []string{"chain or return rule"}, nil
	}
	var missing []string
	for _, h := range hooks {
		key := r.f.Live.HookKey(h)
		if !slices.ContainsFunc(r.table().Hooks, func(l state.Hook) bool { return r.f.Live.HookKey(l.Op) == key }) {
			missing = append(missing, "hook from "+string(h.Chain))
		}
	}
	if probe != nil && !r.has(*probe) {
		missing = append(missing, "ban of "+probe.Source.String())
	}
	return missing, nil
}

// PutBack copies the record's chains into the fake firewall.
func (r *Recorder) PutBack(s *state.State, chains []policy.Chain) (string, error) {
	if len(chains) == 0 {
		chains = s.Tables[r.fam].ChainNames()
	}
	names := make([]string, len(chains))
	for i, c := range chains {
		names[i] = string(c)
		if s.Tables[r.fam].Chains[c] != nil {
			copyChain(r.f.Live, r.fam, c, s.Tables[r.fam])
		}
	}
	r.log("PutBack %s", strings.Join(names, ","))
	return "the record of " + strings.Join(names, ", "), nil
}
