// Package lab brings up the three test hosts of the end-to-end test and
// the demo, each in its own network namespace:
//
//	attacker 203.0.113.45        proxy 203.0.113.1 | 192.0.2.7         mail 192.0.2.10
//	         2001:db8:203::45 --       2001:db8:203::1 | 2001:db8:192::7 -- 2001:db8:192::10
//
// The proxy runs real OpenSSH sshd (with f2b-shim as the key's forced
// command) and socat forwarding IMAP to the mail host; the mail host runs
// a tiny IMAP greeter and real fail2ban with examples/proxy-iptables.conf.
// Every config, key, socket, pid file and log lives in Dir.
package lab

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
	"github.com/f2b-shim/f2b-shim/test/netns"
)

// Addresses of the lab hosts, all from the documentation ranges.
const (
	AttackerV4 = "203.0.113.45"
	AttackerV6 = "2001:db8:203::45"
	ProxyOutV4 = "203.0.113.1"
	ProxyOutV6 = "2001:db8:203::1"
	ProxyInV4  = "192.0.2.7"
	MailV4     = "192.0.2.10"
	SSHPort    = "2222" // sshd's port inside the proxy's namespace
	IMAPPort   = "143"
	Jail       = "imap"
	Chain      = "mail-remote-f2b-imap"
)

// UserID is the uid and gid of the lab's unprivileged f2b-shim user. It
// exists only in the proxy's sshd, which sees its own copies of
// /etc/passwd, /etc/group and /etc/shadow; the host's are left alone.
const UserID = 64123

// RawNFTUser is the benchmark's second unprivileged account (UpBench
// only), the same kind as the f2b-shim user: a key with a forced command
// that runs a copy of nft holding cap_net_admin, as the shim holds it.
// uid and gid RawNFTUserID, in the proxy's own copy of /etc/passwd.
const (
	RawNFTUser   = "f2b-nft"
	RawNFTUserID = UserID + 1
)

// Mode says which account the mail host's key logs into on the proxy.
type Mode string

// The two supported installs.
const (
	RootMode Mode = "root"     // the key in root's authorized_keys
	UserMode Mode = "f2b-shim" // the key in the f2b-shim user's, with a capability-bearing binary
)

// Lab is a running set of test hosts.
type Lab struct {
	// Dir holds every file of the lab; it is world-readable (0755, with
	// private keys 0600) so that the unprivileged user can reach the
	// binary, its policy and its directories.
	Dir  string
	Mode Mode
	// Backend is the policy's backend: "rules", "ipset" or "nftables".
	Backend string
	// sockDir holds ssh's ControlPath sockets: a Unix socket path must fit
	// in 108 bytes, which a test's temp dir can exceed.
	sockDir               string
	Shim                  string
	Attacker, Proxy, Mail *netns.NS
	procs                 []*exec.Cmd
	// Keep leaves Dir in place after Down, for reading its logs.
	Keep       bool
	f2bRunning bool
	// bench (UpBench) also lets root log in with forced commands, with
	// /bin/sh as its shell in the proxy's copy of /etc/passwd.
	bench bool
	// ActionParams replaces the jail's action parameters (port, protocol,
	// type, chain) when set, e.g. `port="imap", protocol="tcp,udp", type=oneport`.
	ActionParams string
	// Fail2banTree, when set, is an extracted fail2ban release whose
	// fail2ban-client (and so fail2ban-server) the mail host runs, with
	// the system's python3; otherwise Debian's fail2ban runs.
	Fail2banTree string
	// Stream runs the jail with examples/proxy-stream.py instead of
	// proxy-iptables.conf (see UpStream).
	Stream bool
	// Proxy2 is the second proxy of UpStream's two-proxy lab.
	Proxy2     *netns.NS
	twoProxies bool
	sshd2      *exec.Cmd
	// LocalJail adds a jail "local" that bans on the mail host itself
	// with fail2ban's own iptables action (see UpStream).
	LocalJail bool
	// HideFirewallPrograms runs the proxy's sshd in a private mount
	// namespace where iptables, ip6tables, their -save/-restore and
	// xtables-* variants and ipset are replaced by a tripwire that fails
	// and logs the call (see nft.go): what a proxy without them is, for
	// the nftables backend. Admin and ProxyExec run in it too.
	HideFirewallPrograms bool
	// Strace runs the shim of every ssh session under
	// "strace -f -e trace=execve" (see StraceExecs). Root mode only: a
	// binary with file capabilities loses them under an unprivileged
	// tracer.
	Strace bool
	sshd   *exec.Cmd
	// builds are UseShim's copies of the binaries it switches between.
	builds map[string]string
}

// RepoRoot is the f2b-shim checkout this package lives in.
func RepoRoot() string {
	_, self, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(self), "..", "..", ".."))
}

// Up builds the hosts. shim is the f2b-shim binary. On error, whatever
// was made is removed; otherwise Down removes it.
func Up(shim string, mode Mode, backend string) (l *Lab, err error) {
	return up(&Lab{Mode: mode, Backend: backend}, shim)
}

// UpWithFail2ban is Up with the mail host running the fail2ban release
// extracted at tree (see Fail2banTree); "" is Debian's.
func UpWithFail2ban(shim string, mode Mode, backend, tree string) (*Lab, error) {
	return up(&Lab{Mode: mode, Backend: backend, Fail2banTree: tree}, shim)
}

// UpWithAction is UpWithFail2ban with the jail's action parameters
// (see ActionParams).
func UpWithAction(shim string, mode Mode, backend, tree, params string) (*Lab, error) {
	return up(&Lab{Mode: mode, Backend: backend, Fail2banTree: tree, ActionParams: params}, shim)
}

