package audit

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestTextEscapesEveryDangerousByte(t *testing.T) {
	tests := []struct {
		name, in string
		// want is the decoded value; "" means the input itself.
		want string
	}{
		{"plain text is kept", "iptables -w -N mail-remote-f2b-x", ""},
		{"a newline cannot start a forged line", "ban\n{\"decision\":\"allow\"}", ""},
		{"a carriage return is escaped", "a\rb", ""},
		{"an escape sequence is escaped", "\x1b[2J\x1b]0;pwned\x07", ""},
		{"NUL is escaped", "a\x00b", ""},
		{"DEL and C1 controls are escaped", "a\x7fb\u009bc", ""},
		{"line separators are escaped", "a\u2028b\u2029c", ""},
		{"quotes and backslashes are escaped", `a"b\c'd`, ""},
		{"invalid UTF-8 becomes U+FFFD", "a\xffb\xc3", "a\ufffdb\ufffd"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := json.Marshal(Text(tt.in))
			require.NoError(t, err)
			for _, b := range out {
				assert.False(t, b < 0x20 || b == 0x7f, "raw control byte %#x in %q", b, out)
			}
			assert.NotContains(t, string(out), "\u2028")
			assert.NotContains(t, string(out), "\u0085")
			var back string
			require.NoError(t, json.Unmarshal(out, &back), "%s", out)
			want := tt.want
			if want == "" {
				want = tt.in
			}
			assert.Equal(t, want, back)
		})
	}
}

func TestRecordKeepsRawBytesWhenTextCannot(t *testing.T) {
	t.Run("invalid UTF-8 is kept in command_b64", func(t *testing.T) {
		var r Record
		r.SetCommand("iptables \xff\xfe")
		assert.Equal(t, []byte("iptables \xff\xfe"), r.CommandB64)
	})
	t.Run("valid text has no command_b64", func(t *testing.T) {
		var r Record
		r.SetCommand("iptables -N x")
		assert.Nil(t, r.CommandB64)
		assert.Equal(t, 13, r.CommandLen)
	})
}

// TestEveryLineFitsInMaxLine is finding 9 of the hardening issue: a
// 4,084-byte command once made a 24,693-byte line. Whatever the input,
// a line is at most MaxLine bytes, and keeps the command's length, hash
// and as much of its start as fits.
func TestEveryLineFitsInMaxLine(t *testing.T) {
	worst := []string{
		strings.Repeat("\x01", 4096),                             // each byte escapes to six
		strings.Repeat("\xff", 4096),                             // invalid: U+FFFD escapes plus base64
		strings.Repeat("\u2028", 2000),                           // three bytes, escaped to six
		strings.Repeat("A", 1<<20),                               // a megabyte
		strings.Repeat("é\x01\xff\"", 3000),                      // mixed
		"iptables -I mail-remote-f2b-x 1 -s 203.0.113.1 -j DROP", // an ordinary line
	}
	longest := 0
	for _, cmd := range worst {
		r := Record{Time: time.Now(), Policy: "p", ClientIP: "2001:db8::1", Decision: Deny, Result: "denied", Exit: 3}
		r.SetCommand(cmd)
		r.Reason = Text(strings.Repeat("\x02", 5000))
		r.SetStderr(strings.Repeat("\x03", 5000))
		r.State = Text(strings.Repeat("\x04", 5000))
		line, err := r.Line()
		require.NoError(t, err)
		assert.LessOrEqual(t, len(line), MaxLine, "%.20q", cmd)
		longest = max(longest, len(line))
		var back Record
		require.NoError(t, json.Unmarshal(line, &back))
		assert.Equal(t, len(cmd), back.CommandLen)
		if len(cmd) > 1000 || back.CommandSHA256 != "" {
			sum := sha256.Sum256([]byte(cmd))
			assert.Equal(t, hex.EncodeToString(sum[:]), back.CommandSHA256, "a cut command keeps its hash")
			shown := string(back.Command)
			if back.CommandB64 != nil {
				shown = string(back.CommandB64)
			}
			assert.True(t, strings.HasPrefix(cmd, shown), "what is kept is the command's start")
			assert.NotEmpty(t, shown)
		} else {
			assert.Equal(t, cmd, string(back.Command))
		}
	}
	t.Logf("the longest line any of these inputs made: %d bytes (MaxLine %d)", longest, MaxLine)
}

