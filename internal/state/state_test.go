package state

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/firewall/fwtest"
	"github.com/f2b-shim/f2b-shim/policy"
)

const chain = "mail-remote-f2b-imap"

func op(t *testing.T, line string) policy.Operation {
	t.Helper()
	o, err := policy.Decide(policy.Default(), line, policy.Context{})
	require.NoError(t, err)
	return o
}

var lifeCycle = []string{
	"iptables -w -N " + chain,
	"iptables -w -A " + chain + " -j RETURN",
	"iptables -w -I INPUT -p tcp -m multiport --dports imap,imaps -j " + chain,
	"iptables -w -I " + chain + " 1 -s 203.0.113.1 -j DROP",
	"iptables -w -I " + chain + " 1 -s 203.0.113.2 -j REJECT",
	"iptables -w -I " + chain + " 1 -s 203.0.113.1 -j DROP", // duplicate
	"iptables -w -D " + chain + " -s 203.0.113.3 -j DROP",   // absent
	"ip6tables -w -N " + chain,
	"ip6tables -w -I " + chain + " 1 -s 2001:db8::1 -j DROP",
}

func TestJournalRoundTrip(t *testing.T) {
	dir := t.TempDir()
	want := New()
	base := time.Date(2026, 11, 25, 1, 0, 0, 0, time.UTC)
	for i, l := range lifeCycle {
		at := base.Add(time.Duration(i) * time.Minute)
		want.Apply(op(t, l), at)
		require.NoError(t, Append(dir, Entry{Time: at, Command: op(t, l).CommandLine()}, false))
	}
	got, problems, err := Load(dir, policy.Default(), policy.Context{})
	require.NoError(t, err)
	assert.Empty(t, problems)
	assert.Equal(t, want, got)
	c := got.Tables[policy.IPv4].Chains[chain]
	require.Len(t, c.Bans, 2, "the duplicate ban is one ban")
	assert.Equal(t, base.Add(3*time.Minute), c.Bans[0].Since, "a ban keeps the time it was first made")
	assert.True(t, c.Return)
	assert.Len(t, got.Tables[policy.IPv4].Hooks, 1)

	t.Run("a compacted journal describes the same state", func(t *testing.T) {
		require.NoError(t, Write(dir, got))
		again, problems, err := Load(dir, policy.Default(), policy.Context{})
		require.NoError(t, err)
		assert.Empty(t, problems)
		assert.Equal(t, got, again)
		assert.False(t, NeedsCompaction(dir))
	})
	t.Run("stopping the jail empties the state", func(t *testing.T) {
		s := got
		for _, l := range []string{"iptables -w -D INPUT -p tcp -m multiport --dports imap,imaps -j " + chain, "iptables -w -F " + chain, "iptables -w -X " + chain} {
			s.Apply(op(t, l), base)
		}
		assert.Empty(t, s.Tables[policy.IPv4].Chains)
		assert.Empty(t, s.Tables[policy.IPv4].Hooks)
	})
}

func TestDamagedOrTamperedJournal(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, Append(dir, Entry{Command: "iptables -w -N " + chain}, false))
	require.NoError(t, Append(dir, Entry{Command: "iptables -w -I " + chain + " 1 -s 203.0.113.1 -j DROP"}, false))
	f, err := os.OpenFile(Path(dir), os.O_APPEND|os.O_WRONLY, 0)
	require.NoError(t, err)
	for _, bad := range []string{
		`{"time":"2026-11-25T01:00:00Z","command":"iptables -F INPUT"}`,
		`{"time":"2026-11-25T01:00:00Z","command":"iptables -w -I ` + chain + ` 1 -s 0.0.0.0/0 -j ACCEPT"}`,
		`{"time":"2026-11-25T01:00:00Z","command":"iptables -w -C ` + chain + ` -j RETURN"}`,
		`not json at all`,
		`{"time":"2026-11-25T01:00:00Z","command":"iptables -w -I ` + chain + ` 1 -s 203.0.113.2 -j DROP"}`,
		`{"time":"2026-11-25T01:00:00Z","comm`, // torn by a crash
	} {
		_, err := f.WriteString(bad + "\n")
		require.NoError(t, err)
	}
	require.NoError(t, f.Close())
	s, problems, err := Load(dir, policy.Default(), policy.Context{})
	require.NoError(t, err)
	assert.Len(t, problems, 5, "%v", problems)
	bans := s.Tables[policy.IPv4].Chains[chain].Bans
	require.Len(t, bans, 2, "the good lines around the bad ones still count")
	assert.Equal(t, "203.0.113.2/32", bans[1].Op.Source.String())
	assert.Empty(t, s.Tables[policy.IPv4].Hooks, "a tampered line never becomes a rule")
}

func TestFromLiveAndRestoreScript(t *testing.T) {
	fake := fwtest.New()
	for _, l := range lifeCycle[:5] {
		_, err := firewall.Apply(firewall.Backend{Table: fake, Policy: policy.Default()}, op(t, l))
		require.NoError(t, err)
	}
	require.NoError(t, fake.NewChain("mail-remote-f2b-odd"))
	require.NoError(t, fake.Insert("mail-remote-f2b-odd", 1, "-s", "0.0.0.0/0", "-j", "ACCEPT"))

	s := New()
	foreign, err := FromLive(s, policy.IPv4, firewall.Backend{Table: fake, Policy: policy.Default()}, policy.Context{})
	require.NoError(t, err)
	assert.Equal(t, []string{"-A mail-remote-f2b-odd -s 0.0.0.0/0 -j ACCEPT"}, foreign)
	c := s.Tables[policy.IPv4].Chains[chain]
	require.Len(t, c.Bans, 2)
	assert.Equal(t, "203.0.113.1/32", c.Bans[0].Op.Source.String(), "the oldest ban is the lowest rule")

	script := s.RestoreScript(policy.IPv4, func(Hook) bool { return true })
	assert.Equal(t, strings.Join([]string{
		"*filter",
		":mail-remote-f2b-imap - [0:0]",
		":mail-remote-f2b-odd - [0:0]",
		"-A mail-remote-f2b-imap -s 203.0.113.2/32 -j REJECT --reject-with icmp-port-unreachable",
		"-A mail-remote-f2b-imap -s 203.0.113.1/32 -j DROP",
		"-A mail-remote-f2b-imap -j RETURN",
		"-I INPUT -p tcp -m multiport --dports imap,imaps -j mail-remote-f2b-imap",
		"COMMIT", ""}, "\n"), script)
}