// UpBench builds the hosts for the benchmark: the shim's key logs into
// the f2b-shim user, whose shell is /bin/sh, as the shipped install has
// it; and root, for the raw and floor keys (AddRawKey, AddFloorKey), also
// logs in with /bin/sh, in the proxy's own copy of /etc/passwd, so that
// no login reads shell rc files that would cost more than the shim.
func UpBench(shim, backend string) (*Lab, error) {
	return up(&Lab{Mode: UserMode, Backend: backend, bench: true}, shim)
}

// UpLab builds the hosts that l's exported fields describe (Mode,
// Backend, Fail2banTree, ActionParams, Stream, HideFirewallPrograms,
// Strace); Dir, Shim and the namespaces are filled in.
func UpLab(shim string, l *Lab) (*Lab, error) { return up(l, shim) }

func up(l *Lab, shim string) (_ *Lab, err error) {
	if l.Strace && l.Mode != RootMode {
		return nil, errors.New("lab: Strace needs RootMode: the shim's file capabilities do not survive an unprivileged tracer")
	}
	dir, err := os.MkdirTemp("", netns.Prefix+"lab-")
	if err != nil {
		return nil, err
	}
	l.Dir = dir
	defer func() {
		if err != nil {
			l.Down()
			l = nil
		}
	}()
	if err := os.Chmod(dir, 0o755); err != nil {
		return l, err
	}
	if l.Shim, err = l.installShim(shim); err != nil {
		return l, err
	}
	if err := l.nftFiles(); err != nil {
		return l, err
	}
	steps := []func() error{l.network, l.proxyFiles, l.startProxy, l.startMailService}
	if l.twoProxies {
		steps = append(steps, l.secondProxy)
	}
	for _, step := range append(steps, l.mailFiles) {
		if err := step(); err != nil {
			return l, err
		}
	}
	return l, nil
}

func (l *Lab) path(name string) string { return filepath.Join(l.Dir, name) }

// UseShim makes the shim's path run the binary src, for the benchmark,
// which measures two builds through the same sshd in turn: each is copied
// once beside it (with the capabilities), and the path becomes a symbolic
// link to it, renamed into place, so that no binary is written (and no
// page cache flushed) between the sessions it times.
func (l *Lab) UseShim(src string) error {
	if l.builds == nil {
		l.builds = map[string]string{}
	}
	bin, ok := l.builds[src]
	if !ok {
		data, err := os.ReadFile(src)
		if err != nil {
			return err
		}
		bin = fmt.Sprintf("%s.%d", l.Shim, len(l.builds))
		if err := os.WriteFile(bin, data, 0o755); err != nil {
			return err
		}
		if l.Mode == UserMode {
			if out, err := exec.Command("setcap", "cap_net_admin,cap_net_raw+ep", bin).CombinedOutput(); err != nil {
				return fmt.Errorf("setcap: %v: %s", err, out)
			}
		}
		l.builds[src] = bin
	}
	link := l.Shim + ".link"
	_ = os.Remove(link)
	return errors.Join(os.Symlink(bin, link), os.Rename(link, l.Shim))
}

// installShim puts the binary where sshd will run it, as scripts/install
// does: in user mode with cap_net_admin,cap_net_raw+ep.
func (l *Lab) installShim(src string) (string, error) {
	data, err := os.ReadFile(src)
	if err != nil {
		return "", err
	}
	bin := l.path("f2b-shim")
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		return "", err
	}
	// "f2b-shim metrics" runs its helper from beside the binary, as
	// scripts/install puts it.
	if helper, err := os.ReadFile(filepath.Join(filepath.Dir(src), "f2b-shim-metrics")); err == nil {
		if err := os.WriteFile(l.path("f2b-shim-metrics"), helper, 0o755); err != nil {
			return "", err
		}
	}
	if l.Mode == UserMode {
		if out, err := exec.Command("setcap", "cap_net_admin,cap_net_raw+ep", bin).CombinedOutput(); err != nil {
			return "", fmt.Errorf("setcap: %v: %s", err, out)
		}
	}
	return bin, nil
}

func (l *Lab) network() error {
	tag := netns.UniqueName("")
	var err error
	for _, h := range []struct {
		p    **netns.NS
		role string
	}{{&l.Attacker, "att"}, {&l.Proxy, "pxy"}, {&l.Mail, "mail"}} {
		if *h.p, err = netns.Add(tag + "-" + h.role); err != nil {
			return err
		}
	}
	// The veth pairs are created inside the namespaces, never on the host.
	cmds := [][]string{
		{l.Attacker.Name, "ip", "link", "add", "att0", "type", "veth", "peer", "name", "pxa0", "netns", l.Proxy.Name},
		{l.Proxy.Name, "ip", "link", "add", "pxm0", "type", "veth", "peer", "name", "mail0", "netns", l.Mail.Name},
		{l.Attacker.Name, "ip", "addr", "add", AttackerV4 + "/24", "dev", "att0"},
		{l.Attacker.Name, "ip", "addr", "add", AttackerV6 + "/64", "dev", "att0", "nodad"},
		{l.Attacker.Name, "ip", "addr", "add", BystanderV4 + "/24", "dev", "att0"},
		// Deprecated at once (preferred_lft 0): never the source the
		// kernel picks, so Connect still comes from AttackerV6; Reach binds
		// it explicitly. (BystanderV4 is a secondary address: never picked.)
		{l.Attacker.Name, "ip", "addr", "add", BystanderV6 + "/64", "dev", "att0", "nodad", "preferred_lft", "0"},
		{l.Proxy.Name, "ip", "addr", "add", ProxyOutV4 + "/24", "dev", "pxa0"},
		{l.Proxy.Name, "ip", "addr", "add", ProxyOutV6 + "/64", "dev", "pxa0", "nodad"},
		{l.Proxy.Name, "ip", "addr", "add", ProxyInV4 + "/24", "dev", "pxm0"},
		{l.Proxy.Name, "ip", "addr", "add", "2001:db8:192::7/64", "dev", "pxm0", "nodad"},
		{l.Mail.Name, "ip", "addr", "add", MailV4 + "/24", "dev", "mail0"},
		{l.Mail.Name, "ip", "addr", "add", "2001:db8:192::10/64", "dev", "mail0", "nodad"},
		{l.Attacker.Name, "ip", "link", "set", "att0", "up"},
		{l.Proxy.Name, "ip", "link", "set", "pxa0", "up"},
		{l.Proxy.Name, "ip", "link", "set", "pxm0", "up"},
		{l.Mail.Name, "ip", "link", "set", "mail0", "up"},
	}
	byName := map[string]*netns.NS{l.Attacker.Name: l.Attacker, l.Proxy.Name: l.Proxy, l.Mail.Name: l.Mail}
	for _, c := range cmds {
		if _, err := byName[c[0]].Run(c[1], c[2:]...); err != nil {
			return err
		}
	}
	return nil
}

