package cli

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/audit"
	"github.com/f2b-shim/f2b-shim/policy"
)

// Snapshot is what "f2b-shim metrics" reports of one policy. It is
// gathered here and rendered by internal/metrics, in the separate
// f2b-shim-metrics binary: the Prometheus client adds about 1.4 ms of
// package initialisation to every start, which the forced command,
// started once per ban, must not pay.
type Snapshot struct {
	Policy string
	Up     bool
	// Bans per family and chain.
	Bans map[[2]string]int
	// Drift per family and kind (missing, unexpected, duplicate).
	Drift map[[2]string]int
	// Requests in the current audit log per decision and result.
	Requests     map[[2]string]int
	LastApply    time.Time
	QuotaDenials int
	Expired      int
	// AuditRead says the audit log was read to its end: Requests,
	// LastApply, QuotaDenials and Expired were measured. Without it they
	// are not reported, as a 0 (or a part) would read as a reset.
	AuditRead bool
}

// MetricsHelper is the binary that renders the metrics, beside f2b-shim.
const MetricsHelper = "f2b-shim-metrics"

// runMetrics hands over to f2b-shim-metrics beside this binary. In the
// least-privilege install only f2b-shim is sure to carry the file
// capabilities (the package sets them on it alone), so it raises them as
// ambient capabilities first: they pass to the helper across exec, and
// from it to iptables, and the helper can read the firewall to measure
// drift. Without them (a copy lost its capabilities) the helper reports
// f2b_shim_up 0 and no drift, which is what is known.
func runMetrics(args []string, stderr io.Writer, deps Deps) int {
	_ = deps.PrepareExec()
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintf(stderr, "f2b-shim: metrics: %v\n", err)
		return ExitSetup
	}
	helper := filepath.Join(filepath.Dir(self), MetricsHelper)
	err = syscall.Exec(helper, append([]string{helper}, args...), os.Environ())
	fmt.Fprintf(stderr, "f2b-shim: metrics: cannot run %s: %v\nf2b-shim: hint: install it beside f2b-shim (scripts/install does)\n", helper, err)
	return ExitSetup
}

// CollectMetrics gathers a snapshot of each policy that args select
// (--policy FILE, or --all [--dir DIR]); code is the first failure's.
func CollectMetrics(args []string, stderr io.Writer, deps Deps) (snaps []Snapshot, code int) {
	code = forPolicies("metrics", args, stderr, deps, func(pol *policy.Policy) int {
		snap, c := collect(pol, stderr, deps)
		snaps = append(snaps, snap)
		return c
	})
	return snaps, code
}

// collect reads one policy's state, drift and audit log.
func collect(pol *policy.Policy, stderr io.Writer, deps Deps) (Snapshot, int) {
	snap := Snapshot{Policy: pol.Name, Bans: map[[2]string]int{}, Drift: map[[2]string]int{}, Requests: map[[2]string]int{}}
	a, code := newAdmin(pol, stderr, deps)
	if a == nil {
		return snap, code
	}
	defer a.close()
	s, err := a.journal()
	if err != nil {
		fmt.Fprintf(stderr, "f2b-shim: metrics: %v\n", err)
		return snap, ExitSetup
	}
	for _, fam := range families {
		t := s.Tables[fam]
		for _, name := range t.ChainNames() {
			snap.Bans[[2]string{fam.String(), string(name)}] = t.Chains[name].Len()
		}
		b, err := a.backend(fam)
		if err == nil {
			var ds []drift
			if ds, err = compare(s, fam, b, a.pol, a.ctx, a.deps.Now()); err == nil {
				// Only a drift that was measured is reported: a gauge of 0
				// for a firewall that could not be read would say "no
				// drift" when nothing is known (f2b_shim_up says why).
				for _, kind := range []string{"missing", "unexpected", "duplicate"} {
					snap.Drift[[2]string{fam.String(), kind}] = 0
				}
				for _, d := range ds {
					snap.Drift[[2]string{fam.String(), d.kind}]++
				}
			}
		}
		if err != nil {
			fmt.Fprintf(stderr, "f2b-shim: metrics %s: %s\n", fam, oneLine.Replace(err.Error()))
			code = ExitFirewall
		}
	}
	_, err = audit.ScanCurrent(pol.AuditLog, func(r audit.Record) {
		snap.Requests[[2]string{r.Decision, r.Result}] += max(1, r.Count)
		switch {
		case r.Result == "applied" && r.Time.After(snap.LastApply):
			snap.LastApply = r.Time
		case r.Result == "expired":
			snap.Expired++
		case r.Decision == audit.Allow && (r.Result == "denied" || r.Result == "coalesced") && strings.Contains(string(r.Reason), "max_new_bans_per_minute"):
			// A limit denial is allowed by the policy and refused by a
			// bound; a policy denial may quote the client's words,
			// such as a chain named max_new_bans_per_minute.
			snap.QuotaDenials += max(1, r.Count)
		}
	})
	if err != nil {
		fmt.Fprintf(stderr, "f2b-shim: metrics: %v\n", err)
		return snap, ExitSetup
	}
	snap.AuditRead = true
	snap.Up = code == ExitOK
	return snap, code
}
