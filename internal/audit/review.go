package audit

import (
	"bufio"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/f2b-shim/f2b-shim/policy"
)

// Entry is one audit line as read back: the raw bytes, for --json, and
// the record parsed from them.
type Entry struct {
	Raw    []byte
	Record Record
}

// Read reads the audit log and its rotations (path.N and path.N.gz, as
// logrotate names them), oldest first. Lines that do not parse are
// reported, not fatal: the log is evidence, and the rest still counts.
func Read(path string) ([]Entry, []string, error) {
	files, err := rotations(path)
	if err != nil {
		return nil, nil, err
	}
	var out []Entry
	var bad []string
	for _, f := range files {
		entries, problems, err := readFile(f)
		if err != nil {
			return nil, nil, err
		}
		out = append(out, entries...)
		bad = append(bad, problems...)
	}
	return out, bad, nil
}

// ReadCurrent reads the current audit log only, not its rotations.
func ReadCurrent(path string) ([]Entry, []string, error) {
	entries, bad, err := readFile(path)
	if os.IsNotExist(err) {
		return nil, nil, nil
	}
	return entries, bad, err
}

// ScanCurrent calls fn with each record of the current audit log, one at
// a time, and keeps none: "f2b-shim metrics" reads the log every minute,
// and its memory must not grow with the log. A line that is not a record
// is counted in bad. A missing log has no records. A log that cannot be
// read to its end is an error: what was read of it is not a count.
func ScanCurrent(path string, fn func(Record)) (bad int, err error) {
	err = scanLog(path, func(_ int, line []byte) {
		var r Record
		if json.Unmarshal(line, &r) != nil {
			bad++
			return
		}
		fn(r)
	})
	var open *openError
	switch {
	case errors.As(err, &open) && os.IsNotExist(open.err):
		return 0, nil
	case errors.As(err, &open):
		return bad, open.err
	case err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, bufio.ErrTooLong):
		return bad, err
	case err != nil:
		bad++
	}
	return bad, nil
}

// rotations lists path's rotated files, the highest number (the oldest)
// first, then path itself.
func rotations(path string) ([]string, error) {
	matches, err := filepath.Glob(path + ".*")
	if err != nil {
		return nil, err
	}
	type rot struct {
		n    int
		name string
	}
	var rots []rot
	for _, m := range matches {
		suffix := strings.TrimSuffix(strings.TrimPrefix(m, path+"."), ".gz")
		if n, err := strconv.Atoi(suffix); err == nil {
			rots = append(rots, rot{n, m})
		}
	}
	sort.Slice(rots, func(i, j int) bool { return rots[i].n > rots[j].n })
	var out []string
	for _, r := range rots {
		out = append(out, r.name)
	}
	if _, err := os.Stat(path); err == nil {
		out = append(out, path)
	} else if len(out) == 0 {
		return nil, err
	}
	return out, nil
}

func readFile(name string) ([]Entry, []string, error) {
	var out []Entry
	var bad []string
	err := scanLog(name, func(n int, line []byte) {
		var e Entry
		if err := json.Unmarshal(line, &e.Record); err != nil {
			bad = append(bad, fmt.Sprintf("%s:%d: %v", name, n, err))
			return
		}
		e.Raw = slices.Clone(line)
		out = append(out, e)
	})
	var open *openError
	if errors.As(err, &open) {
		return nil, nil, open.err
	}
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		bad = append(bad, fmt.Sprintf("%s: %v", name, err))
	}
	return out, bad, nil
}

// openError is a log file that could not be opened at all, as against
// one whose reading stopped partway (a torn gzip, an overlong line).
type openError struct{ err error }

func (e *openError) Error() string { return e.err.Error() }

