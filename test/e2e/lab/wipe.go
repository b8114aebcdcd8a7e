package lab

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/hostnet"
	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
)

// Wipe is something that takes the shim's rules out of the proxy's
// firewall behind its back, as a firewall reload or an admin does.
type Wipe struct {
	Name string
	run  func(l *Lab) error
}

// Wipes are the reloads issue 20 names: the ban chain flushed; the hook
// deleted ("iptables -F INPUT"); "iptables -F; iptables -X" (ufw with
// MANAGE_BUILTINS=yes); "nft flush ruleset" (systemctl reload nftables);
// iptables-restore of a file saved before the bans (netfilter-persistent
// reload). Each hits both families; none touches the ipsets, as none of
// those reloads does.
var Wipes = []Wipe{
	{"the ban chain flushed", func(l *Lab) error { return l.both("-F", Chain) }},
	{"the hook deleted (iptables -F INPUT)", func(l *Lab) error { return l.both("-F", "INPUT") }},
	{"iptables -F; iptables -X", func(l *Lab) error { return errors.Join(l.both("-F"), l.both("-X")) }},
	{"nft flush ruleset", func(l *Lab) error {
		_, err := l.Proxy.Run("nft", "flush", "ruleset")
		return err
	}},
	{"iptables-restore of a file saved before the bans", func(l *Lab) error {
		for _, bin := range []string{"iptables", "ip6tables"} {
			saved, err := os.ReadFile(l.path(bin + ".saved"))
			if err != nil {
				return fmt.Errorf("no saved rules: call SaveFirewall first: %w", err)
			}
			cmd := l.Proxy.Command(bin+"-restore", l.path(bin+".saved"))
			if out, err := cmd.CombinedOutput(); err != nil {
				return fmt.Errorf("%s-restore of %d bytes: %v: %s", bin, len(saved), err, out)
			}
		}
		return nil
	}},
}

func (l *Lab) both(args ...string) error {
	var errs []error
	for _, bin := range []string{"iptables", "ip6tables"} {
		if _, err := l.Proxy.Run(bin, args...); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Run wipes the proxy's firewall.
func (w Wipe) Run(l *Lab) error { return w.run(l) }

// SaveFirewall saves the proxy's filter tables as they are now (for
// Wipes' iptables-restore), as netfilter-persistent save does.
func (l *Lab) SaveFirewall() error {
	for _, bin := range []string{"iptables", "ip6tables"} {
		out, err := l.Proxy.Run(bin+"-save", "-t", "filter")
		if err != nil {
			return err
		}
		if err := os.WriteFile(l.path(bin+".saved"), []byte(out), 0o600); err != nil {
			return err
		}
	}
	return nil
}

// AdminAll runs an admin subcommand for every policy in the lab's
// directory ("--all --dir DIR"), as the systemd units do, as the account
// the key logs into.
func (l *Lab) AdminAll(args ...string) (int, string) {
	args = append(args, "--all", "--dir", l.Dir)
	if l.Mode == UserMode {
		args = append([]string{fmt.Sprintf("--reuid=%d", UserID), fmt.Sprintf("--regid=%d", UserID), "--clear-groups", l.Shim}, args...)
		return exitCode(l.proxyCommand("setpriv", args...))
	}
	return exitCode(l.proxyCommand(l.Shim, args...))
}

// Hooked reports whether both families' INPUT jump into the jail's chain.
func (l *Lab) Hooked() bool {
	if l.Backend == "nftables" {
		return l.NFTHooked("tcp dport { 143, 993 }")
	}
	for _, bin := range []string{"iptables", "ip6tables"} {
		if !strings.Contains(l.Rules(bin), "-A INPUT -p tcp -m multiport --dports 143,993 -j "+Chain) {
			return false
		}
	}
	return true
}

// HasCommand reports whether the proxy can run a program.
func HasCommand(name string) bool {
	_, err := exec.LookPath(name)
	return err == nil
}

// ForgetHooks takes the jail's hooks out of the proxy's state (IPv4), as
// if the shim had never recorded them: then nothing but fail2ban's own
// repair puts a lost hook back, which is what a test of that repair needs.
func (l *Lab) ForgetHooks() error {
	data, err := os.ReadFile(l.path("policy.toml"))
	if err != nil {
		return err
	}
	pol, err := policy.Parse(data)
	if err != nil {
		return err
	}
	op, err := policy.Decide(pol, "iptables -w -D INPUT -p tcp -m multiport --dports 143,993 -j "+Chain, policy.Context{LookupPort: hostnet.LookupPort})
	if err != nil {
		return err
	}
	s, err := state.Open(pol, hostnet.LookupPort, time.Second)
	if err != nil {
		return err
	}
	return errors.Join(s.Record(op, true, time.Now()), s.Close())
}
