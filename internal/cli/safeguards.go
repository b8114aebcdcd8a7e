package cli

import (
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"

	"github.com/f2b-shim/f2b-shim/internal/audit"
	"github.com/f2b-shim/f2b-shim/internal/firewall"
	"github.com/f2b-shim/f2b-shim/internal/state"
	"github.com/f2b-shim/f2b-shim/policy"
)

// forPolicies runs fn for the policy that --policy names, or with --all
// for every policy file in --dir; every policy is tried even when one
// fails, and the first failure's code is returned.
func forPolicies(name string, args []string, stderr io.Writer, deps Deps, fn func(*policy.Policy) int) int {
	return forPoliciesWith(name, args, stderr, deps, nil, fn)
}

// forPoliciesWith is forPolicies for a subcommand with flags of its own.
func forPoliciesWith(name string, args []string, stderr io.Writer, deps Deps, flags func(*flag.FlagSet), fn func(*policy.Policy) int) int {
	fs := newFlagSet(name)
	policyPath := fs.String("policy", "", "policy file (TOML)")
	all := fs.Bool("all", false, "every policy in --dir")
	dir := fs.String("dir", DefaultPolicyDir, "with --all: the directory of policy files")
	if flags != nil {
		flags(fs)
	}
	if err := parseInterspersed(fs, args); err != nil {
		return usageError(stderr, err.Error())
	}
	if fs.NArg() > 0 {
		return usageError(stderr, name+" takes no arguments")
	}
	if !*all {
		pol, err := loadPolicy(*policyPath, deps)
		if err != nil {
			fmt.Fprintf(stderr, "f2b-shim: policy: %v\n", err)
			return ExitSetup
		}
		return fn(pol)
	}
	if *policyPath != "" {
		return usageError(stderr, "choose --policy or --all, not both")
	}
	pols, err := LoadPolicyDir(*dir, deps)
	code := ExitOK
	if err != nil {
		fmt.Fprintf(stderr, "f2b-shim: %s --all: %s\n", name, oneLine.Replace(err.Error()))
		code = ExitSetup
	}
	for _, p := range pols {
		if c := fn(p); c != ExitOK && code == ExitOK {
			code = c
		}
	}
	return code
}

// adminRecord is the audit line of an admin command's change.
func (a *admin) record(command string, op *policy.Operation, result string, code int, err error) audit.Record {
	rec := audit.Record{Time: a.deps.Now().UTC(), Policy: a.pol.Name, UID: os.Getuid(), Decision: audit.Allow, Result: result, Exit: code}
	rec.SetCommand(command)
	if op != nil {
		rec.Op = opRecord(*op)
	}
	if err != nil {
		rec.Reason = audit.Text(err.Error())
	}
	return rec
}

// auditRoom reserves room in the audit log for n records, under the
// lock, before an admin change that must be audited touches the
// firewall.
func (a *admin) auditRoom(n int) error {
	log, err := audit.Open(a.pol.AuditLog)
	if err != nil {
		return err
	}
	defer log.Close()
	return log.Reserve(n)
}

// audit writes admin records; a change that already happened is not
// undone when it cannot be audited, but the admin is told.
func (a *admin) audit(recs ...audit.Record) {
	log, err := audit.Open(a.pol.AuditLog)
	if err == nil {
		// One write and one fsync for them all (expire's chunks).
		err = log.WriteBatch(recs)
		log.Close()
	}
	if err != nil {
		fmt.Fprintf(a.stderr, "f2b-shim: warning: not audited: %v\n", err)
	}
}

// change applies one operation as the admin: the firewall, then the
// state, as the forced command does, with its intent noted first.
func (a *admin) change(op policy.Operation, applyFirewall bool) (firewall.Outcome, error) {
	if !applyFirewall {
		return firewall.Applied, a.store.Record(op, true, a.deps.Now().UTC())
	}
	b, err := a.backend(op.Family)
	if err != nil {
		return 0, err
	}
	if err := a.store.SetIntent(op); err != nil {
		return 0, err
	}
	out, err := b.Apply(op)
	if err != nil {
		return 0, err
	}
	return out, a.store.Record(op, out == firewall.Applied, a.deps.Now().UTC())
}

