package cli

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/google/shlex"
	"golang.org/x/sys/unix"

	"github.com/f2b-shim/f2b-shim/policy"
)

// The install checks of "f2b-shim status": what breaks a real install,
// seen from the account the mail host's key logs in as. Issue 22 found a
// status that said all was well while the binary had lost its
// capabilities (status ran as root, which needs none), while no key line
// was in authorized_keys, and while no sshd block was active.

// shimUser is the account the package and scripts/install make; without
// it the install is in root mode (the key in root's authorized_keys).
const shimUser = "f2b-shim"

// maxKeysFile bounds an authorized_keys file read; a real one holds a few
// lines.
const maxKeysFile = 1 << 20

// keyFileHint is the authorized_keys the examples and the package use for
// the shim's user.
const keyFileHint = "/etc/f2b-shim/authorized_keys"

// installProbe is what the install checks ask of the system.
type installProbe struct {
	// self is this binary, as a key line's command names it.
	self string
	// sshdConfig runs "sshd -T -C SPEC" and returns its output.
	sshdConfig func(spec string) (string, error)
}

func realInstallProbe() installProbe {
	self, _ := os.Executable()
	return installProbe{
		self: self,
		sshdConfig: func(spec string) (string, error) {
			out, err := exec.Command("sshd", "-T", "-C", spec).CombinedOutput()
			if err != nil {
				return "", fmt.Errorf("sshd -T -C %s: %v: %s", spec, err, strings.TrimSpace(string(out)))
			}
			return string(out), nil
		},
	}
}

// statusInstall prints the install lines of status: the binary, the key
// line, sshd's view of the account. They are checked for a policy where
// the install puts policies; a policy elsewhere is a test's or a trial's.
func statusInstall(pol *policy.Policy, line func(what string, err error, ok string)) {
	if pol.File != "" && filepath.Dir(pol.File) != DefaultPolicyDir {
		line("install", nil, "not checked: the key line and sshd are checked for policies in "+DefaultPolicyDir)
		return
	}
	checkInstall(pol, realInstallProbe(), line)
}

func checkInstall(pol *policy.Policy, p installProbe, line func(string, error, string)) {
	u, err := user.Lookup(shimUser)
	if err != nil {
		if u, err = user.LookupId("0"); err != nil {
			line("login user", err, "")
			return
		}
	}
	line("binary", checkBinary(p.self, u), fmt.Sprintf("%s: user %s can run it%s", p.self, u.Username, map[bool]string{true: ", with cap_net_admin,cap_net_raw+ep"}[u.Uid != "0"]))
	if u.Uid != "0" {
		line("login shell", checkShell(u.Username), "user "+u.Username+" has a shell that runs command=")
	}
	cfg, err := sshdView(p, u.Username, "127.0.0.1")
	if err != nil {
		line("sshd", err, "")
		return
	}
	files := keyFiles(cfg, u)
	key, err := findKeyLine(files, p.self, pol)
	if err != nil {
		line("key line", keyLineAdvice(err, files, u, p.self, pol), "")
		return
	}
	line("key line", nil, fmt.Sprintf("%s:%d runs %s", key.file, key.line, key.command))
	addr := "127.0.0.1"
	if a, ok := key.fromAddr(); ok {
		addr = a
		if cfg, err = sshdView(p, u.Username, addr); err != nil {
			line("sshd", err, "")
			return
		}
		if !slices.Contains(keyFiles(cfg, u), key.file) {
			line("sshd", fmt.Errorf("for user %s from %s, sshd does not read %s (AuthorizedKeysFile %s); a Match block for that address changes it", u.Username, addr, key.file, strings.Join(cfg["authorizedkeysfile"], " ")), "")
			return
		}
	}
	line("sshd", checkSSHDRuns(cfg, u, key, p.self, pol), fmt.Sprintf("for user %s from %s: reads %s and runs the shim", u.Username, addr, key.file))
}

