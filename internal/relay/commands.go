package relay

import (
	"fmt"
	"strings"
)

// Jail is what the action knows of its jail: the same parameters, with
// the same defaults, as examples/proxy-iptables.conf, so that the stream
// sends exactly the commands the plain action runs.
type Jail struct {
	// Chain is the ban chain, chain_prefix + the jail's name.
	Chain string
	// Parents are the chains the ban chain is hooked into ("chain").
	Parents []string
	// Protocols are the hooks' protocols ("protocol").
	Protocols []string
	// Port is the hooks' port list ("port"), Type how it matches:
	// "multiport" (default), "oneport" or "allports".
	Port, Type string
	// Blocktype and Blocktype6 are the bans' targets for IPv4 and IPv6.
	Blocktype, Blocktype6 string
	Returntype            string
}

// DefaultJail has proxy-iptables.conf's defaults.
func DefaultJail(chain string) Jail {
	return Jail{
		Chain:      chain,
		Parents:    []string{"INPUT"},
		Protocols:  []string{"tcp"},
		Port:       "ssh",
		Type:       "multiport",
		Blocktype:  "REJECT --reject-with icmp-port-unreachable",
		Blocktype6: "REJECT --reject-with icmp6-port-unreachable",
		Returntype: "RETURN",
	}
}

// Check refuses parameters that would make commands the proxy can only
// deny, with what to change.
func (j Jail) Check() error {
	switch j.Type {
	case "multiport", "oneport", "allports":
	default:
		return fmt.Errorf("type must be multiport, oneport or allports, not %q", j.Type)
	}
	if j.Chain == "" || strings.ContainsAny(j.Chain, " \t\n") {
		return fmt.Errorf("chain name %q is empty or holds white space", j.Chain)
	}
	for _, f := range [][]string{j.Parents, j.Protocols, strings.Fields(j.Port), strings.Fields(j.Blocktype), strings.Fields(j.Blocktype6)} {
		for _, w := range f {
			if strings.ContainsAny(w, "\n\r") {
				return fmt.Errorf("parameter word %q holds a line break", w)
			}
		}
	}
	return nil
}

var families = []string{"iptables", "ip6tables"}

// hooks are the rules that jump into the chain, as proxy-iptables.conf's
// _ipt_chain_rule spells them.
func (j Jail) hooks() []string {
	var match string
	switch j.Type {
	case "multiport":
		match = " -m multiport --dports " + j.Port
	case "oneport":
		match = " --dport " + j.Port
	}
	var out []string
	for _, parent := range j.Parents {
		for _, proto := range j.Protocols {
			out = append(out, parent+" -p "+proto+match+" -j "+j.Chain)
		}
	}
	return out
}

// Commands are the proxy command lines of one operation, in order.
func (j Jail) Commands(op Op) []string {
	var out []string
	switch op.Kind {
	case Start:
		for _, fam := range families {
			out = append(out, fam+" -w -N "+j.Chain, fam+" -w -A "+j.Chain+" -j "+j.Returntype)
			for _, h := range j.hooks() {
				out = append(out, fam+" -w -I "+h)
			}
		}
	case Stop:
		for _, fam := range families {
			for _, h := range j.hooks() {
				out = append(out, fam+" -w -D "+h)
			}
			out = append(out, fam+" -w -F "+j.Chain, fam+" -w -X "+j.Chain)
		}
	case Flush:
		for _, fam := range families {
			out = append(out, fam+" -w -F "+j.Chain)
		}
	case Ban, Unban:
		fam, target := "iptables", j.Blocktype
		if op.Addr.Addr().Is6() {
			fam, target = "ip6tables", j.Blocktype6
		}
		addr := op.Addr.String()
		if op.Addr.IsSingleIP() {
			addr = op.Addr.Addr().String()
		}
		if op.Kind == Ban {
			out = append(out, fam+" -w -I "+j.Chain+" 1 -s "+addr+" -j "+target)
		} else {
			out = append(out, fam+" -w -D "+j.Chain+" -s "+addr+" -j "+target)
		}
	}
	return out
}
