package main

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/f2b-shim/f2b-shim/internal/nftables"
	"github.com/f2b-shim/f2b-shim/policy"
	"github.com/f2b-shim/f2b-shim/test/e2e/lab"
)

// sshRow is one kind of ssh session of the sshd part: a key, what it
// sends, and the shim's backend for the shim's key.
type sshRow struct {
	name, account string
	// key is lab.SSHArgs's: "" is the shim's.
	key, backend, template string
	// bin is the shim's binary for the row: "" is this build's; with
	// --baseline, the baseline's rows install it for their blocks.
	bin string
	// inPlace is how many bans the chain or set held before.
	inPlace int
	// raw is the row whose bans/s this row's are compared with (a raw
	// nft row at the same number of bans), or nil.
	raw    *sshRow
	ms     []float64
	offset int
	warm   bool // its shared connection is open
}

// The sshd part's chains: the shim's, one per backend and size, and the
// raw baselines' (rawChain in iptables; nftables sets made by nftload).
const (
	setChain      = "mail-remote-f2b-set"
	setChain50k   = "mail-remote-f2b-set50k"
	nftChain      = "mail-remote-f2b-nft"
	nftChain50k   = "mail-remote-f2b-nft50k"
	rawNFTChain   = "mail-remote-f2b-raw"
	rawNFTChain50 = "mail-remote-f2b-raw50k"
	// sshPreload is the bans in place of the rows "with 50,000 bans".
	sshPreload = 50000
)

// throughput measures one ssh session per ban, as fail2ban sends them,
// through the same sshd and ControlMaster: the floor (a root key whose
// command is /bin/true), raw iptables (a root key that runs the command),
// raw nft (a key of the f2b-nft user, the same kind of account as the
// shim's, whose forced command runs a copy of nft with cap_net_admin, see
// lab.AddRawNFTKey), and the shim's key, which logs into the f2b-shim
// user as the shipped install does, with each backend, and with 50,000
// bans in place for ipset and nftables (and raw nft). Every login's shell
// is /bin/sh (the lab gives root /bin/sh in the proxy's own copy of
// /etc/passwd): a shell that reads rc files would cost more than the shim
// and hide its cost. The loop runs inside the mail host's namespace, so
// no "ip netns exec" is timed. The rows run in short blocks that
// alternate (c.sshBlocks rounds of every row, of 2 sessions each in the
// full run), so that a busy spell of the shared machine falls on all of
// them alike; the policy's backend is switched
// between blocks (the shim reads it on every request). With --baseline,
// the nftables rows run with that binary too, installed in place of this
// build's for their blocks.
func throughput(c config, shim, self string) ([]*sshRow, error) {
	l, err := lab.UpBench(shim, "rules")
	if err != nil {
		return nil, err
	}
	cleanups = append(cleanups, l.Down)
	if err := errors.Join(l.AddRawKey(), l.AddFloorKey(), l.AddRawNFTKey(),
		l.SetPolicy("max_bans_per_chain", "100000"), l.SetPolicy("max_new_bans_per_minute", "1000000")); err != nil {
		return nil, err
	}
	shimLines := func(backend string, chains ...string) error {
		if err := l.SetPolicy("backend", strconv.Quote(backend)); err != nil {
			return err
		}
		for _, ch := range chains {
			for _, line := range []string{"iptables -w -N " + ch, "iptables -w -A " + ch + " -j RETURN", "iptables -w -I " + ch + " 1 -s 192.0.2.99 -j DROP"} {
				if code, out := l.SSH("f2b-proxy", line); code != 0 {
					return fmt.Errorf("%s (%s backend): %s", line, backend, out)
				}
			}
		}
		return nil
	}
	if err := shimLines("rules", chain); err != nil {
		return nil, err
	}
	if _, err := l.Proxy.Run("iptables", "-N", rawChain); err != nil {
		return nil, err
	}
	if err := shimLines("ipset", setChain, setChain50k); err != nil {
		return nil, err
	}
	if err := l.Preload(setChain50k, sshPreload); err != nil {
		return nil, err
	}
	// The nftables chains last: restore (above) restores every chain the
	// state holds, with the backend of the moment.
	if err := shimLines("nftables", nftChain, nftChain50k); err != nil {
		return nil, err
	}
	if err := l.Record(nftChain50k, sshPreload); err != nil {
		return nil, err
	}
	for _, load := range []struct {
		chain string
		n     int
	}{{nftChain50k, sshPreload}, {rawNFTChain, 0}, {rawNFTChain50, sshPreload}} {
		if out, err := l.Proxy.Command(self, "nftload", policy.Default().NftablesTable, load.chain, strconv.Itoa(load.n)).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("nftload %s: %v: %s", load.chain, err, out)
		}
	}
	ban := func(ch string) string { return "f2b-proxy iptables -w -I " + ch + " 1 -s 198.51.%d -j DROP" }
	rawNFT := func(ch string) string {
		return "f2b-proxy " + strings.Join(rawNFTArgs("add", policy.Chain(ch), "198.51.%d", true), " ")
	}
	raw0 := &sshRow{name: "raw `nft add element`", account: lab.RawNFTUser + " (nft with cap_net_admin)", key: lab.RawNFTUser, template: rawNFT(rawNFTChain)}
	raw50 := &sshRow{name: "raw `nft add element`", account: lab.RawNFTUser + " (nft with cap_net_admin)", key: lab.RawNFTUser, template: rawNFT(rawNFTChain50), inPlace: sshPreload}
	rows := []*sshRow{
		{name: "floor: `command=\"/bin/true\"`", account: "root", key: "floor", template: "f2b-proxy true %d"},
		{name: "raw `iptables -I`", account: "root", key: "raw", template: "f2b-proxy iptables -w -I " + rawChain + " 1 -s 198.51.%d -j DROP"},
		raw0,
		{name: "f2b-shim, rule backend", account: "f2b-shim", backend: "rules", template: ban(chain), raw: raw0},
		{name: "f2b-shim, set backend", account: "f2b-shim", backend: "ipset", template: ban(setChain), raw: raw0},
		{name: "f2b-shim, nftables backend", account: "f2b-shim", backend: "nftables", template: ban(nftChain), raw: raw0},
		raw50,
		{name: "f2b-shim, set backend", account: "f2b-shim", backend: "ipset", template: ban(setChain50k), inPlace: sshPreload, raw: raw50},
		{name: "f2b-shim, nftables backend", account: "f2b-shim", backend: "nftables", template: ban(nftChain50k), inPlace: sshPreload, raw: raw50},
	}
	if c.baseline != "" {
		name := "f2b-shim, nftables backend, baseline (" + c.baseline + ")"
		rows = append(rows,
			&sshRow{name: name, account: "f2b-shim", backend: "nftables", template: ban(nftChain), raw: raw0, bin: c.baseline},
			&sshRow{name: name, account: "f2b-shim", backend: "nftables", template: ban(nftChain50k), inPlace: sshPreload, raw: raw50, bin: c.baseline})
		// Their addresses differ from this build's rows' in the same chain.
		for _, r := range rows[len(rows)-2:] {
			r.offset = 15000
		}
		if err := errors.Join(l.UseShim(c.baseline), l.UseShim(shim)); err != nil {
			return nil, err
		}
	}
	per := max(1, c.e2eBans/c.sshBlocks)
	current, installed := "nftables", shim
	for range c.sshBlocks {
		for _, r := range rows {
			if bin := cmp.Or(r.bin, shim); r.backend != "" && bin != installed {
				if err := l.UseShim(bin); err != nil {
					return nil, err
				}
				installed = bin
			}
			if r.backend != "" && r.backend != current {
				if err := l.SetPolicy("backend", strconv.Quote(r.backend)); err != nil {
					return nil, err
				}
				current = r.backend
			}
			warm := "warm" // the first block of a key opens its shared connection
			if r.warm {
				warm = "-"
			}
			args := append([]string{"sshloop", strconv.Itoa(per), strconv.Itoa(r.offset), warm, r.template}, l.SSHArgs(r.key)...)
			out, err := l.Mail.Command(self, args...).Output()
			if err != nil {
				return nil, fmt.Errorf("sshloop %s (%s): %v", r.name, r.account, err)
			}
			for _, f := range strings.Fields(string(out)) {
				v, _ := strconv.ParseFloat(f, 64)
				r.ms = append(r.ms, v)
			}
			r.offset += per + 1 // and the untimed session of a first block
			r.warm = true
		}
	}
	return rows, nil
}

