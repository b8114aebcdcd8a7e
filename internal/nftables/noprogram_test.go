package nftables

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// The backend must run no program: a ban is netlink messages only, so
// that the proxy needs no nft, iptables or ipset, and strace shows only
// the shim's own execve. No package this one is built from can start one.
func TestRunsNoProgram(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("needs the go tool to list the package's dependencies")
	}
	out, err := exec.Command(goTool, "list", "-deps", ".").Output()
	require.NoError(t, err)
	for _, pkg := range strings.Fields(string(out)) {
		require.NotEqual(t, "os/exec", pkg, "a dependency of internal/nftables can start programs")
	}
}