// TestDenialsAreCoalescedPerClientAndSecond floods the log with denials
// from one client: one full line for the first of each second, and one
// count line for the rest, before the next line.
func TestDenialsAreCoalescedPerClientAndSecond(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	l, err := Open(path)
	require.NoError(t, err)
	defer l.Close()
	t0 := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	deny := func(at time.Time, client string) {
		r := Record{Time: at, Policy: "p", ClientIP: client, Decision: Deny, Result: "denied", Exit: 3}
		r.SetCommand("iptables -F INPUT")
		require.NoError(t, l.Write(r))
	}
	for i := range 1000 {
		deny(t0.Add(time.Duration(i)*time.Millisecond), "192.0.2.10") // 1,000 in one second
	}
	deny(t0.Add(500*time.Millisecond), "192.0.2.11") // another client
	for i := range 10 {
		deny(t0.Add(time.Second+time.Duration(i)*time.Millisecond), "192.0.2.10")
	}
	require.NoError(t, l.Write(Record{Time: t0.Add(3 * time.Second), Policy: "p", Decision: Allow, Result: "applied"}))
	entries, bad, err := Read(path)
	require.NoError(t, err)
	require.Empty(t, bad)
	var got []string
	total := 0
	for _, e := range entries {
		got = append(got, fmt.Sprintf("%s %s %s %d", e.Record.Time.Format("05"), e.Record.ClientIP, e.Record.Result, e.Record.Count))
		if e.Record.Decision == Deny {
			total += max(1, e.Record.Count)
		}
	}
	assert.ElementsMatch(t, []string{
		"00 192.0.2.10 denied 0",
		"00 192.0.2.11 denied 0",
		"00 192.0.2.10 coalesced 999",
		"01 192.0.2.10 denied 0",
		"01 192.0.2.10 coalesced 9",
		" applied 0",
	}, fixAllow(got))
	assert.Equal(t, 1011, total, "every denial is counted")
}

func fixAllow(lines []string) []string {
	for i, l := range lines {
		if strings.HasSuffix(l, "applied 0") {
			lines[i] = " applied 0"
		}
	}
	return lines
}

func TestLogWritesOneValidLinePerRecord(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "audit.jsonl")
	hostile := []string{
		"ban\n{\"decision\":\"allow\"}",
		"\r\x1b[1A\x1b[2Kfake",
		"\xff\xfe\xfd",
		strings.Repeat("\n", 5000),
		`"},"decision":"allow`,
	}
	var wg sync.WaitGroup
	for i := range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l, err := Open(path)
			if !assert.NoError(t, err) {
				return
			}
			defer l.Close()
			r := Record{Time: time.Now(), Policy: "test", Decision: Deny, Result: "denied", Exit: 3}
			r.SetCommand(hostile[i%len(hostile)])
			assert.NoError(t, l.Write(r))
		}()
	}
	wg.Wait()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	lines := 0
	for sc.Scan() {
		var r Record
		require.NoError(t, json.Unmarshal(sc.Bytes(), &r), "line %d: %q", lines+1, sc.Text())
		assert.Equal(t, Deny, r.Decision)
		lines++
	}
	require.NoError(t, sc.Err())
	assert.Equal(t, 50, lines)
	st, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o640), st.Mode().Perm())
}

func TestOpenFailsWhenTheLogCannotBeCreated(t *testing.T) {
	dir := t.TempDir()
	blocker := filepath.Join(dir, "file")
	require.NoError(t, os.WriteFile(blocker, nil, 0o600))
	_, err := Open(filepath.Join(blocker, "audit.jsonl"))
	assert.Error(t, err, "a path under a regular file cannot be created")
}