// runExpire lifts the bans last made longer than max_ban_time ago.
func runExpire(args []string, stdout, stderr io.Writer, deps Deps) int {
	return forPolicies("expire", args, stderr, deps, func(pol *policy.Policy) int {
		a, code := newAdmin(pol, stderr, deps)
		if a == nil {
			return code
		}
		defer a.close()
		n, code := a.expire(true)
		fmt.Fprintf(stdout, "policy %q: %s expired (max_ban_time %s)\n", pol.Name, plural(n, "ban"), maxBanTime(pol))
		return code
	})
}

func maxBanTime(pol *policy.Policy) string {
	if pol.MaxBanTime == 0 {
		return "0: off"
	}
	return pol.MaxBanTime.String()
}

// expire removes what is due from the state, and from the firewall
// too; each expiry is audited with result "expired".
func (a *admin) expire(applyFirewall bool) (int, int) {
	if a.pol.MaxBanTime == 0 {
		return 0, ExitOK
	}
	s, err := a.journal()
	if err != nil {
		fmt.Fprintf(a.stderr, "f2b-shim: expire: %v\n", err)
		return 0, ExitSetup
	}
	return a.expireIn(s, applyFirewall)
}

// runBanUnban is "f2b-shim ban|unban CHAIN ADDR [--target T]": the admin's
// own change, judged by the same policy as the mail host's (never_ban
// holds), recorded so that restore and reconcile agree with it, and
// audited with the admin's uid.
func runBanUnban(verb string, args []string, stdout, stderr io.Writer, deps Deps) int {
	var target string
	a, rest, code := openAdmin(verb, args, stderr, deps, func(fs *flag.FlagSet) {
		fs.StringVar(&target, "target", "", "DROP, REJECT, or \"REJECT --reject-with TYPE\" (ban; default: the policy's first target)")
	})
	if a == nil {
		return code
	}
	defer a.close()
	if len(rest) != 2 {
		return usageError(stderr, verb+" takes CHAIN and ADDRESS")
	}
	chain, addr := rest[0], rest[1]
	bin := "iptables"
	if strings.Contains(addr, ":") {
		bin = "ip6tables"
	}
	if target == "" {
		target = a.pol.Targets[0]
	}
	var ops []policy.Operation
	if verb == "ban" {
		op, err := policy.Decide(a.pol, fmt.Sprintf("%s -w -I %s 1 -s %s -j %s", bin, chain, addr, target), a.ctx)
		if err != nil {
			fmt.Fprintf(stderr, "f2b-shim: denied: %v\n", err)
			return ExitDenied
		}
		if err := a.noChainForBan(op); err != nil {
			fmt.Fprintf(stderr, "f2b-shim: ban: %v\n", err)
			return ExitFirewall
		}
		ops = append(ops, op)
	} else {
		// Every ban of that address in the chain, whatever its target.
		fam := map[string]policy.Family{"iptables": policy.IPv4, "ip6tables": policy.IPv6}[bin]
		var liveOnly []policy.Operation
		for _, t := range firewall.PolicyTargets(fam, a.pol) {
			op, err := policy.Decide(a.pol, fmt.Sprintf("%s -w -D %s -s %s %s", bin, chain, addr, strings.Join(t.Args(), " ")), a.ctx)
			if err != nil {
				fmt.Fprintf(stderr, "f2b-shim: denied: %v\n", err)
				return ExitDenied
			}
			if has, _ := a.store.HasBan(op); has || op.Member.IsValid() {
				ops = append(ops, op)
			} else if a.liveOnlyBan(op) {
				liveOnly = append(liveOnly, op)
			}
		}
		if a.pol.Backend == "nftables" && len(liveOnly) > 0 {
			// The table holds one verdict per chain and family: only the
			// chain's own target finds the address, and when the state
			// holds a ban of it, that removal lifts the element. Only a
			// ban the state lacks is news.
			liveOnly = liveOnly[:1]
			if len(ops) > 0 {
				liveOnly = nil
			}
		}
		for _, op := range liveOnly {
			fmt.Fprintf(stdout, "note: the state did not hold the ban %s (\"f2b-shim reconcile\" lists it as unexpected); it is lifted from the firewall all the same\n", op.CommandLine())
			ops = append(ops, op)
		}
		if len(ops) == 0 {
			fmt.Fprintf(stdout, "%s is not banned in %s: neither the state nor the firewall holds a ban of it there\n", addr, chain)
			return ExitCheckFalse
		}
	}
	code = ExitOK
	var recs []audit.Record
	for _, op := range ops {
		if op.Member.IsValid() && op.Kind == policy.DeleteBan {
			// The admin lifts the whole prefix, for every address in it.
			op.Member = netip.Prefix{}
		}
		out, err := a.change(op, true)
		line := fmt.Sprintf("f2b-shim %s %s %s", verb, chain, addr)
		if err != nil {
			fmt.Fprintf(stderr, "f2b-shim: %s: %s\n", verb, oneLine.Replace(err.Error()))
			recs = append(recs, a.record(line, &op, "failed", ExitFirewall, err))
			code = ExitFirewall
			continue
		}
		recs = append(recs, a.record(line, &op, out.String(), ExitOK, nil))
		fmt.Fprintf(stdout, "%s: %s\n", out, op.CommandLine())
	}
	a.audit(recs...)
	return code
}

