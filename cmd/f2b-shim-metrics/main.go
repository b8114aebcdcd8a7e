// Command f2b-shim-metrics renders f2b-shim's state as Prometheus metrics;
// "f2b-shim metrics" runs it. It is a binary of its own so that the
// forced command does not link the Prometheus client. See the README.
package main

import (
	"os"

	"github.com/f2b-shim/f2b-shim/internal/cli"
	"github.com/f2b-shim/f2b-shim/internal/metrics"
)

func main() {
	cli.CleanEnvironment()
	os.Exit(metrics.Run(os.Args[1:], os.Stdout, os.Stderr, cli.RealDeps()))
}