func (l *Lab) write(name, content string, mode os.FileMode) error {
	return os.WriteFile(l.path(name), []byte(content), mode)
}

func (l *Lab) keygen(name string) error {
	out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", l.path(name)).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ssh-keygen: %v: %s", err, out)
	}
	return nil
}

// proxyFiles writes the proxy's sshd config, host key, authorized_keys
// and f2b-shim policy.
func (l *Lab) proxyFiles() error {
	if err := os.MkdirAll("/run/sshd", 0o755); err != nil { // sshd's privilege-separation directory
		return err
	}
	for _, k := range []string{"ssh_host_ed25519_key", "id_ed25519"} {
		if err := l.keygen(k); err != nil {
			return err
		}
	}
	pub, err := os.ReadFile(l.path("id_ed25519.pub"))
	if err != nil {
		return err
	}
	hostPub, err := os.ReadFile(l.path("ssh_host_ed25519_key.pub"))
	if err != nil {
		return err
	}
	// The line from examples/ssh/authorized_keys, with this lab's paths.
	keyLine := fmt.Sprintf("restrict,from=%q,command=\"%s --policy %s\" %s", MailV4, l.forcedShim(), l.path("policy.toml"), pub)
	rootLogin := "forced-commands-only"
	if l.Mode == UserMode && !l.bench {
		rootLogin = "no"
	}
	sshd := strings.Join([]string{
		"Port " + SSHPort,
		"ListenAddress " + ProxyInV4,
		"HostKey " + l.path("ssh_host_ed25519_key"),
		"PidFile " + l.path("sshd.pid"),
		"AuthorizedKeysFile " + l.path("authorized_keys.%u"),
		"StrictModes no", // the temp dir is not where sshd expects key files
		"UsePAM no",
		"PasswordAuthentication no",
		"KbdInteractiveAuthentication no",
		"PermitRootLogin " + rootLogin,
		"Subsystem sftp internal-sftp",
		"LogLevel VERBOSE",
	}, "\n") + "\n"
	if l.Mode == UserMode {
		// The shipped Match block, with this lab's paths.
		example, err := os.ReadFile(filepath.Join(RepoRoot(), "examples", "ssh", "sshd_config-f2b-shim.conf"))
		if err != nil {
			return err
		}
		sshd += strings.NewReplacer(
			"/etc/f2b-shim/authorized_keys", l.path("authorized_keys.f2b-shim"),
			"/usr/local/sbin/f2b-shim --policy /etc/f2b-shim/policy.toml", l.Shim+" --policy "+l.path("policy.toml"),
		).Replace(string(example))
		if l.bench {
			// The raw nft user gets the shipped block too, with nft's
			// command in place of the shim's (see AddRawNFTKey).
			sshd += "\n" + strings.NewReplacer(
				"Match User f2b-shim", "Match User "+RawNFTUser,
				"/etc/f2b-shim/authorized_keys", l.path("authorized_keys."+RawNFTUser),
				"/usr/local/sbin/f2b-shim --policy /etc/f2b-shim/policy.toml", l.rawNFTCommand(),
			).Replace(string(example))
		}
	}
	policy := fmt.Sprintf("name = \"lab\"\naudit_log = %q\nstate_dir = %q\nbackend = %q\n", l.path("log/audit.jsonl"), l.path("state"), l.Backend)
	owner := 0
	if l.Mode == UserMode {
		owner = UserID
	}
	for _, d := range []string{"log", "state"} {
		if err := os.Mkdir(l.path(d), 0o750); err != nil {
			return err
		}
		if err := os.Chown(l.path(d), owner, owner); err != nil {
			return err
		}
	}
	err = errors.Join(
		l.write("authorized_keys."+string(l.Mode), keyLine, 0o644),
		l.write("sshd_config", sshd, 0o600),
		l.write("policy.toml", policy, 0o640),
		l.write("known_hosts", fmt.Sprintf("[%s]:%s %s", ProxyInV4, SSHPort, hostPub), 0o644),
		os.Chown(l.path("policy.toml"), 0, owner),
	)
	if err != nil || l.Mode != UserMode {
		return err
	}
	// The f2b-shim user, as scripts/install makes it: a real shell (sshd
	// runs command= through it) and "*" for a password that never matches.
	passwd := fmt.Sprintf("f2b-shim:x:%d:%d:f2b-shim forced command:%s:/bin/sh\n", UserID, UserID, l.path("state"))
	group := fmt.Sprintf("f2b-shim:x:%d:\n", UserID)
	shadow := "f2b-shim:*:20000:0:99999:7:::\n"
	if l.bench {
		passwd += fmt.Sprintf("%s:x:%d:%d:raw nft baseline:%s:/bin/sh\n", RawNFTUser, RawNFTUserID, RawNFTUserID, l.Dir)
		group += fmt.Sprintf("%s:x:%d:\n", RawNFTUser, RawNFTUserID)
		shadow += RawNFTUser + ":*:20000:0:99999:7:::\n"
	}
	return l.accounts(passwd, group, shadow)
}

