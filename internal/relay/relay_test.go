package relay

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func ops(t *testing.T, lines ...string) []Op {
	var out []Op
	for _, l := range lines {
		op, err := ParseOp(l)
		require.NoError(t, err, l)
		out = append(out, op)
	}
	return out
}

func live(o *Outbox) []string {
	var out []string
	for _, op := range o.ops {
		if op.Kind == dead {
			continue
		}
		_, s, _ := strings.Cut(op.String(), " ")
		out = append(out, s)
	}
	return out
}

// TestOutboxKeepsOnlyWhatIsNotSuperseded: the outbox is bounded by the
// addresses in flight, and what it keeps, replayed in order, ends where
// the whole history ends.
func TestOutboxKeepsOnlyWhatIsNotSuperseded(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   []string
		want []string
	}{
		{"bans in order", []string{"start", "ban 192.0.2.1", "ban 2001:db8::1"}, []string{"start", "ban 192.0.2.1/32", "ban 2001:db8::1/128"}},
		{"an unban supersedes its ban", []string{"start", "ban 192.0.2.1", "ban 192.0.2.2", "unban 192.0.2.1"}, []string{"start", "ban 192.0.2.2/32", "unban 192.0.2.1/32"}},
		{"a re-ban moves to the end", []string{"ban 192.0.2.1", "ban 192.0.2.2", "unban 192.0.2.1", "ban 192.0.2.1"}, []string{"ban 192.0.2.2/32", "ban 192.0.2.1/32"}},
		{"a flush drops the bans before it", []string{"start", "ban 192.0.2.1", "flush", "ban 192.0.2.2"}, []string{"start", "flush", "ban 192.0.2.2/32"}},
		{"a stop drops everything before it", []string{"start", "ban 192.0.2.1", "flush", "stop"}, []string{"stop"}},
		{"a restart", []string{"start", "ban 192.0.2.1", "stop", "start", "ban 192.0.2.1"}, []string{"stop", "start", "ban 192.0.2.1/32"}},
		{"a second start is not kept", []string{"start", "ban 192.0.2.1", "start", "ban 192.0.2.2"}, []string{"start", "ban 192.0.2.1/32", "ban 192.0.2.2/32"}},
		{"an address is one key whatever its spelling", []string{"ban 2001:db8::1", "unban 2001:0db8::0001", "ban ::ffff:192.0.2.1", "unban 192.0.2.1/32"}, []string{"unban 2001:db8::1/128", "unban 192.0.2.1/32"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o, err := OpenOutbox(t.TempDir(), []string{"p"}, nil)
			require.NoError(t, err)
			defer o.Close()
			for _, op := range ops(t, tc.in...) {
				require.NoError(t, o.Append(op))
			}
			assert.Equal(t, tc.want, live(o))
		})
	}
}

func TestParseOpRefusesWhatTheActionNeverSends(t *testing.T) {
	for _, in := range []string{"", "ban", "ban 192.0.2.1 x", "ban example.net", "ban fe80::1%eth0", "start now", "iptables -F", "unban"} {
		_, err := ParseOp(in)
		assert.Error(t, err, "%q", in)
	}
}

