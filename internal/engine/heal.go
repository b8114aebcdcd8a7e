package engine

import (
	"fmt"
	"strings"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
)

// HealsFirst reports whether a request of this kind first puts its chain
// back when the firewall lost it. A stop (unhook, flush, delete) does
// not: rebuilding what it is about to take away would only cost time.
func HealsFirst(k policy.Kind) bool {
	switch k {
	case policy.DeleteHook, policy.FlushChain, policy.DeleteChain:
		return false
	}
	return true
}

// HealOnContact checks, cheaply (Backend.Missing), that the live firewall
// still holds the chain the state records. A chain the record does not
// hold costs nothing. When something is missing (a firewall reload, a
// flush by hand), what the chain lacks is put back from the record
// before the request is carried out; and since a reload rarely takes one
// chain alone, every other recorded chain of the policy, in both
// families, is checked and put back too (those in checked, which a
// stream's batch has already seen, are skipped, and those checked here
// are added). The returned note says what was missing and what was put
// back, for the request's audit line; status shows the last one. Only
// the request's own chain failing to come back fails the request:
// another chain that cannot be put back (ip6tables broken, say) is named
// in the note, for the timer to retry.
//
// The check is what makes an "unchanged" answer true of the firewall and
// not only of the record: a chain flushed behind the shim's back loses
// its return rule too.
func (e *Engine) HealOnContact(store *state.Store, b Backend, fam policy.Family, chain policy.Chain, checked map[FamChain]bool, probe *policy.Operation) (string, error) {
	note, err := e.healChain(store, b, fam, chain, probe)
	if err != nil || note == "" {
		return note, err
	}
	notes := []string{note}
	for _, f := range Families {
		names, err := store.ChainNames(f)
		if err != nil {
			return "", err
		}
		var other Backend
		for _, n := range names {
			fc := FamChain{f, n}
			if fc == (FamChain{fam, chain}) || checked[fc] {
				continue
			}
			if checked != nil {
				checked[fc] = true
			}
			if other == nil {
				if other, err = e.Open(f, nil, NoBatch); err != nil {
					// The request's own chain is back: another that
					// cannot be is said, and left to the timer.
					notes = append(notes, fmt.Sprintf("%s chains not checked: %v", f, err))
					break
				}
			}
			n, err := e.healChain(store, other, f, n, nil)
			if err != nil {
				n = "not repaired: " + err.Error()
			}
			if n != "" {
				notes = append(notes, n)
			}
		}
	}
	note = strings.Join(notes, "; ")
	if err := store.NoteRepair(e.Ports.Now(), note); err != nil {
		note += "; not noted for status: " + err.Error()
	}
	return note, nil
}

// healChain checks one chain and puts back what it lacks.
func (e *Engine) healChain(store *state.Store, b Backend, fam policy.Family, chain policy.Chain, probe *policy.Operation) (string, error) {
	shape, err := store.ChainShape(fam, chain)
	if err != nil || !shape.Recorded {
		return "", err
	}
	var hooks []policy.Operation
	for _, line := range shape.Hooks {
		if h, err := policy.Decide(e.Pol, line, e.Ctx); err == nil {
			hooks = append(hooks, h) // a record the policy refuses is never put back
		}
	}
	missing, err := b.Missing(chain, shape, hooks, probe)
	if err != nil || len(missing) == 0 {
		return "", err
	}
	put, err := e.Repair(store, b, fam, chain)
	if err != nil {
		return "", fmt.Errorf("%s %s lost its %s, and putting it back failed: %w", fam, chain, strings.Join(missing, ", "), err)
	}
	return fmt.Sprintf("repaired: %s %s had lost its %s; put back %s", fam, chain, strings.Join(missing, ", "), put), nil
}

// Repair puts back what the live chain lacks of its record, and marks
// the record in sync with it (reconcile --fix, and the heal).
func (e *Engine) Repair(store *state.Store, b Backend, fam policy.Family, chain policy.Chain) (string, error) {
	all, _, err := store.Load(e.Ctx)
	if err != nil {
		return "", err
	}
	only := all.Only(fam, chain)
	if only.Tables[fam].Chains[chain] == nil {
		return "nothing: the record holds no such chain", nil
	}
	put, err := b.PutBack(only, []policy.Chain{chain})
	if err != nil {
		return "", err
	}
	return put, store.MarkChainSynced(fam, chain)
}

// RecordedBan is the probe for Backend.Missing: op when it is a ban the
// record holds and the backend checks bans one by one (rules); nil
// otherwise.
func (e *Engine) RecordedBan(store *state.Store, op policy.Operation) (*policy.Operation, error) {
	if op.Kind != policy.AddBan || e.Pol.Backend != "rules" {
		return nil, nil
	}
	has, err := store.HasBan(op)
	if err != nil || !has {
		return nil, err
	}
	return &op, nil
}

// JoinNotes joins the notes of an audit line's state field.
func JoinNotes(notes ...string) string {
	var out []string
	for _, n := range notes {
		if n != "" {
			out = append(out, n)
		}
	}
	return strings.Join(out, "; ")
}

// LastRepair says, for status, when the firewall was last put back from
// the state and what was put back.
func LastRepair(store *state.Store, now time.Time) string {
	at, what, err := store.LastRepair()
	switch {
	case err != nil:
		return "unknown: " + err.Error()
	case at.IsZero():
		return "none: the firewall has never had to be put back"
	}
	return fmt.Sprintf("last at %s (%s ago): %s", at.Local().Format(time.RFC3339), max(now.Sub(at), 0).Round(time.Second), what)
}