// checkBinary checks that the login user may run the binary and, unless
// it is root, that the binary carries the capabilities iptables needs.
func checkBinary(path string, u *user.User) error {
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	sys := st.Sys().(*syscall.Stat_t)
	mode := st.Mode().Perm()
	group := groupName(sys.Gid)
	fixMode := fmt.Sprintf("run: chown root:%s %s && chmod 0750 %s && setcap cap_net_admin,cap_net_raw+ep %s (setcap last: chown and chmod drop it)", shimUser, path, path, path)
	if !canExec(mode, sys, u) {
		return fmt.Errorf("user %s may not run %s (%s %s:%s); %s", u.Username, path, mode, userName(sys.Uid), group, fixMode)
	}
	if mode&0o002 != 0 || sys.Uid != 0 {
		return fmt.Errorf("%s is not root's alone (%s %s:%s), and it carries CAP_NET_ADMIN; %s", path, mode, userName(sys.Uid), group, fixMode)
	}
	if u.Uid == "0" {
		return nil
	}
	if mode&0o001 != 0 {
		return fmt.Errorf("every local user may run %s (%s), which carries CAP_NET_ADMIN; %s", path, mode, fixMode)
	}
	raw := make([]byte, 64)
	n, err := unix.Getxattr(path, "security.capability", raw)
	if err != nil && !errors.Is(err, unix.ENODATA) {
		return fmt.Errorf("reading the file capabilities of %s: %v", path, err)
	}
	if !fileCapsSuffice(raw[:max(n, 0)]) {
		return fmt.Errorf("%s lacks the file capabilities cap_net_admin,cap_net_raw+ep (a copy or a chmod drops them), so user %s cannot change the firewall; run: setcap cap_net_admin,cap_net_raw+ep %s", path, u.Username, path)
	}
	return nil
}

// fileCapsSuffice decodes a security.capability value (struct
// vfs_cap_data): the effective flag and CAP_NET_ADMIN and CAP_NET_RAW in
// the permitted set.
func fileCapsSuffice(b []byte) bool {
	const flagEffective = 0x1
	if len(b) < 12 {
		return false
	}
	magic := binary.LittleEndian.Uint32(b[0:])
	permitted := binary.LittleEndian.Uint32(b[4:])
	const want = 1<<12 | 1<<13 // CAP_NET_ADMIN, CAP_NET_RAW
	return magic&flagEffective != 0 && permitted&want == want
}

func canExec(mode os.FileMode, sys *syscall.Stat_t, u *user.User) bool {
	switch {
	case u.Uid == "0":
		return mode&0o111 != 0
	case u.Uid == strconv.Itoa(int(sys.Uid)):
		return mode&0o100 != 0
	}
	gids, _ := u.GroupIds()
	if u.Gid == strconv.Itoa(int(sys.Gid)) || slices.Contains(gids, strconv.Itoa(int(sys.Gid))) {
		return mode&0o010 != 0
	}
	return mode&0o001 != 0
}

func groupName(gid uint32) string {
	if g, err := user.LookupGroupId(strconv.Itoa(int(gid))); err == nil {
		return g.Name
	}
	return strconv.Itoa(int(gid))
}

func userName(uid uint32) string {
	if u, err := user.LookupId(strconv.Itoa(int(uid))); err == nil {
		return u.Username
	}
	return strconv.Itoa(int(uid))
}

// checkShell: sshd runs command= through the user's shell, so a nologin
// shell refuses every request.
func checkShell(name string) error {
	f, err := os.Open("/etc/passwd")
	if err != nil {
		return nil // nothing to say: the account may come from elsewhere
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Split(sc.Text(), ":")
		if len(fields) == 7 && fields[0] == name {
			if sh := filepath.Base(fields[6]); sh == "nologin" || sh == "false" {
				return fmt.Errorf("user %s has the shell %s, and sshd runs command= through it; run: usermod --shell /bin/sh %s", name, fields[6], name)
			}
		}
	}
	return nil
}