// TestOutboxSurvivesARestart: a relay killed at any point leaves an
// outbox the next one reads: what was appended (a torn last line, whose
// ban() never returned, is dropped), each proxy's cursor, and sequence
// numbers that never go back, even after a rewrite.
func TestOutboxSurvivesARestart(t *testing.T) {
	dir := t.TempDir()
	o, err := OpenOutbox(dir, []string{"a", "b"}, nil)
	require.NoError(t, err)
	for _, op := range ops(t, "start", "ban 192.0.2.1", "ban 192.0.2.2", "ban 192.0.2.3") {
		require.NoError(t, o.Append(op))
	}
	require.NoError(t, o.Taken("a", 3))
	saved := lockWait
	lockWait = 100 * time.Millisecond
	_, err = OpenOutbox(dir, []string{"a"}, nil)
	lockWait = saved
	require.Error(t, err, "one relay per outbox")
	require.NoError(t, o.Close())

	f, err := os.OpenFile(filepath.Join(dir, logName), os.O_APPEND|os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = f.WriteString("5 ban 192.0.2.")
	require.NoError(t, err)
	require.NoError(t, f.Close())

	o, err = OpenOutbox(dir, []string{"a", "b"}, nil)
	require.NoError(t, err)
	assert.Equal(t, []string{"start", "ban 192.0.2.1/32", "ban 192.0.2.2/32", "ban 192.0.2.3/32"}, live(o))
	assert.Len(t, o.Pending("a", 10), 1, "a took three")
	assert.Len(t, o.Pending("b", 10), 4)
	require.NoError(t, o.Taken("b", 4))
	require.NoError(t, o.Taken("a", 4))
	require.NoError(t, o.Close())

	o, err = OpenOutbox(dir, []string{"a", "b"}, nil)
	require.NoError(t, err)
	defer o.Close()
	assert.Empty(t, live(o), "what every proxy took is dropped")
	require.NoError(t, o.Append(Op{Kind: Ban, Addr: mustPrefix("192.0.2.9/32")}))
	assert.Equal(t, uint64(5), o.ops[0].Seq, "numbers go on after a rewrite")
}

// TestOutboxIsBoundedByAddresses: a long history of bans and unbans of a
// few addresses, with a proxy that is down all along, leaves a file of a
// few lines, not of the history.
func TestOutboxIsBoundedByAddresses(t *testing.T) {
	dir := t.TempDir()
	o, err := OpenOutbox(dir, []string{"down"}, nil)
	require.NoError(t, err)
	o.NoSync = true
	for i := range 20000 {
		kind := Ban
		if i%3 == 2 {
			kind = Unban
		}
		require.NoError(t, o.Append(Op{Kind: kind, Addr: mustPrefix(fmt.Sprintf("192.0.2.%d/32", i%10))}))
	}
	require.NoError(t, o.Close())
	data, err := os.ReadFile(filepath.Join(dir, logName))
	require.NoError(t, err)
	lines := strings.Count(string(data), "\n")
	assert.LessOrEqual(t, lines, 2*10+1024+1, "the file holds the live operations, and at most a rewrite's worth more")
	o, err = OpenOutbox(dir, []string{"down"}, nil)
	require.NoError(t, err)
	defer o.Close()
	assert.Len(t, live(o), 10)
}

func mustPrefix(s string) netip.Prefix {
	p, err := parseAddr(s)
	if err != nil {
		panic(err)
	}
	return p
}

// fakeProxy answers a stream session as the shim does, "N 0 applied",
// or denies and fails the lines it is told to, and records what it took.
type fakeProxy struct {
	mu    sync.Mutex
	down  bool
	lines []string
	deny  map[string]bool
	fail  map[string]int // how many times more to fail the line
	dials int
}

func (p *fakeProxy) dial(string) (*Conn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.dials++
	if p.down {
		return nil, errors.New("connection refused")
	}
	inR, inW := io.Pipe()
	outR, outW := io.Pipe()
	go func() {
		defer outW.Close()
		sc := bufio.NewScanner(inR)
		n := 0
		for sc.Scan() {
			n++
			line := sc.Text()
			p.mu.Lock()
			reply := fmt.Sprintf("%d 0 applied", n)
			switch {
			case p.deny[line]:
				reply = fmt.Sprintf("%d 3 denied denied: no", n)
			case p.fail[line] > 0:
				p.fail[line]--
				reply = fmt.Sprintf("%d 4 failed firewall: busy", n)
			default:
				p.lines = append(p.lines, line)
			}
			p.mu.Unlock()
			if _, err := fmt.Fprintln(outW, reply); err != nil {
				return
			}
		}
	}()
	return NewConn(inW, outR, func() error { return inR.Close() }), nil
}

func (p *fakeProxy) taken() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.lines...)
}

type logs struct {
	mu    sync.Mutex
	lines []string
}

func (l *logs) logf(level, format string, a ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, level+": "+fmt.Sprintf(format, a...))
}

func (l *logs) text() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}

