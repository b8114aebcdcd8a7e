package state

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"

	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/firewall/fwtest"
	"github.com/f2b-shim/f2b-shim/internal/hostnet"
	"github.com/f2b-shim/f2b-shim/policy"
)

const chain = "mail-remote-f2b-imap"

var ctx = policy.Context{LookupPort: hostnet.LookupPort}

func op(t testing.TB, line string) policy.Operation {
	t.Helper()
	o, err := policy.Decide(policy.Default(), line, ctx)
	require.NoError(t, err)
	return o
}

func testPolicy(t testing.TB) *policy.Policy {
	pol := policy.Default()
	pol.StateDir = t.TempDir()
	return pol
}

func open(t testing.TB, pol *policy.Policy) *Store {
	s, err := Open(pol, hostnet.LookupPort, time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	return s
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

func TestStoreRoundTrip(t *testing.T) {
	pol := testPolicy(t)
	s := open(t, pol)
	want := New(hostnet.LookupPort)
	base := time.Date(2026, 11, 25, 1, 0, 0, 0, time.UTC)
	for i, l := range lifeCycle {
		at := base.Add(time.Duration(i) * time.Minute)
		want.Apply(op(t, l), at)
		require.NoError(t, s.Record(op(t, l), i != 5 && i != 6, at))
	}
	got, problems, err := s.Load(ctx)
	require.NoError(t, err)
	assert.Empty(t, problems)
	c := got.Tables[policy.IPv4].Chains[chain]
	require.Equal(t, 2, c.Len(), "the duplicate ban is one ban")
	assert.Equal(t, base.Add(3*time.Minute), c.Bans()[0].Since, "a ban keeps the time it was first made")
	assert.True(t, c.Return)
	assert.Len(t, got.Tables[policy.IPv4].Hooks, 1)
	assert.Equal(t, want.Tables[policy.IPv4].Chains[chain].Bans()[1].Op, c.Bans()[1].Op)

	t.Run("the same hook spelled otherwise is one hook, and its removal removes it", func(t *testing.T) {
		require.NoError(t, s.Record(op(t, "iptables -w -I INPUT -p tcp -m multiport --dports 993,143 -j "+chain), false, base))
		got, _, _ := s.Load(ctx)
		assert.Len(t, got.Tables[policy.IPv4].Hooks, 1)
		require.NoError(t, s.Record(op(t, "iptables -w -D INPUT -p tcp -m multiport --dports 143,993 -j "+chain), true, base))
		got, _, _ = s.Load(ctx)
		assert.Empty(t, got.Tables[policy.IPv4].Hooks)
	})
	t.Run("stopping the jail empties the state", func(t *testing.T) {
		for _, l := range []string{"iptables -w -F " + chain, "iptables -w -X " + chain} {
			require.NoError(t, s.Record(op(t, l), true, base))
		}
		got, _, _ := s.Load(ctx)
		assert.Empty(t, got.Tables[policy.IPv4].Chains)
		assert.Len(t, got.Tables[policy.IPv6].Chains, 1, "the other family is untouched")
	})
}

// TestTamperedStateIsJudgedAgain writes records into the state file
// behind the shim's back, as its user could: none becomes a rule.
func TestTamperedStateIsJudgedAgain(t *testing.T) {
	pol := testPolicy(t)
	s := open(t, pol)
	for _, l := range lifeCycle[:4] {
		require.NoError(t, s.Record(op(t, l), true, time.Now()))
	}
	require.NoError(t, s.update(func(tx *bolt.Tx) error {
		c, err := chainBucket(tx, policy.IPv4, chain, true)
		require.NoError(t, err)
		require.NoError(t, c.Bucket(bansBucket).Put([]byte("0.0.0.0/0 ACCEPT"), encodeTime(time.Now())))
		require.NoError(t, c.Bucket(bansBucket).Put([]byte("127.0.0.1/32 DROP"), encodeTime(time.Now())))
		require.NoError(t, c.Bucket(hooksBucket).Put([]byte("iptables -w -F INPUT"), nil))
		require.NoError(t, c.Bucket(hooksBucket).Put([]byte("iptables -w -I INPUT -p udp -j "+chain), nil))
		f := tx.Bucket(famBucket(policy.IPv4))
		_, err = f.CreateBucket([]byte("INPUT"))
		return err
	}))
	got, problems, err := s.Load(ctx)
	require.NoError(t, err)
	assert.Len(t, problems, 5, "%v", problems)
	assert.Equal(t, 1, got.Tables[policy.IPv4].Chains[chain].Len(), "the good record still counts")
	assert.Len(t, got.Tables[policy.IPv4].Hooks, 1)
	assert.NotContains(t, got.Tables[policy.IPv4].Chains, policy.Chain("INPUT"))
}

// TestPoliciesSharingAStateDirKeepTheirOwnState is finding 4 of the
// hardening issue: one policy's changes never touch the other's record.
func TestPoliciesSharingAStateDirKeepTheirOwnState(t *testing.T) {
	a := testPolicy(t)
	b := policy.Default()
	b.Name, b.ChainPrefix, b.StateDir = "mx2", "mail-remote-mx2-", a.StateDir
	sa, sb := open(t, a), open(t, b)
	require.NoError(t, sa.Record(op(t, "iptables -N "+chain), true, time.Now()))
	require.NoError(t, sa.Record(op(t, "iptables -I "+chain+" 1 -s 203.0.113.1 -j DROP"), true, time.Now()))
	opB, err := policy.Decide(b, "iptables -I mail-remote-mx2-imap 1 -s 203.0.113.2 -j DROP", ctx)
	require.NoError(t, err)
	for range 100 {
		require.NoError(t, sb.Record(opB, true, time.Now()))
	}
	gotA, problems, err := sa.Load(ctx)
	require.NoError(t, err)
	assert.Empty(t, problems)
	assert.Equal(t, 1, gotA.Tables[policy.IPv4].Chains[chain].Len())
	gotB, problems, err := sb.Load(ctx)
	require.NoError(t, err)
	assert.Empty(t, problems)
	assert.Equal(t, 1, gotB.Tables[policy.IPv4].Chains["mail-remote-mx2-imap"].Len())
	assert.NotEqual(t, Path(a), Path(b))
}

func TestIntentSurvivesUntilRecorded(t *testing.T) {
	pol := testPolicy(t)
	s := open(t, pol)
	ban := op(t, "iptables -I "+chain+" 1 -s 203.0.113.1 -j DROP")
	require.NoError(t, s.SetIntent(ban))
	require.NoError(t, s.Close())
	s = open(t, pol)
	got, err := s.Intent(ctx)
	require.NoError(t, err)
	require.Len(t, got, 1, "a shim killed after SetIntent leaves the intent")
	assert.Equal(t, ban, got[0])
	require.NoError(t, s.Record(ban, true, time.Now()))
	got, err = s.Intent(ctx)
	require.NoError(t, err)
	assert.Empty(t, got, "recording the change clears it")
}

// TestKeptIntentOutlivesTheRecord: with KeepIntent (one-shot and stream
// mode), recording a change keeps its intent until the caller has written
// its audit line and clears it; a shim killed in between leaves the
// intent, so the next request notes the change as cut short.
func TestKeptIntentOutlivesTheRecord(t *testing.T) {
	pol := testPolicy(t)
	s := open(t, pol)
	s.KeepIntent = true
	ban := op(t, "iptables -I "+chain+" 1 -s 203.0.113.1 -j DROP")
	require.NoError(t, s.SetIntent(ban))
	require.NoError(t, s.RecordRequest(ban, true, time.Now()))
	require.NoError(t, s.Close()) // killed before the audit line
	s = open(t, pol)
	got, err := s.Intent(ctx)
	require.NoError(t, err)
	assert.Equal(t, []policy.Operation{ban}, got, "the intent outlives the record")
	has, err := s.HasBan(ban)
	require.NoError(t, err)
	assert.True(t, has, "and the record holds the ban")
	require.NoError(t, s.ClearIntent())
	got, err = s.Intent(ctx)
	require.NoError(t, err)
	assert.Empty(t, got)
}

// TestAHeldIntentIsNotCleared: a request that cannot read back an earlier
// change holds its intent; its own change failing with nothing changed
// (a denial) must not clear the earlier one with it.
func TestAHeldIntentIsNotCleared(t *testing.T) {
	pol := testPolicy(t)
	s := open(t, pol)
	s.KeepIntent = true
	earlier := op(t, "iptables -I "+chain+" 1 -s 203.0.113.1 -j DROP")
	require.NoError(t, s.SetIntent(earlier))
	s.HoldIntent()
	denied := op(t, "iptables -I "+chain+" 1 -s 203.0.113.2 -j DROP")
	require.NoError(t, s.SetIntent(denied))
	require.NoError(t, s.ClearIntent())
	require.NoError(t, s.SettleIntent())
	got, err := s.Intent(ctx)
	require.NoError(t, err)
	assert.Contains(t, got, earlier, "the earlier change still needs reading back")
}

// TestBatchIsOneTransaction: a batch's reads see its own changes, nothing
// of it is on disk before Commit, and a batch that is never committed (a
// killed stream) leaves the store as it was, with its intents.
func TestBatchIsOneTransaction(t *testing.T) {
	pol := testPolicy(t)
	s := open(t, pol)
	ban1 := op(t, "iptables -I "+chain+" 1 -s 203.0.113.1 -j DROP")
	ban2 := op(t, "iptables -I "+chain+" 1 -s 203.0.113.2 -j DROP")
	require.NoError(t, s.SetIntent(ban1, ban2))
	require.NoError(t, s.Begin())
	require.NoError(t, s.RecordRequest(ban1, true, time.Now()))
	has, err := s.HasBan(ban1)
	require.NoError(t, err)
	assert.True(t, has, "a request in the batch sees the ones before it")
	n, err := s.NewBans(time.Now())
	require.NoError(t, err)
	assert.Equal(t, 1, n, "the quota counts the batch")
	s.Rollback()
	has, err = s.HasBan(ban1)
	require.NoError(t, err)
	assert.False(t, has, "a batch never committed is not in the store")
	got, err := s.Intent(ctx)
	require.NoError(t, err)
	assert.Equal(t, []policy.Operation{ban1, ban2}, got, "its intents are")

	require.NoError(t, s.Begin())
	require.Error(t, s.Begin(), "batches do not nest")
	require.NoError(t, s.RecordRequest(ban1, true, time.Now()))
	require.NoError(t, s.RecordRequest(ban2, true, time.Now()))
	require.NoError(t, s.Commit())
	require.NoError(t, s.Close())
	s = open(t, pol)
	for _, b := range []policy.Operation{ban1, ban2} {
		has, err := s.HasBan(b)
		require.NoError(t, err)
		assert.True(t, has)
	}
	got, err = s.Intent(ctx)
	require.NoError(t, err)
	assert.Empty(t, got, "recording clears the batch's intents")
}

// TestImportOfTheOldJournal carries an upgraded proxy's journal over, and
// leaves another policy's lines to that policy.
func TestImportOfTheOldJournal(t *testing.T) {
	pol := testPolicy(t)
	lines := []string{
		`{"time":"2026-11-25T01:00:00Z","command":"iptables -w -N ` + chain + `"}`,
		`{"time":"2026-11-25T01:01:00Z","command":"iptables -w -I ` + chain + ` 1 -s 203.0.113.1/32 -j DROP"}`,
		`{"time":"2026-11-25T01:02:00Z","command":"iptables -w -I ` + chain + ` 1 -s 203.0.113.2/32 -j DROP"}`,
		`{"time":"2026-11-25T01:03:00Z","command":"iptables -w -D ` + chain + ` -s 203.0.113.2/32 -j DROP"}`,
		`{"time":"2026-11-25T01:04:00Z","command":"iptables -w -I INPUT -p tcp -m tcp --dport 25 -j ` + chain + `"}`,
		`{"time":"2026-11-25T01:04:00Z","command":"iptables -w -I mail-remote-mx2-imap 1 -s 203.0.113.9/32 -j DROP"}`,
		`{"time":"2026-11-25T01:05:00Z","command":"iptables -w -I INPUT -p tcp --dport 25 -j ` + chain + `"}`,
		`not json`,
	}
	require.NoError(t, os.WriteFile(filepath.Join(pol.StateDir, "journal.jsonl"), []byte(strings.Join(lines, "\n")+"\n"), 0o640))
	s := open(t, pol)
	got, problems, err := s.Load(ctx)
	require.NoError(t, err)
	assert.Empty(t, problems)
	c := got.Tables[policy.IPv4].Chains[chain]
	require.NotNil(t, c)
	require.Equal(t, 1, c.Len())
	assert.Equal(t, "203.0.113.1/32", c.Bans()[0].Op.Source.String())
	assert.Equal(t, time.Date(2026, 11, 25, 1, 1, 0, 0, time.UTC), c.Bans()[0].Since)
	assert.Len(t, got.Tables[policy.IPv4].Hooks, 1)
	synced, err := s.Synced(policy.IPv4, chain)
	require.NoError(t, err)
	assert.False(t, synced, "the rule backend reads an imported chain once before trusting it")
}

func TestFromLiveAndRestoreScript(t *testing.T) {
	fake := fwtest.New()
	b := firewall.Backend{Table: fake, Policy: policy.Default(), LookupPort: hostnet.LookupPort}
	for _, l := range lifeCycle[:5] {
		_, err := firewall.Apply(b, op(t, l))
		require.NoError(t, err)
	}
	_, err := firewall.Apply(b, op(t, "iptables -I INPUT -p tcp --dport 25 -j "+chain))
	require.NoError(t, err)
	require.NoError(t, fake.NewChain("mail-remote-f2b-odd"))
	require.NoError(t, fake.Insert("mail-remote-f2b-odd", 1, "-s", "0.0.0.0/0", "-j", "ACCEPT"))

	s := New(hostnet.LookupPort)
	foreign, err := FromLive(s, policy.IPv4, b, ctx)
	require.NoError(t, err)
	assert.Equal(t, []string{"-A mail-remote-f2b-odd -s 0.0.0.0/0 -j ACCEPT"}, foreign)
	c := s.Tables[policy.IPv4].Chains[chain]
	require.Equal(t, 2, c.Len())
	assert.Equal(t, "203.0.113.1/32", c.Bans()[0].Op.Source.String(), "the oldest ban is the lowest rule")
	assert.Len(t, s.Tables[policy.IPv4].Hooks, 2, "the single-port hook, printed as -m tcp --dport 25, is read back")

	script := s.RestoreScript(policy.IPv4, func(Hook) bool { return true })
	assert.Equal(t, strings.Join([]string{
		"*filter",
		":mail-remote-f2b-imap - [0:0]",
		":mail-remote-f2b-odd - [0:0]",
		"-A mail-remote-f2b-imap -s 203.0.113.2/32 -j REJECT --reject-with icmp-port-unreachable",
		"-A mail-remote-f2b-imap -s 203.0.113.1/32 -j DROP",
		"-A mail-remote-f2b-imap -j RETURN",
		"-I INPUT -p tcp --dport 25 -j mail-remote-f2b-imap",
		"-I INPUT -p tcp -m multiport --dports imap,imaps -j mail-remote-f2b-imap",
		"COMMIT", ""}, "\n"), script)
}

// BenchmarkRequestAfterLongHistory is finding 3 of the hardening issue:
// a request's cost must not grow with the history. The store holds
// 20,000 bans after 10,000 ban/unban cycles; each iteration is one ban
// and its unban, recorded as the shim records them (fsync'd).
func BenchmarkRequestAfterLongHistory(b *testing.B) {
	for _, history := range []int{0, 20000} {
		b.Run(fmt.Sprintf("bans=%d", history), func(b *testing.B) {
			pol := testPolicy(b)
			s := open(b, pol)
			preload(b, s, history)
			ban := op(b, "iptables -I "+chain+" 1 -s 198.51.100.1 -j DROP")
			unban := op(b, "iptables -D "+chain+" -s 198.51.100.1 -j DROP")
			for b.Loop() {
				require.NoError(b, s.SetIntent(ban))
				require.NoError(b, s.Record(ban, true, time.Now()))
				require.NoError(b, s.SetIntent(unban))
				require.NoError(b, s.Record(unban, true, time.Now()))
			}
		})
	}
}

// BenchmarkLoadAfterLongHistory measures what restore and list read.
func BenchmarkLoadAfterLongHistory(b *testing.B) {
	pol := testPolicy(b)
	s := open(b, pol)
	preload(b, s, 20000)
	for b.Loop() {
		st, problems, err := s.Load(ctx)
		require.NoError(b, err)
		require.Empty(b, problems)
		require.Equal(b, 20000, st.Tables[policy.IPv4].Chains[chain].Len())
	}
}

// preload records n bans, then n/2 ban/unban cycles, in one transaction
// (the history a busy proxy builds over weeks).
func preload(b testing.TB, s *Store, n int) {
	require.NoError(b, s.update(func(tx *bolt.Tx) error {
		at := time.Now()
		require.NoError(b, s.record(tx, op(b, "iptables -N "+chain), true, at))
		for i := range n {
			require.NoError(b, s.record(tx, op(b, fmt.Sprintf("iptables -I %s 1 -s 10.%d.%d.%d -j DROP", chain, i>>16&255, i>>8&255, i&255)), true, at))
		}
		for i := range n / 2 {
			l := fmt.Sprintf("-s 10.200.%d.%d -j DROP", i>>8&255, i&255)
			require.NoError(b, s.record(tx, op(b, "iptables -I "+chain+" 1 "+l), true, at))
			require.NoError(b, s.record(tx, op(b, "iptables -D "+chain+" "+l), true, at))
		}
		return nil
	}))
}

func TestQuotaCountsNewBansOverAMinute(t *testing.T) {
	s := open(t, testPolicy(t))
	t0 := time.Unix(1_800_000_000, 0)
	for i := range 5 {
		ban := op(t, fmt.Sprintf("iptables -I %s 1 -s 203.0.113.%d -j DROP", chain, i+1))
		require.NoError(t, s.RecordRequest(ban, true, t0.Add(time.Duration(i)*10*time.Second)))
	}
	require.NoError(t, s.RecordRequest(op(t, "iptables -I "+chain+" 1 -s 203.0.113.1 -j DROP"), false, t0.Add(45*time.Second)))
	require.NoError(t, s.Record(op(t, "iptables -I "+chain+" 1 -s 203.0.113.9 -j DROP"), true, t0.Add(45*time.Second)))
	n, err := s.NewBans(t0.Add(45 * time.Second))
	require.NoError(t, err)
	assert.Equal(t, 5, n, "unchanged bans and admin records do not count")
	n, err = s.NewBans(t0.Add(75 * time.Second))
	require.NoError(t, err)
	assert.Equal(t, 3, n, "the bans at 0 and 10 s are more than a minute old at 75 s")
}

func TestReBanRefreshesTheTime(t *testing.T) {
	s := open(t, testPolicy(t))
	t0 := time.Unix(1_800_000_000, 0).UTC()
	ban := op(t, "iptables -I "+chain+" 1 -s 203.0.113.1 -j DROP")
	require.NoError(t, s.Record(op(t, "iptables -N "+chain), true, t0))
	require.NoError(t, s.Record(ban, true, t0))
	require.NoError(t, s.Record(ban, false, t0.Add(time.Hour)))
	st, _, err := s.Load(ctx)
	require.NoError(t, err)
	b := st.Tables[policy.IPv4].Chains[chain].Bans()[0]
	assert.Equal(t, t0, b.Since)
	assert.Equal(t, t0.Add(time.Hour), b.Last)
	assert.Empty(t, st.Expired(t0.Add(30*time.Minute)))
	assert.Len(t, st.Expired(t0.Add(2*time.Hour)), 1)
}

// TestMembersOutliveAChainReadBack: a widened ban's members survive the
// read-back after a change cut short, while their ban is still there.
func TestMembersOutliveAChainReadBack(t *testing.T) {
	pol := testPolicy(t)
	pol.BanPrefixV6 = 64
	s := open(t, pol)
	wide, err := policy.Decide(pol, "ip6tables -I "+chain+" 1 -s 2001:db8:1::10 -j DROP", ctx)
	require.NoError(t, err)
	require.NoError(t, s.Record(op(t, "ip6tables -N "+chain), true, time.Now()))
	require.NoError(t, s.Record(wide, true, time.Now()))
	st, _, err := s.Load(ctx)
	require.NoError(t, err)
	require.NoError(t, s.ReplaceChain(st, policy.IPv6, chain))
	members, err := s.Members(wide)
	require.NoError(t, err)
	assert.Equal(t, []string{"2001:db8:1::10/128"}, members)
	st.Apply(policy.Operation{Command: policy.Command{Family: policy.IPv6, Kind: policy.DeleteBan, Chain: chain, Source: wide.Source, Target: wide.Target}}, time.Now())
	require.NoError(t, s.ReplaceChain(st, policy.IPv6, chain))
	members, err = s.Members(wide)
	require.NoError(t, err)
	assert.Empty(t, members, "gone with their ban")
}

// TestAHookAlreadyThereIsLearned: a hook the firewall holds but the state
// does not (the state was lost) is recorded when fail2ban sends it again,
// so that restore brings it back; one the state has is not doubled.
func TestAHookAlreadyThereIsLearned(t *testing.T) {
	s := open(t, testPolicy(t))
	hook := op(t, "iptables -w -I INPUT -p tcp -m multiport --dports imap,imaps -j "+chain)
	require.NoError(t, s.Record(hook, false, time.Now()))
	require.NoError(t, s.Record(op(t, "iptables -w -I INPUT -p tcp -m multiport --dports 993,143 -j "+chain), false, time.Now()))
	st, _, err := s.Load(ctx)
	require.NoError(t, err)
	assert.Len(t, st.Tables[policy.IPv4].Hooks, 1)
}

// TestBatchSeesItsOwnMarks: the marks a batch writes (a chain in sync, a
// ban unsettled) are seen by the requests after them in the same batch,
// not only once committed; otherwise each ban of a stream's first batch
// after a chain's creation read the whole chain again.
func TestBatchSeesItsOwnMarks(t *testing.T) {
	s := open(t, testPolicy(t))
	ban := op(t, "iptables -I "+chain+" 1 -s 203.0.113.1 -j DROP")
	require.NoError(t, s.Begin())
	defer s.Rollback()
	require.NoError(t, s.Learn(ban.Family, ban.Chain, nil))
	synced, err := s.Synced(ban.Family, ban.Chain)
	require.NoError(t, err)
	assert.True(t, synced)
	require.NoError(t, s.Unsettle(ban))
	unsettled, err := s.Unsettled(ban)
	require.NoError(t, err)
	assert.True(t, unsettled)
}

// TestARenamedPolicyKeepsItsBans changes a policy's name, as an admin
// edits name in its file: the state follows it (issue 22, item 5), and
// another policy of the same state_dir is left alone.
func TestARenamedPolicyKeepsItsBans(t *testing.T) {
	dir := t.TempDir()
	withFile := func(name, file string) *policy.Policy {
		pol := policy.Default()
		pol.Name, pol.StateDir, pol.File = name, dir, file
		return pol
	}
	ban := func(t *testing.T, pol *policy.Policy) {
		s, err := Open(pol, hostnet.LookupPort, time.Second)
		require.NoError(t, err)
		defer s.Close()
		require.NoError(t, s.Record(op(t, "iptables -N "+chain), true, time.Now()))
		require.NoError(t, s.Record(op(t, "iptables -I "+chain+" 1 -s 203.0.113.1 -j DROP"), true, time.Now()))
	}
	bans := func(t *testing.T, pol *policy.Policy) (int, string) {
		s, err := Open(pol, hostnet.LookupPort, time.Second)
		require.NoError(t, err)
		defer s.Close()
		got, _, err := s.Load(ctx)
		require.NoError(t, err)
		c := got.Tables[policy.IPv4].Chains[chain]
		if c == nil {
			return 0, s.RenamedFrom
		}
		return c.Len(), s.RenamedFrom
	}

	t.Run("the renamed policy finds its ban, and the old file is gone", func(t *testing.T) {
		ban(t, withFile("default", "/etc/f2b-shim/policy.toml"))
		n, from := bans(t, withFile("mail1", "/etc/f2b-shim/policy.toml"))
		assert.Equal(t, 1, n)
		assert.Equal(t, "default", from)
		assert.NoFileExists(t, filepath.Join(dir, "default.db"))
		n, from = bans(t, withFile("mail1", "/etc/f2b-shim/policy.toml"))
		assert.Equal(t, 1, n, "and keeps it")
		assert.Empty(t, from, "once moved, nothing more to move")
	})
	t.Run("another policy file's state is not taken", func(t *testing.T) {
		ban(t, withFile("mx2", "/etc/f2b-shim/mx2.toml"))
		n, from := bans(t, withFile("mx3", "/etc/f2b-shim/other.toml"))
		assert.Equal(t, 0, n)
		assert.Empty(t, from)
		assert.FileExists(t, filepath.Join(dir, "mx2.db"))
	})
	t.Run("a file used under two names that both hold state is refused with what to do", func(t *testing.T) {
		ban(t, withFile("a", "/etc/f2b-shim/twice.toml"))
		ban(t, withFile("b", "/etc/f2b-shim/other-twice.toml"))
		require.NoError(t, os.WriteFile(filepath.Join(dir, "b.source"), []byte("/etc/f2b-shim/twice.toml\n"), 0o640))
		_, err := Open(withFile("c", "/etc/f2b-shim/twice.toml"), hostnet.LookupPort, time.Second)
		require.Error(t, err)
		assert.Contains(t, err.Error(), `under the names ["a" "b"], not "c"`)
		assert.Contains(t, err.Error(), filepath.Join(dir, "c.db"))
	})
}

// TestAnUnbanMakesNoChainRecord: an unban (or an unhook) in a chain the state does not
// hold (never made, or made by hand) leaves the state without it, applied
// or not. A record made there would have the heal build, on the next
// request, a chain that was never there (FuzzStream found one-shot and
// stream mode disagreeing over it).
func TestAnUnbanMakesNoChainRecord(t *testing.T) {
	for _, line := range []string{
		"iptables -D " + chain + " -s 203.0.113.1 -j DROP",
		"iptables -D INPUT -p tcp -m multiport --dports 143,993 -j " + chain,
	} {
		for _, applied := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s, applied %v", line, applied), func(t *testing.T) {
				s := open(t, testPolicy(t))
				require.NoError(t, s.Record(op(t, line), applied, time.Now()))
				has, err := s.HasChain(policy.IPv4, chain)
				require.NoError(t, err)
				assert.False(t, has)
			})
		}
	}
}