// accounts writes the proxy's copies of the account files: the host's,
// plus the lab user's lines. sshd sees them through bind mounts in its own
// mount namespace.
func (l *Lab) accounts(passwd, group, shadow string) error {
	for name, extra := range map[string]string{"passwd": passwd, "group": group, "shadow": shadow} {
		data, err := os.ReadFile("/etc/" + name)
		if err != nil {
			return err
		}
		if name == "passwd" && l.bench {
			data = rootShell(data)
		}
		if err := l.write("etc-"+name, string(data)+extra, 0o644); err != nil {
			return err
		}
	}
	return os.Chmod(l.path("etc-shadow"), 0o600)
}

// rootShell gives root /bin/sh in a copy of /etc/passwd.
func rootShell(passwd []byte) []byte {
	lines := strings.Split(string(passwd), "\n")
	for i, l := range lines {
		if f := strings.Split(l, ":"); len(f) == 7 && f[0] == "root" {
			f[6] = "/bin/sh"
			lines[i] = strings.Join(f, ":")
		}
	}
	return []byte(strings.Join(lines, "\n"))
}

// start runs a long-lived program in a namespace, logging to Dir/<log>.
func (l *Lab) start(ns *netns.NS, log string, name string, args ...string) error {
	f, err := os.Create(l.path(log))
	if err != nil {
		return err
	}
	defer f.Close()
	cmd := ns.Command(name, args...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		return err
	}
	l.procs = append(l.procs, cmd)
	return nil
}

func (l *Lab) startProxy() error {
	sshd := []string{"/usr/sbin/sshd", "-D", "-e", "-f", l.path("sshd_config")}
	var script []string
	if l.Mode == UserMode {
		script = append(script, fmt.Sprintf("for f in passwd group shadow; do mount --bind %s/etc-$f /etc/$f; done", l.Dir))
	}
	if l.HideFirewallPrograms {
		hide, err := l.hideScript()
		if err != nil {
			return err
		}
		script = append(script, hide...)
	}
	if script != nil {
		script = append(script, `exec "$@"`)
		sshd = append([]string{"unshare", "--mount", "--propagation", "private", "sh", "-euc", strings.Join(script, "\n"), "sh"}, sshd...)
	}
	if err := l.start(l.Proxy, "sshd.log", sshd[0], sshd[1:]...); err != nil {
		return err
	}
	// ip netns exec, unshare and sh each exec the next: this is sshd's
	// pid, the way into its mount namespace (ProxyExec).
	l.sshd = l.procs[len(l.procs)-1]
	// socat stands in for the reverse proxy: IMAP from the attacker's side
	// goes on to the mail host.
	if err := l.start(l.Proxy, "socat4.log", "socat", "TCP4-LISTEN:"+IMAPPort+",bind="+ProxyOutV4+",fork,reuseaddr", "TCP4:"+MailV4+":"+IMAPPort); err != nil {
		return err
	}
	if err := l.start(l.Proxy, "socat6.log", "socat", "TCP6-LISTEN:"+IMAPPort+",bind=["+ProxyOutV6+"],fork,reuseaddr,ipv6only=1", "TCP4:"+MailV4+":"+IMAPPort); err != nil {
		return err
	}
	if err := l.startOtherPort(); err != nil {
		return err
	}
	var lastErr error
	if err := waitFor(10*time.Second, func() bool {
		out, err := l.Mail.Run("socat", "-T1", "-u", "TCP4:"+ProxyInV4+":"+SSHPort+",connect-timeout=1", "STDOUT")
		lastErr = err
		return strings.HasPrefix(out, "SSH-")
	}); err != nil {
		return fmt.Errorf("sshd on the proxy does not answer (%v): %v\n%s", lastErr, err, l.Log("sshd.log"))
	}
	return nil
}

func (l *Lab) startMailService() error {
	if err := l.start(l.Mail, "imapd.log", "socat", "TCP4-LISTEN:"+IMAPPort+",bind="+MailV4+",fork,reuseaddr", "SYSTEM:echo OK IMAP ready"); err != nil {
		return err
	}
	var lastErr error
	if err := waitFor(10*time.Second, func() bool { lastErr = l.Connect(false); return lastErr == nil }); err != nil {
		return fmt.Errorf("the attacker cannot reach the mail host through the proxy (%v): %v", lastErr, err)
	}
	return nil
}

