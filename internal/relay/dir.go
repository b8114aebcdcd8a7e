package relay

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

// CheckDir refuses an outbox directory that another local user could
// write to, or could have made: the relay runs as root, and a file
// planted there would be sent to the proxies as a ban or unban, or a
// link planted there would have root write through it.
//
// The directory and every parent must belong to root or to the user the
// relay runs as, and must not be writable by group or others. A parent
// that is world-writable with the sticky bit and belongs to root (/tmp)
// is accepted: in it, no one can remove or rename the entries of
// another, so a directory below it that passes these checks stays ours.
func CheckDir(dir string) error { return checkDir(dir, "") }

// checkDir checks dir as the outbox directory (child empty) or as the
// parent of child, which is about to be made in it.
func checkDir(dir, child string) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	euid := uint32(os.Geteuid())
	for p := abs; ; p, child = filepath.Dir(p), p {
		st, err := os.Lstat(p)
		if err != nil {
			return err
		}
		sys, ok := st.Sys().(*syscall.Stat_t)
		if !ok {
			return fmt.Errorf("cannot read the owner of %s", p)
		}
		mode := st.Mode()
		switch {
		case mode&os.ModeSymlink != 0 && child == "":
			return fmt.Errorf("outbox directory %s is a symbolic link; the relay never follows one there: set outbox_dir to the real path", p)
		case mode&os.ModeSymlink != 0:
			// A parent may be a link (/var/run -> /run) if root or we
			// own it: what it points to is checked in its turn.
			if sys.Uid != 0 && sys.Uid != euid {
				return fmt.Errorf("%s, a parent of the outbox directory, is a link owned by uid %d; use outbox_dir on a path only root controls", p, sys.Uid)
			}
			target, err := filepath.EvalSymlinks(p)
			if err != nil {
				return err
			}
			if err := CheckDir(target); err != nil {
				return err
			}
		case !mode.IsDir():
			return fmt.Errorf("%s is not a directory", p)
		case sys.Uid != 0 && sys.Uid != euid:
			return fmt.Errorf("%s belongs to uid %d, not to root or to the relay's user (uid %d): another user could plant operations or links there; use a directory that root owns (chown root:root %s), or set outbox_dir elsewhere", p, sys.Uid, euid, p)
		case mode.Perm()&0o022 != 0 && child != "" && mode&os.ModeSticky != 0 && sys.Uid == 0:
			// /tmp: see above.
		case mode.Perm()&0o022 != 0:
			return fmt.Errorf("%s is writable by its group or by others (mode %#o): another user could plant operations or links there; chmod go-w %s, or set outbox_dir to a directory only root can write, such as /var/lib/fail2ban/f2b-shim", p, sys.Mode&0o7777, p)
		}
		if p == filepath.Dir(p) {
			return nil
		}
	}
}

// MakeDir creates the outbox directory and what is missing of its
// parents (mode 0700), checking the first that exists as their parent,
// and each it makes before it makes the next one in it.
func MakeDir(dir string) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	var missing []string
	p := abs
	for {
		if _, err := os.Lstat(p); err == nil {
			break
		} else if !errors.Is(err, os.ErrNotExist) {
			return err
		}
		missing = append(missing, p)
		if p == filepath.Dir(p) {
			break
		}
		p = filepath.Dir(p)
	}
	// p is checked as the parent of what is made in it: /tmp is fine
	// there, though not as the outbox itself.
	child := ""
	if len(missing) > 0 {
		child = missing[len(missing)-1]
	}
	if err := checkDir(p, child); err != nil {
		return fmt.Errorf("refusing the outbox directory %s: %w", abs, err)
	}
	for i := len(missing) - 1; i >= 0; i-- {
		beforeMkdir(missing[i])
		if err := os.Mkdir(missing[i], 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			return err
		}
		// Checked before anything is made in it: in a sticky /tmp,
		// another user may have made it (or a link by its name) first,
		// and a mkdir below it would follow that link. Once it is
		// checked, no one else can rename it.
		if err := CheckDir(missing[i]); err != nil {
			return fmt.Errorf("refusing the outbox directory %s: %w", abs, err)
		}
	}
	if err := CheckDir(abs); err != nil {
		return fmt.Errorf("refusing the outbox directory %s: %w", abs, err)
	}
	return nil
}

// beforeMkdir is called before each directory MakeDir makes: a test
// plays there the other user who wins the race between the look and
// the mkdir.
var beforeMkdir = func(string) {}