// sshdView is sshd's effective configuration for a login of user from
// addr: each keyword (lower case) with its values, in order.
func sshdView(p installProbe, name, addr string) (map[string][]string, error) {
	out, err := p.sshdConfig(fmt.Sprintf("user=%s,host=mail-host,addr=%s", name, addr))
	if err != nil {
		hint := "run status as root, which may read sshd's configuration and host keys"
		if os.Geteuid() == 0 {
			// Root reads them already: what sshd said is the thing to fix
			// (a missing /run/sshd while ssh.service is stopped, a typo).
			hint = "fix what sshd says (\"sshd -t\" says it too), then run status again"
		}
		if _, lerr := exec.LookPath("sshd"); lerr != nil {
			hint = "install it: apt install openssh-server"
		}
		return nil, fmt.Errorf("%s; %s", oneLine.Replace(strings.TrimSpace(err.Error())), hint)
	}
	return parseSSHDConfig(out), nil
}

func parseSSHDConfig(out string) map[string][]string {
	cfg := map[string][]string{}
	for _, l := range strings.Split(out, "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(l), " ")
		if !ok {
			continue
		}
		k = strings.ToLower(k)
		cfg[k] = append(cfg[k], strings.Fields(v)...)
	}
	return cfg
}

// keyFiles are the authorized_keys files sshd reads for u, with their
// tokens expanded and relative paths taken from the home directory.
func keyFiles(cfg map[string][]string, u *user.User) []string {
	var out []string
	for _, f := range cfg["authorizedkeysfile"] {
		if f == "none" {
			continue
		}
		f = strings.NewReplacer("%%", "%", "%h", u.HomeDir, "%u", u.Username, "%U", u.Uid).Replace(f)
		if !filepath.IsAbs(f) {
			f = filepath.Join(u.HomeDir, f)
		}
		out = append(out, f)
	}
	return out
}

// keyLine is a line of authorized_keys whose command= runs the shim.
type keyLine struct {
	file    string
	line    int
	command string
	from    string
}

// fromAddr is the first plain address of from=, to ask sshd about.
func (k keyLine) fromAddr() (string, bool) {
	for _, f := range strings.Split(k.from, ",") {
		if a, err := netip.ParseAddr(f); err == nil {
			return a.String(), true
		}
	}
	return "", false
}

// errNoKeyLine is findKeyLine's answer when no line runs the shim.
var errNoKeyLine = errors.New("no key line runs the shim")

// findKeyLine finds, in the files sshd reads, a key line whose command=
// runs this binary with this policy.
func findKeyLine(files []string, self string, pol *policy.Policy) (keyLine, error) {
	var others []string
	for _, file := range files {
		f, err := os.Open(file)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		sc.Buffer(nil, maxKeysFile)
		n := 0
		for sc.Scan() {
			n++
			opts := keyOptions(sc.Text())
			cmd, ok := opts["command"]
			if !ok {
				continue
			}
			if runsShim(cmd, self, pol) {
				f.Close()
				return keyLine{file: file, line: n, command: cmd, from: opts["from"]}, nil
			}
			if strings.Contains(cmd, "f2b-shim") {
				others = append(others, fmt.Sprintf("%s:%d runs %q", file, n, cmd))
			}
		}
		f.Close()
	}
	if len(others) > 0 {
		return keyLine{}, fmt.Errorf("%w: %s, not %s with the policy %s", errNoKeyLine, strings.Join(others, "; "), self, policyFileOf(pol))
	}
	return keyLine{}, errNoKeyLine
}

func policyFileOf(pol *policy.Policy) string {
	if pol.File == "" {
		return DefaultPolicyDir + "/policy.toml"
	}
	return pol.File
}