// mailFiles writes fail2ban's config dir: fail2ban.conf, a jail on
// Dir/mail.log, a filter, and action.d with the repository's
// examples/proxy-iptables.conf itself (a link, not a copy) and the
// iptables.conf it builds on. The mail host's ssh_config is
// examples/ssh/ssh_config with this lab's host, user and paths.
func (l *Lab) mailFiles() error {
	f2b := l.path("fail2ban")
	for _, d := range []string{"action.d", "filter.d", "jail.d"} {
		if err := os.MkdirAll(filepath.Join(f2b, d), 0o755); err != nil {
			return err
		}
	}
	// The action file includes nothing: it alone must do for every release.
	links := map[string]string{
		filepath.Join(RepoRoot(), "examples", "proxy-iptables.conf"): filepath.Join(f2b, "action.d", "proxy-iptables.conf"),
		filepath.Join(RepoRoot(), "examples", "proxy-stream.py"):     filepath.Join(f2b, "action.d", "proxy-stream.py"),
	}
	for from, to := range links {
		if err := os.Symlink(from, to); err != nil {
			return err
		}
	}
	example, err := os.ReadFile(filepath.Join(RepoRoot(), "examples", "ssh", "ssh_config"))
	if err != nil {
		return err
	}
	if l.sockDir, err = os.MkdirTemp("", netns.Prefix); err != nil {
		return err
	}
	sshConfig := strings.NewReplacer(
		"HostName proxy.example.net", "HostName "+ProxyInV4+"\n    Port "+SSHPort,
		"User f2b-shim", "User "+string(l.Mode),
		"/etc/fail2ban/f2b-shim/", l.Dir+"/",
		"/run/fail2ban/", l.sockDir+"/",
	).Replace(string(example))
	conf := fmt.Sprintf(`[Definition]
loglevel = INFO
logtarget = %s
socket = %s
pidfile = %s
dbfile = %s
`, l.path("fail2ban.log"), l.path("fail2ban.sock"), l.path("fail2ban.pid"), l.path("fail2ban.sqlite3"))
	jail := l.jailConf()
	if l.twoProxies {
		sshConfig += strings.Replace(strings.Replace(sshConfig, "Host f2b-proxy\n", "Host f2b-proxy2\n", 1), "HostName "+ProxyInV4, "HostName "+Proxy2V4, 1)
	}
	if l.LocalJail {
		jail += l.localJail()
		local, err := os.ReadFile("/etc/fail2ban/action.d/iptables.conf")
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(f2b, "action.d", "iptables.conf"), local, 0o644); err != nil {
			return err
		}
	}
	filter := "[Definition]\nfailregex = imap-login: auth failed, rip=<HOST>\n"
	return errors.Join(
		l.write("ssh_config", sshConfig, 0o644),
		l.write("mail.log", "", 0o644),
		l.write("mail-local.log", "", 0o644),
		os.WriteFile(filepath.Join(f2b, "fail2ban.conf"), []byte(conf), 0o644),
		os.WriteFile(filepath.Join(f2b, "jail.conf"), []byte(jail), 0o644),
		os.WriteFile(filepath.Join(f2b, "filter.d", "lab-imap.conf"), []byte(filter), 0o644),
	)
}

// jailConf is the mail host's jail.conf: the jail with the shipped
// action and the lab's ActionParams.
func (l *Lab) jailConf() string {
	jail := fmt.Sprintf(`[DEFAULT]
backend = polling
[%s]
enabled = true
filter = lab-imap
logpath = %s
maxretry = 3
findtime = 10m
bantime = 1h
action = proxy-iptables[name=%s, %s, ssh_config="%s", ssh_key="%s"]
`, Jail, l.path("mail.log"), Jail, cmp.Or(l.ActionParams, `port="imap,imaps", protocol=tcp`), l.path("ssh_config"), l.path("id_ed25519"))
	if l.Stream {
		jail = strings.Replace(jail, "action = proxy-iptables[name="+Jail+", ", "action = "+l.streamAction(), 1)
	}
	return jail
}

// SetActionParams rewrites the jail's action parameters (see
// ActionParams); fail2ban reads them at its next start or reload. Not
// with LocalJail.
func (l *Lab) SetActionParams(params string) error {
	if l.LocalJail {
		return errors.New("lab: SetActionParams would drop the local jail")
	}
	l.ActionParams = params
	return os.WriteFile(filepath.Join(l.path("fail2ban"), "jail.conf"), []byte(l.jailConf()), 0o644)
}

// Fail2ban runs fail2ban-client with the lab's config on the mail host.
func (l *Lab) Fail2ban(args ...string) (string, error) {
	args = append([]string{"-c", l.path("fail2ban")}, args...)
	if l.Fail2banTree == "" {
		return l.Mail.Run("fail2ban-client", args...)
	}
	return l.Mail.Run("env", append([]string{"PYTHONPATH=" + l.Fail2banTree, "/usr/bin/python3", filepath.Join(l.Fail2banTree, "bin", "fail2ban-client")}, args...)...)
}

// StartFail2ban starts fail2ban-server on the mail host and waits until
// the jail answers.
func (l *Lab) StartFail2ban() error {
	if _, err := l.Fail2ban("start"); err != nil {
		return err
	}
	l.f2bRunning = true
	return waitFor(20*time.Second, func() bool {
		_, err := l.Fail2ban("status", Jail)
		return err == nil
	})
}

// StopFail2ban stops fail2ban, which runs the action's actionstop.
func (l *Lab) StopFail2ban() error {
	_, err := l.Fail2ban("stop")
	if err == nil {
		l.f2bRunning = false
		err = waitFor(20*time.Second, func() bool { return !alive(l.path("fail2ban.pid")) })
	}
	return err
}

// FailLogins appends n failed logins from ip to the mail log.
func (l *Lab) FailLogins(ip string, n int) error { return l.failLogins("mail.log", ip, n) }

