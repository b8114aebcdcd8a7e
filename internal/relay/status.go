package relay

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/safefile"
)

// ProxyStatus is what one proxy has not taken from a jail's outbox.
type ProxyStatus struct {
	Proxy   string
	Pending int
	// Oldest is when the oldest pending operation was taken (zero when
	// none is pending, or the file is older than the timestamps).
	Oldest time.Time
	// LastError is the proxy's last error while it is down, and when.
	LastError   string
	LastErrorAt time.Time
}

// JailStatus is one jail's outbox, as "f2b-shim outbox" shows it.
type JailStatus struct {
	Jail    string
	Dir     string
	Live    int
	Proxies []ProxyStatus
	// Skipped says what the load skipped (torn or foreign lines).
	Skipped []string
}

// ReadStatus reads every jail's outbox under dir (outbox_dir) without
// taking its lock or changing anything: a running relay goes on.
func ReadStatus(dir string) ([]JailStatus, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []JailStatus
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		jdir := filepath.Join(dir, e.Name())
		if _, err := os.Lstat(filepath.Join(jdir, "lock")); err != nil {
			continue // not an outbox
		}
		st, err := readJail(jdir)
		if err != nil {
			return nil, err
		}
		st.Jail = e.Name()
		out = append(out, st)
	}
	return out, nil
}

func readJail(dir string) (JailStatus, error) {
	st := JailStatus{Dir: dir}
	o := &Outbox{dir: dir, byAddr: map[netip.Prefix]uint64{}, cursors: map[string]uint64{}, backlog: map[string]int{},
		logf: func(_, format string, a ...any) { st.Skipped = append(st.Skipped, oneLine(fmt.Sprintf(format, a...))) }}
	if err := o.load(); err != nil {
		return st, err
	}
	st.Live = o.live()
	// Not filepath.Glob: the directory's own name may hold a pattern's
	// characters ("[").
	entries, err := os.ReadDir(dir)
	if err != nil {
		return st, err
	}
	for _, e := range entries {
		proxy, ok := strings.CutPrefix(e.Name(), "cursor.")
		if !ok || strings.HasSuffix(proxy, ".tmp") {
			continue
		}
		c, err := readNumber(filepath.Join(dir, e.Name()))
		if err != nil {
			// Said, and counted as nothing taken: what is shown
			// errs on the side of pending.
			st.Skipped = append(st.Skipped, fmt.Sprintf("the cursor of %s cannot be read (%v); counted as nothing taken", proxy, err))
			c = 0
		}
		ps := ProxyStatus{Proxy: proxy}
		for _, op := range o.ops[o.index(c+1):] {
			if op.Kind == dead {
				continue
			}
			if ps.Pending == 0 && op.At != 0 {
				ps.Oldest = time.Unix(op.At, 0)
			}
			ps.Pending++
		}
		ps.LastError, ps.LastErrorAt = readError(filepath.Join(dir, "error."+proxy))
		st.Proxies = append(st.Proxies, ps)
	}
	slices.SortFunc(st.Proxies, func(a, b ProxyStatus) int { return strings.Compare(a.Proxy, b.Proxy) })
	return st, nil
}

// readError reads an error file: "UNIXTIME MESSAGE".
func readError(path string) (string, time.Time) {
	f, err := safefile.Open(path, os.O_RDONLY, 0)
	if err != nil {
		return "", time.Time{}
	}
	defer f.Close()
	buf := make([]byte, 4096)
	n, _ := f.Read(buf)
	at, msg, _ := strings.Cut(strings.TrimSpace(string(buf[:n])), " ")
	sec, err := strconv.ParseInt(at, 10, 64)
	if err != nil {
		return msg, time.Time{}
	}
	return msg, time.Unix(sec, 0)
}

// initCursors writes a cursor file for each proxy that has none, so that
// "f2b-shim outbox" lists a proxy that never took anything.
//
// It removes the cursor and error files of a proxy that is no longer
// among the jail's proxies: nothing is delivered to it any more, and
// "f2b-shim outbox" would otherwise list it as pending for ever.
func (o *Outbox) initCursors(proxies []string) {
	known := map[string]bool{}
	for _, p := range proxies {
		known[safeName(p)] = true
	}
	if entries, err := os.ReadDir(o.dir); err == nil {
		for _, e := range entries {
			name, ok := strings.CutPrefix(e.Name(), "cursor.")
			if !ok {
				name, ok = strings.CutPrefix(e.Name(), "error.")
			}
			if !ok || known[strings.TrimSuffix(name, ".tmp")] {
				continue
			}
			if os.Remove(filepath.Join(o.dir, e.Name())) == nil && strings.HasPrefix(e.Name(), "cursor.") && !strings.HasSuffix(name, ".tmp") {
				o.logf("info", "outbox %s: proxy %s is no longer among the jail's proxies: forgotten", o.dir, name)
			}
		}
	}
	for _, p := range proxies {
		if _, err := os.Lstat(o.cursorPath(p)); errors.Is(err, os.ErrNotExist) {
			_ = writeAside(o.dir, o.cursorPath(p), []byte(strconv.FormatUint(o.cursors[p], 10)+"\n"), false)
		}
	}
}
