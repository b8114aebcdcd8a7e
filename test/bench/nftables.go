package main

import (
	"encoding/json"
	"fmt"
	"math"
	"net/netip"
	"os"
	"strconv"
	"strings"

	"github.com/f2b-shim/f2b-shim/internal/nftables"
	"github.com/f2b-shim/f2b-shim/policy"
	"github.com/f2b-shim/f2b-shim/test/netns"
)

// nftVariants are the backends the nftables part puts side by side:
// rules and ipset on iptables-nft, and the nftables backend.
var nftVariants = []variant{{"nft", "rules"}, {"nft", "ipset"}, {"", "nftables"}}

// nftLoad runs inside a namespace: it makes chain in the nftables table
// with the shim's layout (WithAddressSets, as the shim opens it), a DROP
// verdict, and n bans (benchAddr) with max_ban_time's default as their
// timeout, in one transaction; what "f2b-shim restore" makes of a state
// with those bans, without the state.
//
//	nftload TABLE CHAIN N
func nftLoad(args []string) int {
	if len(args) != 3 {
		return 2
	}
	ch := policy.Chain(args[1])
	n, err := strconv.Atoi(args[2])
	if err != nil {
		return 2
	}
	t, err := nftables.Open(args[0], nftables.WithAddressSets())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer t.Close()
	bans := make([]nftables.Ban, n)
	for i := range bans {
		bans[i] = nftables.Ban{Prefix: netip.MustParsePrefix(benchAddr(i) + "/32"), Timeout: policy.Default().MaxBanTime}
	}
	err = t.Do(func(b *nftables.Batch) {
		b.EnsureChain(ch, policy.IPv4)
		b.SetVerdict(ch, policy.IPv4, policy.Target{Kind: policy.Drop})
		if n > 0 {
			b.AddBans(ch, bans)
		}
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// nftSetup is one backend with n bans in place: a proxy namespace with
// the shim's chain hooked into INPUT for port 143, and a client beside it.
type nftSetup struct {
	v             variant
	n             int
	proxy, client *netns.NS
	pol           string
	restore       float64 // ms; NaN when the bans were loaded without restore
	s             samples
	conns         []float64
}

// nftBench is the nftables part (issue 23): for rules, ipset and
// nftables side by side, stream mode's bans per second, and with N bans
// in place the latency of one-shot calls (against raw "nft add element"
// with the same N for nftables) and the connection rate from a second
// namespace through the hook. Every measurement runs in rounds that
// alternate the backends and N, so that a busy spell of the shared
// machine falls on all alike; the tables give medians over the rounds.
func nftBench(c config, md *strings.Builder, tmp, shim, self string) error {
	if err := nftStream(c, md, tmp, shim); err != nil {
		return err
	}
	return nftInPlace(c, md, tmp, shim, self)
}

func nftStream(c config, md *strings.Builder, tmp, shim string) error {
	secs := map[variant][]float64{}
	for range c.nftRounds {
		for _, v := range c.nftVariants {
			s, err := streamAlone(tmp, shim, v, c.nftStreamBans)
			if err != nil {
				return fmt.Errorf("stream %s: %w", v, err)
			}
			secs[v] = append(secs[v], s)
		}
	}
	fmt.Fprintf(md, "\n### Stream mode alone, per backend: %d bans from stdin to the firewall (one session, from exec to exit; median of %d, the backends alternating)\n\n| backend | seconds | bans/s | each run, bans/s |\n|---|---|---|---|\n", c.nftStreamBans, c.nftRounds)
	for _, v := range c.nftVariants {
		var each []string
		for _, s := range secs[v] {
			each = append(each, fmt.Sprintf("%.0f", float64(c.nftStreamBans)/s))
		}
		m := median(secs[v])
		fmt.Fprintf(md, "| %s | %.3f | %.0f | %s |\n", v, m, float64(c.nftStreamBans)/m, strings.Join(each, ", "))
		fmt.Fprintf(os.Stderr, "bench: stream %-13s %.0f bans/s\n", v, float64(c.nftStreamBans)/m)
	}
	return nil
}

func nftInPlace(c config, md *strings.Builder, tmp, shim, self string) error {
	var setups []*nftSetup
	raw := map[int]*nftSetup{} // raw nft, per N: proxy only
	for _, n := range c.nftNs {
		for _, v := range c.nftVariants {
			st, err := newNFTSetup(tmp, shim, self, v, n)
			if err != nil {
				return fmt.Errorf("%s N=%d: %w", v, n, err)
			}
			setups = append(setups, st)
		}
		if hasNFT(c.nftVariants) {
			ns, err := newNS("rawnft")
			if err != nil {
				return err
			}
			if out, err := ns.Command(self, "nftload", policy.Default().NftablesTable, chain, strconv.Itoa(n)).CombinedOutput(); err != nil {
				return fmt.Errorf("raw nft N=%d: nftload: %v: %s", n, err, out)
			}
			raw[n] = &nftSetup{v: variant{bans: "raw nft"}, n: n, proxy: ns}
		}
	}
	per := c.nftBans
	one := c
	one.connRuns, one.connTime = 1, c.nftConnTime
	for round := range c.nftRounds {
		for _, n := range c.nftNs {
			for _, st := range append(setupsAt(setups, n), raw[n]) {
				if st == nil {
					continue
				}
				who := "shim"
				if st.v.bans == "raw nft" {
					who = "rawnft"
				}
				data, err := st.proxy.Command(self, "measure", who, shim, st.pol, st.v.ipt, strconv.Itoa(per), strconv.Itoa(round*per), "samples", strconv.Itoa(c.nftChecks)).Output()
				if err != nil {
					return fmt.Errorf("%s N=%d: measure: %v", st.v, n, err)
				}
				var s samples
				if err := json.Unmarshal(data, &s); err != nil {
					return err
				}
				st.s.Ban, st.s.Check, st.s.Unban = append(st.s.Ban, s.Ban...), append(st.s.Check, s.Check...), append(st.s.Unban, s.Unban...)
			}
		}
		for _, st := range setups {
			rate, err := connRate(one, st.proxy, st.client, self)
			if err != nil {
				return fmt.Errorf("%s N=%d: %w", st.v, st.n, err)
			}
			st.conns = append(st.conns, rate)
		}
		fmt.Fprintf(os.Stderr, "bench: nftables part, round %d of %d done\n", round+1, c.nftRounds)
	}
	writeInPlace(c, md, setups, raw, per)
	return nil
}

func hasNFT(vs []variant) bool {
	for _, v := range vs {
		if v.bans == "nftables" {
			return true
		}
	}
	return false
}

func setupsAt(setups []*nftSetup, n int) []*nftSetup {
	var out []*nftSetup
	for _, st := range setups {
		if st.n == n {
			out = append(out, st)
		}
	}
	return out
}

// newNFTSetup makes a proxy and a client namespace, puts n bans in place
// through the state and "f2b-shim restore" (for nftables, through
// nftload when restore fails), and hooks the chain into INPUT through
// the shim.
func newNFTSetup(tmp, shim, self string, v variant, n int) (*nftSetup, error) {
	dir, err := os.MkdirTemp(tmp, "nft-")
	if err != nil {
		return nil, err
	}
	proxy, client, err := pair()
	if err != nil {
		return nil, err
	}
	pol, err := writePolicy(dir, v)
	if err != nil {
		return nil, err
	}
	st := &nftSetup{v: v, n: n, proxy: proxy, client: client, pol: pol}
	took, err := preload(proxy, nil, dir, pol, shim, v, n)
	switch {
	case err != nil && v.bans == "nftables":
		// restore is not yet wired to the nftables backend everywhere:
		// load what it would make, and say so in the table.
		fmt.Fprintf(os.Stderr, "bench: %s N=%d: restore failed, loading with nftload: %v\n", v, n, err)
		if out, err := proxy.Command(self, "nftload", policy.Default().NftablesTable, chain, strconv.Itoa(n)).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("nftload: %v: %s", err, out)
		}
		st.restore = math.NaN()
	case err != nil:
		return nil, err
	default:
		st.restore = ms(took)
	}
	if err := shimLine(proxy, shim, pol, "iptables -w -I INPUT -p tcp --dport 143 -j "+chain); err != nil {
		return nil, err
	}
	if n > 0 {
		if err := inPlace(proxy, shim, pol, v, benchAddr(n-1)); err != nil {
			return nil, err
		}
	}
	return st, nil
}

// inPlace checks that the last preloaded ban is in the firewall.
func inPlace(ns *netns.NS, shim, pol string, v variant, addr string) error {
	line := "iptables -w -C " + chain + " -s " + addr + " -j DROP"
	cmd := ns.Command(shim, "--policy", pol)
	cmd.Env = []string{"SSH_ORIGINAL_COMMAND=" + line}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s: the preloaded ban %s is not in place (%s): %v: %s", v, addr, line, err, out)
	}
	return nil
}

func writeInPlace(c config, md *strings.Builder, setups []*nftSetup, raw map[int]*nftSetup, per int) {
	fmt.Fprintf(md, "\n### With N bans in place, per backend: one-shot latency and connections per second (ms: medians of %d rounds × %d bans, × %d checks and unbans, the shim run directly in the proxy's namespace; connections/s: medians of %d runs of %s from a second namespace through the hook, client not banned; the rounds alternate backends and N)\n\n", c.nftRounds, per, c.nftChecks, c.nftRounds, c.nftConnTime)
	fmt.Fprintf(md, "| backend | N | shim ban | raw `nft add element` | ratio | shim unban | raw `nft delete element` | shim check | raw `nft get element` | ban × N = %d | connections/s | × N = %d | restore N bans, ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n", c.nftNs[0], c.nftNs[0])
	base := map[variant]*nftSetup{}
	for _, st := range setups {
		if st.n == c.nftNs[0] {
			base[st.v] = st
		}
	}
	dash := func(f float64) string {
		if math.IsNaN(f) {
			return "–"
		}
		return fmt.Sprintf("%.1f", f)
	}
	for _, v := range c.nftVariants {
		for _, st := range setups {
			if st.v != v {
				continue
			}
			b0 := base[v]
			rb, rc, ru, ratio := math.NaN(), math.NaN(), math.NaN(), "–"
			if r := raw[st.n]; v.bans == "nftables" && r != nil {
				rb, rc, ru = median(r.s.Ban), median(r.s.Check), median(r.s.Unban)
				ratio = fmt.Sprintf("%.2f", median(st.s.Ban)/rb)
			}
			fmt.Fprintf(md, "| %s | %d | %.1f | %s | %s | %.1f | %s | %.1f | %s | %.2f | %.0f | %.2f | %s |\n", v, st.n,
				median(st.s.Ban), dash(rb), ratio, median(st.s.Unban), dash(ru), median(st.s.Check), dash(rc),
				median(st.s.Ban)/median(b0.s.Ban), median(st.conns), median(st.conns)/median(b0.conns), dash(st.restore))
		}
	}
	last := c.nftNs[len(c.nftNs)-1]
	fmt.Fprintf(md, "\nFrom N = %d to N = %d (goal for nftables: within 1.1×): ", c.nftNs[0], last)
	var parts []string
	for _, v := range c.nftVariants {
		for _, st := range setups {
			if st.v == v && st.n == last {
				b0 := base[v]
				parts = append(parts, fmt.Sprintf("%s ban %.2f×, connections/s %.2f×", v, median(st.s.Ban)/median(b0.s.Ban), median(st.conns)/median(b0.conns)))
			}
		}
	}
	md.WriteString(strings.Join(parts, "; ") + ".\n")
	if r0, rl := raw[c.nftNs[0]], raw[last]; r0 != nil && rl != nil {
		fmt.Fprintf(md, "Raw `nft add element`: %.2f× (%.1f ms → %.1f ms).\n", median(rl.s.Ban)/median(r0.s.Ban), median(r0.s.Ban), median(rl.s.Ban))
	}
}

// loadAverage is /proc/loadavg's first three fields.
func loadAverage() string {
	data, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}
