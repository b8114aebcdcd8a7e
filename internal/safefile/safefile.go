// Package safefile opens the files that f2b-shim keeps in directories
// its own user owns: state_dir and the audit log's directory.
//
// In the least-privilege install those directories belong to the f2b-shim
// user, and root runs admin commands (restore at boot, list, reconcile)
// on the same files. Whoever controls the user (a compromised mail host
// that found a bug in the shim) could plant a symlink or a hard link
// there, to make root create, append to or hand over a file elsewhere.
// So every file is opened without following symlinks, must be a regular
// file with one link, and must belong to the directory's owner; a file
// root creates there is given to the directory's owner, so that the user
// can go on using it.
package safefile

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

// Open opens path like os.OpenFile, safely for a directory that another
// user may own. With os.O_CREATE it creates the file when it is missing.
func Open(path string, flag int, perm os.FileMode) (*os.File, error) {
	dir, err := os.Stat(filepath.Dir(path))
	if err != nil {
		return nil, err
	}
	dirSys, ok := dir.Sys().(*syscall.Stat_t)
	if !ok {
		return nil, fmt.Errorf("cannot read the owner of %s", filepath.Dir(path))
	}
	// O_NONBLOCK: opening a FIFO would otherwise wait for its other
	// end, so one planted in place of a file would hang root's command
	// before check could refuse it. On a regular file it changes
	// nothing.
	base := flag&^(os.O_CREATE|os.O_EXCL) | syscall.O_NOFOLLOW | syscall.O_CLOEXEC | syscall.O_NONBLOCK
	if flag&os.O_CREATE != 0 {
		// Created here, now: no one else can have linked it anywhere.
		f, err := os.OpenFile(path, base|os.O_CREATE|os.O_EXCL, perm)
		if err == nil {
			if os.Geteuid() == 0 && dirSys.Uid != 0 {
				if err := f.Chown(int(dirSys.Uid), int(dirSys.Gid)); err != nil {
					f.Close()
					return nil, err
				}
			}
			return f, nil
		}
		if !errors.Is(err, os.ErrExist) {
			return nil, err
		}
	}
	f, err := os.OpenFile(path, base, perm)
	if errors.Is(err, syscall.ELOOP) {
		return nil, fmt.Errorf("%s is a symbolic link; f2b-shim never follows links in its own directories: remove it", path)
	}
	if err != nil {
		return nil, err
	}
	if err := check(f, path, dirSys.Uid); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// check accepts an existing file only if it is a regular file with a
// single link that belongs to the directory's owner.
func check(f *os.File, path string, dirUID uint32) error {
	st, err := f.Stat()
	if err != nil {
		return err
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	switch {
	case !ok:
		return fmt.Errorf("cannot read the owner of %s", path)
	case !st.Mode().IsRegular():
		return fmt.Errorf("%s is not a regular file; remove it", path)
	case sys.Nlink != 1:
		return fmt.Errorf("%s has %d hard links; it may be linked to a file elsewhere: remove it", path, sys.Nlink)
	case sys.Uid != dirUID:
		return fmt.Errorf("%s belongs to uid %d, not to its directory's owner (uid %d); remove it, or chown it to the directory's owner", path, sys.Uid, dirUID)
	}
	return nil
}