// failLogins appends n failed logins from ip to one of the lab's logs.
func (l *Lab) failLogins(log, ip string, n int) error {
	f, err := os.OpenFile(l.path(log), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	for range n {
		if _, err := fmt.Fprintf(f, "%s imap-login: auth failed, rip=%s\n", time.Now().Format("2006-01-02 15:04:05"), ip); err != nil {
			return err
		}
	}
	return nil
}

// Connect opens an IMAP connection from the attacker through the proxy and
// expects the mail host's greeting.
func (l *Lab) Connect(v6 bool) error {
	addr := "TCP4:" + ProxyOutV4 + ":" + IMAPPort
	if v6 {
		addr = "TCP6:[" + ProxyOutV6 + "]:" + IMAPPort
	}
	out, err := l.Attacker.Run("socat", "-T2", "-u", addr+",connect-timeout=2", "STDOUT")
	if err != nil {
		return err
	}
	if !strings.Contains(out, "OK IMAP ready") {
		return fmt.Errorf("no IMAP greeting, got %q", out)
	}
	return nil
}

// Rules is the proxy's "iptables -S" (or ip6tables) of the filter table.
//
// With the nftables backend it is "nft list ruleset" whatever bin is.
func (l *Lab) Rules(bin string) string {
	if l.Backend == "nftables" {
		bin = "nft"
	}
	out, err := l.Proxy.Run(bin, "-S")
	if bin == "nft" {
		out, err = l.Proxy.Run("nft", "list", "ruleset")
	}
	if err != nil {
		return err.Error()
	}
	return out
}

// Banned reports whether the proxy bans ip with fail2ban's default
// REJECT: a rule in the chain, or with the set backend a member of the
// chain's REJECT set.
func (l *Lab) Banned(ip string) bool {
	a := netip.MustParseAddr(ip)
	fam, bin, with := policy.IPv4, "iptables", "icmp-port-unreachable"
	if a.Is6() {
		fam, bin, with = policy.IPv6, "ip6tables", "icmp6-port-unreachable"
	}
	if l.Backend == "nftables" {
		return l.nftBanned(l.Proxy, a)
	}
	if l.Backend == "ipset" {
		set := firewall.SetName(fam, Chain, policy.Target{Kind: policy.Reject, RejectWith: with})
		_, err := l.Proxy.Run("ipset", "test", set, ip)
		return err == nil && strings.Contains(l.Rules(bin), "--match-set "+set+" src")
	}
	return strings.Contains(l.Rules(bin), fmt.Sprintf("-A %s -s %s -j REJECT", Chain, netip.PrefixFrom(a, a.BitLen())))
}

// WaitBan waits until the proxy does (or does not) ban ip, and returns
// how long that took.
// Fail2banBans is the jail's "Banned IP list" as fail2ban reports it.
func (l *Lab) Fail2banBans() ([]string, error) {
	out, err := l.Fail2ban("status", Jail)
	if err != nil {
		return nil, err
	}
	for _, line := range strings.Split(out, "\n") {
		if _, list, ok := strings.Cut(line, "Banned IP list:"); ok {
			ips := strings.Fields(list)
			slices.Sort(ips)
			return ips, nil
		}
	}
	return nil, fmt.Errorf("no banned list in: %s", out)
}

// ProxyBans lists the addresses the proxy bans in the jail's chain, both
// families, once per rule or set member: an address banned twice shows
// twice.
func (l *Lab) ProxyBans() []string { return l.bansIn(l.Proxy) }

// Proxy2Bans is ProxyBans of the second proxy.
func (l *Lab) Proxy2Bans() []string { return l.bansIn(l.Proxy2) }

func (l *Lab) bansIn(ns *netns.NS) []string {
	if l.Backend == "nftables" {
		return l.nftBans(ns)
	}
	var out []string
	for _, bin := range []string{"iptables", "ip6tables"} {
		rules, err := ns.Run(bin, "-S")
		if err != nil {
			rules = ""
		}
		for _, r := range strings.Split(rules, "\n") {
			f := strings.Fields(r)
			switch {
			case len(f) > 3 && f[0] == "-A" && f[1] == Chain && f[2] == "-s":
				p := netip.MustParsePrefix(f[3])
				out = append(out, p.Addr().String())
			case len(f) > 5 && f[0] == "-A" && f[1] == Chain && f[3] == "set":
				members, _ := ns.Run("ipset", "list", f[5])
				_, m, _ := strings.Cut(members, "Members:\n")
				for _, e := range strings.Fields(m) {
					if p, err := netip.ParsePrefix(e); err == nil {
						e = p.Addr().String()
					}
					out = append(out, e)
				}
			}
		}
	}
	slices.Sort(out)
	return out
}

// WaitSameBans waits until fail2ban holds want (all of it: after a
// restart it re-bans from its database a little at a time) and the proxy
// bans exactly that, each once; it returns both lists as last read.
func (l *Lab) WaitSameBans(want []string, timeout time.Duration) (f2b, proxy []string, err error) {
	err = waitFor(timeout, func() bool {
		f2b, err = l.Fail2banBans()
		proxy = l.ProxyBans()
		return err == nil && slices.Equal(f2b, want) && slices.Equal(proxy, want)
	})
	return f2b, proxy, err
}

// WaitJail waits until fail2ban answers for the jail again (after a
// restart or a reload).
func (l *Lab) WaitJail() error {
	l.f2bRunning = true
	return waitFor(30*time.Second, func() bool {
		_, err := l.Fail2ban("status", Jail)
		return err == nil
	})
}

// KillFail2ban stops fail2ban-server with SIGKILL, as a crash or the OOM
// killer would, leaving its rules and database as they are.
func (l *Lab) KillFail2ban() error {
	pid := readPid(l.path("fail2ban.pid"))
	if pid <= 0 {
		return fmt.Errorf("no fail2ban pid in %s", l.path("fail2ban.pid"))
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		return err
	}
	l.f2bRunning = false
	if err := waitFor(20*time.Second, func() bool { return !alive(l.path("fail2ban.pid")) }); err != nil {
		return err
	}
	// A killed server leaves its socket; a new one refuses to start on it.
	return os.Remove(l.path("fail2ban.sock"))
}

func (l *Lab) WaitBan(ip string, present bool, timeout time.Duration) (time.Duration, error) {
	start := time.Now()
	if err := waitFor(timeout, func() bool { return l.Banned(ip) == present }); err != nil {
		return 0, fmt.Errorf("after %s the proxy still %s %s:\n%s", timeout, map[bool]string{true: "does not ban", false: "bans"}[present], ip, l.Rules("iptables")+l.Rules("ip6tables"))
	}
	return time.Since(start), nil
}

// SSH runs ssh from the mail host with the lab's ssh_config and key, as
// fail2ban's action does, and returns its exit code and output.
func (l *Lab) SSH(args ...string) (int, string) {
	cmd := l.Mail.Command("ssh", append([]string{"-F", l.path("ssh_config"), "-i", l.path("id_ed25519")}, args...)...)
	return exitCode(cmd)
}

// Admin runs an admin subcommand of the shim on the proxy, as the account
// the key logs into (as the systemd unit's User= does for restore).
func (l *Lab) Admin(args ...string) (int, string) {
	args = append([]string{args[0], "--policy", l.path("policy.toml")}, args[1:]...)
	if l.Mode == UserMode {
		args = append([]string{fmt.Sprintf("--reuid=%d", UserID), fmt.Sprintf("--regid=%d", UserID), "--clear-groups", l.Shim}, args...)
		return exitCode(l.proxyCommand("setpriv", args...))
	}
	return exitCode(l.proxyCommand(l.Shim, args...))
}

// FlushProxy empties the proxy's firewall, both families and its ipsets,
// as a reboot or an admin's "iptables -F; iptables -X" would, behind
// fail2ban's back. With the nftables backend it is "nft flush ruleset".
func (l *Lab) FlushProxy() error {
	if l.Backend == "nftables" {
		_, err := l.Proxy.Run("nft", "flush", "ruleset")
		return err
	}
	for _, bin := range []string{"iptables", "ip6tables"} {
		for _, flag := range []string{"-F", "-X"} {
			if _, err := l.Proxy.Run(bin, flag); err != nil {
				return err
			}
		}
	}
	_, err := l.Proxy.Run("ipset", "destroy")
	return err
}

// SetPolicy sets one key of the proxy's policy (both proxies' in a
// two-proxy lab) to a TOML value, such as SetPolicy("backend", `"ipset"`);
// the shim reads its policy on every request.
func (l *Lab) SetPolicy(key, value string) error {
	if key == "backend" {
		l.Backend = strings.Trim(value, `"`)
	}
	files := []string{l.path("policy.toml")}
	if l.twoProxies {
		files = append(files, l.p2("policy.toml"))
	}
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			return err
		}
		line := []byte(key + " = " + value)
		re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(key) + ` = .*$`)
		if re.Match(data) {
			data = re.ReplaceAll(data, line)
		} else {
			data = append(append(data, line...), '\n')
		}
		if err := os.WriteFile(file, data, 0o640); err != nil {
			return err
		}
	}
	return nil
}

