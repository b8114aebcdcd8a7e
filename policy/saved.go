package policy

import "strings"

// ParseSaved reads one rule as "iptables -S" prints it ("-A CHAIN ...")
// back into the command that puts it there: a ban ("-I C 1 -s ..."), a
// hook ("-I P -p ...") or a return rule ("-A C -j RETURN"). It accepts
// exactly the forms iptables prints for the rules the grammar makes,
// which differ from what fail2ban sends: an address always carries its
// prefix length ("/32"), and a single-port hook carries the protocol's
// match ("-p tcp -m tcp --dport 25"). The result is a Command like any
// other, still to be authorized.
func ParseSaved(fam Family, line string) (Command, error) {
	if err := precheck(line); err != nil {
		return Command{}, err
	}
	f := strings.Fields(line)
	if len(f) < 4 || f[0] != "-A" {
		return Command{}, deny("rule %q is not an \"-A CHAIN ...\" line of iptables -S", line)
	}
	chain, rest := f[1], f[2:]
	// "-p P -m P --dport N" is iptables' spelling of "-p P --dport N".
	if len(rest) >= 5 && rest[0] == "-p" && rest[2] == "-m" && rest[3] == rest[1] && rest[4] == "--dport" {
		rest = append(rest[:2:2], rest[4:]...)
	}
	words := []string{fam.Binary()}
	switch {
	case len(rest) == 2 && rest[0] == "-j" && rest[1] == "RETURN":
		words = append(words, "-A", chain)
	case rest[0] == "-s":
		words = append(words, "-I", chain, "1")
	default:
		words = append(words, "-I", chain)
	}
	return ParseCommand(strings.Join(append(words, rest...), " "))
}
