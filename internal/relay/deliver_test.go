package relay

import (
	"bufio"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// sshProxy is a proxy behind a fake ssh: while it is down, a session
// starts (ssh runs) and ends at once with ssh's message on stderr, as a
// real ssh does when sshd is stopped; while its quota is spent, it denies
// every ban as the shim does; its chain can be wiped, after which a ban
// fails with exit 4 until a start creates it again.
type sshProxy struct {
	mu         sync.Mutex
	down       bool
	quotaUntil time.Time
	chain      bool
	// refuse is how many more sessions to refuse for max_stream_sessions.
	refuse int
	dials  int
	denied int
	lines  []string
	jail   Jail
}

func (p *sshProxy) set(f func(p *sshProxy)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	f(p)
}

func (p *sshProxy) dial(string) (*Conn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.dials++
	inR, inW := io.Pipe()
	outR, outW := io.Pipe()
	if p.down {
		go func() { _, _ = io.Copy(io.Discard, inR) }()
		outW.Close()
		c := NewConn(inW, outR, func() error { return inR.Close() })
		c.stderr = func() string { return "ssh: connect to host f2b-proxy2 port 22: Connection refused" }
		return c, nil
	}
	create := p.jail.Commands(Op{Kind: Start})[0]
	refused := p.refuse > 0
	if refused {
		p.refuse--
	}
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
			case refused:
				reply = fmt.Sprintf("%d 3 denied denied: %d stream sessions are open, max_stream_sessions = 4", n, 4)
			case strings.Contains(line, " -I "+p.jail.Chain+" ") && time.Now().Before(p.quotaUntil):
				p.denied++
				reply = fmt.Sprintf("%d 3 denied %s: max_new_bans_per_minute = 10", n, QuotaDenial)
			case strings.Contains(line, " "+p.jail.Chain+" ") && !p.chain:
				reply = fmt.Sprintf("%d 4 failed firewall: iptables: No chain/target/match by that name.", n)
			default:
				if line == create {
					p.chain = true
				}
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

func (p *sshProxy) has(line string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, l := range p.lines {
		if l == line {
			return true
		}
	}
	return false
}

// runWith runs a relay for one sshProxy; send queues lines, stop ends it.
func runWith(t *testing.T, p *sshProxy, minB, maxB time.Duration) (send func(...string), stop func(), l *logs) {
	box, err := OpenOutbox(t.TempDir(), []string{"f2b-proxy2"}, nil)
	require.NoError(t, err)
	l = &logs{}
	inR, inW := io.Pipe()
	done := make(chan error, 1)
	cfg := Config{Jail: p.jail, Proxies: []string{"f2b-proxy2"}, Outbox: box, Drain: time.Millisecond, Logf: l.logf,
		MinBackoff: minB, MaxBackoff: maxB, Dial: p.dial}
	go func() { done <- Run(cfg, inR, io.Discard); box.Close() }()
	send = func(lines ...string) {
		for _, line := range lines {
			_, err := fmt.Fprintln(inW, line)
			require.NoError(t, err)
		}
	}
	stop = func() { inW.Close(); require.NoError(t, <-done) }
	return send, stop, l
}

// schedule is the most attempts a backoff doubling from minB to maxB
// allows in elapsed (plus the first).
func schedule(minB, maxB, elapsed time.Duration) int {
	n, at, b := 1, time.Duration(0), time.Duration(0)
	for {
		b = min(max(2*b, minB), maxB)
		if at += b; at > elapsed {
			return n
		}
		n++
	}
}

// TestADownProxyIsLoggedOnceAndBacksOff: while a proxy's sshd is down,
// the relay dials it again on a doubling backoff, not at its floor every
// time, and fail2ban's log hears one line (with ssh's own message) when
// it goes down and one when it is back, none per attempt.
func TestADownProxyIsLoggedOnceAndBacksOff(t *testing.T) {
	p := &sshProxy{down: true, chain: true, jail: DefaultJail("mail-remote-f2b-imap")}
	const minB, maxB = 20 * time.Millisecond, 320 * time.Millisecond
	send, stop, l := runWith(t, p, minB, maxB)
	began := time.Now()
	send("start", "ban 192.0.2.1")
	require.Eventually(t, func() bool { p.mu.Lock(); defer p.mu.Unlock(); return p.dials >= 6 }, time.Minute, 5*time.Millisecond)
	time.Sleep(4 * maxB)
	p.set(func(p *sshProxy) { p.down = false })
	elapsed := time.Since(began)
	ban := p.jail.Commands(Op{Kind: Ban, Addr: mustPrefix("192.0.2.1")})[0]
	require.Eventually(t, func() bool { return p.has(ban) }, time.Minute, 5*time.Millisecond)
	require.Eventually(t, func() bool { return strings.Contains(l.text(), "is back") }, time.Minute, 5*time.Millisecond)
	stop()
	p.mu.Lock()
	dials := p.dials
	p.mu.Unlock()
	assert.LessOrEqual(t, dials, schedule(minB, maxB, elapsed)+1, "the backoff doubles while the proxy stays down (%d dials in %s)", dials, elapsed)
	lines := strings.Split(l.text(), "\n")
	require.Len(t, lines, 2, "one line down, one line back:\n%s", l.text())
	assert.Contains(t, lines[0], "warning: proxy f2b-proxy2: ssh: connect to host f2b-proxy2 port 22: Connection refused; it counts as down")
	assert.Equal(t, "info: f2b-proxy2 is back: 2 operations delivered", lines[1])
}

// TestQuotaDenialsBackOff: a proxy over its ban quota gets the first
// window once, then one line per attempt on a doubling backoff, not the
// whole window at the floor (which filled its audit log).
func TestQuotaDenialsBackOff(t *testing.T) {
	p := &sshProxy{chain: true, jail: DefaultJail("mail-remote-f2b-imap"), quotaUntil: time.Now().Add(time.Hour)}
	const minB, maxB = 10 * time.Millisecond, 160 * time.Millisecond
	send, stop, l := runWith(t, p, minB, maxB)
	began := time.Now()
	send("start")
	for i := range 200 {
		send(fmt.Sprintf("ban 2001:db8::%x", i))
	}
	require.Eventually(t, func() bool { p.mu.Lock(); defer p.mu.Unlock(); return p.dials >= 8 }, time.Minute, 5*time.Millisecond)
	p.set(func(p *sshProxy) { p.quotaUntil = time.Time{} })
	elapsed := time.Since(began)
	require.Eventually(t, func() bool { return strings.Contains(l.text(), "is back: 200 operations delivered") }, time.Minute, 5*time.Millisecond, l.text())
	stop()
	p.mu.Lock()
	defer p.mu.Unlock()
	assert.LessOrEqual(t, p.dials, schedule(minB, maxB, elapsed)+1, "quota denials back off (%d dials in %s)", p.dials, elapsed)
	assert.LessOrEqual(t, p.denied, 200+p.dials, "after the first denial, one line per attempt")
	assert.Equal(t, 2, strings.Count(l.text(), "\n")+1, l.text())
}

// TestAWipedChainIsStartedAgain (issue 20, the relay recovers): after a
// firewall reload wiped the proxy's chain, a ban fails with exit 4; the
// relay sends the jail's start again and goes on, and later bans land.
// fail2ban's log says so, once.
func TestAWipedChainIsStartedAgain(t *testing.T) {
	p := &sshProxy{jail: DefaultJail("mail-remote-f2b-imap")}
	send, stop, l := runWith(t, p, 10*time.Millisecond, time.Second)
	ban := func(a string) string { return p.jail.Commands(Op{Kind: Ban, Addr: mustPrefix(a)})[0] }
	send("start", "ban 192.0.2.1")
	require.Eventually(t, func() bool { return p.has(ban("192.0.2.1")) }, 10*time.Second, 5*time.Millisecond)
	p.set(func(p *sshProxy) { p.chain, p.lines = false, nil })
	send("ban 192.0.2.2", "ban 192.0.2.3")
	require.Eventually(t, func() bool { return p.has(ban("192.0.2.3")) }, 10*time.Second, 5*time.Millisecond, "the jail is stuck behind the failing ban:\n%s", l.text())
	stop()
	assert.Equal(t, append(p.jail.Commands(Op{Kind: Start}), ban("192.0.2.2"), ban("192.0.2.3")), p.lines, "the start, then the failed ban, then the rest")
	assert.Contains(t, l.text(), "No chain/target/match by that name.; sending the jail's start again")
	assert.Equal(t, 1, strings.Count(l.text(), "sending the jail's start again"), l.text())
}

// TestARefusedSessionIsTriedAgain: a proxy that refuses a session because
// too many are open (max_stream_sessions) denies its lines with exit 3;
// they are not dropped as a policy denial would be, but sent again on a
// later session, after a backoff.
func TestARefusedSessionIsTriedAgain(t *testing.T) {
	p := &sshProxy{chain: true, refuse: 3, jail: DefaultJail("mail-remote-f2b-imap")}
	send, stop, l := runWith(t, p, 10*time.Millisecond, 80*time.Millisecond)
	send("ban 192.0.2.1")
	ban := p.jail.Commands(Op{Kind: Ban, Addr: mustPrefix("192.0.2.1")})[0]
	require.Eventually(t, func() bool { return p.has(ban) }, 10*time.Second, 5*time.Millisecond, l.text())
	stop()
	assert.NotContains(t, l.text(), "denied \"", "the line was dropped as denied")
	assert.Contains(t, l.text(), "max_stream_sessions")
	assert.Equal(t, 4, p.dials)
}
