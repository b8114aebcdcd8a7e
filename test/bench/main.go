// Command bench measures f2b-shim against raw iptables, side by side in
// one run, in network namespaces it makes and removes: per-operation
// latency with N bans in place, bans per second through real sshd,
// connections per second through the proxy with N bans, and restore time.
// It prints markdown tables of medians and ratios and writes a PNG plot
// (with gnuplot) of ban latency against N. Run it with scripts/bench.
//
// It re-runs itself inside a namespace for the parts that time programs
// there ("measure", "serve", "connect"), so that no "ip netns exec" sits in
// what is timed.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
	"github.com/f2b-shim/f2b-shim/test/netns"
	"github.com/f2b-shim/f2b-shim/test/nstest"
)

const chain = "mail-remote-f2b-bench"

// rawChain holds the same N rules for the raw iptables calls.
const rawChain = "raw-bench"

type config struct {
	ns       []int
	reps     int
	e2eBans  int
	connTime time.Duration
	connRuns int
	out      string
	only     string
	// The stream part (stream.go).
	streamBans, streamRuns, plainBurst, streamBurst, singleBans, burstRuns int
	// The heal part (heal.go): bans in place, runs, bans per stream
	// session (it measures beside baseline too).
	healBans, healRuns, healStream int
	// The stream bounds part (streambounds.go): a build to compare with,
	// and the sizes of its floods.
	baseline                  string
	floodRebans, floodRetries int
	// The sshd part's blocks: its rows alternate in this many rounds.
	sshBlocks int
	// The nftables part (nftables.go): the backends, the bans in place,
	// its rounds, and the stream's bans.
	nftVariants              []variant
	nftNs                    []int
	nftRounds, nftStreamBans int
	// Per round: one-shot bans, and checks and unbans of some of them,
	// per namespace; and one run of the connection loop this long.
	nftBans, nftChecks int
	nftConnTime        time.Duration
}

// runs reports whether the part is to run. "--only nftables" runs the
// sshd part too, whose table has the nftables backend's one-shot rows.
func (c config) runs(part string) bool {
	return c.only == "" || c.only == part || (c.only == "nftables" && part == "sshd")
}

func main() {
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case "measure":
			os.Exit(measure(os.Args[2:]))
		case "serve":
			os.Exit(serve(os.Args[2]))
		case "connect":
			os.Exit(connect(os.Args[2], os.Args[3]))
		case "sshloop":
			os.Exit(sshloop(os.Args[2:]))
		case "healmeasure":
			os.Exit(healMeasure(os.Args[2:]))
		case "nftload":
			os.Exit(nftLoad(os.Args[2:]))
		}
	}
	quick := flag.Bool("quick", false, "a short run, as a smoke test: N = 0 and 100, few repetitions")
	out := flag.String("out", "bench-out", "directory for results.md and latency.png")
	only := flag.String("only", "", "run one part: latency, sshd, packets, hooks, stream, streambounds, heal or nftables (rules, ipset and nftables side by side: sshd, stream, N bans in place)")
	baseline := flag.String("baseline", "", "streambounds, heal and the sshd part's nftables rows: an f2b-shim binary to measure side by side with this build")
	healN := flag.Int("heal-bans", 1000, "heal: bans in place")
	flag.Parse()
	c := config{ns: []int{0, 1000, 10000, 50000}, reps: 15, e2eBans: 50, connTime: 2 * time.Second, connRuns: 3, out: *out,
		streamBans: 10000, streamRuns: 3, plainBurst: 1000, streamBurst: 10000, singleBans: 15, burstRuns: 3, floodRebans: 100000, floodRetries: 20}
	if *quick {
		c = config{ns: []int{0, 100}, reps: 3, e2eBans: 5, connTime: 300 * time.Millisecond, connRuns: 1, out: *out,
			streamBans: 1000, streamRuns: 1, plainBurst: 20, streamBurst: 200, singleBans: 3, burstRuns: 1, floodRebans: 1000, floodRetries: 2}
	}
	c.only, c.baseline = *only, *baseline
	c.sshBlocks, c.nftVariants, c.nftNs, c.nftRounds, c.nftStreamBans = 25, nftVariants, []int{0, 10000, 50000}, 10, 10000
	c.nftBans, c.nftChecks, c.nftConnTime = 4, 1, time.Second
	if *quick {
		// The smoke run: the nftables backend alone (rules and ipset
		// have their smoke runs in the other parts), small.
		c.sshBlocks, c.nftVariants, c.nftNs, c.nftRounds, c.nftStreamBans = 1, []variant{{"", "nftables"}}, []int{0, 100}, 1, 1000
		c.nftBans, c.nftChecks, c.nftConnTime = 3, 1, 300*time.Millisecond
	}
	c.healBans, c.healRuns, c.healStream = *healN, 5, 1000
	if *quick {
		c.healBans, c.healRuns, c.healStream = 100, 1, 100
	}
	if err := run(c); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// cleanup removes every namespace and process the run made, also on ^C.
