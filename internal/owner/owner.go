// Package owner keeps files that root creates in the shim's directories
// usable by the shim's own user: in the least-privilege install, an admin
// running "f2b-shim list" or "restore" as root must not leave a root-only
// lock file or audit log that the f2b-shim user then cannot open.
package owner

import (
	"os"
	"path/filepath"
	"syscall"
)

// Inherit gives path the owner and group of its directory, when root
// made it and the directory belongs to someone else. It changes nothing
// for other users, or in root mode, where the directories are root's.
func Inherit(path string) error {
	if os.Geteuid() != 0 {
		return nil
	}
	st, err := os.Stat(filepath.Dir(path))
	if err != nil {
		return err
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok || sys.Uid == 0 {
		return nil
	}
	return os.Lchown(path, int(sys.Uid), int(sys.Gid))
}