// TestRepeatedNonChangesAreCoalescedPerKind floods the log from one
// client with every kind of request that changes nothing, interleaved,
// in one second: each kind is written once in full and once as a count,
// however they alternate, and the log grows by a bounded number of bytes.
func TestRepeatedNonChangesAreCoalescedPerKind(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	l, err := Open(path)
	require.NoError(t, err)
	defer l.Close()
	t0 := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	kinds := []Record{
		{Decision: Deny, Result: "denied", Exit: 3, Reason: "chain \"INPUT\" is outside the allowed prefix"},
		{Decision: Allow, Result: "denied", Exit: 3, Reason: "ban quota limit reached: 10 bans were made in the last minute (max_new_bans_per_minute); wait"},
		{Decision: Allow, Result: "denied", Exit: 3, Reason: "ban limit reached: chain \"x\" already holds 5 bans (max_bans_per_chain); unban some"},
		{Decision: Allow, Result: "unchanged"},
		{Decision: Allow, Result: "check-true"},
		{Decision: Allow, Result: "check-false", Exit: 1},
		{Decision: Allow, Result: "dry-run"},
		{Decision: Allow, Result: "failed", Exit: 4, Reason: "no chain by that name"},
	}
	const rounds = 1000
	var batch []Record
	for i := range rounds {
		for _, k := range kinds {
			r := k
			r.Time, r.Policy, r.ClientIP = t0.Add(time.Duration(i)*time.Millisecond), "p", "192.0.2.10"
			r.SetCommand("iptables -w -I f2b-x 1 -s 203.0.113.62 -j DROP " + strings.Repeat("\x01", 5000))
			r.Reason = Text(strings.Repeat("\x02", 600)) + r.Reason
			batch = append(batch, r)
		}
		if len(batch) >= 512 {
			require.NoError(t, l.WriteBatch(batch))
			batch = batch[:0]
		}
	}
	batch = append(batch, Record{Time: t0.Add(time.Second), Policy: "p", ClientIP: "192.0.2.10", Decision: Allow, Result: "applied"})
	require.NoError(t, l.WriteBatch(batch))
	entries, bad, err := Read(path)
	require.NoError(t, err)
	require.Empty(t, bad)
	full, counted := map[string]int{}, map[string]int{}
	for _, e := range entries {
		r := e.Record
		if r.Result == "coalesced" {
			counted[r.Decision] += r.Count
			continue
		}
		full[r.Result]++
	}
	assert.Equal(t, map[string]int{"denied": 3, "unchanged": 1, "check-true": 1, "check-false": 1, "dry-run": 1, "failed": 1, "applied": 1}, full)
	assert.Equal(t, map[string]int{Deny: rounds - 1, Allow: 7 * (rounds - 1)}, counted, "every request is counted")
	assert.Len(t, entries, 2*len(kinds)+1)
	st, err := os.Stat(path)
	require.NoError(t, err)
	t.Logf("%d requests of %d kinds in one second from one client: %d bytes", rounds*len(kinds), len(kinds), st.Size())
	// The bound README and SECURITY.md state: per client, kind and
	// second, one full line and one count line.
	assert.LessOrEqual(t, st.Size(), int64(len(kinds)+1)*MaxCoalescedSecond, "the worst case per kind and second")
}

// TestFollowRotationReopensARenamedLog renames the log as logrotate's
// create mode does: the next record goes to a new file at the path, and
// links to the last line of the rotated one.
func TestFollowRotationReopensARenamedLog(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	l, err := Open(path)
	require.NoError(t, err)
	defer l.Close()
	rec := Record{Time: time.Now(), Policy: "p", Decision: Allow, Result: "applied"}
	require.NoError(t, l.Write(rec))
	moved, err := l.FollowRotation()
	require.NoError(t, err)
	assert.False(t, moved, "nothing rotated yet")
	require.NoError(t, os.Rename(path, path+".1"))
	moved, err = l.FollowRotation()
	require.NoError(t, err)
	assert.True(t, moved)
	require.NoError(t, l.Write(rec))
	entries, _, err := ReadCurrent(path)
	require.NoError(t, err)
	assert.Len(t, entries, 1, "the new record is in the new file")
	old, _, err := ReadCurrent(path + ".1")
	require.NoError(t, err)
	assert.Len(t, old, 1, "and not in the rotated one")
}

// TestScanCurrentStreamsTheLog: metrics reads every record one at a time,
// counts a line that is not one, and finds no records in a missing log.
func TestScanCurrentStreamsTheLog(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	n, err := ScanCurrent(path, func(Record) { t.Fatal("a missing log has no records") })
	require.NoError(t, err)
	assert.Zero(t, n)
	l, err := Open(path)
	require.NoError(t, err)
	for i := range 1000 {
		require.NoError(t, l.Write(Record{Time: time.Unix(int64(i), 0), Policy: "p", Decision: Allow, Result: "applied"}))
	}
	l.Close()
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = f.WriteString("not json\n")
	require.NoError(t, err)
	f.Close()
	seen := 0
	bad, err := ScanCurrent(path, func(r Record) { seen++ })
	require.NoError(t, err)
	assert.Equal(t, 1000, seen)
	assert.Equal(t, 1, bad)
}

