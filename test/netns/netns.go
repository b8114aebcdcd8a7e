// Package netns creates and removes the network namespaces that the
// system tests and the demo run in. Nothing here touches the host's own
// network or firewall: every command runs inside a namespace made here.
package netns

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os/exec"
	"strings"
)

// Prefix starts the name of every namespace the project makes, so that a
// cleanup after a killed run removes ours and nothing else.
const Prefix = "f2bt-"

// NS is a named network namespace.
type NS struct {
	Name string
}

// UniqueName returns Prefix, a random tag and the role, e.g. "f2bt-1a2b3c4d-proxy".
func UniqueName(role string) string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	name := Prefix + hex.EncodeToString(b)
	if role != "" {
		name += "-" + role
	}
	return name
}

// Add creates a namespace with loopback up.
func Add(name string) (*NS, error) {
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip netns add %s: %v: %s", name, err, out)
	}
	ns := &NS{Name: name}
	if _, err := ns.Run("ip", "link", "set", "lo", "up"); err != nil {
		_ = ns.Delete()
		return nil, err
	}
	return ns, nil
}

// Delete removes the namespace.
func (ns *NS) Delete() error {
	if out, err := exec.Command("ip", "netns", "del", ns.Name).CombinedOutput(); err != nil {
		return fmt.Errorf("ip netns del %s: %v: %s", ns.Name, err, out)
	}
	return nil
}

// Command returns a command that runs inside the namespace.
func (ns *NS) Command(name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", ns.Name, name}, args...)...)
}

// Run runs a command inside the namespace and returns its stdout; the
// error carries its stderr.
func (ns *NS) Run(name string, args ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := ns.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}
