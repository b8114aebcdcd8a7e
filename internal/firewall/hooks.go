package firewall

import (
	"fmt"
	"strings"

	"github.com/f2b-shim/f2b-shim/policy"
)

// liveHook is a rule in a parent chain that jumps to a ban chain.
type liveHook struct {
	parent string
	spec   []string // as "iptables -S" prints it, after "-A PARENT"
	effect string   // policy.HookEffect, "" when the rule is not one the grammar makes
}

// hooksInto lists the rules in the policy's parent chains that jump to
// chain, read from "iptables -S". Hooks are never looked up with
// "iptables -C": ip6tables-legacy 1.8.9 ignores match data there, so a
// "--dport 9999" check finds a "--dport 8080" hook.
func hooksInto(b Backend, fam policy.Family, chain policy.Chain) ([]liveHook, error) {
	var out []liveHook
	for _, parent := range b.Policy.ParentChains {
		ok, err := b.Table.ChainExists(parent)
		if err != nil {
			return nil, err
		}
		if !ok {
			continue
		}
		rules, err := b.Table.List(parent)
		if err != nil {
			return nil, err
		}
		for _, r := range rules {
			rest, isRule := strings.CutPrefix(r, "-A "+parent+" ")
			f := strings.Fields(rest)
			if !isRule || len(f) < 2 || f[len(f)-2] != "-j" && f[len(f)-2] != "-g" || f[len(f)-1] != string(chain) {
				continue
			}
			h := liveHook{parent: parent, spec: f}
			if c, err := policy.ParseSaved(fam, r); err == nil && c.Kind == policy.AddHook {
				h.effect, _ = policy.HookEffect(policy.Operation{Command: c}, b.LookupPort)
			}
			out = append(out, h)
		}
	}
	return out, nil
}

// applyHook adds, removes or checks a hook by what it does, not by how
// it is spelled: a hook with the same parent, protocol and ports as one
// already there is that hook. A new hook past max_hooks_per_chain is
// refused.
func applyHook(b Backend, op policy.Operation) (Outcome, error) {
	ok, err := b.Table.ChainExists(string(op.Jump))
	if err != nil {
		return 0, err
	}
	if !ok {
		// No ban chain, no jump to it: iptables cannot hold one.
		switch op.Kind {
		case policy.CheckHook:
			return CheckFalse, nil
		case policy.DeleteHook:
			return Unchanged, nil
		}
		return 0, fmt.Errorf("chain %q does not exist; fail2ban creates it (-N) before it hooks it", op.Jump)
	}
	want, err := policy.HookEffect(op, b.LookupPort)
	if err != nil {
		return 0, err
	}
	live, err := hooksInto(b, op.Family, op.Jump)
	if err != nil {
		return 0, err
	}
	var same *liveHook
	for i := range live {
		if live[i].parent == string(op.Chain) && live[i].effect == want {
			same = &live[i]
			break
		}
	}
	switch op.Kind {
	case policy.CheckHook:
		return checkOutcome(same != nil, nil)
	case policy.DeleteHook:
		if same == nil {
			return Unchanged, nil
		}
		// Delete the rule as iptables printed it: it names exactly that
		// rule, whatever spelling the request used.
		return Applied, b.Table.Delete(same.parent, same.spec...)
	}
	if same != nil {
		return Unchanged, nil
	}
	if len(live) >= b.Policy.MaxHooksPerChain {
		return 0, fmt.Errorf("hook %w: %d rules already jump to %s chain %q (max_hooks_per_chain); remove one, or raise the limit in the policy", ErrLimit, len(live), op.Family, op.Jump)
	}
	return Applied, b.Table.Insert(string(op.Chain), 1, op.RuleSpec()...)
}
