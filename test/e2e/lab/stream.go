package lab

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/f2b-shim/f2b-shim/test/netns"
)

// The second proxy of a two-proxy lab sits on its own link to the mail
// host:
//
//	proxy2 198.51.100.7 -- mail 198.51.100.10
//
// It runs only sshd with the shim (no IMAP forwarding): it stands for the
// other half of an HA pair, which must get every ban too.
const (
	Proxy2V4   = "198.51.100.7"
	MailToP2V4 = "198.51.100.10"
	// LocalJailName is the mail host's own jail of UpStream's LocalJail:
	// fail2ban's iptables action, in the mail host's firewall.
	LocalJailName = "local"
)

// UpStream builds a lab whose jail streams its bans with
// examples/proxy-stream.py: to the proxy, and with two set to a second
// proxy as well. local adds a jail that bans on the mail host itself.
func UpStream(shim, backend, tree string, two, local bool) (*Lab, error) {
	return up(&Lab{Mode: UserMode, Backend: backend, Fail2banTree: tree, Stream: true, twoProxies: two, LocalJail: local}, shim)
}

// streamAction is the jail's action line for proxy-stream.py, up to the
// parameters that follow (port, protocol, ssh_config, ssh_key).
func (l *Lab) streamAction() string {
	proxies := "f2b-proxy"
	if l.twoProxies {
		proxies += ", f2b-proxy2"
	}
	// A short drain keeps fail2ban's stop quick when a proxy is down.
	return fmt.Sprintf(`proxy-stream.py[proxies="%s", f2b_shim="%s", outbox_dir="%s", drain="3", `, proxies, l.Shim, l.path("outbox"))
}

func (l *Lab) localJail() string {
	return fmt.Sprintf(`
[%s]
enabled = true
filter = lab-imap
logpath = %s
maxretry = 3
findtime = 10m
bantime = 1h
action = iptables[name=%s, port=imap, protocol=tcp]
`, LocalJailName, l.path("mail-local.log"), LocalJailName)
}

func (l *Lab) p2(name string) string { return filepath.Join(l.Dir, "p2", name) }

