package cli

import (
	"bytes"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/internal/audit"
	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/relay"
	"github.com/f2b-shim/f2b-shim/policy"
)

// stream runs a stream session with input on stdin.
func (h *harness) stream(input string) (int, []string, string) {
	var stdout, stderr bytes.Buffer
	h.calls++
	d := h.deps
	d.Stdin = strings.NewReader(input)
	env := Env{OriginalCommand: StreamCommand, HasCommand: true, SSHConnection: "192.0.2.10 50022 192.0.2.7 22"}
	code := Run([]string{"--policy", "/etc/f2b-shim/policy.toml"}, env, &stdout, &stderr, d)
	var replies []string
	if stdout.Len() > 0 {
		replies = strings.Split(strings.TrimSuffix(stdout.String(), "\n"), "\n")
	}
	return code, replies, stderr.String()
}

// streamCorpus is what a fail2ban host sends, and what a hostile one
// might: starts, bans, unbans, checks, repeats, denials, a foreign chain,
// the proxy's own address, bytes that are no command at all.
var streamCorpus = []string{
	"iptables -w -N " + chain,
	"iptables -w -A " + chain + " -j RETURN",
	"iptables -w -C " + chain + " -j RETURN",
	"iptables -w -I INPUT -p tcp -m multiport --dports 143,993 -j " + chain,
	"iptables -w -D INPUT -p tcp -m multiport --dports 143,993 -j " + chain,
	"iptables -w -I " + chain + " 1 -s 203.0.113.45 -j REJECT --reject-with icmp-port-unreachable",
	"iptables -w -D " + chain + " -s 203.0.113.45 -j REJECT --reject-with icmp-port-unreachable",
	"iptables -w -C " + chain + " -s 203.0.113.45 -j REJECT --reject-with icmp-port-unreachable",
	"iptables -w -I " + chain + " 1 -s 203.0.113.46 -j DROP",
	"iptables -w -D " + chain + " -s 203.0.113.46 -j DROP",
	"iptables -w -I " + chain + " 1 -s 192.0.2.10 -j DROP",
	"iptables -w -I " + chain + " 1 -s 192.0.2.7 -j DROP",
	"iptables -w -F INPUT",
	"iptables -w -F " + chain,
	"iptables -w -X " + chain,
	"ip6tables -w -N " + chain,
	"ip6tables -w -I " + chain + " 1 -s 2001:db8::45 -j DROP",
	"ip6tables -w -D " + chain + " -s 2001:db8::45 -j DROP",
	"iptables -w -I " + chain + " 1 -s 203.0.113.47 -j ACCEPT",
	"f2b-shim stream",
	"sh -c id",
	"iptables -w -I " + chain + " 1 -s 203.0.113.48 -j DROP; id",
	"iptables\t-w -N x\r",
	"\xff\xfe",
	"",
	strings.Repeat("A", policy.MaxCommandLen+10),
}

// TestStreamAnswersEachLineAsOneShotWould runs the corpus, repeated and
// in a tiny batch size, through one stream session and, line by line,
// through one-shot mode on a second proxy: every reply carries the exit
// and result one-shot mode gave, every line has its own audit line with
// the session and its number, and both firewalls end the same.
func TestStreamAnswersEachLineAsOneShotWould(t *testing.T) {
	for _, backend := range []string{"rules", "ipset"} {
		t.Run(backend, func(t *testing.T) {
			var lines []string
			for range 3 {
				lines = append(lines, streamCorpus...)
			}
			checkStreamMatchesOneShot(t, backend, lines)
		})
	}
}

