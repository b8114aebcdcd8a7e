// Package fwtest provides Fake, an in-memory firewall.Table that behaves
// like iptables' filter table where the shim relies on it (errors for a
// missing chain, a duplicate chain, a missing rule, a chain still in use)
// and records every call, for unit tests.
package fwtest

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/f2b-shim/f2b-shim/internal/firewall"
)

// Fake is an in-memory filter table. The zero value is not usable; call New.
type Fake struct {
	chains map[string][]string // chain -> rule specs joined by spaces, in order
	// Calls records every call, e.g. "Insert mail-remote-f2b-x 1 -s 1.2.3.4/32 -j DROP".
	Calls []string
	// Fail, when set, makes the named method fail, e.g. Fail["Insert"].
	Fail map[string]error
}

var builtins = []string{"INPUT", "FORWARD", "OUTPUT"}

// New returns a Fake holding only the built-in chains.
func New() *Fake {
	f := &Fake{chains: map[string][]string{}, Fail: map[string]error{}}
	for _, c := range builtins {
		f.chains[c] = nil
	}
	return f
}

func (f *Fake) call(method string, args ...string) error {
	f.Calls = append(f.Calls, strings.TrimSpace(method+" "+strings.Join(args, " ")))
	return f.Fail[method]
}

// ChainExists implements firewall.Table.
func (f *Fake) ChainExists(chain string) (bool, error) {
	if err := f.call("ChainExists", chain); err != nil {
		return false, err
	}
	_, ok := f.chains[chain]
	return ok, nil
}

// NewChain implements firewall.Table.
func (f *Fake) NewChain(chain string) error {
	if err := f.call("NewChain", chain); err != nil {
		return err
	}
	if _, ok := f.chains[chain]; ok {
		return fmt.Errorf("chain %s already exists", chain)
	}
	f.chains[chain] = nil
	return nil
}

// FlushChain implements firewall.Table.
func (f *Fake) FlushChain(chain string) error {
	if err := f.call("FlushChain", chain); err != nil {
		return err
	}
	if _, ok := f.chains[chain]; !ok {
		return fmt.Errorf("no chain %s", chain)
	}
	f.chains[chain] = nil
	return nil
}

// DeleteChain implements firewall.Table.
func (f *Fake) DeleteChain(chain string) error {
	if err := f.call("DeleteChain", chain); err != nil {
		return err
	}
	rules, ok := f.chains[chain]
	switch {
	case !ok:
		return fmt.Errorf("no chain %s", chain)
	case len(rules) > 0:
		return fmt.Errorf("chain %s is not empty", chain)
	case f.referenced(chain):
		return fmt.Errorf("chain %s is still referenced", chain)
	}
	delete(f.chains, chain)
	return nil
}

func (f *Fake) referenced(chain string) bool {
	for _, rules := range f.chains {
		for _, r := range rules {
			if strings.HasSuffix(r, "-j "+chain) {
				return true
			}
		}
	}
	return false
}

// Exists implements firewall.Table. Like "iptables -C", it answers false
// for a missing chain but fails for a jump to a missing chain.
func (f *Fake) Exists(chain string, spec ...string) (bool, error) {
	if err := f.call("Exists", append([]string{chain}, spec...)...); err != nil {
		return false, err
	}
	if err := f.checkJump(spec); err != nil {
		return false, err
	}
	return slices.Contains(f.chains[chain], saved(spec)), nil
}

func (f *Fake) checkJump(spec []string) error {
	if i := slices.Index(spec, "-j"); i >= 0 && i+1 < len(spec) {
		target := spec[i+1]
		if _, ok := f.chains[target]; !ok && !slices.Contains([]string{"DROP", "REJECT", "RETURN", "ACCEPT"}, target) {
			return fmt.Errorf("couldn't load target %s", target)
		}
	}
	return nil
}

// saved is a rule as "iptables -S" prints it: a single-port match
// carries its protocol's match, "-p tcp -m tcp --dport 25".
func saved(spec []string) string {
	if len(spec) >= 3 && spec[0] == "-p" && spec[2] == "--dport" {
		spec = slices.Concat(spec[:2], []string{"-m", spec[1]}, spec[2:])
	}
	return strings.Join(spec, " ")
}

// Insert implements firewall.Table.
func (f *Fake) Insert(chain string, pos int, spec ...string) error {
	if err := f.call("Insert", append([]string{chain, fmt.Sprint(pos)}, spec...)...); err != nil {
		return err
	}
	rules, ok := f.chains[chain]
	if !ok {
		return fmt.Errorf("no chain %s", chain)
	}
	if err := f.checkJump(spec); err != nil {
		return err
	}
	if pos < 1 || pos > len(rules)+1 {
		return fmt.Errorf("index of insertion too big")
	}
	f.chains[chain] = slices.Insert(rules, pos-1, saved(spec))
	return nil
}

// Append implements firewall.Table.
func (f *Fake) Append(chain string, spec ...string) error {
	if err := f.call("Append", append([]string{chain}, spec...)...); err != nil {
		return err
	}
	if _, ok := f.chains[chain]; !ok {
		return fmt.Errorf("no chain %s", chain)
	}
	f.chains[chain] = append(f.chains[chain], saved(spec))
	return nil
}