// runsShim reports whether a command line runs this binary with this
// policy: --policy names it, or none is given and it is the default file.
func runsShim(cmd, self string, pol *policy.Policy) bool {
	words, err := shlex.Split(cmd)
	if err != nil || len(words) == 0 || !samePath(words[0], self) {
		return false
	}
	for i, w := range words {
		if p, ok := strings.CutPrefix(w, "--policy="); ok {
			return samePath(p, policyFileOf(pol))
		}
		if w == "--policy" && i+1 < len(words) {
			return samePath(words[i+1], policyFileOf(pol))
		}
	}
	return samePath(DefaultPolicyDir+"/policy.toml", policyFileOf(pol))
}

func samePath(a, b string) bool {
	if a == b {
		return true
	}
	ra, err1 := filepath.EvalSymlinks(a)
	rb, err2 := filepath.EvalSymlinks(b)
	return err1 == nil && err2 == nil && ra == rb
}

// keyOptions parses the options before the key of an authorized_keys
// line (sshd(8), AUTHORIZED_KEYS FILE FORMAT): name or name="value",
// comma-separated, a value's quotes escaped with a backslash.
func keyOptions(line string) map[string]string {
	line = strings.TrimSpace(line)
	opts := map[string]string{}
	if line == "" || line[0] == '#' || isKeyType(line) {
		return opts
	}
	var name, val strings.Builder
	inValue, quoted := false, false
	flush := func() {
		if name.Len() > 0 {
			opts[strings.ToLower(name.String())] = val.String()
		}
		name.Reset()
		val.Reset()
		inValue = false
	}
	for i := 0; i < len(line); i++ {
		c := line[i]
		switch {
		case quoted && c == '\\' && i+1 < len(line) && line[i+1] == '"':
			val.WriteByte('"')
			i++
		case c == '"':
			quoted = !quoted
		case quoted:
			val.WriteByte(c)
		case c == ' ' || c == '\t':
			flush()
			return opts
		case c == ',':
			flush()
		case c == '=' && !inValue:
			inValue = true
		case inValue:
			val.WriteByte(c)
		default:
			name.WriteByte(c)
		}
	}
	flush()
	return opts
}

func isKeyType(line string) bool {
	first, _, _ := strings.Cut(line, " ")
	for _, p := range []string{"ssh-", "ecdsa-", "sk-"} {
		if strings.HasPrefix(first, p) {
			return true
		}
	}
	return false
}

// keyLineAdvice says where the key line goes and how it reads.
func keyLineAdvice(err error, files []string, u *user.User, self string, pol *policy.Policy) error {
	where := strings.Join(files, " or ")
	line := fmt.Sprintf(`restrict,from="MAIL-HOST-ADDRESS",command="%s --policy %s" ssh-ed25519 AAAA... fail2ban@mail`, self, policyFileOf(pol))
	fix := fmt.Sprintf("add the mail host's key with this line: echo '%s' >> %s", line, keyFileHint)
	if u.Uid == "0" {
		fix = fmt.Sprintf("add the mail host's key with this line: echo '%s' >> %s", line, filepath.Join(u.HomeDir, ".ssh/authorized_keys"))
	} else if !slices.Contains(files, keyFileHint) {
		// sshd does not read the shim's file for its user: the drop-in
		// is missing (or not included).
		dropIn := "/usr/share/doc/f2b-shim/examples/sshd_config-f2b-shim.conf"
		if _, serr := os.Stat(dropIn); serr != nil {
			dropIn = "examples/ssh/sshd_config-f2b-shim.conf"
		}
		fix = fmt.Sprintf("sshd reads no %s for user %s, so the sshd block is not active; run: install -m 0644 %s /etc/ssh/sshd_config.d/f2b-shim.conf && sshd -t && systemctl reload ssh; then %s", keyFileHint, u.Username, dropIn, fix)
	}
	return fmt.Errorf("%v in %s (sshd's AuthorizedKeysFile for user %s); %s", err, where, u.Username, fix)
}