// startRelay runs a relay with fake proxies and returns its input, a
// stop that ends the input and waits for the relay, and its log.
func startRelay(t *testing.T, dir string, proxies map[string]*fakeProxy) (func(string), func() error, *logs) {
	var names []string
	for n := range proxies {
		names = append(names, n)
	}
	box, err := OpenOutbox(dir, names, nil)
	require.NoError(t, err)
	l := &logs{}
	inR, inW := io.Pipe()
	outR, outW := io.Pipe()
	done := make(chan error, 1)
	cfg := Config{
		Jail: DefaultJail("mail-remote-f2b-imap"), Proxies: names, Outbox: box, Drain: 5 * time.Second, Logf: l.logf, MaxBackoff: 50 * time.Millisecond, GroupAcks: true,
		Dial: func(dest string) (*Conn, error) { return proxies[dest].dial(dest) },
	}
	go func() { done <- Run(cfg, inR, outW); box.Close(); outW.Close() }()
	var replies []string
	read := make(chan struct{})
	go func() {
		defer close(read)
		sc := bufio.NewScanner(outR)
		for sc.Scan() {
			replies = append(replies, sc.Text())
		}
	}()
	sent := 0
	send := func(line string) {
		_, err := fmt.Fprintln(inW, line)
		require.NoError(t, err)
		sent++
	}
	stop := func() error {
		inW.Close()
		err := <-done
		<-read
		require.NotEmpty(t, replies)
		assert.Equal(t, fmt.Sprintf("ok %d", sent), replies[len(replies)-1], "every line is acknowledged")
		for _, r := range replies {
			assert.True(t, strings.HasPrefix(r, "ok "), "no line refused: %q", r)
		}
		return err
	}
	return send, stop, l
}

// TestOneProxyDownDelaysNoOther: bans reach the live proxy while the
// other is down; the other gets everything, in order, when it is back,
// and an unban made meanwhile is not undone.
func TestOneProxyDownDelaysNoOther(t *testing.T) {
	up, down := &fakeProxy{}, &fakeProxy{down: true}
	send, stop, l := startRelay(t, t.TempDir(), map[string]*fakeProxy{"up": up, "down": down})
	send("start")
	for i := range 100 {
		send(fmt.Sprintf("ban 192.0.2.%d", i))
	}
	send("unban 192.0.2.5")
	j := DefaultJail("mail-remote-f2b-imap")
	unban := j.Commands(Op{Kind: Unban, Addr: mustPrefix("192.0.2.5")})[0]
	require.Eventually(t, func() bool {
		got := up.taken()
		return len(got) > 0 && got[len(got)-1] == unban
	}, 10*time.Second, 10*time.Millisecond, "the live proxy has everything while the other is down")
	assert.GreaterOrEqual(t, len(up.taken()), 6+99+1)
	assert.Empty(t, down.taken())
	down.mu.Lock()
	down.down = false
	down.mu.Unlock()
	require.NoError(t, stop())
	got := down.taken()
	var want []string
	want = append(want, j.Commands(Op{Kind: Start})...)
	for i := range 100 {
		if i != 5 {
			want = append(want, j.Commands(Op{Kind: Ban, Addr: mustPrefix(fmt.Sprintf("192.0.2.%d", i))})...)
		}
	}
	want = append(want, j.Commands(Op{Kind: Unban, Addr: mustPrefix("192.0.2.5")})...)
	assert.Equal(t, want, got, "in order, and the ban the unban superseded is not sent")
	assert.Contains(t, l.text(), "proxy down: connection refused; it counts as down")
}

