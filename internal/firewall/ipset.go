package firewall

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"

	"github.com/f2b-shim/f2b-shim/policy"
)

// Sets is the narrow interface to ipset that the set backend needs.
type Sets interface {
	// Create makes a hash:net set of the family, if it does not exist.
	Create(name string, fam policy.Family, maxelem int) error
	// Add reports false when the entry was there already; ErrSetFull
	// when the set holds maxelem entries.
	Add(name, entry string) (bool, error)
	// Del reports false when the entry, or the set, was not there.
	Del(name, entry string) (bool, error)
	// Test reports whether the set matches the entry.
	Test(name, entry string) (bool, error)
	// Flush and Destroy do nothing to a set that does not exist.
	Flush(name string) error
	Destroy(name string) error
	// Members lists a set's entries; none for a set that does not exist.
	Members(name string) ([]string, error)
	// References counts the iptables rules that use the set.
	References(name string) (int, error)
}

// ErrSetFull is returned when a ban set already holds max_bans_per_chain entries.
var ErrSetFull = errors.New("set is full")

// SetName is the ipset that holds a chain's bans with one target. The
// name is derived, not chosen, so that every part of the shim (apply,
// list, restore, reconcile) finds the same set; ipset allows 31 bytes,
// too few for a chain name plus a reject type, hence the hash.
func SetName(fam policy.Family, chain policy.Chain, t policy.Target) string {
	sum := sha256.Sum256([]byte(fmt.Sprintf("%s %s %s", fam, chain, t)))
	return "f2b-" + hex.EncodeToString(sum[:6])
}

// setNames lists every set a chain may have under the policy: one per
// target it allows. -F and -X use it to clean up.
func setNames(fam policy.Family, chain policy.Chain, pol *policy.Policy) []string {
	var out []string
	for _, t := range PolicyTargets(fam, pol) {
		out = append(out, SetName(fam, chain, t))
	}
	return out
}

// PolicyTargets lists the targets a policy allows for a family.
func PolicyTargets(fam policy.Family, pol *policy.Policy) []policy.Target {
	var out []policy.Target
	for _, name := range pol.Targets {
		if name == "DROP" {
			out = append(out, policy.Target{Kind: policy.Drop})
			continue
		}
		for _, with := range pol.RejectWith {
			if policy.RejectFamily(with) == fam {
				out = append(out, policy.Target{Kind: policy.Reject, RejectWith: with})
			}
		}
	}
	return out
}

// IPSet is the real Sets, running the ipset tool from a system directory.
type IPSet struct {
	path string
}

// OpenIPSet finds the ipset tool.
func OpenIPSet() (*IPSet, error) {
	for _, dir := range systemDirs {
		p := dir + "/ipset"
		if _, err := exec.LookPath(p); err == nil {
			return &IPSet{path: p}, nil
		}
	}
	return nil, fmt.Errorf("ipset not found in %s; install the ipset package, or set backend = \"rules\" in the policy", strings.Join(systemDirs, ", "))
}

func (s *IPSet) run(args ...string) (string, error) { return runTool(s.path, "", args...) }

// says reports whether err is ipset's message containing text.
func says(err error, text string) bool {
	var ce *CommandError
	return errors.As(err, &ce) && strings.Contains(ce.Stderr, text)
}

const noSet = "does not exist"

// Create implements Sets.
func (s *IPSet) Create(name string, fam policy.Family, maxelem int) error {
	family := "inet"
	if fam == policy.IPv6 {
		family = "inet6"
	}
	_, err := s.run("create", name, "hash:net", "family", family, "maxelem", strconv.Itoa(maxelem), "-exist")
	return err
}

// Add implements Sets.
func (s *IPSet) Add(name, entry string) (bool, error) {
	_, err := s.run("add", name, entry)
	switch {
	case err == nil:
		return true, nil
	case says(err, "already added"):
		return false, nil
	case says(err, "is full"):
		return false, ErrSetFull
	}
	return false, err
}

// Del implements Sets.
func (s *IPSet) Del(name, entry string) (bool, error) {
	_, err := s.run("del", name, entry)
	if err != nil && (says(err, "not added") || says(err, noSet)) {
		return false, nil
	}
	return err == nil, err
}

// Test implements Sets.
func (s *IPSet) Test(name, entry string) (bool, error) {
	_, err := s.run("test", name, entry)
	var ce *CommandError
	if errors.As(err, &ce) && ce.Status == 1 && (strings.Contains(ce.Stderr, "NOT in set") || strings.Contains(ce.Stderr, noSet)) {
		return false, nil
	}
	return err == nil, err
}

// Flush implements Sets.
func (s *IPSet) Flush(name string) error {
	if _, err := s.run("flush", name); err != nil && !says(err, noSet) {
		return err
	}
	return nil
}

// Destroy implements Sets.
func (s *IPSet) Destroy(name string) error {
	if _, err := s.run("destroy", name); err != nil && !says(err, noSet) {
		return err
	}
	return nil
}

// Members implements Sets.
func (s *IPSet) Members(name string) ([]string, error) {
	out, err := s.run("list", name)
	if err != nil {
		if says(err, noSet) {
			return nil, nil
		}
		return nil, err
	}
	_, members, _ := strings.Cut(out, "Members:\n")
	return strings.Fields(members), nil
}

// Restore feeds an "ipset restore" script: one call for any number of
// entries.
func (s *IPSet) Restore(script string) error {
	_, err := runTool(s.path, script, "restore", "-exist")
	return err
}
