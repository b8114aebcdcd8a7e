// Package metrics renders f2b-shim's state as Prometheus metrics, for
// node_exporter's textfile collector. It lives in its own binary,
// f2b-shim-metrics, so that the forced command does not link the
// Prometheus client, whose start-up cost it would pay on every ban.
package metrics

import (
	"fmt"
	"io"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"

	"github.com/f2b-shim/f2b-shim/internal/cli"
)

// Register adds the snapshots' metrics to reg.
func Register(reg *prometheus.Registry, snaps []cli.Snapshot) {
	bans := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "f2b_shim_bans",
		Help: "Bans in the state, per chain and family."}, []string{"policy", "family", "chain"})
	requests := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "f2b_shim_requests_total",
		Help: "Requests in the current audit log (it restarts at rotation), by decision and result."}, []string{"policy", "decision", "result"})
	drift := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "f2b_shim_drift",
		Help: "Differences between the state and the live firewall, by kind (missing, unexpected, duplicate)."}, []string{"policy", "family", "kind"})
	lastApply := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "f2b_shim_last_apply_timestamp_seconds",
		Help: "When a request last changed the firewall (Unix time), from the current audit log."}, []string{"policy"})
	quota := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "f2b_shim_quota_denials_total",
		Help: "Bans refused by max_new_bans_per_minute, in the current audit log."}, []string{"policy"})
	expired := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "f2b_shim_expired_total",
		Help: "Bans lifted by max_ban_time, in the current audit log."}, []string{"policy"})
	up := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "f2b_shim_up",
		Help: "1 when the policy, its state, its audit log and the firewall could all be read."}, []string{"policy"})
	reg.MustRegister(bans, requests, drift, lastApply, quota, expired, up)
	for _, s := range snaps {
		for k, n := range s.Bans {
			bans.WithLabelValues(s.Policy, k[0], k[1]).Set(float64(n))
		}
		for k, n := range s.Drift {
			drift.WithLabelValues(s.Policy, k[0], k[1]).Set(float64(n))
		}
		if s.AuditRead {
			// Only what was counted: an unread log is no requests.
			for k, n := range s.Requests {
				requests.WithLabelValues(s.Policy, k[0], k[1]).Add(float64(n))
			}
			if !s.LastApply.IsZero() {
				lastApply.WithLabelValues(s.Policy).Set(float64(s.LastApply.Unix()))
			}
			quota.WithLabelValues(s.Policy).Add(float64(s.QuotaDenials))
			expired.WithLabelValues(s.Policy).Add(float64(s.Expired))
		}
		v := 0.0
		if s.Up {
			v = 1
		}
		up.WithLabelValues(s.Policy).Set(v)
	}
}

// Run is "f2b-shim metrics [--policy FILE | --all [--dir DIR]] [--out
// FILE]": the text format on stdout, or written to --out atomically (a
// temp file renamed over it), as the textfile collector needs.
func Run(args []string, stdout, stderr io.Writer, deps cli.Deps) int {
	var out string
	var rest []string
	for i := 0; i < len(args); i++ {
		switch {
		case args[i] == "--out" && i+1 < len(args):
			out = args[i+1]
			i++
		case strings.HasPrefix(args[i], "--out="):
			out = strings.TrimPrefix(args[i], "--out=")
		default:
			rest = append(rest, args[i])
		}
	}
	snaps, code := cli.CollectMetrics(rest, stderr, deps)
	if code == cli.ExitUsage {
		return code
	}
	reg := prometheus.NewRegistry()
	Register(reg, snaps)
	if out != "" {
		if err := prometheus.WriteToTextfile(out, reg); err != nil {
			fmt.Fprintf(stderr, "f2b-shim: metrics: %v\n", err)
			return cli.ExitSetup
		}
		return code
	}
	families, err := reg.Gather()
	if err != nil {
		fmt.Fprintf(stderr, "f2b-shim: metrics: %v\n", err)
		return cli.ExitSetup
	}
	enc := expfmt.NewEncoder(stdout, expfmt.NewFormat(expfmt.TypeTextPlain))
	for _, f := range families {
		if err := enc.Encode(f); err != nil {
			fmt.Fprintf(stderr, "f2b-shim: metrics: %v\n", err)
			return cli.ExitSetup
		}
	}
	return code
}