// TestDeniedLinesAreDroppedFailedLinesRetried: a line the proxy denies
// is logged and not sent again; a line that fails is sent again, and so
// is everything after it, in order.
func TestDeniedLinesAreDroppedFailedLinesRetried(t *testing.T) {
	j := DefaultJail("mail-remote-f2b-imap")
	ban := func(a string) string { return j.Commands(Op{Kind: Ban, Addr: mustPrefix(a)})[0] }
	p := &fakeProxy{deny: map[string]bool{ban("192.0.2.2"): true}, fail: map[string]int{ban("192.0.2.3"): 2}}
	send, stop, l := startRelay(t, t.TempDir(), map[string]*fakeProxy{"p": p})
	for _, a := range []string{"192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"} {
		send("ban " + a)
	}
	require.NoError(t, stop())
	got := slices.DeleteFunc(p.taken(), func(l string) bool { return slices.Contains(j.Commands(Op{Kind: Start}), l) })
	// Lines after a failed one may have been taken already (they were
	// sent before its reply came); the session that follows sends them
	// all again from the failed one on, in order, so the proxy ends as
	// the order says.
	require.GreaterOrEqual(t, len(got), 3)
	assert.Equal(t, []string{ban("192.0.2.3"), ban("192.0.2.4")}, got[len(got)-2:], "the last session sends from the failed line on, in order")
	assert.ElementsMatch(t, []string{ban("192.0.2.1"), ban("192.0.2.3"), ban("192.0.2.4")}, dedupe(got), "every ban but the denied one")
	assert.Contains(t, l.text(), `error: proxy p denied "`+ban("192.0.2.2")+`": denied: no`)
	assert.Contains(t, l.text(), "failed (exit 4): firewall: busy; sending the jail's start again")
	assert.GreaterOrEqual(t, p.dials, 3, "a failed line ends the session, and a new one sends it again")
}

// dedupe drops lines sent again (at least once: a retry resends what
// the proxy already took, which changes nothing there).
func dedupe(lines []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, l := range lines {
		if !seen[l] {
			seen[l] = true
			out = append(out, l)
		}
	}
	return out
}

// TestDrainIsBounded: with a proxy down, the end of input waits at most
// the drain time, and what is left stays in the outbox for the next start.
func TestDrainIsBounded(t *testing.T) {
	dir := t.TempDir()
	down := &fakeProxy{down: true}
	names := []string{"down"}
	box, err := OpenOutbox(dir, names, nil)
	require.NoError(t, err)
	l := &logs{}
	cfg := Config{Jail: DefaultJail("c"), Proxies: names, Outbox: box, Drain: 100 * time.Millisecond, Logf: l.logf, MaxBackoff: 20 * time.Millisecond, Dial: down.dial}
	require.NoError(t, Run(cfg, strings.NewReader("start\nban 192.0.2.1\n"), io.Discard))
	require.NoError(t, box.Close())
	assert.Contains(t, l.text(), "stopping with 2 operation(s) not yet delivered")
	box, err = OpenOutbox(dir, names, nil)
	require.NoError(t, err)
	defer box.Close()
	assert.Equal(t, []string{"start", "ban 192.0.2.1/32"}, live(box))
}

func TestCommandsMatchTheActionFile(t *testing.T) {
	j := DefaultJail("mail-remote-f2b-imap")
	j.Port, j.Protocols, j.Parents = "imap,imaps", []string{"tcp", "udp"}, []string{"INPUT"}
	assert.Equal(t, []string{
		"iptables -w -N mail-remote-f2b-imap",
		"iptables -w -A mail-remote-f2b-imap -j RETURN",
		"iptables -w -I INPUT -p tcp -m multiport --dports imap,imaps -j mail-remote-f2b-imap",
		"iptables -w -I INPUT -p udp -m multiport --dports imap,imaps -j mail-remote-f2b-imap",
		"ip6tables -w -N mail-remote-f2b-imap",
		"ip6tables -w -A mail-remote-f2b-imap -j RETURN",
		"ip6tables -w -I INPUT -p tcp -m multiport --dports imap,imaps -j mail-remote-f2b-imap",
		"ip6tables -w -I INPUT -p udp -m multiport --dports imap,imaps -j mail-remote-f2b-imap",
	}, j.Commands(Op{Kind: Start}))
	assert.Equal(t, []string{"ip6tables -w -I mail-remote-f2b-imap 1 -s 2001:db8::1 -j REJECT --reject-with icmp6-port-unreachable"}, j.Commands(Op{Kind: Ban, Addr: mustPrefix("2001:db8::1")}))
	assert.Equal(t, []string{"iptables -w -D mail-remote-f2b-imap -s 192.0.2.0/24 -j REJECT --reject-with icmp-port-unreachable"}, j.Commands(Op{Kind: Unban, Addr: mustPrefix("192.0.2.0/24")}))
}