func checkStreamMatchesOneShot(t *testing.T, backend string, lines []string) {
	t.Helper()
	s, o := newHarness(t), newHarness(t)
	for _, h := range []*harness{s, o} {
		h.pol.Backend = backend
		h.pol.StreamMaxBatch = 4
	}
	code, replies, stderr := s.stream(strings.Join(lines, "\n") + "\n")
	require.Equal(t, ExitOK, code, stderr)
	require.Len(t, replies, len(lines), "one reply per line")
	recs := s.records()
	byLine := map[int]audit.Record{}
	session := ""
	for _, r := range recs {
		if r.Result == "coalesced" {
			continue
		}
		byLine[r.LineNo] = r
		if session == "" {
			session = r.Session
		}
		assert.Equal(t, session, r.Session, "one session")
	}
	assert.Len(t, session, 16)
	for i, line := range lines {
		got := replies[i]
		if line == StreamCommand {
			// One-shot mode would start a session; a stream never nests.
			assert.True(t, strings.HasPrefix(got, strconv.Itoa(i+1)+" 3 denied "), got)
			continue
		}
		want, _ := o.forced(line)
		fields := strings.SplitN(got, " ", 4)
		require.GreaterOrEqual(t, len(fields), 3, got)
		assert.Equal(t, strconv.Itoa(i+1), fields[0], "replies in order")
		assert.Equal(t, strconv.Itoa(want), fields[1], "line %d %q: %s", i+1, line, got)
		oneShot := o.records()
		assert.Equal(t, oneShot[len(oneShot)-1].Result, fields[2], "line %d %q", i+1, line)
		if r, ok := byLine[i+1]; ok {
			assert.Equal(t, fields[2], r.Result, "the audit line says what the reply says")
		} else if !slices.Contains([]string{"denied", "unchanged", "check-true", "check-false", "failed", "dry-run"}, fields[2]) {
			// Repeats that change nothing are counted on a "coalesced"
			// line (audit.Log.Write); a change always has its own.
			t.Errorf("line %d (%s) has no audit line", i+1, got)
		}
	}
	pending, err := audit.Pending(s.pol.AuditLog)
	require.NoError(t, err)
	counted := pending[audit.Allow] + pending[audit.Deny]
	for _, r := range recs {
		counted += max(1, r.Count)
	}
	assert.Equal(t, len(lines), counted, "every line is in the log, in full or counted")
	for _, fam := range []policy.Family{policy.IPv4, policy.IPv6} {
		assert.Equal(t, o.tables[fam].Dump(), s.tables[fam].Dump(), "%s firewall", fam)
	}
	assert.Equal(t, o.sets.Names(), s.sets.Names())
	for _, name := range o.sets.Names() {
		om, _ := o.sets.Members(name)
		sm, _ := s.sets.Members(name)
		assert.ElementsMatch(t, om, sm, name)
	}
}

// TestStreamAuditsEveryDenial: a stream's denials are each counted in
// the audit log (written in full, or coalesced with a count), like
// one-shot mode's.
func TestStreamAuditsEveryDenial(t *testing.T) {
	h := newHarness(t)
	n := 50
	code, replies, _ := h.stream(strings.Repeat("sh -c id\n", n))
	require.Equal(t, ExitOK, code)
	require.Len(t, replies, n)
	// The next line of the log writes out the count of the last second.
	code, _ = h.forced("iptables -w -N " + chain)
	require.Equal(t, ExitOK, code)
	counted := 0
	for _, r := range h.records() {
		switch {
		case r.Result == "coalesced":
			counted += r.Count
		case r.Decision == audit.Deny:
			counted++
		}
	}
	assert.Equal(t, n, counted, "every denial is in the log")
}

