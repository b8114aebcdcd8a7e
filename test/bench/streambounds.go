package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// streamBounds measures what issue 19's bounds cost and save, this build
// against a baseline build (--baseline BIN), side by side in one run:
//   - stream bans/s, as "Stream mode alone" measures them, runs of both
//     builds alternating;
//   - the audit log's growth under the floods a mail host can send through
//     allowed lines: bans over the quota, re-bans of one address that
//     change nothing, and a relay that sends its window again every second
//     while over the quota.
func streamBounds(c config, md *strings.Builder, tmp, shim string) error {
	builds := []struct{ name, bin string }{{"this build", shim}}
	if c.baseline != "" {
		builds = append([]struct{ name, bin string }{{"baseline " + filepath.Base(filepath.Dir(c.baseline)), c.baseline}}, builds...)
	}
	fmt.Fprintf(md, "\n### Stream bounds: %d bans from stdin to the firewall (one session; median of %d, builds alternating)\n\n| iptables / backend |", c.streamBans, c.streamRuns)
	for _, b := range builds {
		fmt.Fprintf(md, " %s bans/s |", b.name)
	}
	fmt.Fprintf(md, " ratio |\n|---|%s---|\n", strings.Repeat("---|", len(builds)))
	for _, v := range variants {
		secs := make([][]float64, len(builds))
		for range c.streamRuns {
			for i, b := range builds {
				s, err := streamAlone(tmp, b.bin, v, c.streamBans)
				if err != nil {
					return fmt.Errorf("%s: %w", b.name, err)
				}
				secs[i] = append(secs[i], s)
			}
		}
		fmt.Fprintf(md, "| %s |", v)
		for i := range builds {
			fmt.Fprintf(md, " %.0f |", float64(c.streamBans)/median(secs[i]))
		}
		fmt.Fprintf(md, " %.2f |\n", median(secs[0])/median(secs[len(builds)-1]))
	}

	floods := []struct {
		name  string
		quota int
		input string
		times int
		every time.Duration
	}{
		{"2,000 bans against max_new_bans_per_minute = 10", 10, banInput(2000), 1, 0},
		{fmt.Sprintf("%d re-bans of one address (unchanged)", c.floodRebans), 1000000, strings.Repeat(fmt.Sprintf("iptables -w -I %s 1 -s 203.0.113.5 -j DROP\n", chain), c.floodRebans), 1, 0},
		{fmt.Sprintf("a relay over the quota resending 1,000 lines every second, %d times", c.floodRetries), 10, banInput(1000), c.floodRetries, time.Second},
	}
	fmt.Fprintf(md, "\n### Audit log growth under floods through allowed lines (nft/rules)\n\n| flood |")
	for _, b := range builds {
		fmt.Fprintf(md, " %s: bytes | lines |", b.name)
	}
	fmt.Fprintf(md, "\n|---|%s\n", strings.Repeat("---|---|", len(builds)))
	for _, f := range floods {
		fmt.Fprintf(md, "| %s |", f.name)
		for _, b := range builds {
			size, lines, err := flood(tmp, b.bin, f.quota, f.input, f.times, f.every)
			if err != nil {
				return fmt.Errorf("%s: %s: %w", b.name, f.name, err)
			}
			fmt.Fprintf(md, " %d | %d |", size, lines)
		}
		fmt.Fprintln(md)
	}
	return nil
}

func banInput(n int) string {
	var in strings.Builder
	for i := range n {
		fmt.Fprintf(&in, "iptables -w -I %s 1 -s %s -j DROP\n", chain, benchAddr(i))
	}
	return in.String()
}

// flood runs input through times stream sessions, every apart, in a fresh
// namespace whose chain exists, and returns how many bytes and lines the
// audit log grew by (the side file's pending counts not included).
func flood(tmp, shim string, quota int, input string, times int, every time.Duration) (int64, int, error) {
	ns, err := newNS("flood")
	if err != nil {
		return 0, 0, err
	}
	dir, err := os.MkdirTemp(tmp, "flood-")
	if err != nil {
		return 0, 0, err
	}
	pol, err := writePolicy(dir, variant{"nft", "rules"})
	if err != nil {
		return 0, 0, err
	}
	f, err := os.OpenFile(pol, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return 0, 0, err
	}
	fmt.Fprintf(f, "max_new_bans_per_minute = %d\n", quota)
	f.Close()
	run := func(in string) error {
		cmd := ns.Command(shim, "--policy", pol)
		cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "SSH_ORIGINAL_COMMAND=f2b-shim stream", "SSH_CONNECTION=192.0.2.10 50022 192.0.2.7 22"}
		cmd.Stdin = strings.NewReader(in)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("stream: %v: %.200s", err, out)
		}
		return nil
	}
	// The chain, and the ban that the re-bans repeat.
	if err := run(fmt.Sprintf("iptables -w -N %s\niptables -w -I %s 1 -s 203.0.113.5 -j DROP\n", chain, chain)); err != nil {
		return 0, 0, err
	}
	audit := filepath.Join(dir, "audit.jsonl")
	before, err := os.ReadFile(audit)
	if err != nil {
		return 0, 0, err
	}
	for i := range times {
		if i > 0 {
			time.Sleep(every)
		}
		if err := run(input); err != nil {
			return 0, 0, err
		}
	}
	after, err := os.ReadFile(audit)
	if err != nil {
		return 0, 0, err
	}
	grown := after[len(before):]
	return int64(len(grown)), strings.Count(string(grown), "\n"), nil
}
