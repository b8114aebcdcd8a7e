package cli

import (
	"fmt"
	"io"
	"os"

	"github.com/f2b-shim/f2b-shim/internal/engine"

	"github.com/f2b-shim/f2b-shim/internal/audit"
	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
)

// runStatus is a self-test on one screen: the policy, the capabilities,
// the lock and state, the audit log, iptables (and ipset), and the drift
// between the state and the firewall. Exit 0 when all is well, 1 when
// something needs a look (each line says what), 5 when the policy
// cannot be read.
func runStatus(args []string, stdout, stderr io.Writer, deps Deps) int {
	if code, ok := mailHostStatus(args, stdout, deps); ok {
		return code
	}
	return forPolicies("status", args, stderr, deps, func(pol *policy.Policy) int {
		return statusOf(pol, stdout, stderr, deps)
	})
}

func statusOf(pol *policy.Policy, stdout, stderr io.Writer, deps Deps) int {
	code := ExitOK
	line := func(what string, err error, ok string) {
		if err != nil {
			code = ExitCheckFalse
			fmt.Fprintf(stdout, "  %-13s FAIL  %s\n", what+":", oneLine.Replace(err.Error()))
			return
		}
		fmt.Fprintf(stdout, "  %-13s ok    %s\n", what+":", ok)
	}
	if pol.Backend == "nftables" {
		fmt.Fprintf(stdout, "policy %q: backend nftables, table inet %s, prefix %s\n", pol.Name, pol.NftablesTable, pol.ChainPrefix)
	} else {
		fmt.Fprintf(stdout, "policy %q: backend %s, iptables %s, prefix %s\n", pol.Name, pol.Backend, pol.IptablesBackend, pol.ChainPrefix)
	}
	// As root this line speaks only of this run; what the key's account
	// gets from the binary is the "binary" check below.
	caps := "this status runs as root (the key's account: see binary)"
	if os.Geteuid() != 0 {
		caps = "cap_net_admin and cap_net_raw from the binary's file capabilities"
	}
	line("capabilities", deps.PrepareExec(), caps)
	statusInstall(pol, line)
	log, err := audit.Open(pol.AuditLog)
	if err == nil {
		log.Close()
	}
	line("audit log", err, pol.AuditLog+" is writable, with room for a line")
	a, c := newAdmin(pol, io.Discard, deps)
	if a == nil {
		line("state", fmt.Errorf("cannot take the lock or open %s (exit %d); run \"f2b-shim list --policy FILE\" to see why", state.Path(pol), c), "")
		return ExitCheckFalse
	}
	defer a.close()
	line("lock", nil, "taken and released")
	s, problems, err := a.store.Load(a.ctx)
	if err == nil && len(problems) > 0 {
		err = fmt.Errorf("%d records the policy refuses, first %s; run \"f2b-shim list\" for all", len(problems), problems[0])
	}
	if intent, _ := a.store.Intent(a.ctx); err == nil && len(intent) > 0 {
		err = fmt.Errorf("%d change(s) were cut short, first %s; the next request reads their chains back", len(intent), intent[0].CommandLine())
	}
	chains, bans := 0, 0
	if s != nil {
		for _, fam := range families {
			chains += len(s.Tables[fam].Chains)
			for _, ch := range s.Tables[fam].Chains {
				bans += ch.Len()
			}
		}
	}
	line("state", err, fmt.Sprintf("%s: %s, %s", state.Path(pol), plural(chains, "chain"), plural(bans, "ban")))
	line("repairs", nil, engine.LastRepair(a.store, deps.Now()))
	for _, fam := range families {
		b, err := a.backend(fam)
		if err != nil {
			line(fam.String(), err, "")
			continue
		}
		what, err := engine.Probe(b)
		line(fam.String(), err, what)
		if err != nil || s == nil {
			continue
		}
		ds, err := compare(s, fam, b, a.pol, a.ctx, a.deps.Now())
		kinds := map[string]int{}
		for _, d := range ds {
			kinds[d.kind]++
		}
		if err == nil && len(ds) > 0 {
			err = fmt.Errorf("%d missing, %d unexpected, %d duplicate; run \"f2b-shim reconcile\"", kinds["missing"], kinds["unexpected"], kinds["duplicate"])
		}
		line(fam.String()+" drift", err, "none: the firewall holds what the state says")
	}
	return code
}