// TestStreamEdgeCases: what ends or refuses a session.
func TestStreamEdgeCases(t *testing.T) {
	t.Run("an unterminated last line is not carried out", func(t *testing.T) {
		h := newHarness(t)
		code, replies, _ := h.stream("iptables -w -N " + chain + "\niptables -w -X " + chain)
		require.Equal(t, ExitOK, code)
		require.Len(t, replies, 2)
		assert.Equal(t, "1 0 applied", replies[0])
		assert.True(t, strings.HasPrefix(replies[1], "2 3 denied denied: the line does not end in a newline"), replies[1])
		ok, _ := h.tables[policy.IPv4].ChainExists(chain)
		assert.True(t, ok)
	})
	t.Run("a broken policy answers nothing and changes nothing", func(t *testing.T) {
		h := newHarness(t)
		h.deps.LoadPolicy = func(string) (*policy.Policy, error) { return nil, fmt.Errorf("bad") }
		code, replies, stderr := h.stream("iptables -w -N " + chain + "\n")
		assert.Equal(t, ExitSetup, code)
		assert.Empty(t, replies)
		assert.Contains(t, stderr, "policy: bad")
	})
	t.Run("a batch without the proxy's own addresses is refused", func(t *testing.T) {
		h := newHarness(t)
		calls, real := 0, h.deps.Context
		h.deps.Context = func(c netip.Addr) (policy.Context, error) {
			if calls++; calls > 1 {
				return policy.Context{}, fmt.Errorf("cannot read the proxy's addresses")
			}
			return real(c)
		}
		code, replies, _ := h.stream("iptables -w -N " + chain + "\n")
		assert.Equal(t, ExitOK, code)
		assert.Equal(t, []string{"1 5 denied denied: cannot read the proxy's addresses"}, replies, "read again for every batch")
		ok, _ := h.tables[policy.IPv4].ChainExists(chain)
		assert.False(t, ok)
	})
	t.Run("dry run judges and applies nothing", func(t *testing.T) {
		h := newHarness(t)
		h.pol.DryRun = true
		_, replies, _ := h.stream("iptables -w -N " + chain + "\nsh\n")
		assert.Equal(t, "1 0 dry-run", replies[0])
		assert.True(t, strings.HasPrefix(replies[1], "2 3 denied"))
		ok, _ := h.tables[policy.IPv4].ChainExists(chain)
		assert.False(t, ok)
	})
}

// FuzzStream: any sequence of lines (from the corpus, or any bytes) gets
// one reply per line, in order, each with one-shot mode's exit, and the
// firewall ends as applying the lines one by one in one-shot mode leaves
// it.
func FuzzStream(f *testing.F) {
	f.Add([]byte{0, 1, 5, 6, 5, 7, 13, 14}, "")
	f.Add([]byte{15, 16, 17, 10, 11, 20}, "iptables -w -N "+chain+"\x00")
	f.Fuzz(func(t *testing.T, picks []byte, extra string) {
		if len(picks) > 40 {
			picks = picks[:40]
		}
		var lines []string
		for _, p := range picks {
			if int(p) < len(streamCorpus) {
				lines = append(lines, streamCorpus[p])
			} else {
				lines = append(lines, strings.ReplaceAll(extra, "\n", " "))
			}
		}
		if len(lines) == 0 {
			return
		}
		checkStreamMatchesOneShot(t, "rules", lines)
	})
}

// TestABatchedBanThatFailsDoesNotFailItsNeighbours: with the rule
// backend a batch's new bans go to the firewall in one iptables-restore,
// all or nothing. When it fails, each ban gets its own true result: the
// ban into a chain deleted behind the shim's back fails (exit 4, and is
// not recorded), the bans around it are applied.
func TestABatchedBanThatFailsDoesNotFailItsNeighbours(t *testing.T) {
	h := newHarness(t)
	other := chain + "2"
	code, _, stderr := h.stream("iptables -w -N " + chain + "\niptables -w -N " + other + "\n")
	require.Equal(t, ExitOK, code, stderr)
	v4 := h.tables[policy.IPv4]
	require.NoError(t, v4.DeleteChain(other))
	ban := func(c, addr string) string { return "iptables -w -I " + c + " 1 -s " + addr + " -j DROP" }
	code, replies, stderr := h.stream(strings.Join([]string{ban(chain, "203.0.113.1"), ban(other, "203.0.113.2"), ban(chain, "203.0.113.3")}, "\n") + "\n")
	require.Equal(t, ExitOK, code, stderr)
	require.Len(t, replies, 3)
	assert.Equal(t, "1 0 applied", replies[0])
	assert.True(t, strings.HasPrefix(replies[1], "2 4 failed firewall: no chain"), replies[1])
	assert.Equal(t, "3 0 applied", replies[2])
	assert.Contains(t, v4.Calls, "Restore 5", "one iptables-restore for the batch's three bans")
	rules, err := v4.List(chain)
	require.NoError(t, err)
	assert.Equal(t, []string{"-N " + chain, "-A " + chain + " -s 203.0.113.3/32 -j DROP", "-A " + chain + " -s 203.0.113.1/32 -j DROP"}, rules)
	// The failed ban was not recorded: sent again once the chain is
	// back, it is applied, not taken for one already there.
	require.NoError(t, v4.NewChain(other))
	code, replies, _ = h.stream(ban(other, "203.0.113.2") + "\n")
	require.Equal(t, ExitOK, code)
	assert.Equal(t, []string{"1 0 applied"}, replies)
}