// TestChainNamesDoNotMakeNewKinds: a limit's reason quotes the client's
// chain, and a chain may be named "mail-remote-f2b-max_aa". Limit denials
// of many such chains in one second must still be coalesced as one kind
// per limit, or a compromised mail host picks as many kinds (a full line
// each per second) as it may make chains.
func TestChainNamesDoNotMakeNewKinds(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	l, err := Open(path)
	require.NoError(t, err)
	defer l.Close()
	t0 := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	reasons := []string{
		"hook limit reached: 1 rules already jump to ipv4 chain %q (max_hooks_per_chain); remove one",
		"ban limit reached: chain %q already holds 5 bans (max_bans_per_chain); unban some",
		"ban limit reached: set f2b-1 of chain %q already holds max_bans_per_chain (5) bans with target \"DROP\"; unban some",
	}
	var batch []Record
	for i := range 300 {
		for _, reason := range reasons {
			chain := fmt.Sprintf("mail-remote-f2b-max_%c%c", 'a'+i/26%26, 'a'+i%26)
			r := Record{Time: t0.Add(time.Duration(i) * time.Millisecond), Policy: "p", ClientIP: "192.0.2.10",
				Decision: Allow, Result: "denied", Exit: 3, Reason: Text(fmt.Sprintf(reason, chain))}
			r.SetCommand("iptables -w -I INPUT -p tcp --dport 587 -j " + chain)
			batch = append(batch, r)
		}
	}
	require.NoError(t, l.WriteBatch(batch))
	require.NoError(t, l.Write(Record{Time: t0.Add(3 * time.Second), Policy: "p", Decision: Allow, Result: "applied"}))
	entries, bad, err := Read(path)
	require.NoError(t, err)
	require.Empty(t, bad)
	total := 0
	for _, e := range entries {
		if e.Record.Result != "applied" {
			total += max(1, e.Record.Count)
		}
	}
	assert.Equal(t, len(batch), total, "every limit denial is counted")
	assert.LessOrEqual(t, len(entries), 2*2+1, "one full line and one count line per limit, whatever the chains are named")
}

// TestARotationDuringABatchKeepsTheChain: logrotate renames the log while
// a stream's batch is being carried out (after the session checked for a
// rotation), and a one-shot call writes the first line of the new file,
// linked to the rotated file's last line. The batch's lines must not go
// on in the rotated file after that line, or the chain breaks at the new
// file's first line.
func TestARotationDuringABatchKeepsTheChain(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	session, err := Open(path)
	require.NoError(t, err)
	defer session.Close()
	rec := func(what string) Record {
		return Record{Time: time.Now(), Policy: "p", ClientIP: "192.0.2.10", Decision: Allow, Result: "applied", Command: Text(what)}
	}
	require.NoError(t, session.Write(rec("before")))
	_, err = session.FollowRotation() // the batch starts: nothing rotated yet
	require.NoError(t, err)
	require.NoError(t, os.Rename(path, path+".1")) // logrotate, create mode
	oneShot, err := Open(path)
	require.NoError(t, err)
	require.NoError(t, oneShot.Write(rec("one-shot")))
	require.NoError(t, oneShot.Close())
	require.NoError(t, session.WriteBatch([]Record{rec("batch 1"), rec("batch 2")})) // the batch ends
	brk, n, err := Verify(path)
	require.NoError(t, err)
	assert.Nil(t, brk, "the chain holds across the rotation")
	assert.Equal(t, 4, n)
}

// TestChangesTheShimMadeOnItsOwnAreNotCoalesced: an "unchanged" re-ban
// that healed a wiped firewall first, or finished the record of a change
// a killed shim left, carries a change in its state note; coalesced with
// the client's other unchanged requests of that second, the change left
// no line in the log. A note that merely quotes those words (a chain's
// name) is coalesced as before.
func TestChangesTheShimMadeOnItsOwnAreNotCoalesced(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	l, err := Open(path)
	require.NoError(t, err)
	defer l.Close()
	t0 := time.Date(2026, 12, 1, 6, 0, 0, 0, time.UTC)
	notes := []string{
		"",
		"repaired: ipv4 mail-remote-f2b-imap had lost its chain or return rule; put back the chain (1 ban in the record) and 1 hook(s)",
		"an earlier change (iptables -w -I mail-remote-f2b-imap 1 -s 203.0.113.60/32 -j DROP) was cut short; ipv4 mail-remote-f2b-imap was read back from the firewall",
		"3 earlier changes (first iptables -w -I mail-remote-f2b-imap 1 -s 203.0.113.60/32 -j DROP) were cut short; 1 chain(s) were read back from the firewall",
		"203.0.113.0/24 stays banned for other addresses in it (mail-remote-f2b-repaired: ; 2 earlier changes)",
	}
	var batch []Record
	for i, note := range notes {
		batch = append(batch, Record{Time: t0.Add(time.Duration(i) * time.Millisecond), Policy: "p", ClientIP: "192.0.2.10",
			Decision: Allow, Result: "unchanged", State: Text(note)})
	}
	require.NoError(t, l.WriteBatch(batch))
	entries, bad, err := Read(path)
	require.NoError(t, err)
	require.Empty(t, bad)
	var written []string
	for _, e := range entries {
		if e.Record.Result != "coalesced" {
			written = append(written, string(e.Record.State))
		}
	}
	assert.Equal(t, notes[:4], written, "the first unchanged line, and each change the shim made on its own")
}
