package policy

import (
	"fmt"
	"net/netip"
	"strings"
	"unicode/utf8"

	"github.com/google/shlex"
)

// MaxCommandLen bounds SSH_ORIGINAL_COMMAND. The longest line a fail2ban
// proxy action sends is under 200 bytes; 4096 leaves room for any sane
// setup and keeps a hostile client from feeding the parser megabytes.
const MaxCommandLen = 4096

// maxWaitDigits bounds the seconds of "-w N"; the value is accepted and
// ignored, because the shim bounds its own waits (lock_timeout).
const maxWaitDigits = 4

// maxProtoLen bounds a protocol word; real ones ("tcp", "udplite") are short.
const maxProtoLen = 16

// Kind is what a command asks for.
type Kind int

// Every operation the grammar can express. Anything else is denied while
// parsing, so no other kind can ever reach the firewall.
const (
	CreateChain     Kind = iota + 1 // -N C
	FlushChain                      // -F C
	DeleteChain                     // -X C
	AddReturn                       // -A C -j RETURN
	CheckReturn                     // -C C -j RETURN
	AddHook                         // -I P -p PROTO ... -j C
	DeleteHook                      // -D P -p PROTO ... -j C
	CheckHook                       // -C P -p PROTO ... -j C
	CheckHookListed                 // -n -L P | grep -q 'C[ \t]'
	AddBan                          // -I C [1] -s ADDR -j TARGET
	DeleteBan                       // -D C -s ADDR -j TARGET
	CheckBan                        // -C C -s ADDR -j TARGET
)

var kindNames = map[Kind]string{
	CreateChain: "create-chain", FlushChain: "flush-chain", DeleteChain: "delete-chain",
	AddReturn: "add-return", CheckReturn: "check-return",
	AddHook: "add-hook", DeleteHook: "delete-hook", CheckHook: "check-hook", CheckHookListed: "check-hook-listed",
	AddBan: "ban", DeleteBan: "unban", CheckBan: "check-ban",
}

// String is the kind's name in the audit log and in "f2b-shim check".
func (k Kind) String() string {
	if s, ok := kindNames[k]; ok {
		return s
	}
	return "unknown"
}

// IsCheck reports whether the kind only asks a question. Its answer is the
// exit status: 0 for true, 1 for false, as with "iptables -C".
func (k Kind) IsCheck() bool {
	return k == CheckReturn || k == CheckHook || k == CheckHookListed || k == CheckBan
}

// Command is a parsed request. Every field is typed and checked for syntax;
// whether the policy allows it is for Authorize to say.
type Command struct {
	Family Family
	Kind   Kind
	// Chain is the chain the command names after -N/-F/-X/-A/-C/-I/-D/-L:
	// the ban chain for chain and ban commands, the parent for hooks.
	Chain Chain
	// Jump is the ban chain that a hook jumps to (or that the grep looks for).
	Jump   Chain
	Proto  string
	Match  Match
	Ports  []Port
	Source netip.Prefix
	Target Target
}

// BanChain is the chain of the prefix that the command changes or asks about.
func (c Command) BanChain() Chain {
	if c.isHook() {
		return c.Jump
	}
	return c.Chain
}

func (c Command) isHook() bool {
	return c.Kind == AddHook || c.Kind == DeleteHook || c.Kind == CheckHook || c.Kind == CheckHookListed
}

func (c Command) isBan() bool {
	return c.Kind == AddBan || c.Kind == DeleteBan || c.Kind == CheckBan
}

// maxQuoted bounds a word quoted in a reason: the reason goes into the
// audit log and fail2ban's log, and a 4 KiB word must not make it 4 KiB.
const maxQuoted = 64

// deny builds the error for a word the grammar or the policy refuses.
// Long words are cut to their first maxQuoted bytes and "…".
func deny(format string, args ...any) error {
	return &Denial{Reason: fmt.Sprintf(format, shorten(args)...)}
}

// wordErr is fmt.Errorf with long words cut as deny cuts them.
func wordErr(format string, args ...any) error {
	return fmt.Errorf(format, shorten(args)...)
}

func shorten(args []any) []any {
	for i, a := range args {
		if s, ok := a.(string); ok && len(s) > maxQuoted {
			args[i] = cut(s, maxQuoted) + "…"
		}
	}
	return args
}

