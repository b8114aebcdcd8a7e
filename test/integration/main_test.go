// Package integration runs the built f2b-shim against real iptables-nft
// and iptables-legacy, each test in its own network namespace.
package integration

import (
	"fmt"
	"os"
	"testing"

	"github.com/f2b-shim/f2b-shim/test/nstest"
)

// shim is the binary under test, built once for the package.
var shim string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "f2b-shim-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// F2B_SHIM_BINARY runs the system tests against another build, such
	// as an older release, to show which attacks it lets through.
	if shim = os.Getenv("F2B_SHIM_BINARY"); shim == "" {
		shim, err = nstest.BuildShim(dir)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}