// scanLog calls fn for each line of a log file, gzipped (".gz") or not;
// line is only valid during the call.
func scanLog(name string, fn func(n int, line []byte)) error {
	f, err := os.Open(name)
	if err != nil {
		return &openError{err}
	}
	defer f.Close()
	var r io.Reader = f
	if strings.HasSuffix(name, ".gz") {
		gz, err := gzip.NewReader(f)
		if err != nil {
			return &openError{fmt.Errorf("%s: %v", name, err)}
		}
		defer gz.Close()
		r = gz
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for n := 1; sc.Scan(); n++ {
		fn(n, sc.Bytes())
	}
	return sc.Err()
}

// Filter selects audit entries; the zero value selects all.
type Filter struct {
	Since, Until time.Time
	// Client matches the policy name or the ssh client's address.
	Client string
	Denied bool
	// IP matches entries whose ban address holds it.
	IP    netip.Addr
	Chain string
}

// Match reports whether e passes every set condition.
func (f Filter) Match(e Entry) bool {
	r := e.Record
	switch {
	case !f.Since.IsZero() && r.Time.Before(f.Since),
		!f.Until.IsZero() && r.Time.After(f.Until),
		f.Client != "" && f.Client != r.Policy && f.Client != r.ClientIP && f.Client != client(r),
		f.Denied && r.Decision != Deny:
		return false
	}
	if f.IP.IsValid() {
		if r.Op == nil {
			return false
		}
		p, err := netip.ParsePrefix(r.Op.Source)
		if err != nil || !p.Contains(f.IP) {
			return false
		}
	}
	return f.Chain == "" || (r.Op != nil && r.Op.Chain == f.Chain)
}

// ParseWhen reads a --since/--until value: a duration back from now
// ("2h", "30m", "1d", "1d12h"), "today" or "yesterday" (their midnight), a
// clock time today ("14:00"), or a date and time ("2026-11-25",
// "2026-11-25 14:00", RFC 3339). A negative duration is refused: it
// would mean the future.
func ParseWhen(s string, now time.Time) (time.Time, error) {
	switch s {
	case "today":
		y, m, d := now.Local().Date()
		return time.Date(y, m, d, 0, 0, 0, 0, time.Local), nil
	case "yesterday":
		y, m, d := now.Local().Date()
		return time.Date(y, m, d-1, 0, 0, 0, 0, time.Local), nil
	}
	if back, neg := strings.CutPrefix(s, "-"); neg {
		if _, err := policy.ParseDays(back); err == nil {
			return time.Time{}, fmt.Errorf("%q is a negative duration; give how far back, such as \"2h\" or \"1d\"", s)
		}
	}
	if d, err := policy.ParseDays(s); err == nil {
		return now.Add(-d), nil
	}
	for _, layout := range []string{"15:04", "15:04:05"} {
		if t, err := time.ParseInLocation(layout, s, time.Local); err == nil {
			y, m, d := now.Local().Date()
			return time.Date(y, m, d, t.Hour(), t.Minute(), t.Second(), 0, time.Local), nil
		}
	}
	for _, layout := range []string{time.RFC3339, "2006-01-02T15:04", "2006-01-02 15:04:05", "2006-01-02 15:04", "2006-01-02"} {
		if t, err := time.ParseInLocation(layout, s, time.Local); err == nil {
			return t, nil
		}
	}
	return time.Time{}, fmt.Errorf("%q is neither a duration like \"2h\" or \"1d\", \"today\", \"yesterday\", a clock time like \"14:00\", nor a time like \"2026-11-25 14:00\"", s)
}

// WriteTable prints entries as an aligned table.
func WriteTable(w io.Writer, entries []Entry) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "TIME\tCLIENT\tDECISION\tRESULT\tOPERATION\tDETAIL")
	for _, e := range entries {
		r := e.Record
		op, detail := "-", strconv.Quote(string(r.Command))
		if r.Op != nil {
			op = r.Op.Kind + " " + r.Op.Chain
			if r.Op.Source != "" {
				detail = r.Op.Source + " " + r.Op.Target
			}
		}
		if r.Reason != "" {
			detail += ": " + strconv.Quote(string(r.Reason))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", r.Time.Local().Format("2006-01-02 15:04:05"), client(r), r.Decision, r.Result, op, detail)
	}
	tw.Flush()
}

