// Command demo shows f2b-shim at work on three throw-away hosts (network
// namespaces): an attacker, the reverse proxy and the mail host. It
// narrates each step and removes everything when it ends. Run it with
// scripts/demo, as root.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/f2b-shim/f2b-shim/test/e2e/lab"
	"github.com/f2b-shim/f2b-shim/test/nstest"
)

func main() {
	os.Exit(run())
}

func say(format string, args ...any) { fmt.Printf("\n==> "+format+"\n", args...) }
func show(text string) {
	for _, line := range strings.Split(strings.TrimRight(text, "\n"), "\n") {
		fmt.Println("    " + line)
	}
}

func run() int {
	dir, err := os.MkdirTemp("", "f2b-shim-demo-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	bin, err := nstest.BuildShim(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		return 1
	}
	say("Bringing up three hosts in network namespaces (nothing on this machine's own network changes)")
	show(fmt.Sprintf("attacker %s, %s\nproxy    %s (towards the attacker), %s (towards the mail host): sshd, socat for IMAP, and f2b-shim\n         as the forced command of the unprivileged user f2b-shim (cap_net_admin,cap_net_raw only)\nmail     %s: an IMAP greeter and fail2ban 1.0 with examples/proxy-iptables.conf",
		lab.AttackerV4, lab.AttackerV6, lab.ProxyOutV4, lab.ProxyInV4, lab.MailV4))
	l, err := lab.Up(bin, lab.UserMode, "rules")
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		return 1
	}
	defer l.Down()
	// Ctrl-C, a closed terminal or a closed pipe (demo | head) still clean up.
	signal.Ignore(syscall.SIGPIPE)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	go func() { <-sig; l.Down(); os.RemoveAll(dir); os.Exit(130) }()

	if err := steps(l); err != nil {
		fmt.Fprintln(os.Stderr, "\ndemo: FAILED:", err)
		return 1
	}
	say("Done. Everything is removed again.")
	return 0
}

// auditSince prints the audit lines after the first n and returns the new count.
func auditSince(l *lab.Lab, n int) int {
	recs, _ := l.Audit()
	for _, r := range recs[min(n, len(recs)):] {
		if r["result"] == "coalesced" {
			// Written before the next line of the log: a flood of denials
			// costs one full line a second and a count.
			show(fmt.Sprintf("(%v more denials of this client in that second: counted, not logged one by one)", r["count"]))
			continue
		}
		line := fmt.Sprintf("ssh sent %q -> %v, %v", r["command"], r["decision"], r["result"])
		if reason, ok := r["reason"]; ok {
			line += fmt.Sprintf(" (%v)", reason)
		}
		show(line)
	}
	return len(recs)
}

func chainRules(l *lab.Lab, bin string) string {
	var out []string
	for _, line := range strings.Split(l.Rules(bin), "\n") {
		if strings.Contains(line, lab.Chain) {
			out = append(out, line)
		}
	}
	if len(out) == 0 {
		return "(no " + lab.Chain + " rules)"
	}
	return strings.Join(out, "\n")
}

func attacker(l *lab.Lab, v6 bool) {
	if err := l.Connect(v6); err != nil {
		show("attacker: refused at the proxy")
	} else {
		show("attacker: gets the mail host's IMAP greeting through the proxy")
	}
}

func steps(l *lab.Lab) error {
	say("The attacker connects to IMAP on the proxy")
	attacker(l, false)

	say("fail2ban starts on the mail host")
	if err := l.StartFail2ban(); err != nil {
		return err
	}
	seen := 0

	say("The attacker fails to log in three times; the mail host logs it")
	if err := l.FailLogins(lab.AttackerV4, 3); err != nil {
		return err
	}
	took, err := l.WaitBan(lab.AttackerV4, true, 30*time.Second)
	if err != nil {
		return err
	}
	for _, line := range strings.Split(l.Log("fail2ban.log"), "\n") {
		if strings.Contains(line, "Found "+lab.AttackerV4) || strings.Contains(line, "Ban "+lab.AttackerV4) {
			show("fail2ban: " + line[strings.Index(line, "[imap]"):])
		}
	}
	say("What ssh sent to the proxy, and what f2b-shim decided")
	seen = auditSince(l, seen)
	say("The proxy's firewall now holds (ban in place %s after the third failure)", took.Round(time.Millisecond))
	show(chainRules(l, "iptables"))
	attacker(l, false)

	say("The admin unbans the address: fail2ban-client set imap unbanip %s", lab.AttackerV4)
	if _, err := l.Fail2ban("set", lab.Jail, "unbanip", lab.AttackerV4); err != nil {
		return err
	}
	if _, err := l.WaitBan(lab.AttackerV4, false, 30*time.Second); err != nil {
		return err
	}
	seen = auditSince(l, seen)
	show(chainRules(l, "iptables"))
	attacker(l, false)

	say("Someone takes over the mail host and tries the proxy key for other things")
	for _, cmd := range []string{"id", "iptables -F INPUT", "iptables -w -I " + lab.Chain + " 1 -s 0.0.0.0/0 -j DROP", "iptables -I INPUT -j ACCEPT"} {
		code, out := l.SSH("-o", "ControlPath=none", "f2b-proxy", cmd)
		show(fmt.Sprintf("$ ssh proxy %q -> exit %d: %s", cmd, code, strings.TrimSpace(out)))
	}
	seen = auditSince(l, seen)

	say("fail2ban stops: its action removes the chain and the hook from the proxy")
	if err := l.StopFail2ban(); err != nil {
		return err
	}
	auditSince(l, seen)
	show(chainRules(l, "iptables"))
	return nil
}
