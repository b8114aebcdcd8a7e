package cli

import (
	"encoding/binary"
	"errors"
	"io"
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/policy"
)

func TestKeyOptions(t *testing.T) {
	for _, c := range []struct {
		name, line string
		want       map[string]string
	}{
		{"the example line gives its command and from", `restrict,from="192.0.2.10",command="/usr/sbin/f2b-shim --policy /etc/f2b-shim/policy.toml" ssh-ed25519 AAAA fail2ban@mail`,
			map[string]string{"restrict": "", "from": "192.0.2.10", "command": "/usr/sbin/f2b-shim --policy /etc/f2b-shim/policy.toml"}},
		{"a line without options has none", `ssh-ed25519 AAAA command="x"`, map[string]string{}},
		{"a comment has none", `# command="/usr/sbin/f2b-shim"`, map[string]string{}},
		{"an escaped quote stays in the value", `command="echo \"a b\"",no-pty ssh-rsa AAAA`, map[string]string{"command": `echo "a b"`, "no-pty": ""}},
		{"option names are case-insensitive", `Command="/usr/sbin/f2b-shim" ssh-ed25519 AAAA`, map[string]string{"command": "/usr/sbin/f2b-shim"}},
	} {
		t.Run(c.name, func(t *testing.T) { assert.Equal(t, c.want, keyOptions(c.line)) })
	}
}

func TestFileCapsSuffice(t *testing.T) {
	caps := func(magic, permitted uint32) []byte {
		b := binary.LittleEndian.AppendUint32(nil, magic)
		b = binary.LittleEndian.AppendUint32(b, permitted)
		return append(b, make([]byte, 12)...)
	}
	const v2, netBoth = 0x02000000, 1<<12 | 1<<13
	for _, c := range []struct {
		name string
		in   []byte
		want bool
	}{
		{"cap_net_admin,cap_net_raw+ep suffices", caps(v2|1, netBoth), true},
		{"no xattr (after setcap -r) does not", nil, false},
		{"+p without the effective flag does not", caps(v2, netBoth), false},
		{"cap_net_admin alone does not", caps(v2|1, 1<<12), false},
	} {
		t.Run(c.name, func(t *testing.T) { assert.Equal(t, c.want, fileCapsSuffice(c.in)) })
	}
}