// Preload records n bans (10.x.y.z) in chain in the proxy's state and
// puts them in place with "f2b-shim restore": a proxy with n bans.
func (l *Lab) Preload(chain string, n int) error {
	if err := l.Record(chain, n); err != nil {
		return err
	}
	if code, out := l.Admin("restore"); code != 0 {
		return fmt.Errorf("restore: %s", out)
	}
	return nil
}

// Record records n bans (10.x.y.z) in chain in the proxy's state only,
// for a caller that puts them in the firewall itself.
func (l *Lab) Record(chain string, n int) error {
	data, err := os.ReadFile(l.path("policy.toml"))
	if err != nil {
		return err
	}
	pol, err := policy.Parse(data)
	if err != nil {
		return err
	}
	s, err := state.Open(pol, nil, time.Second)
	if err != nil {
		return err
	}
	var ops []policy.Operation
	for i := range n {
		op, err := policy.Decide(pol, fmt.Sprintf("iptables -w -I %s 1 -s 10.%d.%d.%d -j DROP", chain, i>>16&255, i>>8&255, i&255), policy.Context{})
		if err != nil {
			s.Close()
			return err
		}
		ops = append(ops, op)
	}
	return errors.Join(s.RecordBatch(ops, time.Now()), s.Close())
}

// AddRawKey gives the mail host a second key to the proxy's root, one
// that runs any command without the shim, for the benchmark's raw
// iptables baseline; RawSSH uses it. Root mode only, and never in a test
// that checks what the shim's key may do.
func (l *Lab) AddRawKey() error {
	// A forced command that runs whatever the client asked for, so that
	// "PermitRootLogin forced-commands-only" admits the key; exec keeps
	// it to the one process a plain root key would start.
	return l.addRootKey("raw", `exec $SSH_ORIGINAL_COMMAND`)
}

// AddFloorKey gives the mail host a root key whose forced command is
// /bin/true: the cost of an ssh session itself, the floor under raw
// iptables and the shim alike. FloorSSH uses it.
func (l *Lab) AddFloorKey() error { return l.addRootKey("floor", "/bin/true") }

func (l *Lab) addRootKey(name, command string) error {
	return l.addKey("root", name, fmt.Sprintf("restrict,command=%q", command))
}

// rawNFTCommand is the raw nft user's forced command: the client's words
// as nft's arguments, through the user's /bin/sh as sshd runs every
// forced command, the shim's included (sh forks once for it, as it does
// for the shim's command; no exec, so that both pay the same).
func (l *Lab) rawNFTCommand() string { return l.path("nft") + " $SSH_ORIGINAL_COMMAND" }