var cleanups []func()

func cleanupAll() {
	for i := len(cleanups) - 1; i >= 0; i-- {
		cleanups[i]()
	}
	cleanups = nil
}

func run(c config) error {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	go func() { <-sig; cleanupAll(); os.Exit(130) }()
	defer cleanupAll()

	if err := os.MkdirAll(c.out, 0o755); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "f2bt-bench-")
	if err != nil {
		return err
	}
	os.Chmod(tmp, 0o755)
	cleanups = append(cleanups, func() { os.RemoveAll(tmp) })
	shim, err := nstest.BuildShim(tmp)
	if err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	var md strings.Builder
	host, _ := os.Hostname()
	fmt.Fprintf(&md, "Measured %s on %s (%d CPUs; load average %s at the start), medians of %d runs each, times in milliseconds.\n\n", time.Now().Format("2006-01-02"), host, numCPU(), loadAverage(), c.reps)

	if c.runs("latency") {
		lat, err := latencies(c, tmp, shim, self)
		if err != nil {
			return err
		}
		writeLatency(&md, c, lat)
		if err := plot(c, lat); err != nil {
			fmt.Fprintln(os.Stderr, "bench: no plot:", err)
		}
	}
	if c.runs("sshd") {
		rows, err := throughput(c, shim, self)
		if err != nil {
			return err
		}
		writeThroughput(&md, c, rows)
	}
	if c.runs("packets") {
		if err := packets(c, &md, tmp, shim, self); err != nil {
			return err
		}
	}
	if c.runs("hooks") {
		if err := hooks(c, &md, tmp, shim, self); err != nil {
			return err
		}
	}
	if c.runs("heal") {
		if err := healBench(c, &md, tmp, shim, self, c.baseline); err != nil {
			return err
		}
	}
	if c.runs("stream") {
		if err := streamBench(c, &md, tmp, shim, self); err != nil {
			return err
		}
	}
	if c.runs("nftables") {
		if err := nftBench(c, &md, tmp, shim, self); err != nil {
			return err
		}
	}
	if c.runs("streambounds") {
		if err := streamBounds(c, &md, tmp, shim); err != nil {
			return err
		}
	}
	fmt.Fprintf(&md, "\nLoad average at the end: %s.\n", loadAverage())
	fmt.Print(md.String())
	return os.WriteFile(filepath.Join(c.out, "results.md"), []byte(md.String()), 0o644)
}

func numCPU() int {
	data, _ := os.ReadFile("/proc/cpuinfo")
	return max(1, strings.Count(string(data), "processor\t:"))
}

// variant is one iptables backend with one ban backend.
type variant struct{ ipt, bans string }

func (v variant) String() string {
	if v.ipt == "" { // the nftables backend runs no iptables
		return v.bans
	}
	return v.ipt + "/" + v.bans
}

var variants = []variant{{"nft", "rules"}, {"nft", "ipset"}, {"legacy", "rules"}, {"legacy", "ipset"}}

// result holds the medians of one variant at one N, in milliseconds.
type result struct {
	V                                      variant
	N                                      int
	ShimBan, ShimCheck, ShimUnban, Restore float64
	RawBan, RawCheck, RawUnban             float64
}

