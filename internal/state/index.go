package state

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/f2b-shim/f2b-shim/policy"
)

// Index records which bans the rule backend has put into each chain, one
// empty file per ban in state_dir/bans/FAMILY/CHAIN/, and their number.
// It lets a ban skip reading the whole chain, which on iptables-nft costs
// as much as the chain is long. It is a cache of the firewall, never the
// record of truth: it is rebuilt from the live chain whenever it is
// missing, and restore and reconcile --fix drop it.
//
// A crash never costs a ban or doubles one: a ban is marked pending
// before its rule goes in or comes out, and settled after; a ban found
// pending (its shim was stopped halfway) is checked against the chain.
type Index struct {
	Dir string
}

func (x Index) chainDir(fam policy.Family, chain policy.Chain) string {
	return filepath.Join(x.Dir, "bans", fam.String(), string(chain))
}

// file names a ban by its rule: the address with "_" for "/", a comma,
// the target with "_" for spaces.
func (x Index) file(op policy.Operation) string {
	name := strings.ReplaceAll(op.Source.String(), "/", "_") + "," + strings.ReplaceAll(op.Target.String(), " ", "_")
	return filepath.Join(x.chainDir(op.Family, op.Chain), name)
}

// Known reports whether the index has an entry for the chain at all.
func (x Index) Known(fam policy.Family, chain policy.Chain) bool {
	_, err := os.Stat(filepath.Join(x.chainDir(fam, chain), "count"))
	return err == nil
}

// Build replaces the chain's entry with the given bans.
func (x Index) Build(fam policy.Family, chain policy.Chain, bans []policy.Operation) error {
	dir := x.chainDir(fam, chain)
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return err
	}
	for _, b := range bans {
		if err := os.WriteFile(x.file(b), nil, 0o640); err != nil {
			return err
		}
	}
	return x.setCount(fam, chain, len(bans))
}

// Has reports whether the index lists the ban.
func (x Index) Has(op policy.Operation) bool {
	_, err := os.Stat(x.file(op))
	return err == nil
}

// Count is the number of bans the index lists for the chain.
func (x Index) Count(fam policy.Family, chain policy.Chain) (int, error) {
	data, err := os.ReadFile(filepath.Join(x.chainDir(fam, chain), "count"))
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(data)))
}

func (x Index) setCount(fam policy.Family, chain policy.Chain, n int) error {
	return os.WriteFile(filepath.Join(x.chainDir(fam, chain), "count"), []byte(strconv.Itoa(n)+"\n"), 0o640)
}

// MarkPending notes that a ban's rule is about to go in.
func (x Index) MarkPending(op policy.Operation) error {
	return os.WriteFile(x.file(op)+".pending", nil, 0o640)
}

// Pending reports whether a ban was marked pending and never listed.
func (x Index) Pending(op policy.Operation) bool {
	_, err := os.Stat(x.file(op) + ".pending")
	return err == nil
}

// Add lists a ban that is now in the firewall.
func (x Index) Add(op policy.Operation) error {
	n, err := x.Count(op.Family, op.Chain)
	if err != nil {
		return err
	}
	if err := os.WriteFile(x.file(op), nil, 0o640); err != nil {
		return err
	}
	if err := os.Remove(x.file(op) + ".pending"); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return x.setCount(op.Family, op.Chain, n+1)
}

// Settle clears a ban's pending mark once its rule has come out.
func (x Index) Settle(op policy.Operation) error {
	if err := os.Remove(x.file(op) + ".pending"); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// Remove unlists a ban that is about to leave the firewall, leaving it
// pending until Settle.
func (x Index) Remove(op policy.Operation) error {
	if err := x.MarkPending(op); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	err := os.Remove(x.file(op))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	n, err := x.Count(op.Family, op.Chain)
	if err != nil {
		return err
	}
	return x.setCount(op.Family, op.Chain, max(0, n-1))
}

// Drop forgets a chain.
func (x Index) Drop(fam policy.Family, chain policy.Chain) error {
	return os.RemoveAll(x.chainDir(fam, chain))
}

// DropAll forgets every chain.
func (x Index) DropAll() error { return os.RemoveAll(filepath.Join(x.Dir, "bans")) }
