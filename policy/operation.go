package policy

import "strings"

// Table is the only iptables table the shim ever touches.
const Table = "filter"

// RuleSpec is the rule as iptables arguments after "-I/-D/-C CHAIN", built
// from typed values only: no word of the client's text is passed through.
// It is nil for the kinds that name a chain but no rule.
func (o Operation) RuleSpec() []string {
	switch o.Kind {
	case AddReturn, CheckReturn:
		return []string{"-j", "RETURN"}
	case AddHook, DeleteHook, CheckHook:
		spec := []string{"-p", o.Proto}
		switch o.Match {
		case OnePort:
			spec = append(spec, "--dport", o.Ports[0].String())
		case MultiPort:
			spec = append(spec, "-m", "multiport", "--dports", joinPorts(o.Ports))
		}
		return append(spec, "-j", string(o.Jump))
	case AddBan, DeleteBan, CheckBan:
		return append([]string{"-s", o.Source.String()}, o.Target.Args()...)
	}
	return nil
}

// CommandLine is the canonical wire form of the operation: what a fail2ban
// action would send for it. ParseCommand of it yields the same operation.
func (o Operation) CommandLine() string {
	words := []string{o.Family.Binary(), "-w"}
	switch o.Kind {
	case CreateChain:
		words = append(words, "-N", string(o.Chain))
	case FlushChain:
		words = append(words, "-F", string(o.Chain))
	case DeleteChain:
		words = append(words, "-X", string(o.Chain))
	case CheckHookListed:
		words = append(words, "-n", "-L", string(o.Chain), "|", "grep", "-q", `'`+string(o.Jump)+`[ \t]'`)
	default:
		letter := map[Kind]string{
			AddReturn: "-A", CheckReturn: "-C",
			AddHook: "-I", DeleteHook: "-D", CheckHook: "-C",
			AddBan: "-I", DeleteBan: "-D", CheckBan: "-C",
		}[o.Kind]
		words = append(words, letter, string(o.Chain))
		if o.Kind == AddBan {
			words = append(words, "1")
		}
		words = append(words, o.RuleSpec()...)
	}
	return strings.Join(words, " ")
}