// cut shortens s to at most n bytes without splitting a UTF-8 sequence.
func cut(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// Denial is the error for a request that the grammar or the policy refuses.
// Reason names the offending word, quoted, so fail2ban's log shows it.
type Denial struct {
	Reason string
}

func (d *Denial) Error() string { return d.Reason }

// ParseCommand parses the text of SSH_ORIGINAL_COMMAND. It accepts only the
// command lines listed in the README; everything else is a *Denial.
func ParseCommand(line string) (Command, error) {
	if err := precheck(line); err != nil {
		return Command{}, err
	}
	words, err := shlex.Split(line)
	if err != nil {
		return Command{}, deny("the command does not split into words: %v", err)
	}
	if len(words) == 0 {
		return Command{}, deny("the command is empty")
	}
	p := &parser{words: words}
	return p.command()
}

// precheck runs before shlex, which would quietly drop a comment or turn
// odd bytes into words. Nothing a fail2ban action sends needs any of these.
func precheck(line string) error {
	if len(line) > MaxCommandLen {
		return deny("the command is %d bytes long; at most %d are allowed", len(line), MaxCommandLen)
	}
	if !utf8.ValidString(line) {
		return deny("the command is not valid UTF-8")
	}
	for i, r := range line {
		if r < 0x20 || r == 0x7f || (r >= 0x80 && r <= 0x9f) {
			return deny("the command holds control character %U at byte %d", r, i)
		}
		if r == '#' {
			// shlex would silently drop everything after an unquoted " #".
			return deny("the command holds %q at byte %d; comments are not allowed", "#", i)
		}
	}
	return nil
}

// parser walks the words left to right. Each accepted form has one fixed
// word order, the one fail2ban sends, so there is no general option parser
// to confuse.
type parser struct {
	words []string
	pos   int
}

func (p *parser) peek() string {
	if p.pos < len(p.words) {
		return p.words[p.pos]
	}
	return ""
}

func (p *parser) next() (string, bool) {
	if p.pos >= len(p.words) {
		return "", false
	}
	p.pos++
	return p.words[p.pos-1], true
}

// want consumes one exact word.
func (p *parser) want(word string) error {
	got, ok := p.next()
	if !ok {
		return deny("the command ends where %q was expected", word)
	}
	if got != word {
		return deny("unexpected word %q where %q was expected", got, word)
	}
	return nil
}

// value consumes the argument of the option before it.
func (p *parser) value(what string) (string, error) {
	got, ok := p.next()
	if !ok {
		return "", deny("the command ends where %s was expected", what)
	}
	return got, nil
}

func (p *parser) chain() (Chain, error) {
	w, err := p.value("a chain name")
	if err != nil {
		return "", err
	}
	c, err := parseChain(w)
	if err != nil {
		return "", deny("%v", err)
	}
	return c, nil
}

// end makes sure no word is left: a trailing word could be anything.
func (p *parser) end() error {
	if w, ok := p.next(); ok {
		return deny("unexpected word %q after the end of the command", w)
	}
	return nil
}

func (p *parser) command() (Command, error) {
	var c Command
	switch bin, _ := p.next(); bin {
	case "iptables":
		c.Family = IPv4
	case "ip6tables":
		c.Family = IPv6
	default:
		return c, deny("program %q is not allowed; only \"iptables\" and \"ip6tables\" are", bin)
	}
	if err := p.skipWait(); err != nil {
		return c, err
	}
	var err error
	switch opt, _ := p.next(); opt {
	case "-N", "-F", "-X":
		c.Kind = map[string]Kind{"-N": CreateChain, "-F": FlushChain, "-X": DeleteChain}[opt]
		if c.Chain, err = p.chain(); err != nil {
			return c, err
		}
	case "-A":
		c.Kind = AddReturn
		if c.Chain, err = p.chain(); err != nil {
			return c, err
		}
		err = p.returnRule()
	case "-C", "-I", "-D":
		err = p.ruleCommand(&c, opt)
	case "-n":
		err = p.listCheck(&c, "-n", "-L")
	case "-L":
		err = p.listCheck(&c, "-L", "-n")
	case "":
		return c, deny("the command ends after %q; an iptables option was expected", c.Family.Binary())
	default:
		return c, deny("option %q is not allowed; only -N, -F, -X, -A, -C, -I, -D and the \"-n -L\" check are", opt)
	}
	if err != nil {
		return c, err
	}
	return c, p.end()
}

// skipWait accepts -w, -w N, --wait, --wait N and --wait=N right after the
// binary. fail2ban sends them to wait for the xtables lock; the shim has
// its own bounded wait, so the value is checked and then dropped.
func (p *parser) skipWait() error {
	w := p.peek()
	if v, ok := strings.CutPrefix(w, "--wait="); ok {
		p.pos++
		if !isWaitSeconds(v) {
			return deny("wait value %q must be a number of seconds", v)
		}
		return nil
	}
	if w != "-w" && w != "--wait" {
		return nil
	}
	p.pos++
	if isWaitSeconds(p.peek()) {
		p.pos++
	}
	return nil
}

func isWaitSeconds(s string) bool {
	if s == "" || len(s) > maxWaitDigits {
		return false
	}
	for _, r := range s {
		if r < '0' || r > '9' {
			return false
		}
	}
	return true
}

func (p *parser) returnRule() error {
	if err := p.want("-j"); err != nil {
		return err
	}
	return p.want("RETURN")
}

// ruleCommand parses -C, -I and -D. The word after the chain tells the
// shape: "-p" starts a hook, "-s" or a position starts a ban, "-j" is the
// RETURN rule.
func (p *parser) ruleCommand(c *Command, opt string) error {
	var err error
	if c.Chain, err = p.chain(); err != nil {
		return err
	}
	switch next := p.peek(); {
	case next == "-p":
		c.Kind = map[string]Kind{"-C": CheckHook, "-I": AddHook, "-D": DeleteHook}[opt]
		return p.hookRule(c)
	case next == "-j" && opt == "-C":
		c.Kind = CheckReturn
		return p.returnRule()
	case next == "-s" || (opt == "-I" && next == "1"):
		c.Kind = map[string]Kind{"-C": CheckBan, "-I": AddBan, "-D": DeleteBan}[opt]
		if next == "1" {
			p.pos++ // the only position allowed: fail2ban's "-I C 1"
		}
		return p.banRule(c)
	case next == "":
		return deny("the command ends after chain %q", c.Chain)
	default:
		return deny("unexpected word %q after chain %q; a ban (-s), a hook (-p) or -j RETURN was expected", next, c.Chain)
	}
}

func (p *parser) hookRule(c *Command) error {
	if err := p.want("-p"); err != nil {
		return err
	}
	proto, err := p.value("a protocol")
	if err != nil {
		return err
	}
	if !isProto(proto) {
		return deny("protocol %q is not a protocol name", proto)
	}
	c.Proto = proto
	switch p.peek() {
	case "-m":
		p.pos++
		if err := p.want("multiport"); err != nil {
			return err
		}
		if err := p.want("--dports"); err != nil {
			return err
		}
		w, err := p.value("a port list")
		if err != nil {
			return err
		}
		if c.Ports, err = parsePortList(w); err != nil {
			return deny("%v", err)
		}
		c.Match = MultiPort
	case "--dport":
		p.pos++
		w, err := p.value("a port")
		if err != nil {
			return err
		}
		port, err := parsePort(w)
		if err != nil {
			return deny("%v", err)
		}
		c.Match, c.Ports = OnePort, []Port{port}
	default:
		c.Match = AllPorts
	}
	if err := p.want("-j"); err != nil {
		return err
	}
	c.Jump, err = p.chain()
	return err
}

func isProto(s string) bool {
	if s == "" || len(s) > maxProtoLen {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9') {
			return false
		}
	}
	return true
}