// TestDeliveredOperationsAreDropped: once every proxy has taken them,
// operations leave memory and, in time, the file: a long run of bans to
// proxies that keep up leaves an outbox of what is still in flight.
func TestDeliveredOperationsAreDropped(t *testing.T) {
	dir := t.TempDir()
	o, err := OpenOutbox(dir, []string{"a", "b"}, nil)
	require.NoError(t, err)
	defer o.Close()
	o.NoSync = true
	for i := range 5000 {
		require.NoError(t, o.Append(Op{Kind: Ban, Addr: mustPrefix(fmt.Sprintf("2001:db8::%x", i))}))
		if i%100 == 99 {
			require.NoError(t, o.Taken("a", o.seq))
			require.NoError(t, o.Taken("b", o.seq-10))
		}
	}
	assert.LessOrEqual(t, len(o.ops), 110, "in memory: what b has not taken")
	data, err := os.ReadFile(filepath.Join(dir, logName))
	require.NoError(t, err)
	assert.LessOrEqual(t, strings.Count(string(data), "\n"), 2*110+1024+1, "in the file: at most a rewrite's worth more")
}

// TestRunAcknowledgesInGroups: the relay answers "ok N" for the lines it
// made durable, cumulatively and in order, in fewer answers than lines
// when they come together (group commit), and "error N MESSAGE" for the
// line it refused, before the "ok" that covers it.
func TestRunAcknowledgesInGroups(t *testing.T) {
	dir := t.TempDir()
	box, err := OpenOutbox(dir, []string{"p"}, nil)
	require.NoError(t, err)
	defer box.Close()
	var in strings.Builder
	for i := range 3000 {
		if i == 1499 {
			in.WriteString("ban example.net\n")
			continue
		}
		fmt.Fprintf(&in, "ban 2001:db8::%x\n", i)
	}
	var out strings.Builder
	p := &fakeProxy{}
	cfg := Config{Jail: DefaultJail("c"), Proxies: []string{"p"}, Outbox: box, Drain: time.Minute, Logf: (&logs{}).logf, Dial: p.dial, GroupAcks: true}
	require.NoError(t, Run(cfg, strings.NewReader(in.String()), &out))
	var oks []int
	var errs []string
	for _, line := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		var n int
		if _, err := fmt.Sscanf(line, "ok %d", &n); err == nil {
			oks = append(oks, n)
		} else {
			errs = append(errs, line)
		}
	}
	require.NotEmpty(t, oks)
	assert.True(t, slices.IsSorted(oks), "acknowledgements go forward")
	assert.Equal(t, 3000, oks[len(oks)-1])
	assert.Less(t, len(oks), 3000, "lines that come together are synced together")
	assert.Equal(t, []string{`error 1500 "example.net" is not an IP address or prefix`}, errs)
	assert.Len(t, dedupe(p.taken()), 2999)
}

// TestRunAnswersEachLineForEarlierActions: without GroupAcks, each line
// gets its own answer, in order, as the action of earlier versions
// expects (fail2ban runs the action it loaded until it restarts, also
// after an upgrade replaced the relay's binary under it).
func TestRunAnswersEachLineForEarlierActions(t *testing.T) {
	box, err := OpenOutbox(t.TempDir(), []string{"p"}, nil)
	require.NoError(t, err)
	defer box.Close()
	var out strings.Builder
	cfg := Config{Jail: DefaultJail("c"), Proxies: []string{"p"}, Outbox: box, Drain: time.Minute, Logf: (&logs{}).logf, Dial: (&fakeProxy{}).dial}
	require.NoError(t, Run(cfg, strings.NewReader("start\nban 192.0.2.1\nban example.net\nunban 192.0.2.1\n"), &out))
	assert.Equal(t, "ok\nok\nerror \"example.net\" is not an IP address or prefix\nok\n", out.String())
}