// AddRawNFTKey gives the mail host a key to the raw nft user (UpBench
// only), for the benchmark's baseline of the nftables backend: the same
// sshd, the same kind of account (unprivileged, /bin/sh, the shipped
// Match block and key options), and a copy of nft with
// cap_net_admin+ep, as the shim has it, in place of the shim. The key
// runs nothing but nft, inside the proxy's namespace; use it with
// SSHArgs(RawNFTUser).
func (l *Lab) AddRawNFTKey() error {
	if !l.bench {
		return fmt.Errorf("the raw nft key exists only in a benchmark lab (UpBench)")
	}
	nft, err := exec.LookPath("nft")
	if err != nil {
		return err
	}
	data, err := os.ReadFile(nft)
	if err != nil {
		return err
	}
	if err := os.WriteFile(l.path("nft"), data, 0o755); err != nil {
		return err
	}
	if out, err := exec.Command("setcap", "cap_net_admin+ep", l.path("nft")).CombinedOutput(); err != nil {
		return fmt.Errorf("setcap: %v: %s", err, out)
	}
	return l.addKey(RawNFTUser, RawNFTUser, fmt.Sprintf("restrict,from=%q,command=%q", MailV4, l.rawNFTCommand()))
}

// addKey makes a key pair id_NAME, appends its line with options to
// user's authorized_keys in Dir, and writes ssh_config_NAME, which logs
// in as user with it over its own shared connection.
func (l *Lab) addKey(user, name, options string) error {
	if err := l.keygen("id_" + name); err != nil {
		return err
	}
	pub, err := os.ReadFile(l.path("id_" + name + ".pub"))
	if err != nil {
		return err
	}
	f, err := os.OpenFile(l.path("authorized_keys."+user), os.O_APPEND|os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := fmt.Fprintf(f, "%s %s", options, pub); err != nil {
		return err
	}
	cfg, err := os.ReadFile(l.path("ssh_config"))
	if err != nil {
		return err
	}
	conf := strings.NewReplacer(l.path("id_ed25519"), l.path("id_"+name), "f2b-shim-%C", name+"-%C", "User "+string(l.Mode), "User "+user).Replace(string(cfg))
	return l.write("ssh_config_"+name, conf, 0o644)
}

// SSHArgs is how the mail host runs ssh with one of the lab's keys: ""
// (the shim's), "raw", "floor" or RawNFTUser; for a loop that runs inside the mail
// host's namespace, so that "ip netns exec" is not timed.
func (l *Lab) SSHArgs(key string) []string {
	if key == "" {
		return []string{"-F", l.path("ssh_config"), "-i", l.path("id_ed25519")}
	}
	return []string{"-F", l.path("ssh_config_" + key), "-i", l.path("id_" + key)}
}

// RawSSH runs ssh from the mail host with the raw key (see AddRawKey).
func (l *Lab) RawSSH(args ...string) (int, string) {
	return exitCode(l.Mail.Command("ssh", append(l.SSHArgs("raw"), args...)...))
}

// MailCommand runs any program on the mail host, e.g. scp or sftp.
func (l *Lab) MailCommand(name string, args ...string) (int, string) {
	return exitCode(l.Mail.Command(name, args...))
}

func exitCode(cmd *exec.Cmd) (int, string) {
	cmd.Stdin = nil
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode(), string(out)
	}
	if err != nil {
		return -1, err.Error()
	}
	return 0, string(out)
}

// Audit reads the proxy's f2b-shim audit log.
func (l *Lab) Audit() ([]map[string]any, error) { return readAudit(l.path("log/audit.jsonl")) }

// Log returns one of the lab's log files, e.g. "fail2ban.log".
func (l *Lab) Log(name string) string {
	b, _ := os.ReadFile(l.path(name))
	return string(b)
}

// Down stops everything the lab started and deletes its namespaces. It is
// safe to call more than once and after a failed Up.
func (l *Lab) Down() {
	if l.f2bRunning {
		_ = l.StopFail2ban()
	}
	if l.Mail != nil {
		// End ssh's shared connections (ControlPersist) to the proxy.
		l.SSH("-O", "exit", "f2b-proxy")
		if l.twoProxies {
			l.SSH("-O", "exit", "f2b-proxy2")
		}
		for _, key := range []string{"raw", "floor", RawNFTUser} {
			if _, err := os.Stat(l.path("ssh_config_" + key)); err == nil {
				exitCode(l.Mail.Command("ssh", append(l.SSHArgs(key), "-O", "exit", "f2b-proxy")...))
			}
		}
	}
	killPidFile(l.path("fail2ban.pid"))
	for _, p := range l.procs {
		_ = p.Process.Kill()
		_ = p.Wait()
	}
	l.procs = nil
	if l.sockDir != "" {
		_ = os.RemoveAll(l.sockDir)
	}
	for _, ns := range []**netns.NS{&l.Attacker, &l.Proxy, &l.Proxy2, &l.Mail} {
		if *ns != nil {
			_ = (*ns).Delete()
			*ns = nil
		}
	}
	if l.Dir != "" && !l.Keep {
		_ = os.RemoveAll(l.Dir)
	}
}

func readPid(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

func alive(pidFile string) bool {
	pid := readPid(pidFile)
	return pid > 0 && syscall.Kill(pid, 0) == nil
}

// killPidFile stops the process a pid file of ours names, if it still runs.
func killPidFile(path string) {
	if pid := readPid(path); pid > 0 {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

func waitFor(timeout time.Duration, ok func() bool) error {
	deadline := time.Now().Add(timeout)
	for {
		if ok() {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %s", timeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