func (p *parser) banRule(c *Command) error {
	if err := p.want("-s"); err != nil {
		return err
	}
	w, err := p.value("an address")
	if err != nil {
		return err
	}
	if c.Source, err = parseSource(w, c.Family); err != nil {
		return deny("%v", err)
	}
	if err := p.want("-j"); err != nil {
		return err
	}
	switch t, _ := p.next(); t {
	case "DROP":
		c.Target = Target{Kind: Drop}
	case "REJECT":
		c.Target = Target{Kind: Reject, RejectWith: defaultReject(c.Family)}
		if p.peek() == "--reject-with" {
			p.pos++
			with, err := p.value("a reject type")
			if err != nil {
				return err
			}
			if fam, ok := rejectTypes[with]; !ok || fam != c.Family {
				return deny("reject type %q is not one f2b-shim knows for %s (see --reject-with in iptables-extensions(8); the short aliases are not accepted)", with, c.Family.Binary())
			}
			c.Target.RejectWith = with
		}
	case "":
		return deny("the command ends where a target was expected")
	default:
		return deny("target %q is not allowed; a ban may only DROP or REJECT", t)
	}
	return nil
}

// listCheck parses fail2ban 0.10/0.11's actioncheck,
// "iptables -n -L P | grep -q 'C[ \t]'", in either option order. The shim
// answers it itself; grep never runs.
func (p *parser) listCheck(c *Command, first, second string) error {
	c.Kind = CheckHookListed
	if first == "-n" {
		if err := p.want(second); err != nil {
			return err
		}
	}
	var err error
	if c.Chain, err = p.chain(); err != nil {
		return err
	}
	if first == "-L" {
		if err := p.want(second); err != nil {
			return err
		}
	}
	for _, w := range []string{"|", "grep", "-q"} {
		if err := p.want(w); err != nil {
			return err
		}
	}
	pat, err := p.value("a grep pattern")
	if err != nil {
		return err
	}
	name, ok := strings.CutSuffix(pat, `[ \t]`)
	if !ok {
		return deny(`grep pattern %q must be a chain name followed by "[ \t]"`, pat)
	}
	if c.Jump, err = parseChain(name); err != nil {
		return deny("%v", err)
	}
	return nil
}