// runPrune retires a mail host's chain, in both families: every hook into
// it goes, then the chain and its sets, then its state.
func runPrune(args []string, stdout, stderr io.Writer, deps Deps) int {
	a, rest, code := openAdmin("prune", args, stderr, deps, nil)
	if a == nil {
		return code
	}
	defer a.close()
	if len(rest) != 1 {
		return usageError(stderr, "prune takes one CHAIN")
	}
	chain := rest[0]
	code = ExitOK
	var recs []audit.Record
	for _, fam := range families {
		b, err := a.backend(fam)
		if err != nil {
			fmt.Fprintf(stderr, "f2b-shim: prune %s: %v\n", fam, err)
			return ExitFirewall
		}
		live := state.New(a.ctx.LookupPort)
		if _, err := b.Read(live, policy.Chain(chain)); err != nil {
			fmt.Fprintf(stderr, "f2b-shim: prune %s: %v\n", fam, err)
			return ExitFirewall
		}
		var ops []policy.Operation
		for _, h := range live.Tables[fam].Hooks {
			op := h.Op
			op.Kind = policy.DeleteHook
			ops = append(ops, op)
		}
		for _, l := range []string{"-F", "-X"} {
			op, err := policy.Decide(a.pol, fam.Binary()+" -w "+l+" "+chain, a.ctx)
			if err != nil {
				fmt.Fprintf(stderr, "f2b-shim: denied: %v\n", err)
				return ExitDenied
			}
			ops = append(ops, op)
		}
		for _, op := range ops {
			out, err := a.change(op, true)
			if err != nil {
				fmt.Fprintf(stderr, "f2b-shim: prune: %s: %s\n", op.CommandLine(), oneLine.Replace(err.Error()))
				recs = append(recs, a.record("f2b-shim prune "+chain, &op, "failed", ExitFirewall, err))
				code = ExitFirewall
				break
			}
			recs = append(recs, a.record("f2b-shim prune "+chain, &op, out.String(), ExitOK, nil))
			fmt.Fprintf(stdout, "%s: %s\n", out, op.CommandLine())
		}
	}
	if code == ExitOK && a.pol.Backend == "nftables" {
		if err := dropEmptyTable(a); err != nil {
			fmt.Fprintf(stderr, "f2b-shim: prune: %v\n", err)
			code = ExitFirewall
		}
	}
	a.audit(recs...)
	return code
}

// dropEmptyTable deletes the nftables backend's table once its last ban
// chain is pruned: the table is the shim's own, and an empty one would
// stay on the proxy after the mail host is gone (uninstall prunes every
// chain). A table that holds anything else, such as a rule an admin
// added, stays.
func dropEmptyTable(a *admin) error {
	if err := a.deps.PrepareExec(); err != nil {
		return err
	}
	return a.engine().DropEmptyTable()
}