// rawNFTArgs is nft's command line for a raw change of one address in
// chain's IPv4 address set (the shim's layout, WithAddressSets): "add"
// with the element timeout the shim gives a ban (max_ban_time's default),
// "get" (a check) or "delete".
func rawNFTArgs(verb string, ch policy.Chain, addr string, timeout bool) []string {
	elem := "{ " + addr + " }"
	if timeout {
		elem = fmt.Sprintf("{ %s timeout %ds }", addr, int(policy.Default().MaxBanTime.Seconds()))
	}
	return append([]string{verb, "element", "inet", policy.Default().NftablesTable, nftables.AddrSetName(ch, policy.IPv4)}, strings.Fields(elem)...)
}

func writeThroughput(md *strings.Builder, c config, rows []*sshRow) {
	per := max(1, c.e2eBans/c.sshBlocks)
	fmt.Fprintf(md, "\n### One ban per ssh session through the same sshd (ControlMaster, every login's shell /bin/sh; median of %d sessions each, in %d blocks of %d that alternate)\n\n", per*c.sshBlocks, c.sshBlocks, per)
	fmt.Fprintf(md, "| via | account | bans in place | ms per session | over the floor | bans/s | × raw `nft add element`'s bans/s (same bans in place) |\n|---|---|---|---|---|---|---|\n")
	floor := median(rows[0].ms)
	for _, r := range rows {
		m := median(r.ms)
		ratio := "–"
		if r.raw != nil {
			ratio = fmt.Sprintf("%.2f", median(r.raw.ms)/m)
		}
		fmt.Fprintf(md, "| %s | %s | %d | %.1f | %.1f | %.1f | %s |\n", r.name, r.account, r.inPlace, m, m-floor, 1000/m, ratio)
	}
	for _, r := range rows {
		if r.backend == "nftables" {
			fmt.Fprintf(md, "\n%s, %d bans in place: %.2f× raw `nft add element`'s bans/s (goal ≥ 0.9).", r.name, r.inPlace, median(r.raw.ms)/median(r.ms))
		}
	}
	fmt.Fprintln(md)
	fmt.Fprintln(os.Stderr, "bench: sshd part done")
}