// checkSSHDRuns checks that sshd, for this login, runs the shim: the
// forced command wins over the key's command=; public keys are accepted;
// the account is allowed to log in.
func checkSSHDRuns(cfg map[string][]string, u *user.User, key keyLine, self string, pol *policy.Policy) error {
	one := func(k string) string {
		if v := cfg[k]; len(v) > 0 {
			return strings.Join(v, " ")
		}
		return ""
	}
	if one("pubkeyauthentication") == "no" {
		return fmt.Errorf("sshd has PubkeyAuthentication no for user %s; set it to yes in the sshd block, then run: sshd -t && systemctl reload ssh", u.Username)
	}
	if fc := one("forcecommand"); fc != "" && fc != "none" && !runsShim(fc, self, pol) {
		return fmt.Errorf("sshd's ForceCommand for user %s is %q, which runs instead of the key's command; make it %q in the sshd block, then run: sshd -t && systemctl reload ssh", u.Username, fc, key.command)
	}
	if u.Uid == "0" && one("permitrootlogin") == "no" {
		return errors.New("sshd has PermitRootLogin no; in root mode set \"PermitRootLogin forced-commands-only\" in /etc/ssh/sshd_config, then run: sshd -t && systemctl reload ssh")
	}
	if allow := cfg["allowusers"]; len(allow) > 0 && !slices.ContainsFunc(allow, func(p string) bool { return userMatches(p, u.Username) }) {
		return fmt.Errorf("sshd's AllowUsers (%s) leaves out %s; add it there, then run: sshd -t && systemctl reload ssh", strings.Join(allow, " "), u.Username)
	}
	if deny := cfg["denyusers"]; slices.ContainsFunc(deny, func(p string) bool { return userMatches(p, u.Username) }) {
		return fmt.Errorf("sshd's DenyUsers (%s) names %s; take it out, then run: sshd -t && systemctl reload ssh", strings.Join(deny, " "), u.Username)
	}
	return nil
}

// userMatches matches an AllowUsers/DenyUsers pattern ("name" or
// "name@host", with * and ?) against a user name.
func userMatches(pattern, name string) bool {
	pattern, _, _ = strings.Cut(pattern, "@")
	ok, _ := filepath.Match(pattern, name)
	return ok
}

// The mail host's files: the outboxes' directory (proxy-stream.py's
// outbox_dir default) and the actions the package f2b-shim-mailhost
// installs.
var (
	mailHostOutboxDir = "/var/lib/fail2ban/f2b-shim"
	mailHostMarks     = []string{"/etc/fail2ban/action.d/proxy-stream.py", "/etc/fail2ban/action.d/proxy-iptables.conf", mailHostOutboxDir}
)

// mailHostStatus answers "f2b-shim status" on a mail host, which has no
// policy: it says so, names the outboxes, and creates nothing (status once
// made /var/lib/f2b-shim and an audit log there). ok is false when this
// is not a mail host, or when a policy file exists.
func mailHostStatus(args []string, stdout io.Writer, deps Deps) (code int, ok bool) {
	if len(args) > 0 || deps.DefaultPolicyFile == "" {
		return 0, false
	}
	if _, err := os.Stat(deps.DefaultPolicyFile); err == nil {
		return 0, false
	}
	var found []string
	for _, m := range mailHostMarks {
		if _, err := os.Stat(m); err == nil {
			found = append(found, m)
		}
	}
	if len(found) == 0 {
		return 0, false
	}
	fmt.Fprintf(stdout, "this is a mail host: no proxy policy (%s), and %s\n", deps.DefaultPolicyFile, strings.Join(found, ", "))
	outboxes, _ := filepath.Glob(filepath.Join(mailHostOutboxDir, "*"))
	if len(outboxes) == 0 {
		fmt.Fprintf(stdout, "  outboxes:     none yet in %s (proxy-stream.py makes one per jail when the jail starts)\n", mailHostOutboxDir)
	} else {
		fmt.Fprintf(stdout, "  outboxes:     %s\n", strings.Join(outboxes, ", "))
	}
	fmt.Fprintln(stdout, "  the relay's side: run \"f2b-shim outbox\" to see what waits for each proxy; \"f2b-shim status\" checks a proxy, run it there")
	return ExitOK, true
}
