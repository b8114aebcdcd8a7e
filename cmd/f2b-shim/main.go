// Command f2b-shim is the forced command (authorized_keys command=) that
// lets a fail2ban host manage only its own ban chains on a proxy's
// firewall. See the README.
package main

import (
	"os"

	"github.com/f2b-shim/f2b-shim/internal/cli"
)

func main() {
	env := cli.EnvFrom(os.Environ())
	cli.CleanEnvironment()
	cli.FinishWhatWasStarted()
	os.Exit(cli.Run(os.Args[1:], env, os.Stdout, os.Stderr, cli.RealDeps()))
}
