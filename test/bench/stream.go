package main

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/f2b-shim/f2b-shim/test/e2e/lab"
)

// streamBench measures the streamed ban channel against the plain action,
// side by side, through the same kind of lab (real fail2ban, sshd, shim):
//
//   - stream mode alone: bans per second from stdin to the firewall;
//   - a burst of banip: from the first ban until the last is in the
//     proxy's firewall, proxy-iptables.conf against proxy-stream.py;
//   - a single ban: from "fail2ban-client banip" until the rule is in
//     place, median of several.
func streamBench(c config, md *strings.Builder, tmp, shim, self string) error {
	fmt.Fprintf(md, "\n### Stream mode alone: %d bans from stdin to the firewall (one session; median of %d)\n\n| iptables / backend | seconds | bans/s |\n|---|---|---|\n", c.streamBans, c.streamRuns)
	for _, v := range variants {
		var secs []float64
		for range c.streamRuns {
			s, err := streamAlone(tmp, shim, v, c.streamBans)
			if err != nil {
				return err
			}
			secs = append(secs, s)
		}
		m := median(secs)
		fmt.Fprintf(md, "| %s | %.2f | %.0f |\n", v, m, float64(c.streamBans)/m)
	}

	// The floor and the stream's bursts are run burstRuns times each, in
	// turn (floor, stream, baseline, ...), so that a busy spell of the
	// machine falls on all of them alike; the table has their medians.
	// The plain action's burst takes minutes and runs once.
	runs := c.burstRuns
	fmt.Fprintf(md, "\n### A burst of banip, fail2ban 1.0.2 to the proxy's firewall (nft; one proxy; user mode; median of %d, in turn)\n\n| action | backend | bans | seconds until the last is in place | bans/s | extrapolated to 10,000 | × the floor |\n|---|---|---|---|---|---|---|\n", runs)
	// A baseline, when given: the stream action and shim of an older
	// checkout, measured in the same run (F2B_SHIM_BENCH_BASELINE=DIR).
	var baseShim, baseAction, baseName string
	if dir := os.Getenv(baselineEnv); dir != "" {
		var err error
		if baseShim, err = buildBaseline(dir, tmp); err != nil {
			return err
		}
		baseAction = filepath.Join(dir, "examples", "proxy-stream.py")
		baseName = "proxy-stream.py, before (" + gitHead(dir) + ")"
	}
	type key struct{ name, backend string }
	secs := map[key][]float64{}
	var order []key
	measure := func(k key, f func() (float64, error)) error {
		s, err := f()
		if err != nil {
			return fmt.Errorf("burst %s %s: %w", k.name, k.backend, err)
		}
		if secs[k] == nil {
			order = append(order, k)
		}
		secs[k] = append(secs[k], s)
		return nil
	}
	floorKey := key{"floor: a Python action that does nothing (until fail2ban has logged the last ban)", "–"}
	for range runs {
		if err := measure(floorKey, func() (float64, error) { return burstFloor(shim, c.streamBurst) }); err != nil {
			return err
		}
		for _, backend := range []string{"rules", "ipset"} {
			if err := measure(key{"proxy-stream.py", backend}, func() (float64, error) {
				return burstTime(shim, "", backend, true, c.streamBurst)
			}); err != nil {
				return err
			}
			if baseShim != "" {
				if err := measure(key{baseName, backend}, func() (float64, error) {
					return burstTime(baseShim, baseAction, backend, true, c.streamBurst)
				}); err != nil {
					return err
				}
			}
		}
	}
	floor := median(secs[floorKey])
	row := func(name, backend string, n int, s float64) {
		fmt.Fprintf(md, "| %s | %s | %d | %.1f | %.0f | %.0f s | %.1f |\n", name, backend, n, s, float64(n)/s, s/float64(n)*10000, s/float64(n)*float64(c.streamBurst)/floor)
	}
	for _, k := range order {
		row(k.name, k.backend, c.streamBurst, median(secs[k]))
	}
	for _, backend := range []string{"rules", "ipset"} {
		s, err := burstTime(shim, "", backend, false, c.plainBurst)
		if err != nil {
			return fmt.Errorf("burst proxy-iptables.conf %s: %w", backend, err)
		}
		row("proxy-iptables.conf (once)", backend, c.plainBurst, s)
	}
	fmt.Fprintf(md, "\nEach run, in seconds: ")
	for i, k := range order {
		if i > 0 {
			fmt.Fprint(md, "; ")
		}
		fmt.Fprintf(md, "%s %s %.1f", k.name, k.backend, secs[k])
	}
	fmt.Fprintln(md)

	fmt.Fprintf(md, "\n### A single ban: from fail2ban's \"Ban\" log line until the proxy bans (nft, rules; median of %d; the firewall is polled, a few ms a look)\n\n| action | median ms | min ms | max ms |\n|---|---|---|---|\n", c.singleBans)
	for _, stream := range []bool{false, true} {
		ms, err := singleBans(shim, stream, c.singleBans)
		if err != nil {
			return err
		}
		name := map[bool]string{false: "proxy-iptables.conf (one ssh per ban, ControlMaster)", true: "proxy-stream.py (kept session)"}[stream]
		fmt.Fprintf(md, "| %s | %.1f | %.1f | %.1f |\n", name, median(ms), slices.Min(ms), slices.Max(ms))
	}
	return nil
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}

