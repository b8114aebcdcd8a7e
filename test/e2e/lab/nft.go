package lab

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/f2b-shim/f2b-shim/test/netns"
)

// What the nftables backend's tests add to the lab: a proxy whose sshd
// cannot run iptables or ipset, the shim under strace, a second address
// on the attacker's side and a second port on the proxy for the
// enforcement checks, and reading the shim's nftables table with nft
// (the program, not the shim's own code: the check must not share the
// shim's bugs).
const (
	// BystanderV4 and BystanderV6 sit on the attacker's link: a source
	// that is never banned, which must get through while the attacker
	// does not.
	BystanderV4 = "203.0.113.50"
	BystanderV6 = "2001:db8:203::50"
	// OtherPort is a port the proxy serves that no multiport or oneport
	// hook of the jail covers (allports does).
	OtherPort = "8143"
	// NFTTable is the policy's nftables_table default.
	NFTTable = "f2b_shim"
)

// hiddenPatterns are the programs a proxy on the nftables backend does
// without: every iptables front-end and variant, and ipset.
var hiddenPatterns = []string{"iptables*", "ip6tables*", "xtables-*", "ipset*", "arptables*", "ebtables*"}

// hiddenDirs are where they live on Debian (with /sbin a link to
// usr/sbin, which EvalSymlinks folds).
var hiddenDirs = []string{"/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/sbin", "/usr/local/bin"}

// HiddenPrograms are the program names the proxy's sshd cannot run with
// HideFirewallPrograms, e.g. /usr/sbin/iptables-nft-restore.
func HiddenPrograms() []string {
	var names []string
	for _, d := range hiddenDirs {
		for _, p := range hiddenPatterns {
			m, _ := filepath.Glob(filepath.Join(d, p))
			names = append(names, m...)
		}
	}
	return names
}

// hiddenTargets are the files behind HiddenPrograms: a bind mount over a
// symbolic link lands on the file it points to, so these are what is
// covered, once each.
func hiddenTargets() ([]string, error) {
	var targets []string
	for _, n := range HiddenPrograms() {
		real, err := filepath.EvalSymlinks(n)
		if err != nil {
			continue // a dangling alternative: nothing to run
		}
		if fi, err := os.Stat(real); err == nil && fi.Mode().IsRegular() && !slices.Contains(targets, real) {
			targets = append(targets, real)
		}
	}
	if len(targets) == 0 {
		return nil, errors.New("lab: no iptables or ipset program found to hide; the test would prove nothing")
	}
	return targets, nil
}

// tripwire replaces every hidden program: it fails, says why, and logs
// the call, so that a test can show nothing tried to run one.
const tripwire = `#!/bin/sh
printf '%%s\n' "$0 $*" >> %s
echo "f2b-shim lab: $0 is hidden from the proxy's sshd (no iptables or ipset here)" >&2
exit 126
`

// HiddenMessage is part of what a hidden program says when run.
const HiddenMessage = "is hidden from the proxy's sshd"

// nftFiles writes the tripwire and its log, and the strace wrapper.
func (l *Lab) nftFiles() error {
	if l.HideFirewallPrograms {
		if err := l.write("tripwire", fmt.Sprintf(tripwire, l.path("hidden-ran.log")), 0o755); err != nil {
			return err
		}
		// The shim runs as the lab user in user mode: it must be able to
		// leave its trace.
		if err := errors.Join(l.write("hidden-ran.log", "", 0o666), os.Chmod(l.path("hidden-ran.log"), 0o666)); err != nil {
			return err
		}
	}
	if l.Strace {
		if err := os.Mkdir(l.path("strace"), 0o755); err != nil {
			return err
		}
		// $$ is the session's shell, which exec keeps: one log per session.
		wrapper := fmt.Sprintf("#!/bin/sh\nexec strace -f -qq -e trace=execve -o %s/$$.log %s \"$@\"\n", l.path("strace"), l.Shim)
		return l.write("f2b-shim-strace", wrapper, 0o755)
	}
	return nil
}

// forcedShim is the program of the key's forced command.
func (l *Lab) forcedShim() string {
	if l.Strace {
		return l.path("f2b-shim-strace")
	}
	return l.Shim
}