// TestCheckInstall runs the install checks against files in a temp dir
// and a stand-in for "sshd -T": each failure names its fix.
func TestCheckInstall(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the checks read the binary as root owns it; run as root")
	}
	if _, err := user.Lookup(shimUser); err == nil {
		t.Skip("this host has a user " + shimUser + "; the test expects root mode")
	}
	dir := t.TempDir()
	self := filepath.Join(dir, "f2b-shim")
	require.NoError(t, os.WriteFile(self, []byte("#!/bin/sh\n"), 0o755))
	keys := filepath.Join(dir, "authorized_keys")
	pol := policy.Default()
	pol.File = "/etc/f2b-shim/policy.toml"
	sshd := "authorizedkeysfile " + keys + "\nforcecommand none\npubkeyauthentication yes\npermitrootlogin forced-commands-only\n"
	probe := installProbe{self: self, sshdConfig: func(spec string) (string, error) {
		assert.True(t, strings.HasPrefix(spec, "user=root,"), spec)
		return sshd, nil
	}}
	run := func() (fails []string, oks []string) {
		checkInstall(pol, probe, func(what string, err error, ok string) {
			if err != nil {
				fails = append(fails, what+": "+err.Error())
			} else {
				oks = append(oks, what+": "+ok)
			}
		})
		return
	}

	t.Run("no key line fails with the line to add", func(t *testing.T) {
		fails, _ := run()
		require.Len(t, fails, 1)
		assert.Contains(t, fails[0], "key line: no key line runs the shim in "+keys)
		assert.Contains(t, fails[0], `command="`+self+` --policy /etc/f2b-shim/policy.toml"`)
	})
	t.Run("a key line for another binary is named", func(t *testing.T) {
		require.NoError(t, os.WriteFile(keys, []byte(`restrict,command="/usr/local/sbin/f2b-shim" ssh-ed25519 AAAA m`+"\n"), 0o600))
		fails, _ := run()
		require.Len(t, fails, 1)
		assert.Contains(t, fails[0], `runs "/usr/local/sbin/f2b-shim", not `+self)
	})
	require.NoError(t, os.WriteFile(keys, []byte("# the mail host\n"+`restrict,from="192.0.2.10",command="`+self+` --policy /etc/f2b-shim/policy.toml" ssh-ed25519 AAAA m`+"\n"), 0o600))
	t.Run("the key line in place is all well", func(t *testing.T) {
		fails, oks := run()
		assert.Empty(t, fails)
		assert.Contains(t, strings.Join(oks, "\n"), "key line: "+keys+":2 runs")
		assert.Contains(t, strings.Join(oks, "\n"), "sshd: for user root from 192.0.2.10")
	})
	for _, c := range []struct{ name, sshd, want string }{
		{"a ForceCommand that runs something else fails", "forcecommand /bin/true\n", "ForceCommand for user root is \"/bin/true\""},
		{"PermitRootLogin no fails in root mode", "permitrootlogin no\n", "PermitRootLogin forced-commands-only"},
		{"AllowUsers without the user fails", "allowusers alice bob@192.0.2.1\n", "AllowUsers (alice bob@192.0.2.1) leaves out root"},
		{"no public keys fails", "pubkeyauthentication no\n", "PubkeyAuthentication no"},
	} {
		t.Run(c.name, func(t *testing.T) {
			old := sshd
			key, _, _ := strings.Cut(c.sshd, " ")
			var lines []string
			for _, l := range strings.Split(strings.TrimSpace(old), "\n") {
				if !strings.HasPrefix(l, key+" ") {
					lines = append(lines, l)
				}
			}
			sshd = strings.Join(lines, "\n") + "\n" + c.sshd
			defer func() { sshd = old }()
			fails, _ := run()
			require.Len(t, fails, 1)
			assert.Contains(t, fails[0], c.want)
			assert.Contains(t, fails[0], "reload ssh", "the failure says how to fix it")
		})
	}
	t.Run("sshd -T failing for root says to fix what sshd says, not to run as root", func(t *testing.T) {
		good := probe.sshdConfig
		probe.sshdConfig = func(string) (string, error) {
			return "", errors.New("sshd -T -C user=root: exit status 255: Missing privilege separation directory: /run/sshd")
		}
		defer func() { probe.sshdConfig = good }()
		fails, _ := run()
		require.Len(t, fails, 1)
		assert.Contains(t, fails[0], "Missing privilege separation directory")
		assert.Contains(t, fails[0], "fix what sshd says")
		assert.NotContains(t, fails[0], "run status as root")
	})
	t.Run("a binary others may change fails", func(t *testing.T) {
		require.NoError(t, os.Chmod(self, 0o757))
		defer os.Chmod(self, 0o755)
		fails, _ := run()
		require.NotEmpty(t, fails)
		assert.Contains(t, fails[0], "binary: "+self+" is not root's alone")
		assert.Contains(t, fails[0], "run: chown root:f2b-shim")
	})
}

// TestStatusOnAMailHost: with no policy and the mail host's files in
// place, status says it is a mail host, names the outboxes and makes no
// state or audit log (issue 22 found /var/lib/f2b-shim made there).
func TestStatusOnAMailHost(t *testing.T) {
	dir := t.TempDir()
	outboxes := filepath.Join(dir, "outboxes")
	require.NoError(t, os.MkdirAll(filepath.Join(outboxes, "dovecot"), 0o750))
	oldDir, oldMarks := mailHostOutboxDir, mailHostMarks
	mailHostOutboxDir, mailHostMarks = outboxes, []string{outboxes}
	defer func() { mailHostOutboxDir, mailHostMarks = oldDir, oldMarks }()
	deps := Deps{DefaultPolicyFile: filepath.Join(dir, "etc/policy.toml")}

	var out strings.Builder
	code := runStatus(nil, &out, io.Discard, deps)
	assert.Equal(t, ExitOK, code)
	assert.Contains(t, out.String(), "this is a mail host")
	assert.Contains(t, out.String(), filepath.Join(outboxes, "dovecot"))
	assert.Contains(t, out.String(), `"f2b-shim outbox"`)
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	assert.Len(t, entries, 1, "status made nothing beside the outboxes")

	t.Run("a host with a policy is a proxy, whatever else it has", func(t *testing.T) {
		require.NoError(t, os.MkdirAll(filepath.Dir(deps.DefaultPolicyFile), 0o755))
		require.NoError(t, os.WriteFile(deps.DefaultPolicyFile, nil, 0o644))
		_, ok := mailHostStatus(nil, io.Discard, deps)
		assert.False(t, ok)
	})
}