// streamAlone pipes n ban lines into one stream session of the shim in a
// fresh namespace whose chain exists, and returns the seconds it took.
func streamAlone(tmp, shim string, v variant, n int) (float64, error) {
	ns, err := newNS("strm")
	if err != nil {
		return 0, err
	}
	dir, err := os.MkdirTemp(tmp, "stream-")
	if err != nil {
		return 0, err
	}
	pol, err := writePolicy(dir, v)
	if err != nil {
		return 0, err
	}
	f, err := os.OpenFile(pol, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return 0, err
	}
	fmt.Fprintln(f, "max_new_bans_per_minute = 1000000")
	f.Close()
	var in strings.Builder
	for i := range n {
		fmt.Fprintf(&in, "iptables -w -I %s 1 -s %s -j DROP\n", chain, benchAddr(i))
	}
	// ok counts the lines that succeeded: a ban is "applied"; the return
	// rule may be "unchanged" (implicit with the nftables backend).
	run := func(input string, ok ...string) (time.Duration, error) {
		cmd := ns.Command(shim, "--policy", pol)
		cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "SSH_ORIGINAL_COMMAND=f2b-shim stream", "SSH_CONNECTION=192.0.2.10 50022 192.0.2.7 22"}
		cmd.Stdin = strings.NewReader(input)
		start := time.Now()
		out, err := cmd.Output()
		if err != nil {
			return 0, fmt.Errorf("stream: %v", err)
		}
		got := 0
		for _, o := range ok {
			got += strings.Count(string(out), " 0 "+o+"\n")
		}
		if got != strings.Count(input, "\n") {
			return 0, fmt.Errorf("stream: %d of %d applied", got, strings.Count(input, "\n"))
		}
		return time.Since(start), nil
	}
	if _, err := run("iptables -w -N "+chain+"\niptables -w -A "+chain+" -j RETURN\n", "applied", "unchanged"); err != nil {
		return 0, err
	}
	d, err := run(in.String(), "applied")
	return d.Seconds(), err
}

// burstAddr is the i-th address of a burst (IPv6 documentation space).
func burstAddr(i int) string {
	return netip.MustParseAddr(fmt.Sprintf("2001:db8:1:%x::%x", i>>16, i&0xffff)).String()
}

// burstTime starts a lab with the plain or the stream action, bans n
// addresses with one "banip", and returns the seconds from the call until
// the last is in the proxy's firewall.
func burstTime(shim, action, backend string, stream bool, n int) (float64, error) {
	var l *lab.Lab
	var err error
	if stream {
		l, err = lab.UpStream(shim, backend, "", false, false)
	} else {
		l, err = lab.Up(shim, lab.UserMode, backend)
	}
	if err != nil {
		return 0, err
	}
	defer l.Down()
	if action != "" {
		// The baseline's own action file, in place of this tree's.
		to := filepath.Join(l.Dir, "fail2ban", "action.d", "proxy-stream.py")
		if err := errors.Join(os.Remove(to), os.Symlink(action, to)); err != nil {
			return 0, err
		}
	}
	if err := l.SetPolicy("max_new_bans_per_minute", "1000000"); err != nil {
		return 0, err
	}
	if err := l.StartFail2ban(); err != nil {
		return 0, err
	}
	// The jail's chain and hooks first, so that the burst times bans.
	if _, err := l.Fail2ban("set", lab.Jail, "banip", "2001:db8:2::1"); err != nil {
		return 0, err
	}
	if _, err := l.WaitBan("2001:db8:2::1", true, time.Minute); err != nil {
		return 0, err
	}
	ips := make([]string, n)
	for i := range n {
		ips[i] = burstAddr(i)
	}
	last := ips[n-1]
	start := time.Now()
	cmd := l.Mail.Command("fail2ban-client", append([]string{"-c", filepath.Join(l.Dir, "fail2ban"), "set", lab.Jail, "banip"}, ips...)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return 0, fmt.Errorf("banip: %v: %s", err, out)
	}
	// fail2ban bans in order and the proxy applies in order: the last
	// address in place means all are (the test suite checks that).
	if _, err := l.WaitBan(last, true, 30*time.Minute); err != nil {
		return 0, err
	}
	return time.Since(start).Seconds(), nil
}