// Delete implements firewall.Table.
func (f *Fake) Delete(chain string, spec ...string) error {
	if err := f.call("Delete", append([]string{chain}, spec...)...); err != nil {
		return err
	}
	rules, ok := f.chains[chain]
	if !ok {
		return &firewall.CommandError{Status: 1, Stderr: "iptables: No chain/target/match by that name.\n"}
	}
	i := slices.Index(rules, saved(spec))
	if i < 0 {
		return &firewall.CommandError{Status: 1, Stderr: "iptables: Bad rule (does a matching rule exist in that chain?).\n"}
	}
	f.chains[chain] = slices.Delete(rules, i, i+1)
	return nil
}

// List implements firewall.Table, in "iptables -S CHAIN" form.
func (f *Fake) List(chain string) ([]string, error) {
	if err := f.call("List", chain); err != nil {
		return nil, err
	}
	rules, ok := f.chains[chain]
	if !ok {
		return nil, fmt.Errorf("no chain %s", chain)
	}
	out := []string{"-N " + chain}
	if slices.Contains(builtins, chain) {
		out[0] = "-P " + chain + " ACCEPT"
	}
	for _, r := range rules {
		out = append(out, "-A "+chain+" "+r)
	}
	return out, nil
}

// ListChains implements firewall.Table.
func (f *Fake) ListChains() ([]string, error) {
	if err := f.call("ListChains"); err != nil {
		return nil, err
	}
	names := slices.Clone(builtins)
	var user []string
	for c := range f.chains {
		if !slices.Contains(builtins, c) {
			user = append(user, c)
		}
	}
	slices.Sort(user)
	return append(names, user...), nil
}

// Dump is the whole table in "iptables -S" order: built-in chains first,
// then user chains sorted, then every chain's rules.
func (f *Fake) Dump() string {
	var names []string
	for c := range f.chains {
		if !slices.Contains(builtins, c) {
			names = append(names, c)
		}
	}
	slices.Sort(names)
	names = append(slices.Clone(builtins), names...)
	var lines []string
	for _, c := range names {
		if slices.Contains(builtins, c) {
			lines = append(lines, "-P "+c+" ACCEPT")
		} else {
			lines = append(lines, "-N "+c)
		}
	}
	for _, c := range names {
		for _, r := range f.chains[c] {
			lines = append(lines, "-A "+c+" "+r)
		}
	}
	return strings.Join(lines, "\n") + "\n"
}

// Restore is iptables-restore --noflush for the scripts the shim writes:
// ":CHAIN - [0:0]" declares a chain (and empties it), "-A CHAIN SPEC"
// appends, "-I CHAIN [1] SPEC" inserts at the top, "-C CHAIN SPEC" fails
// unless the rule is there, between "*filter" and
// "COMMIT": all or nothing, like the real one. Fail["Restore"] makes it
// fail.
func (f *Fake) Restore(script string) error {
	if err := f.call("Restore", fmt.Sprint(strings.Count(script, "\n"))); err != nil {
		return err
	}
	next := maps.Clone(f.chains)
	for _, line := range strings.Split(strings.TrimSuffix(script, "\n"), "\n") {
		w := strings.Fields(line)
		switch {
		case line == "*filter" || line == "COMMIT":
		case len(w) == 3 && strings.HasPrefix(w[0], ":"):
			next[w[0][1:]] = nil
		case len(w) > 2 && w[0] == "-C":
			if err := f.checkJump(w[2:]); err != nil {
				return fmt.Errorf("iptables-restore: line %q: %v", line, err)
			}
			if !slices.Contains(next[w[1]], saved(w[2:])) {
				return fmt.Errorf("iptables-restore: line %q failed: Bad rule (does a matching rule exist in that chain?)", line)
			}
		case len(w) > 2 && (w[0] == "-I" || w[0] == "-A"):
			if _, ok := next[w[1]]; !ok {
				return fmt.Errorf("iptables-restore: line %q: no chain %s", line, w[1])
			}
			spec := w[2:]
			if w[0] == "-I" && spec[0] == "1" {
				spec = spec[1:]
			}
			if w[0] == "-I" {
				next[w[1]] = slices.Insert(slices.Clone(next[w[1]]), 0, saved(spec))
			} else {
				next[w[1]] = append(slices.Clone(next[w[1]]), saved(spec))
			}
		default:
			return fmt.Errorf("fake iptables-restore does not know %q", line)
		}
	}
	f.chains = next
	return nil
}

// Wipe removes a chain and every jump to it, without recording a call:
// what a firewall reload does behind the shim's back ("iptables -F;
// iptables -X", "nft flush ruleset"). An empty chain name wipes every
// chain but the built-in ones, and empties those.
func (f *Fake) Wipe(chain string) {
	for c, rules := range f.chains {
		if chain == "" || c == chain {
			if slices.Contains(builtins, c) {
				f.chains[c] = nil
			} else {
				delete(f.chains, c)
			}
			continue
		}
		f.chains[c] = slices.DeleteFunc(rules, func(r string) bool { return strings.HasSuffix(r, "-j "+chain) })
	}
}

// Empty flushes a chain without recording a call ("iptables -F CHAIN"
// behind the shim's back).
func (f *Fake) Empty(chain string) { f.chains[chain] = nil }