// newNS makes a namespace that the run removes at its end.
func newNS(role string) (*netns.NS, error) {
	ns, err := netns.Add(netns.UniqueName(role))
	if err != nil {
		return nil, err
	}
	cleanups = append(cleanups, func() {
		if pids, _ := exec.Command("ip", "netns", "pids", ns.Name).Output(); len(pids) > 0 {
			for _, p := range strings.Fields(string(pids)) {
				var pid int
				fmt.Sscan(p, &pid)
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		ns.Delete()
	})
	return ns, nil
}

func writePolicy(dir string, v variant) (string, error) {
	p := filepath.Join(dir, "policy.toml")
	ipt := ""
	if v.ipt != "" {
		ipt = fmt.Sprintf("iptables_backend = %q\n", v.ipt)
	}
	return p, os.WriteFile(p, []byte(fmt.Sprintf("name = \"bench\"\naudit_log = %q\nstate_dir = %q\n%sbackend = %q\nmax_bans_per_chain = 100000\nlock_timeout = \"50s\"\n",
		filepath.Join(dir, "audit.jsonl"), filepath.Join(dir, "state"), ipt, v.bans)), 0o644)
}

func benchAddr(i int) string { return fmt.Sprintf("10.%d.%d.%d", i>>16&255, i>>8&255, i&255) }

// preload puts n bans in place through the state and "f2b-shim
// restore" in ns, and the same n rules into rawChain in rawNS (its own
// namespace: iptables-legacy reads and writes the whole table, so raw
// rules next to the shim's chain would slow the shim down too), and
// returns how long the restore took.
func preload(ns, rawNS *netns.NS, dir, pol, shim string, v variant, n int) (time.Duration, error) {
	stateDir := filepath.Join(dir, "state")
	if err := os.MkdirAll(stateDir, 0o750); err != nil {
		return 0, err
	}
	s := state.New(nil)
	for _, l := range []string{"iptables -w -N " + chain, "iptables -w -A " + chain + " -j RETURN"} {
		op, _ := policy.Decide(policy.Default(), l, policy.Context{})
		s.Apply(op, time.Now())
	}
	var raw strings.Builder
	raw.WriteString("*filter\n:" + rawChain + " - [0:0]\n")
	pol0 := policy.Default()
	pol0.ChainPrefix = "mail-remote-f2b-"
	for i := range n {
		op, err := policy.Decide(pol0, fmt.Sprintf("iptables -w -I %s 1 -s %s -j DROP", chain, benchAddr(i)), policy.Context{})
		if err != nil {
			return 0, err
		}
		s.Apply(op, time.Now())
		fmt.Fprintf(&raw, "-A %s -s %s/32 -j DROP\n", rawChain, benchAddr(i))
	}
	raw.WriteString("COMMIT\n")
	benchPol := policy.Default()
	benchPol.Name, benchPol.StateDir = "bench", stateDir
	if err := state.Save(benchPol, s); err != nil {
		return 0, err
	}
	start := time.Now()
	if out, err := ns.Command(shim, "restore", "--policy", pol).CombinedOutput(); err != nil {
		return 0, fmt.Errorf("restore: %v: %s", err, out)
	}
	took := time.Since(start)
	if rawNS == nil {
		return took, nil
	}
	cmd := rawNS.Command("iptables-"+v.ipt+"-restore", "--noflush")
	cmd.Stdin = strings.NewReader(raw.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		return 0, fmt.Errorf("raw preload: %v: %s", err, out)
	}
	return took, nil
}

func latencies(c config, tmp, shim, self string) ([]result, error) {
	var out []result
	for _, v := range variants {
		for _, n := range c.ns {
			dir, err := os.MkdirTemp(tmp, "lat-")
			if err != nil {
				return nil, err
			}
			ns, err := newNS("lat")
			if err != nil {
				return nil, err
			}
			rawNS, err := newNS("raw")
			if err != nil {
				return nil, err
			}
			pol, err := writePolicy(dir, v)
			if err != nil {
				return nil, err
			}
			restore, err := preload(ns, rawNS, dir, pol, shim, v, n)
			if err != nil {
				return nil, fmt.Errorf("%s N=%d: %v", v, n, err)
			}
			var r, raw result
			for _, m := range []struct {
				ns   *netns.NS
				who  string
				into *result
			}{{ns, "shim", &r}, {rawNS, "raw", &raw}} {
				data, err := m.ns.Command(self, "measure", m.who, shim, pol, v.ipt, fmt.Sprint(c.reps)).Output()
				if err != nil {
					return nil, fmt.Errorf("%s N=%d: measure: %v", v, n, err)
				}
				if err := json.Unmarshal(data, m.into); err != nil {
					return nil, err
				}
			}
			r.RawBan, r.RawCheck, r.RawUnban = raw.RawBan, raw.RawCheck, raw.RawUnban
			r.V, r.N, r.Restore = v, n, ms(restore)
			out = append(out, r)
			fmt.Fprintf(os.Stderr, "bench: %-13s N=%-6d shim ban %.1f ms, raw %.1f ms\n", v, n, r.ShimBan, r.RawBan)
		}
	}
	return out, nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// measure runs inside the namespace: reps shim and raw calls of each
// kind, each on another address, and prints their medians as JSON.
// args: who (shim, raw or rawnft), shim, policy, iptables backend, reps,
// and optionally the first address's index (rounds that alternate with
// other namespaces use fresh addresses), "samples" to print every sample
// rather than the medians, and how many of the reps to check and unban
// (all by default: where those cost a second each, fewer).
func measure(args []string) int {
	who, shim, pol, ipt := args[0], args[1], args[2], args[3]
	var reps, offset int
	fmt.Sscan(args[4], &reps)
	if len(args) > 5 {
		fmt.Sscan(args[5], &offset)
	}
	checks := reps
	if len(args) > 7 {
		fmt.Sscan(args[7], &checks)
	}
	s := measureSamples(who, shim, pol, ipt, reps, min(reps, checks), offset)
	if len(args) > 6 && args[6] == "samples" {
		json.NewEncoder(os.Stdout).Encode(s)
		return 0
	}
	var r result
	if who == "shim" {
		r.ShimBan, r.ShimCheck, r.ShimUnban = median(s.Ban), median(s.Check), median(s.Unban)
	} else {
		r.RawBan, r.RawCheck, r.RawUnban = median(s.Ban), median(s.Check), median(s.Unban)
	}
	json.NewEncoder(os.Stdout).Encode(r)
	return 0
}

// samples are the times of single calls, in milliseconds.
type samples struct{ Ban, Check, Unban []float64 }

// measureSamples times reps bans, then checks and unbans of the first
// checks of them, of the addresses 203.0.(offset+i).1: through the shim
// ("shim"), raw iptables on rawChain ("raw"), or raw nft on the address
// set of chain ("rawnft", see rawNFTArgs).
func measureSamples(who, shim, pol, ipt string, reps, checks, offset int) samples {
	n := reps
	times := func(call func(i int) *exec.Cmd) []float64 {
		var out []float64
		for i := range n {
			cmd := call(offset + i)
			start := time.Now()
			_ = cmd.Run() // a check's "false" is an exit status of 1, not a failure
			out = append(out, ms(time.Since(start)))
		}
		return out
	}
	shimOp := func(format string) []float64 {
		return times(func(i int) *exec.Cmd {
			cmd := exec.Command(shim, "--policy", pol)
			cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "SSH_ORIGINAL_COMMAND=" + fmt.Sprintf(format, i)}
			return cmd
		})
	}
	rawOp := func(format string) []float64 {
		return times(func(i int) *exec.Cmd {
			return exec.Command("/usr/sbin/iptables-"+ipt, strings.Fields(fmt.Sprintf(format, i))...)
		})
	}
	nftOp := func(verb string, timeout bool) []float64 {
		return times(func(i int) *exec.Cmd {
			return exec.Command("/usr/sbin/nft", rawNFTArgs(verb, chain, fmt.Sprintf("203.0.%d.1", i), timeout)...)
		})
	}
	var s samples
	switch who {
	case "shim":
		s.Ban, n = shimOp("iptables -w -I "+chain+" 1 -s 203.0.%d.1 -j DROP"), checks
		s.Check = shimOp("iptables -w -C " + chain + " -s 203.0.%d.1 -j DROP")
		s.Unban = shimOp("iptables -w -D " + chain + " -s 203.0.%d.1 -j DROP")
	case "rawnft":
		s.Ban, n = nftOp("add", true), checks
		s.Check, s.Unban = nftOp("get", false), nftOp("delete", false)
	default:
		s.Ban, n = rawOp("-w -I "+rawChain+" 1 -s 203.0.%d.1 -j DROP"), checks
		s.Check = rawOp("-w -C " + rawChain + " -s 203.0.%d.1 -j DROP")
		s.Unban = rawOp("-w -D " + rawChain + " -s 203.0.%d.1 -j DROP")
	}
	return s
}

func writeLatency(md *strings.Builder, c config, rs []result) {
	fmt.Fprintf(md, "### Latency of one call, with N bans in place (ms; ratio = shim / raw iptables)\n\n")
	fmt.Fprintf(md, "| iptables / backend | N | shim ban | raw ban | ratio | shim unban | raw unban | ratio | shim check | raw check | ratio | restore N bans |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range rs {
		fmt.Fprintf(md, "| %s | %d | %.1f | %.1f | %.2f | %.1f | %.1f | %.2f | %.1f | %.1f | %.2f | %.0f |\n", r.V, r.N,
			r.ShimBan, r.RawBan, r.ShimBan/r.RawBan, r.ShimUnban, r.RawUnban, r.ShimUnban/r.RawUnban, r.ShimCheck, r.RawCheck, r.ShimCheck/r.RawCheck, r.Restore)
	}
	fmt.Fprintf(md, "\nBan latency at the largest N against N = 0, per variant: ")
	var parts []string
	for _, v := range variants {
		var first, last result
		for _, r := range rs {
			if r.V == v {
				if r.N == c.ns[0] {
					first = r
				}
				last = r
			}
		}
		parts = append(parts, fmt.Sprintf("%s %.2f× (unban %.2f×)", v, last.ShimBan/first.ShimBan, last.ShimUnban/first.ShimUnban))
	}
	md.WriteString(strings.Join(parts, ", ") + ".\n")
}

// plot writes latency.png with gnuplot: shim ban latency and raw iptables
// latency against N, one line per variant.
func plot(c config, rs []result) error {
	gp, err := exec.LookPath("gnuplot")
	if err != nil {
		return err
	}
	var data, cmds strings.Builder
	fmt.Fprintf(&cmds, "set terminal png size 900,560\nset output %q\nset title 'f2b-shim ban latency against bans in place'\nset xlabel 'bans in the chain (N)'\nset ylabel 'ms per ban (median)'\nset key left top\nset grid\nplot ", filepath.Join(c.out, "latency.png"))
	var plots []string
	idx := 0
	for _, v := range variants {
		for _, who := range []string{"shim", "raw"} {
			if who == "raw" && v.bans == "ipset" {
				continue // raw iptables is the same for both backends
			}
			for _, r := range rs {
				if r.V == v {
					y := r.ShimBan
					if who == "raw" {
						y = r.RawBan
					}
					fmt.Fprintf(&data, "%d %.3f\n", r.N, y)
				}
			}
			data.WriteString("\n\n")
			title := "f2b-shim " + v.String()
			if who == "raw" {
				title = "raw iptables-" + v.ipt
			}
			plots = append(plots, fmt.Sprintf("'-' index 0 with linespoints title %q", title))
			idx++
		}
	}
	cmds.WriteString(strings.Join(plots, ", ") + "\n")
	// gnuplot reads each inline data block after the plot command, ended by "e".
	for _, block := range strings.Split(strings.TrimSuffix(data.String(), "\n\n"), "\n\n") {
		cmds.WriteString(block + "\ne\n")
	}
	cmd := exec.Command(gp)
	cmd.Stdin = strings.NewReader(cmds.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("gnuplot: %v: %s", err, out)
	}
	return nil
}

// sshloop runs "ssh ARGS... TARGET" n times, with %d in the template
// standing for "x.y" of a fresh address (the offset-th on: a block of
// sessions that alternates with others' gives its first), and prints each
// session's time in milliseconds. With "warm", an untimed session first
// opens the shared connection (the address offset+n). It runs inside the
// mail host's namespace.
//
//	sshloop N OFFSET warm|- TEMPLATE SSH-ARGS...
func sshloop(args []string) int {
	if len(args) < 4 {
		return 2
	}
	n, _ := strconv.Atoi(args[0])
	offset, _ := strconv.Atoi(args[1])
	warm, template, sshArgs := args[2] == "warm", args[3], args[4:]
	run := func(i int) (time.Duration, error) {
		words := strings.Fields(strings.ReplaceAll(template, "%d", fmt.Sprintf("%d.%d", 100+i/250, i%250+1)))
		start := time.Now()
		out, err := exec.Command("ssh", append(append([]string{}, sshArgs...), words...)...).CombinedOutput()
		if err != nil {
			return 0, fmt.Errorf("%v: %s", err, out)
		}
		return time.Since(start), nil
	}
	if warm {
		if _, err := run(offset + n); err != nil { // opens the shared connection
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	for i := range min(n, 30000) { // 198.51.(100+i/250) stays an address
		d, err := run(offset + i)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		fmt.Printf("%.3f\n", float64(d.Microseconds())/1000)
	}
	return 0
}

// packets measures TCP connections per second from a client that is not
// banned, through the proxy's INPUT hook, with N bans in the chain.
func packets(c config, md *strings.Builder, tmp, shim, self string) error {
	fmt.Fprintf(md, "\n### TCP connections per second through the hook, with N bans (client not banned; median of %d runs of %s)\n\n| iptables / backend | N | connections/s | share of N = 0 |\n|---|---|---|---|\n", c.connRuns, c.connTime)
	for _, v := range variants {
		var base float64
		for _, n := range c.ns {
			dir, err := os.MkdirTemp(tmp, "pkt-")
			if err != nil {
				return err
			}
			proxy, client, err := pair()
			if err != nil {
				return err
			}
			pol, err := writePolicy(dir, v)
			if err != nil {
				return err
			}
			if _, err := preload(proxy, nil, dir, pol, shim, v, n); err != nil {
				return err
			}
			if err := shimLine(proxy, shim, pol, "iptables -w -I INPUT -p tcp --dport 143 -j "+chain); err != nil {
				return err
			}
			rate, err := connRate(c, proxy, client, self)
			if err != nil {
				return err
			}
			if n == c.ns[0] {
				base = rate
			}
			fmt.Fprintf(md, "| %s | %d | %.0f | %.0f%% |\n", v, n, rate, 100*rate/base)
			fmt.Fprintf(os.Stderr, "bench: %-13s N=%-6d %.0f connections/s\n", v, n, rate)
		}
	}
	return nil
}

// pair makes a proxy and a client namespace joined by a veth pair.
func pair() (proxy, client *netns.NS, err error) {
	if proxy, err = newNS("pxy"); err != nil {
		return nil, nil, err
	}
	if client, err = newNS("cli"); err != nil {
		return nil, nil, err
	}
	for _, step := range [][]string{
		{proxy.Name, "ip", "link", "add", "p0", "type", "veth", "peer", "name", "c0", "netns", client.Name},
		{proxy.Name, "ip", "addr", "add", "198.51.100.1/24", "dev", "p0"},
		{client.Name, "ip", "addr", "add", "198.51.100.2/24", "dev", "c0"},
		{proxy.Name, "ip", "link", "set", "p0", "up"},
		{client.Name, "ip", "link", "set", "c0", "up"},
	} {
		ns := proxy
		if step[0] == client.Name {
			ns = client
		}
		if _, err := ns.Run(step[1], step[2:]...); err != nil {
			return nil, nil, err
		}
	}
	return proxy, client, nil
}

// shimLine runs one forced command in ns.
func shimLine(ns *netns.NS, shim, pol, line string) error {
	cmd := ns.Command(shim, "--policy", pol)
	cmd.Env = []string{"SSH_ORIGINAL_COMMAND=" + line}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %v: %s", line, err, out)
	}
	return nil
}

// connRate is the median rate of TCP connections from client to a
// server on the proxy's port 143.
func connRate(c config, proxy, client *netns.NS, self string) (float64, error) {
	srv := proxy.Command(self, "serve", "198.51.100.1:143")
	if err := srv.Start(); err != nil {
		return 0, err
	}
	defer func() { srv.Process.Kill(); srv.Wait() }()
	time.Sleep(200 * time.Millisecond)
	var rates []float64
	for range c.connRuns {
		out, err := client.Command(self, "connect", "198.51.100.1:143", c.connTime.String()).Output()
		if err != nil {
			return 0, fmt.Errorf("connect: %v", err)
		}
		var r float64
		fmt.Sscan(string(out), &r)
		rates = append(rates, r)
	}
	slices.Sort(rates)
	return rates[len(rates)/2], nil
}

// hooks measures the packet path with as many hooks as the defaults
// allow (max_chains chains, max_hooks_per_chain hooks each, every hook
// matching the probed port), against none and one, and against what the
// main before the bounds let one chain have (999 hooks). Each chain holds
// its RETURN rule and bans bans (rule backend, nft), made with
// iptables-restore; the hooks go through the shim, which must accept them.
func hooks(c config, md *strings.Builder, tmp, shim, self string) error {
	def := policy.Default()
	bans := 758 // the finding's chain
	if c.reps < 5 {
		bans = 10
	}
	fmt.Fprintf(md, "\n### TCP connections per second with many hooks (nft, rule backend, %d bans per chain unless said; median of %d runs of %s)\n\n| hooks | connections/s | share of no hook |\n|---|---|---|\n", bans, c.connRuns, c.connTime)
	cases := []struct {
		name            string
		chains, perHook int
		viaShim         bool
		bans            int
	}{
		{"none", 1, 0, true, bans},
		{"1 chain, 1 hook", 1, 1, true, bans},
		{fmt.Sprintf("the defaults' maximum: %d chains × %d hooks", def.MaxChains, def.MaxHooksPerChain), def.MaxChains, def.MaxHooksPerChain, true, bans},
		{"the defaults' maximum, chains of one rule (as the set backend's)", def.MaxChains, def.MaxHooksPerChain, true, 1},
		{"1 chain × 999 hooks (what the main before max_hooks_per_chain allowed)", 1, 999, false, bans},
	}
	var base float64
	for _, cs := range cases {
		dir, err := os.MkdirTemp(tmp, "hooks-")
		if err != nil {
			return err
		}
		proxy, client, err := pair()
		if err != nil {
			return err
		}
		pol, err := writePolicy(dir, variant{ipt: "nft", bans: "rules"})
		if err != nil {
			return err
		}
		var script strings.Builder
		script.WriteString("*filter\n")
		for i := range cs.chains {
			fmt.Fprintf(&script, ":%s%d - [0:0]\n", chain, i)
		}
		for i := range cs.chains {
			for b := range cs.bans {
				fmt.Fprintf(&script, "-A %s%d -s %s/32 -j DROP\n", chain, i, benchAddr(b))
			}
			fmt.Fprintf(&script, "-A %s%d -j RETURN\n", chain, i)
			if !cs.viaShim {
				for h := range cs.perHook {
					fmt.Fprintf(&script, "-A INPUT -p tcp --dport 143:%d -j %s%d\n", 143+h, chain, i)
				}
			}
		}
		script.WriteString("COMMIT\n")
		restore := proxy.Command("iptables-nft-restore", "--noflush")
		restore.Stdin = strings.NewReader(script.String())
		if out, err := restore.CombinedOutput(); err != nil {
			return fmt.Errorf("hooks preload: %v: %s", err, out)
		}
		if cs.viaShim {
			for i := range cs.chains {
				for h := range cs.perHook {
					// Each hook matches port 143, with another port set.
					if err := shimLine(proxy, shim, pol, fmt.Sprintf("iptables -w -I INPUT -p tcp --dport 143:%d -j %s%d", 143+h, chain, i)); err != nil {
						return err
					}
				}
			}
		}
		rate, err := connRate(c, proxy, client, self)
		if err != nil {
			return err
		}
		if base == 0 {
			base = rate
		}
		fmt.Fprintf(md, "| %s | %.0f | %.0f%% |\n", cs.name, rate, 100*rate/base)
		fmt.Fprintf(os.Stderr, "bench: hooks %-70s %.0f connections/s\n", cs.name, rate)
	}
	return nil
}

// serve accepts connections and closes them at once, until killed.
func serve(addr string) int {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	for {
		conn, err := ln.Accept()
		if err != nil {
			return 1
		}
		conn.Close()
	}
}

// connect opens and closes connections one after another for a while and
// prints how many per second succeeded. Bounded in time and in count.
func connect(addr, dur string) int {
	d, err := time.ParseDuration(dur)
	if err != nil {
		return 2
	}
	const maxConns = 1_000_000
	n := 0
	start := time.Now()
	for time.Since(start) < d && n < maxConns {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		io.Copy(io.Discard, conn) // the server closes at once
		conn.Close()
		n++
	}
	fmt.Println(float64(n) / time.Since(start).Seconds())
	return 0
}