// hideScript is the part of the sshd's mount-namespace script that
// covers every hidden program with the tripwire.
func (l *Lab) hideScript() ([]string, error) {
	targets, err := hiddenTargets()
	if err != nil {
		return nil, err
	}
	var script []string
	for _, t := range targets {
		script = append(script, fmt.Sprintf("mount --bind %s %s", l.path("tripwire"), t))
	}
	return script, nil
}

// HiddenCalls are the hidden programs that something run by the proxy's
// sshd (or ProxyExec) tried to run, one line each; ResetHiddenCalls
// empties the list.
func (l *Lab) HiddenCalls() []string {
	var calls []string
	for _, line := range strings.Split(l.Log("hidden-ran.log"), "\n") {
		if line != "" {
			calls = append(calls, line)
		}
	}
	return calls
}

// ResetHiddenCalls empties HiddenCalls.
func (l *Lab) ResetHiddenCalls() error { return os.Truncate(l.path("hidden-ran.log"), 0) }

// proxyCommand runs a program on the proxy: in the sshd's mount namespace
// when the firewall programs are hidden there, so that an admin command
// has no more than the forced command has.
func (l *Lab) proxyCommand(name string, args ...string) *exec.Cmd {
	if l.HideFirewallPrograms && l.sshd != nil {
		return exec.Command("nsenter", append([]string{"-t", fmt.Sprint(l.sshd.Process.Pid), "-m", "-n", "--", name}, args...)...)
	}
	return l.Proxy.Command(name, args...)
}

// ProxyExec runs a program as root on the proxy as its sshd sees the
// machine (see HideFirewallPrograms), and returns its exit code and
// output.
func (l *Lab) ProxyExec(name string, args ...string) (int, string) {
	return exitCode(l.proxyCommand(name, args...))
}

// startOtherPort serves OtherPort on the proxy's outside addresses.
func (l *Lab) startOtherPort() error {
	for _, a := range []struct{ log, listen string }{
		{"socat-other4.log", "TCP4-LISTEN:" + OtherPort + ",bind=" + ProxyOutV4 + ",fork,reuseaddr"},
		{"socat-other6.log", "TCP6-LISTEN:" + OtherPort + ",bind=[" + ProxyOutV6 + "],fork,reuseaddr,ipv6only=1"},
	} {
		if err := l.start(l.Proxy, a.log, "socat", a.listen, "SYSTEM:echo OK other port"); err != nil {
			return err
		}
	}
	return nil
}

// What Reach finds.
const (
	Open     = "open"      // the greeting came
	Refused  = "refused"   // connection refused: a REJECT
	TimedOut = "timed out" // no answer: a DROP
)

// Reach connects from src (an address of the attacker's namespace) to
// the proxy's outside address of the same family on port, and says
// what happened: Open, Refused, TimedOut, or the error.
func (l *Lab) Reach(src, port string) string {
	a := netip.MustParseAddr(src)
	addr, bind := "TCP4:"+ProxyOutV4+":"+port, src
	if a.Is6() {
		addr, bind = "TCP6:["+ProxyOutV6+"]:"+port, "["+src+"]"
	}
	out, err := l.Attacker.Run("socat", "-T2", "-u", addr+",connect-timeout=2,bind="+bind, "STDOUT")
	switch {
	case err == nil && strings.HasPrefix(out, "OK "):
		return Open
	case err == nil:
		return fmt.Sprintf("no greeting: %q", out)
	case strings.Contains(err.Error(), "Connection refused"):
		return Refused
	case strings.Contains(err.Error(), "timed out"):
		return TimedOut
	}
	return err.Error()
}

// nftSet is a set of the shim's table as "nft -j" shows it.
type nftSet struct {
	Name  string            `json:"name"`
	Table string            `json:"table"`
	Flags []string          `json:"flags"`
	Elem  []json.RawMessage `json:"elem"`
}

