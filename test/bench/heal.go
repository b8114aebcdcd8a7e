package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// healBench measures what the check that a chain is still in place
// costs per ban (issue 20: "heal on contact"), one-shot and stream, with
// the chain hooked into INPUT and N bans in place, for this build and,
// with --baseline, an older f2b-shim binary side by side in the same run: each
// binary in its own namespace, measured in alternating rounds, so that a
// busy machine weighs on both alike.
func healBench(c config, md *strings.Builder, tmp, shim, self, old string) error {
	type bin struct {
		name, path, pol string
		ns              interface {
			Command(string, ...string) *exec.Cmd
		}
		one, per []float64
	}
	fmt.Fprintf(md, "\n### The check that the chain is in place: cost per ban (chain, return rule, one hook, %d bans in place; one-shot: medians of %d rounds of %d; stream: of %d sessions; each round in fresh namespaces, the binaries alternating)\n\n", c.healBans, healRounds, c.healRuns, healRounds)
	fmt.Fprintf(md, "| iptables / backend | binary | one-shot ban, ms | stream, ms per ban (%d per session) |\n|---|---|---|---|\n", c.healStream)
	for _, v := range []variant{{"nft", "rules"}, {"nft", "ipset"}, {"legacy", "rules"}, {"legacy", "ipset"}} {
		bins := []*bin{{name: "this build", path: shim}}
		if old != "" {
			bins = append([]*bin{{name: "old (" + filepath.Base(filepath.Dir(old)) + ")", path: old}}, bins...)
		}
		// Each round starts from a fresh namespace and state with n bans,
		// so that the bans a round adds do not weigh on the next.
		for range healRounds {
			for _, b := range bins {
				dir, err := os.MkdirTemp(tmp, "heal-")
				if err != nil {
					return err
				}
				ns, err := newNS("heal")
				if err != nil {
					return err
				}
				b.ns, b.pol = ns, filepath.Join(dir, "policy.toml")
				if err := os.WriteFile(b.pol, []byte(fmt.Sprintf("name = \"bench\"\naudit_log = %q\nstate_dir = %q\niptables_backend = %q\nbackend = %q\nmax_bans_per_chain = 1000000\nmax_new_bans_per_minute = 1000000\nlock_timeout = \"50s\"\n",
					filepath.Join(dir, "audit.jsonl"), filepath.Join(dir, "state"), v.ipt, v.bans)), 0o644); err != nil {
					return err
				}
				if out, err := b.ns.Command(self, "healmeasure", "setup", b.path, b.pol, fmt.Sprint(c.healBans)).CombinedOutput(); err != nil {
					return fmt.Errorf("%s %s: setup: %v: %s", v, b.name, err, out)
				}
				data, err := b.ns.Command(self, "healmeasure", "run", b.path, b.pol, fmt.Sprint(c.healBans), fmt.Sprint(c.healRuns), fmt.Sprint(c.healStream)).Output()
				if err != nil {
					return fmt.Errorf("%s %s: healmeasure: %v", v, b.name, err)
				}
				var r struct{ OneShot, Stream []float64 }
				if err := json.Unmarshal(data, &r); err != nil {
					return err
				}
				b.one, b.per = append(b.one, r.OneShot...), append(b.per, r.Stream...)
				ns.Delete()
			}
		}
		for _, b := range bins {
			one, per := median(b.one), median(b.per)
			fmt.Fprintf(md, "| %s | %s | %.2f | %.3f |\n", v, b.name, one, per)
			fmt.Fprintf(os.Stderr, "bench: heal %-13s %-16s one-shot %.2f ms, stream %.3f ms/ban\n", v, b.name, one, per)
		}
	}
	return nil
}

// healRounds is how many alternating rounds healBench measures each
// binary in.
const healRounds = 5

// healMeasure runs inside a namespace. "setup": it starts the chain as
// fail2ban does (chain, return rule, hook) and puts n bans in place with
// one stream session. "run": it times runs one-shot bans and runs stream
// sessions of perSession bans each, from address number first on, and
// prints the samples (ms per ban) as JSON.
func healMeasure(args []string) int {
	mode, shim, pol := args[0], args[1], args[2]
	env := func(line string) []string {
		return []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "SSH_ORIGINAL_COMMAND=" + line}
	}
	oneShot := func(line string) error {
		cmd := exec.Command(shim, "--policy", pol)
		cmd.Env = env(line)
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("%s: %v: %s", line, err, out)
		}
		return nil
	}
	stream := func(lines []string) error {
		cmd := exec.Command(shim, "--policy", pol)
		cmd.Env = env("f2b-shim stream")
		cmd.Stdin = strings.NewReader(strings.Join(lines, "\n") + "\n")
		out, err := cmd.Output()
		if err != nil {
			return fmt.Errorf("stream: %v", err)
		}
		if got := strings.Count(string(out), " 0 applied"); got != len(lines) {
			return fmt.Errorf("stream: %d of %d lines applied: %.200s", got, len(lines), out)
		}
		return nil
	}
	fail := func(err error) int { fmt.Fprintln(os.Stderr, "healmeasure:", err); return 1 }
	ban := func(i int) string { return fmt.Sprintf("iptables -w -I %s 1 -s %s -j DROP", chain, benchAddr(i)) }
	if mode == "setup" {
		var n int
		fmt.Sscan(args[3], &n)
		for _, l := range []string{"iptables -w -N " + chain, "iptables -w -A " + chain + " -j RETURN", "iptables -w -I INPUT -p tcp -m multiport --dports 143,993 -j " + chain} {
			if err := oneShot(l); err != nil {
				return fail(err)
			}
		}
		var pre []string
		for i := range n {
			pre = append(pre, ban(i))
		}
		if len(pre) > 0 {
			if err := stream(pre); err != nil {
				return fail(err)
			}
		}
		return 0
	}
	var next, runs, perSession int
	fmt.Sscan(args[3], &next)
	fmt.Sscan(args[4], &runs)
	fmt.Sscan(args[5], &perSession)
	var one, per []float64
	for range runs {
		start := time.Now()
		if err := oneShot(ban(next)); err != nil {
			return fail(err)
		}
		one = append(one, ms(time.Since(start)))
		next++
	}
	// One session per round: each adds perSession bans to the chain.
	var lines []string
	for range perSession {
		lines = append(lines, ban(next))
		next++
	}
	start := time.Now()
	if err := stream(lines); err != nil {
		return fail(err)
	}
	per = append(per, ms(time.Since(start))/float64(perSession))
	json.NewEncoder(os.Stdout).Encode(struct{ OneShot, Stream []float64 }{one, per})
	return 0
}