// noopAction is a fail2ban Python action that does nothing.
const noopAction = `from fail2ban.server.action import ActionBase
class NoopAction(ActionBase):
	def start(self): pass
	def stop(self): pass
	def ban(self, aInfo): pass
	def unban(self, aInfo): pass
Action = NoopAction
`

// burstFloor is burstTime's figure for fail2ban alone: n bans with an
// action that does nothing, until fail2ban has logged the last.
func burstFloor(shim string, n int) (float64, error) {
	l, err := lab.UpStream(shim, "rules", "", false, false)
	if err != nil {
		return 0, err
	}
	defer l.Down()
	conf := filepath.Join(l.Dir, "fail2ban")
	jail, err := os.ReadFile(filepath.Join(conf, "jail.conf"))
	if err != nil {
		return 0, err
	}
	lines := strings.Split(string(jail), "\n")
	for i, line := range lines {
		if strings.HasPrefix(line, "action = ") {
			lines[i] = "action = noop.py"
		}
	}
	if err := errors.Join(
		os.WriteFile(filepath.Join(conf, "jail.conf"), []byte(strings.Join(lines, "\n")), 0o644),
		os.WriteFile(filepath.Join(conf, "action.d", "noop.py"), []byte(noopAction), 0o644),
		l.StartFail2ban(),
	); err != nil {
		return 0, err
	}
	ips := make([]string, n)
	for i := range n {
		ips[i] = burstAddr(i)
	}
	start := time.Now()
	cmd := l.Mail.Command("fail2ban-client", append([]string{"-c", conf, "set", lab.Jail, "banip"}, ips...)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return 0, fmt.Errorf("banip: %v: %s", err, out)
	}
	last := "] Ban " + ips[n-1]
	for !strings.Contains(l.Log("fail2ban.log"), last) {
		if time.Since(start) > 10*time.Minute {
			return 0, fmt.Errorf("fail2ban did not ban %s", ips[n-1])
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(start).Seconds(), nil
}

// singleBans times n single bans: from the line fail2ban logs when it
// bans ("[imap] Ban ADDR", just before it calls the action) until the
// rule is in the proxy's firewall, each after the last is in place.
func singleBans(shim string, stream bool, n int) ([]float64, error) {
	var l *lab.Lab
	var err error
	if stream {
		l, err = lab.UpStream(shim, "rules", "", false, false)
	} else {
		l, err = lab.Up(shim, lab.UserMode, "rules")
	}
	if err != nil {
		return nil, err
	}
	defer l.Down()
	if err := l.StartFail2ban(); err != nil {
		return nil, err
	}
	var out []float64
	for i := range n + 1 {
		ip := fmt.Sprintf("198.51.100.%d", i+1)
		if _, err := l.Fail2ban("set", lab.Jail, "banip", ip); err != nil {
			return nil, err
		}
		deadline := time.Now().Add(time.Minute)
		for !l.Banned(ip) {
			if time.Now().After(deadline) {
				return nil, fmt.Errorf("%s was not banned in a minute", ip)
			}
			time.Sleep(2 * time.Millisecond)
		}
		seen := time.Now()
		banned, err := banLogged(l.Log("fail2ban.log"), ip)
		if err != nil {
			return nil, err
		}
		if i > 0 { // the first starts the jail's chain
			out = append(out, float64(seen.Sub(banned).Microseconds())/1000)
		}
	}
	return out, nil
}

// banLogged is the time of fail2ban's "[imap] Ban ADDR" line.
func banLogged(log, ip string) (time.Time, error) {
	for _, line := range strings.Split(log, "\n") {
		if strings.HasSuffix(line, "] Ban "+ip) {
			return time.ParseInLocation("2006-01-02 15:04:05,000", line[:23], time.Local)
		}
	}
	return time.Time{}, fmt.Errorf("fail2ban logged no ban of %s", ip)
}

// baselineEnv names an older checkout whose stream action and shim the
// burst also measures, side by side with this tree's.
const baselineEnv = "F2B_SHIM_BENCH_BASELINE"

// buildBaseline builds the checkout's f2b-shim and f2b-shim-metrics.
func buildBaseline(dir, tmp string) (string, error) {
	out := filepath.Join(tmp, "baseline")
	for _, cmd := range []string{"f2b-shim", "f2b-shim-metrics"} {
		b := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(out, cmd), "./cmd/"+cmd)
		b.Dir, b.Env = dir, append(os.Environ(), "CGO_ENABLED=0")
		if msg, err := b.CombinedOutput(); err != nil {
			return "", fmt.Errorf("building the baseline in %s: %v: %s", dir, err, msg)
		}
	}
	return filepath.Join(out, "f2b-shim"), nil
}

// gitHead is the checkout's short commit, or its directory's name.
func gitHead(dir string) string {
	out, err := exec.Command("git", "-C", dir, "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return filepath.Base(dir)
	}
	return strings.TrimSpace(string(out))
}
