package fwtest

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/policy"
)

// FakeSets is an in-memory ipset of hash:net sets, with ipset's answers
// for duplicates, absent entries, full sets and missing sets.
type FakeSets struct {
	sets    map[string][]netip.Prefix
	maxelem map[string]int
	Calls   []string
	// tables hold the rules that reference the sets, as the kernel counts
	// them for References.
	tables []*Fake
}

// NewSets returns a FakeSets with no set, whose rules live in tables.
func NewSets(tables ...*Fake) *FakeSets {
	return &FakeSets{sets: map[string][]netip.Prefix{}, maxelem: map[string]int{}, tables: tables}
}

// References implements firewall.Sets: the rules of the table that match
// the set.
func (f *FakeSets) References(name string) (int, error) {
	f.call("references %s", name)
	if _, ok := f.sets[name]; !ok {
		return 0, firewall.ErrNoSet
	}
	n := 0
	for _, t := range f.tables {
		for _, rules := range t.chains {
			for _, r := range rules {
				if strings.Contains(r, "--match-set "+name+" ") {
					n++
				}
			}
		}
	}
	return n, nil
}

var _ firewall.Sets = (*FakeSets)(nil)

func (f *FakeSets) call(format string, args ...any) {
	f.Calls = append(f.Calls, fmt.Sprintf(format, args...))
}

// Create implements firewall.Sets.
func (f *FakeSets) Create(name string, fam policy.Family, maxelem int) error {
	f.call("create %s %s %d", name, fam, maxelem)
	if _, ok := f.sets[name]; !ok {
		f.sets[name], f.maxelem[name] = nil, maxelem
	}
	return nil
}

// Add implements firewall.Sets.
func (f *FakeSets) Add(name, entry string) (bool, error) {
	f.call("add %s %s", name, entry)
	set, ok := f.sets[name]
	if !ok {
		return false, firewall.ErrNoSet
	}
	p := netip.MustParsePrefix(entry)
	if slices.Contains(set, p) {
		return false, nil
	}
	if len(set) >= f.maxelem[name] {
		return false, firewall.ErrSetFull
	}
	f.sets[name] = append(set, p)
	return true, nil
}

// Del implements firewall.Sets.
func (f *FakeSets) Del(name, entry string) (bool, error) {
	f.call("del %s %s", name, entry)
	p := netip.MustParsePrefix(entry)
	i := slices.Index(f.sets[name], p)
	if i < 0 {
		return false, nil
	}
	f.sets[name] = slices.Delete(f.sets[name], i, i+1)
	return true, nil
}

// Test implements firewall.Sets, matching like hash:net: an entry is in
// the set when a member contains it.
func (f *FakeSets) Test(name, entry string) (bool, error) {
	f.call("test %s %s", name, entry)
	p := netip.MustParsePrefix(entry)
	for _, m := range f.sets[name] {
		if m.Bits() <= p.Bits() && m.Contains(p.Addr()) {
			return true, nil
		}
	}
	return false, nil
}

// Flush implements firewall.Sets.
func (f *FakeSets) Flush(name string) error {
	f.call("flush %s", name)
	if _, ok := f.sets[name]; ok {
		f.sets[name] = nil
	}
	return nil
}

// Destroy implements firewall.Sets.
func (f *FakeSets) Destroy(name string) error {
	f.call("destroy %s", name)
	delete(f.sets, name)
	delete(f.maxelem, name)
	return nil
}

// Members implements firewall.Sets.
func (f *FakeSets) Members(name string) ([]string, error) {
	var out []string
	for _, p := range f.sets[name] {
		out = append(out, p.String())
	}
	return out, nil
}

// Names lists the sets that exist.
func (f *FakeSets) Names() []string {
	var out []string
	for n := range f.sets {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}