// quoted and addressLike are what varies between denials of one kind:
// the words quoted from the request, and addresses and numbers.
var (
	quoted      = regexp.MustCompile(`"(?:[^"\\]|\\.)*"…?`)
	addressLike = regexp.MustCompile(`[0-9a-fA-F]*[0-9:.][0-9a-fA-F:.]*(/\d+)?`)
)

// reasonKind turns a denial reason into its kind, for counting:
// `address "203.0.113.9/32" overlaps 192.0.2.10/32, which is never banned`
// becomes `address "…" overlaps …, which is never banned`. The text is
// the shim's own words with the client's quoted (escaped), so printing it
// as it is cannot forge anything.
func reasonKind(reason string) string {
	k := quoted.ReplaceAllString(reason, `"…"`)
	k = addressLike.ReplaceAllStringFunc(k, func(m string) string {
		if strings.ContainsAny(m, ".:/") || len(m) > 0 && m[0] >= '0' && m[0] <= '9' {
			return "…"
		}
		return m
	})
	if len(k) > 120 {
		k = k[:120] + "…"
	}
	return k
}

func client(r Record) string {
	if r.ClientIP == "" {
		return r.Policy
	}
	return r.Policy + "@" + r.ClientIP
}

// WriteSummary prints counts per client and decision, the top denial
// reasons, the most banned addresses, and bans per hour.
func WriteSummary(w io.Writer, entries []Entry) {
	type kv struct {
		k string
		n int
	}
	top := func(m map[string]int, limit int) []kv {
		var out []kv
		for k, n := range m {
			out = append(out, kv{k, n})
		}
		sort.Slice(out, func(i, j int) bool { return out[i].n > out[j].n || out[i].n == out[j].n && out[i].k < out[j].k })
		return out[:min(limit, len(out))]
	}
	perClient, reasons, banned, perHour := map[string]int{}, map[string]int{}, map[string]int{}, map[string]int{}
	for _, e := range entries {
		r := e.Record
		perClient[client(r)+"\t"+r.Decision]++
		if r.Decision == Deny {
			reasons[reasonKind(string(r.Reason))] += max(1, r.Count)
		}
		if r.Op != nil && r.Op.Kind == "ban" && r.Result == "applied" {
			banned[r.Op.Source]++
			perHour[r.Time.Local().Format("2006-01-02 15:00")]++
		}
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "%d requests\n\nCLIENT\tDECISION\tCOUNT\n", len(entries))
	for _, c := range top(perClient, len(perClient)) {
		fmt.Fprintf(tw, "%s\t%d\n", c.k, c.n)
	}
	fmt.Fprintf(tw, "\nTOP DENIAL REASONS, BY KIND\tCOUNT\n")
	for _, c := range top(reasons, 10) {
		fmt.Fprintf(tw, "%s\t%d\n", c.k, c.n)
	}
	fmt.Fprintf(tw, "\nMOST BANNED ADDRESSES\tBANS\n")
	for _, c := range top(banned, 10) {
		fmt.Fprintf(tw, "%s\t%d\n", c.k, c.n)
	}
	tw.Flush()
	fmt.Fprintf(w, "\nBANS PER HOUR\n")
	hours := make([]string, 0, len(perHour))
	most := 0
	for h, n := range perHour {
		hours = append(hours, h)
		most = max(most, n)
	}
	slices.Sort(hours)
	const width = 40 // the longest bar, in characters
	for _, h := range hours {
		bar := max(1, perHour[h]*width/most)
		fmt.Fprintf(w, "%s  %-*s %d\n", h, width, strings.Repeat("#", bar), perHour[h])
	}
}