// secondProxy makes the second proxy: its namespace and link, and an
// sshd with the shim whose config, policy, state and audit log are the
// first proxy's with its own paths.
func (l *Lab) secondProxy() error {
	var err error
	if l.Proxy2, err = netns.Add(strings.TrimSuffix(l.Proxy.Name, "-pxy") + "-pxy2"); err != nil {
		return err
	}
	for _, c := range [][]string{
		{"ip", "link", "add", "mail1", "type", "veth", "peer", "name", "p2m0", "netns", l.Proxy2.Name},
		{"ip", "addr", "add", MailToP2V4 + "/24", "dev", "mail1"},
		{"ip", "link", "set", "mail1", "up"},
	} {
		if _, err := l.Mail.Run(c[0], c[1:]...); err != nil {
			return err
		}
	}
	for _, c := range [][]string{
		{"ip", "addr", "add", Proxy2V4 + "/24", "dev", "p2m0"},
		{"ip", "link", "set", "p2m0", "up"},
		{"ip", "link", "set", "lo", "up"},
	} {
		if _, err := l.Proxy2.Run(c[0], c[1:]...); err != nil {
			return err
		}
	}
	if err := os.Mkdir(l.p2(""), 0o755); err != nil {
		return err
	}
	out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "p2", "-f", l.p2("ssh_host_ed25519_key")).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ssh-keygen: %v: %s", err, out)
	}
	hostPub, err := os.ReadFile(l.p2("ssh_host_ed25519_key.pub"))
	if err != nil {
		return err
	}
	paths := strings.NewReplacer(
		l.path("ssh_host_ed25519_key"), l.p2("ssh_host_ed25519_key"),
		l.path("sshd.pid"), l.p2("sshd.pid"),
		l.path("authorized_keys."), l.p2("authorized_keys."),
		l.path("policy.toml"), l.p2("policy.toml"),
		l.path("log/"), l.p2("log/"),
		l.path("state"), l.p2("state"),
		"ListenAddress "+ProxyInV4, "ListenAddress "+Proxy2V4,
		fmt.Sprintf("from=%q", MailV4), fmt.Sprintf("from=%q", MailToP2V4),
	)
	owner := 0
	if l.Mode == UserMode {
		owner = UserID
	}
	for _, d := range []string{"log", "state"} {
		if err := os.Mkdir(l.p2(d), 0o750); err != nil {
			return err
		}
		if err := os.Chown(l.p2(d), owner, owner); err != nil {
			return err
		}
	}
	for _, f := range []struct {
		name string
		mode os.FileMode
	}{{"sshd_config", 0o600}, {"policy.toml", 0o640}, {"authorized_keys." + string(l.Mode), 0o644}} {
		data, err := os.ReadFile(l.path(f.name))
		if err != nil {
			return err
		}
		if err := os.WriteFile(l.p2(f.name), []byte(paths.Replace(string(data))), f.mode); err != nil {
			return err
		}
	}
	if err := os.Chown(l.p2("policy.toml"), 0, owner); err != nil {
		return err
	}
	kh, err := os.OpenFile(l.path("known_hosts"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(kh, "\n[%s]:%s %s", Proxy2V4, SSHPort, hostPub)
	if err := errors.Join(err, kh.Close()); err != nil {
		return err
	}
	return l.StartProxy2()
}

// StartProxy2 starts the second proxy's sshd and waits until it answers.
func (l *Lab) StartProxy2() error {
	sshd := []string{"/usr/sbin/sshd", "-D", "-e", "-f", l.p2("sshd_config")}
	if l.Mode == UserMode {
		script := fmt.Sprintf("for f in passwd group shadow; do mount --bind %s/etc-$f /etc/$f; done\nexec \"$@\"", l.Dir)
		sshd = append([]string{"unshare", "--mount", "--propagation", "private", "sh", "-euc", script, "sh"}, sshd...)
	}
	f, err := os.OpenFile(l.p2("sshd.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	cmd := l.Proxy2.Command(sshd[0], sshd[1:]...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		return err
	}
	l.procs = append(l.procs, cmd)
	l.sshd2 = cmd
	return waitFor(10*time.Second, func() bool {
		out, _ := l.Mail.Run("socat", "-T1", "-u", "TCP4:"+Proxy2V4+":"+SSHPort+",connect-timeout=1", "STDOUT")
		return strings.HasPrefix(out, "SSH-")
	})
}

// StopProxy2 stops the second proxy's sshd and every session it runs, as
// a proxy going down would: every process in its namespace is one the
// lab started (sshd, its sessions, their shims).
func (l *Lab) StopProxy2() error {
	if l.sshd2 != nil {
		_ = l.sshd2.Process.Kill()
		_ = l.sshd2.Wait()
		l.sshd2 = nil
	}
	return l.killAllIn(l.Proxy2)
}

// killAllIn sends SIGKILL to every process in a namespace of the lab's.
func (l *Lab) killAllIn(ns *netns.NS) error {
	out, err := exec.Command("ip", "netns", "pids", ns.Name).Output()
	if err != nil {
		return err
	}
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	return nil
}

// PidsIn lists the pids in a lab namespace whose command line contains
// what, e.g. the shims of the stream sessions on a proxy.
func (l *Lab) PidsIn(ns *netns.NS, what string) []int {
	out, err := exec.Command("ip", "netns", "pids", ns.Name).Output()
	if err != nil {
		return nil
	}
	var pids []int
	for _, f := range strings.Fields(string(out)) {
		pid, err := strconv.Atoi(f)
		if err != nil {
			continue
		}
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if strings.Contains(strings.ReplaceAll(string(cmdline), "\x00", " "), what) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// Audit2 reads the second proxy's audit log.
func (l *Lab) Audit2() ([]map[string]any, error) { return readAudit(l.p2("log/audit.jsonl")) }

func readAudit(path string) ([]map[string]any, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []map[string]any
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 64<<10)
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			return nil, fmt.Errorf("audit line %q: %v", sc.Text(), err)
		}
		out = append(out, m)
	}
	return out, sc.Err()
}

// FailLoginsLocal is FailLogins for the local jail's log.
func (l *Lab) FailLoginsLocal(ip string, n int) error { return l.failLogins("mail-local.log", ip, n) }

// LocalBanned reports whether the mail host's own firewall bans ip (the
// local jail's fail2ban iptables action: chain f2b-local).
func (l *Lab) LocalBanned(ip string) bool {
	out, err := l.Mail.Run("iptables", "-S", "f2b-"+LocalJailName)
	return err == nil && strings.Contains(out, "-s "+ip+"/32 ")
}

// BlockProxy makes the proxy unreachable from the mail host without an
// answer: packets to its sshd are dropped in the mail host's own
// (namespaced) firewall, so ssh waits for its ConnectTimeout, as for a
// proxy that is powered off. UnblockProxy lifts it.
func (l *Lab) BlockProxy() error {
	_, err := l.Mail.Run("iptables", "-I", "OUTPUT", "-d", ProxyInV4, "-p", "tcp", "--dport", SSHPort, "-j", "DROP")
	return err
}

// UnblockProxy lifts BlockProxy.
func (l *Lab) UnblockProxy() error {
	_, err := l.Mail.Run("iptables", "-D", "OUTPUT", "-d", ProxyInV4, "-p", "tcp", "--dport", SSHPort, "-j", "DROP")
	return err
}

// WaitFor polls ok every 100 ms until it holds or timeout passes.
func WaitFor(timeout time.Duration, ok func() bool) error { return waitFor(timeout, ok) }