// TestStreamBoundsCountTheBatch attacks the bounds with one batch: a
// duplicate ban, more bans than max_bans_per_chain allows, more new bans
// than max_new_bans_per_minute allows. Each request sees the ones before
// it in its batch (their inserts are still queued for one
// iptables-restore), so the bounds hold exactly as one request at a
// time; and the quota's denial is the one the relay sends again later.
func TestStreamBoundsCountTheBatch(t *testing.T) {
	ban := func(a string) string { return "iptables -w -I " + chain + " 1 -s " + a + " -j DROP" }
	for _, tc := range []struct {
		name  string
		set   func(*policy.Policy)
		want  []string
		rules int
	}{
		{"max_bans_per_chain", func(p *policy.Policy) { p.MaxBansPerChain = 2 },
			[]string{"2 0 applied", "3 0 unchanged", "4 0 applied", "5 3 denied denied: ban limit reached", "6 3 denied denied: ban limit reached"}, 2},
		{"max_new_bans_per_minute", func(p *policy.Policy) { p.MaxNewBansPerMinute = 3 },
			[]string{"2 0 applied", "3 0 unchanged", "4 0 applied", "5 0 applied", "6 3 denied " + relay.QuotaDenial}, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			tc.set(h.pol)
			input := strings.Join([]string{"iptables -w -N " + chain, ban("203.0.113.1"), ban("203.0.113.1"), ban("203.0.113.2"), ban("203.0.113.3"), ban("203.0.113.4")}, "\n") + "\n"
			code, replies, stderr := h.stream(input)
			require.Equal(t, ExitOK, code, stderr)
			require.Len(t, replies, 6)
			for i, w := range tc.want {
				assert.True(t, strings.HasPrefix(replies[i+1], w), "%q, want %q", replies[i+1], w)
			}
			rules, err := h.tables[policy.IPv4].List(chain)
			require.NoError(t, err)
			assert.Len(t, rules, 1+tc.rules, "the chain and its bans: %v", rules)
			assert.Contains(t, h.tables[policy.IPv4].Calls, fmt.Sprintf("Restore %d", tc.rules+2), "the batch's new bans went in one iptables-restore")
		})
	}
}

// TestStreamBatchLetsTheLockGo: a batch that has held the lock for the
// lock budget stops, lets the lock go, and serves the rest in the next
// batch: each line is still answered, in order.
func TestStreamBatchLetsTheLockGo(t *testing.T) {
	for _, tc := range []struct {
		name    string
		step    time.Duration // how far the clock moves at each reading
		batches int
	}{
		{"a quick batch holds the lock once", 0, 1},
		{"a slow batch lets it go after each line", streamLockBudget, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			now := time.Now()
			h.deps.Now = func() time.Time { now = now.Add(tc.step); return now }
			opened, open := 0, h.deps.OpenTable
			h.deps.OpenTable = func(fam policy.Family, b string, w time.Duration) (firewall.Table, error) {
				opened++ // once per batch that acts, for the family
				return open(fam, b, w)
			}
			code, replies, stderr := h.stream("iptables -w -N " + chain + "\niptables -w -A " + chain + " -j RETURN\niptables -w -I " + chain + " 1 -s 203.0.113.1 -j DROP\n")
			require.Equal(t, ExitOK, code, stderr)
			assert.Equal(t, []string{"1 0 applied", "2 0 applied", "3 0 applied"}, replies)
			assert.Equal(t, tc.batches, opened)
		})
	}
}