// NFTSets reads the sets of the shim's table in a namespace of the lab,
// set name to its elements: addresses, or prefixes when wider.
func NFTSets(ns *netns.NS) (map[string][]string, error) {
	out, err := ns.Run("nft", "-j", "list", "table", "inet", NFTTable)
	if err != nil {
		if strings.Contains(err.Error(), "No such file or directory") {
			return map[string][]string{}, nil // no table: no sets
		}
		return nil, err
	}
	var doc struct {
		Nftables []struct {
			Set *nftSet `json:"set"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		return nil, fmt.Errorf("nft -j: %v", err)
	}
	sets := map[string][]string{}
	for _, o := range doc.Nftables {
		if o.Set == nil {
			continue
		}
		elems := []string{}
		for _, e := range o.Set.Elem {
			s, err := nftElem(e)
			if err != nil {
				return nil, fmt.Errorf("set %s: %v", o.Set.Name, err)
			}
			elems = append(elems, s)
		}
		sets[o.Set.Name] = elems
	}
	return sets, nil
}

// nftElem reads one element: "192.0.2.7", {"prefix": {...}},
// {"range": [a, b]}, or any of them as {"elem": {"val": …, "timeout": …}}.
func nftElem(raw json.RawMessage) (string, error) {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s, nil
	}
	var o struct {
		Elem *struct {
			Val json.RawMessage `json:"val"`
		} `json:"elem"`
		Prefix *struct {
			Addr string `json:"addr"`
			Len  int    `json:"len"`
		} `json:"prefix"`
		Range []string `json:"range"`
	}
	if err := json.Unmarshal(raw, &o); err != nil {
		return "", err
	}
	switch {
	case o.Elem != nil:
		return nftElem(o.Elem.Val)
	case o.Prefix != nil:
		return fmt.Sprintf("%s/%d", o.Prefix.Addr, o.Prefix.Len), nil
	case len(o.Range) == 2:
		return o.Range[0] + "-" + o.Range[1], nil
	}
	return "", fmt.Errorf("unknown element %s", raw)
}

// NFTExpires is how long the kernel keeps the element addr of a set of
// the shim's table (nft's "expires", in whole seconds), and whether the
// element is there.
func NFTExpires(ns *netns.NS, set, addr string) (time.Duration, bool) {
	out, err := ns.Run("nft", "-j", "list", "set", "inet", NFTTable, set)
	if err != nil {
		return 0, false
	}
	var doc struct {
		Nftables []struct {
			Set *struct {
				Elem []struct {
					Elem *struct {
						Val     json.RawMessage `json:"val"`
						Expires int64           `json:"expires"`
					} `json:"elem"`
				} `json:"elem"`
			} `json:"set"`
		} `json:"nftables"`
	}
	if json.Unmarshal([]byte(out), &doc) != nil {
		return 0, false
	}
	for _, o := range doc.Nftables {
		if o.Set == nil {
			continue
		}
		for _, e := range o.Set.Elem {
			if e.Elem == nil {
				continue
			}
			if v, err := nftElem(e.Elem.Val); err == nil && v == addr {
				return time.Duration(e.Elem.Expires) * time.Second, true
			}
		}
	}
	return 0, false
}

// NFTChain is "nft list chain" of a chain of the shim's table (input is
// the hooks' base chain), or "" when it is not there.
func NFTChain(ns *netns.NS, chain string) string {
	out, err := ns.Run("nft", "list", "chain", "inet", NFTTable, chain)
	if err != nil {
		return ""
	}
	return out
}

// nftFamilySets are the jail's ban sets of ip's family: the interval set
// and the single addresses' set.
func nftFamilySets(a netip.Addr) []string {
	v := "-v4"
	if a.Is6() {
		v = "-v6"
	}
	return []string{Chain + v, Chain + v + "-addr"}
}

// nftBanned: an element of one of the jail's sets of ip's family covers
// ip, and a rule of the jail's chain matches on that set.
func (l *Lab) nftBanned(ns *netns.NS, a netip.Addr) bool {
	sets, err := NFTSets(ns)
	if err != nil {
		return false
	}
	rules := NFTChain(ns, Chain)
	for _, name := range nftFamilySets(a) {
		if !strings.Contains(rules, " saddr @"+name+" ") {
			continue
		}
		for _, e := range sets[name] {
			if covers(e, a) {
				return true
			}
		}
	}
	return false
}

func covers(elem string, a netip.Addr) bool {
	if p, err := netip.ParsePrefix(elem); err == nil {
		return p.Contains(a)
	}
	if lo, hi, ok := strings.Cut(elem, "-"); ok {
		l, err1 := netip.ParseAddr(lo)
		h, err2 := netip.ParseAddr(hi)
		return err1 == nil && err2 == nil && l.Compare(a) <= 0 && a.Compare(h) <= 0
	}
	e, err := netip.ParseAddr(elem)
	return err == nil && e == a
}

// nftBans lists the elements of the jail's ban sets, both families,
// that a rule of the jail's chain matches on (an element of a set no
// rule uses bans nothing), as bansIn does for the other backends.
func (l *Lab) nftBans(ns *netns.NS) []string {
	sets, err := NFTSets(ns)
	if err != nil {
		return nil
	}
	rules := NFTChain(ns, Chain)
	var out []string
	for name, elems := range sets {
		if strings.HasPrefix(name, Chain+"-v") && strings.Contains(rules, " saddr @"+name+" ") {
			out = append(out, elems...)
		}
	}
	slices.Sort(out)
	return out
}

// NFTHooked reports whether the proxy's input chain jumps into the
// jail's chain for both families with match, e.g.
// "tcp dport { 143, 993 }", "tcp dport 143" or "meta l4proto tcp".
func (l *Lab) NFTHooked(match string) bool {
	input := NFTChain(l.Proxy, "input")
	for _, fam := range []string{"ipv4", "ipv6"} {
		if !strings.Contains(input, "meta nfproto "+fam+" "+match+" jump "+Chain+"\n") {
			return false
		}
	}
	return true
}

// NFTVerdicts are the jail chain's verdict rules without the set names,
// e.g. "ip saddr reject with icmp port-unreachable".
func (l *Lab) NFTVerdicts() []string {
	var out []string
	for _, line := range strings.Split(NFTChain(l.Proxy, Chain), "\n") {
		line = strings.TrimSpace(line)
		if strings.Contains(line, "saddr @") {
			out = append(out, regexp.MustCompile(` @\S+`).ReplaceAllString(line, ""))
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// execveLine is an execve that strace -f saw start (not a "resumed" half).
var execveLine = regexp.MustCompile(`(?m)^\d+ +execve\(.*$`)

// StraceExecs reads the strace logs of the sessions since the last
// ClearStrace (see Strace): per session, the execve calls it made,
// starting with the shim's own.
func (l *Lab) StraceExecs() (map[string][]string, error) {
	logs, err := filepath.Glob(l.path("strace/*.log"))
	if err != nil {
		return nil, err
	}
	out := map[string][]string{}
	for _, f := range logs {
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		out[filepath.Base(f)] = execveLine.FindAllString(string(data), -1)
	}
	return out, nil
}

// ClearStrace removes the strace logs. A session still running (a stream
// session) writes on into its removed log: clear only between one-shot
// sessions.
func (l *Lab) ClearStrace() error {
	logs, err := filepath.Glob(l.path("strace/*.log"))
	if err != nil {
		return err
	}
	for _, f := range logs {
		if err := os.Remove(f); err != nil {
			return err
		}
	}
	return nil
}

// NFTWipes take the shim's nftables rules away behind its back, as
// Wipes do for iptables: the shim's table deleted; the hooks' base chain
// flushed; "nft flush ruleset" (systemctl reload nftables with a ruleset
// that does not name the shim's table); a ruleset saved before the bans
// loaded again ("nft list ruleset" saved, as an admin keeps
// /etc/nftables.conf, then "nft flush ruleset; nft -f"): the table, its
// sets, chains and hooks come back, the bans do not; the jail's chain
// flushed (its verdict rules gone, the sets and their elements kept).
var NFTWipes = []Wipe{
	{"the shim's table deleted", func(l *Lab) error { return l.nft("delete", "table", "inet", NFTTable) }},
	{"the hooks flushed", func(l *Lab) error { return l.nft("flush", "chain", "inet", NFTTable, "input") }},
	{"nft flush ruleset", func(l *Lab) error { return l.nft("flush", "ruleset") }},
	{"a ruleset saved before the bans loaded again", func(l *Lab) error {
		saved, err := l.Proxy.Run("nft", "-s", "list", "ruleset")
		if err != nil {
			return err
		}
		saved = regexp.MustCompile(`(?s)\s*elements = \{.*?\}`).ReplaceAllString(saved, "")
		if err := os.WriteFile(l.path("saved.nft"), []byte("flush ruleset\n"+saved), 0o600); err != nil {
			return err
		}
		return l.nft("-f", l.path("saved.nft"))
	}},
	{"the jail's chain flushed", func(l *Lab) error { return l.nft("flush", "chain", "inet", NFTTable, Chain) }},
}

// bansWaitForTheTimer are the wipes after which, by design, a new ban
// puts back the chains and hooks but not the bans the sets lost, and
// why: the check on contact reads metadata, never elements, so that it
// costs the same at any number of bans (internal/engine nft.Missing).
var bansWaitForTheTimer = map[string]string{
	"a ruleset saved before the bans loaded again": "the sets came back empty; the check on contact reads no elements, reconcile (the timer) does",
}

// BansWaitForTheTimer says why, after this wipe, the bans come back with
// the timer's reconcile and not with the next ban; "" when the next ban
// brings them back.
func (w Wipe) BansWaitForTheTimer() string { return bansWaitForTheTimer[w.Name] }

// WipesFor are the wipes of a backend: NFTWipes for nftables, Wipes
// for the others. Index 2 takes everything of the shim's away.
func WipesFor(backend string) []Wipe {
	if backend == "nftables" {
		return NFTWipes
	}
	return Wipes
}

func (l *Lab) nft(args ...string) error {
	_, err := l.Proxy.Run("nft", args...)
	return err
}

// NFTDeleteHooks deletes the proxy's hooks of one family ("ipv4" or
// "ipv6") into the jail's chain by handle, behind the shim's back, as an
// "iptables -F INPUT" does to one family's.
func (l *Lab) NFTDeleteHooks(fam string) error {
	out, err := l.Proxy.Run("nft", "-a", "list", "chain", "inet", NFTTable, "input")
	if err != nil {
		return err
	}
	re := regexp.MustCompile(`meta nfproto ` + fam + ` .* jump ` + regexp.QuoteMeta(Chain) + ` # handle (\d+)`)
	found := re.FindAllStringSubmatch(out, -1)
	if len(found) == 0 {
		return fmt.Errorf("no %s hook into %s:\n%s", fam, Chain, out)
	}
	for _, m := range found {
		if err := l.nft("delete", "rule", "inet", NFTTable, "input", "handle", m[1]); err != nil {
			return err
		}
	}
	return nil
}

// NFTTransaction is one committed nftables transaction as "nft monitor"
// shows it: the program that committed it and the ban elements it added,
// each once (the shim adds, deletes and adds an element again to refresh
// its timeout).
type NFTTransaction struct {
	Program string
	Added   []string
}

// nftGeneration is nft monitor's line after each committed transaction.
var nftGeneration = regexp.MustCompile(`^# new generation \d+ by process \d+ \((.*)\)$`)

// NFTMonitor runs "nft monitor" on the proxy until the returned function
// is called, which returns the transactions seen meanwhile, in order.
func (l *Lab) NFTMonitor() (stop func() ([]NFTTransaction, error), err error) {
	f, err := os.Create(l.path("nft-monitor.log"))
	if err != nil {
		return nil, err
	}
	cmd := l.Proxy.Command("nft", "monitor")
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, err
	}
	l.procs = append(l.procs, cmd) // Down stops it if the test does not
	// nft monitor subscribes before it prints anything: wait for a
	// transaction of our own to show.
	probe := func() bool { return strings.Contains(l.Log("nft-monitor.log"), "f2b_lab_probe") }
	for i := 0; i < 50 && !probe(); i++ {
		_ = l.nft("add", "table", "inet", "f2b_lab_probe")
		_ = l.nft("delete", "table", "inet", "f2b_lab_probe")
		time.Sleep(100 * time.Millisecond)
	}
	if !probe() {
		_ = cmd.Process.Kill()
		return nil, errors.New("nft monitor shows nothing")
	}
	skip := len(l.Log("nft-monitor.log"))
	return func() ([]NFTTransaction, error) {
		time.Sleep(500 * time.Millisecond) // the last events' lines
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		f.Close()
		var out []NFTTransaction
		var added []string
		for _, line := range strings.Split(l.Log("nft-monitor.log")[skip:], "\n") {
			switch m := nftGeneration.FindStringSubmatch(line); {
			case m != nil:
				slices.Sort(added)
				out = append(out, NFTTransaction{Program: m[1], Added: slices.Compact(added)})
				added = nil
			case strings.HasPrefix(line, "add element inet "+NFTTable+" "+Chain+"-v"):
				// One element a line: "add element … SET { ADDR timeout … }".
				if _, e, ok := strings.Cut(line, "{ "); ok {
					added = append(added, strings.Fields(e)[0])
				}
			}
		}
		return out, nil
	}, nil
}
