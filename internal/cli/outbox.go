package cli

import (
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/relay"
)

// runOutbox is "f2b-shim outbox [--dir DIR]", on the mail host: what each
// jail's relay has not yet delivered, per proxy, and why. Exit 0 when
// every proxy has everything, 1 when something is pending.
func runOutbox(args []string, stdout, stderr io.Writer, now func() time.Time) int {
	fs := newFlagSet("outbox")
	dir := fs.String("dir", mailHostOutboxDir, "proxy-stream.py's outbox_dir")
	if err := fs.Parse(args); err != nil {
		return usageError(stderr, "outbox: "+err.Error())
	}
	if fs.NArg() > 0 {
		return usageError(stderr, "outbox takes only --dir DIR")
	}
	jails, err := relay.ReadStatus(*dir)
	if errors.Is(err, os.ErrNotExist) {
		fmt.Fprintf(stdout, "no outbox in %s: no stream jail has run here\n", *dir)
		return ExitOK
	}
	if err != nil {
		fmt.Fprintf(stderr, "f2b-shim: outbox: %s\nf2b-shim: hint: run it as root, with --dir set to the action's outbox_dir\n", relay.Printable(err.Error()))
		return ExitSetup
	}
	if len(jails) == 0 {
		fmt.Fprintf(stdout, "no outbox in %s: no stream jail has run here\n", *dir)
		return ExitOK
	}
	code := ExitOK
	for _, j := range jails {
		fmt.Fprintf(stdout, "%s (%s): %d operation(s) kept\n", relay.Printable(j.Jail), relay.Printable(j.Dir), j.Live)
		for _, s := range j.Skipped {
			fmt.Fprintf(stdout, "  note: %s\n", relay.Printable(s))
		}
		for _, p := range j.Proxies {
			line := "everything delivered"
			if p.Pending > 0 {
				code = ExitCheckFalse
				line = fmt.Sprintf("%d pending", p.Pending)
				if !p.Oldest.IsZero() {
					line += fmt.Sprintf(", the oldest %s old", age(now(), p.Oldest))
				}
			}
			if p.LastError != "" {
				line += "; last error"
				if !p.LastErrorAt.IsZero() {
					line += fmt.Sprintf(" %s ago", age(now(), p.LastErrorAt))
				}
				line += ": " + relay.Printable(p.LastError)
			}
			fmt.Fprintf(stdout, "  %s: %s\n", relay.Printable(p.Proxy), line)
		}
	}
	return code
}

func age(now, t time.Time) time.Duration {
	return max(0, now.Sub(t)).Round(time.Second)
}
