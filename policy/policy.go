package policy

import (
	"bytes"
	"fmt"
	"net/netip"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
)

// Policy is the proxy admin's configuration. The TOML key names are a
// user-facing contract documented in the README; keep them stable.
type Policy struct {
	Name            string         `toml:"name"`
	ChainPrefix     string         `toml:"chain_prefix"`
	ParentChains    []string       `toml:"parent_chains"`
	Protocols       []string       `toml:"protocols"`
	Targets         []string       `toml:"targets"`
	RejectWith      []string       `toml:"reject_with"`
	MinPrefixV4     int            `toml:"min_prefix_v4"`
	MinPrefixV6     int            `toml:"min_prefix_v6"`
	NeverBan        []netip.Prefix `toml:"-"`
	MaxBansPerChain int            `toml:"max_bans_per_chain"`
	AuditLog        string         `toml:"audit_log"`
	StateDir        string         `toml:"state_dir"`
	LockTimeout     time.Duration  `toml:"-"`
	IptablesBackend string         `toml:"iptables_backend"`
	// Syslog also sends every audit record to syslog/journald.
	Syslog bool `toml:"syslog"`
	// Backend is "rules" (one iptables rule per ban), "ipset" (bans in
	// hash:net sets, one rule per target) or "nftables" (bans in the sets
	// of the shim's own nftables table, changed over netlink: no iptables,
	// no ipset, no program per ban).
	Backend string `toml:"backend"`
	// NftablesTable is the inet table the nftables backend owns.
	NftablesTable string `toml:"nftables_table"`
	// MaxChains bounds the ban chains per family; MaxHooksPerChain the
	// jumps into one ban chain from the parent chains, per family. Every
	// packet to a hooked port walks the chain once per hook.
	MaxChains        int `toml:"max_chains"`
	MaxHooksPerChain int `toml:"max_hooks_per_chain"`
	// HookPorts, when set, are the only ports a hook may match. Empty
	// means: any port outside the proxy's local (ephemeral) port range,
	// and never every port.
	HookPorts []Port `toml:"-"`
	// NAT64Prefixes are NAT64 prefixes besides the well-known ones, whose
	// addresses are judged as the IPv4 addresses they carry.
	NAT64Prefixes []netip.Prefix `toml:"-"`
	// MaxBanTime is the longest a ban stays on the proxy without being
	// made again ("f2b-shim expire" lifts older ones); 0 keeps bans until
	// they are lifted.
	MaxBanTime time.Duration `toml:"-"`
	// BanPrefixV6 and BanPrefixV4 widen a ban of one address to its
	// prefix of that length (128 and 32: no change).
	BanPrefixV6 int `toml:"ban_prefix_v6"`
	BanPrefixV4 int `toml:"ban_prefix_v4"`
	// MaxNewBansPerMinute bounds the bans that change the firewall, for
	// one-shot and stream requests together.
	MaxNewBansPerMinute int `toml:"max_new_bans_per_minute"`
	// DryRun judges, audits and answers every request, and applies none.
	DryRun bool `toml:"dry_run"`
	// StreamIdleTimeout ends a stream session (f2b-shim stream) that has
	// sent nothing for that long; the relay opens a new one when it has
	// bans to send.
	StreamIdleTimeout time.Duration `toml:"-"`
	// StreamMaxBatch bounds the requests of a stream that are applied
	// under one hold of the lock, so that a one-shot request waits for at
	// most one batch.
	StreamMaxBatch int `toml:"stream_max_batch"`
	// MaxStreamSessions bounds the stream sessions of this policy open at
	// once: sshd does not bound authenticated connections, and each
	// session holds an sshd and a shim process.
	MaxStreamSessions int `toml:"max_stream_sessions"`
	// File is the absolute path the policy was read from ("" for the
	// built-in defaults). The state remembers it, so that a policy whose
	// name changes finds its state again (name names the state file).
	File string `toml:"-"`
}

// Limits on the policy itself, each with its reason.
const (
	// maxLockTimeout stays well under fail2ban's 60 s action timeout, so the
	// shim always answers before fail2ban kills it.
	maxLockTimeout = 50 * time.Second
	// maxStreamIdle keeps a forgotten session from holding an sshd
	// process for more than a day.
	maxStreamIdle = 24 * time.Hour
	// maxStreamBatch keeps one batch's hold of the lock short: a batch of
	// bans that each need their own iptables call takes a few ms each.
	maxStreamBatch = 10000
	// maxStreamSessionsLimit keeps a typo from switching the bound off:
	// each session costs about 15 MB (shim and sshd).
	maxStreamSessionsLimit = 256
	// defaultMaxStreamSessions: the relay keeps one session per proxy
	// and mail host, and a restart overlaps the old one for a moment;
	// four leaves room for that and for an admin's own session.
	defaultMaxStreamSessions = 4
	// maxBansLimit keeps a typo from allowing an unbounded chain.
	maxBansLimit = 1_000_000
	// maxNameLen keeps the name short in every audit line.
	maxNameLen = 64
	// maxChainsLimit and maxHooksLimit keep a typo from allowing what
	// the limits are there to stop: a packet walking thousands of rules.
	maxChainsLimit = 1024
	maxHooksLimit  = 64
	// minPrefixLen keeps chain_prefix specific to this setup: a short
	// prefix ("f", "DOCK") reaches other programs' chains.
	minPrefixLen = 8
)

// Defaults of the bounds, and why they are what they are:
//   - defaultMaxBanTime: a ban outlives a dead or retired mail host by at
//     most this. fail2ban's own longest ban in its shipped jails is the
//     recidive jail's week, and bantime.increment grows a repeat
//     offender's ban with every re-ban, which refreshes the time here; 30
//     days is far past both, and short enough that a host restored from
//     an old backup does not leave bans for months.
//   - defaultMaxNewBans: after a restart fail2ban 1.x sends every ban of
//     its database again, one a few milliseconds apart; a busy mail host
//     holds thousands, and a restore-and-restart must pass. 10,000 a
//     minute passes that, and still makes a compromised host take five
//     minutes, each refused ban audited, to fill max_bans_per_chain.
//   - defaultMaxChains: fail2ban makes one chain per jail and family; a
//     busy mail host runs ten to twenty jails (postfix, postfix-sasl,
//     dovecot, sieve, roundcube, recidive ...). 32 leaves room for that
//     and caps what a compromised host can make.
//   - defaultMaxHooks: fail2ban 1.1 hooks a jail's chain into each of its
//     chain= parents for each of its protocol= values, with one rule per
//     pair, so chain="INPUT,FORWARD" and protocol="tcp,udp" make 4; 8
//     leaves room for a third parent or protocol.
const (
	defaultMaxChains  = 32
	defaultMaxHooks   = 8
	defaultMaxBanTime = 30 * 24 * time.Hour
	defaultMaxNewBans = 10000
	// maxNewBansLimit keeps a typo from switching the quota off.
	maxNewBansLimit = 1_000_000
)

// Default returns the built-in policy, the one used without --policy.
func Default() *Policy {
	var with []string
	for t := range rejectTypes {
		with = append(with, t)
	}
	slices.Sort(with)
	return &Policy{
		Name:                "default",
		ChainPrefix:         "mail-remote-f2b-",
		ParentChains:        []string{"INPUT"},
		Protocols:           []string{"tcp", "udp"},
		Targets:             []string{"REJECT", "DROP"},
		RejectWith:          with,
		MinPrefixV4:         24,
		MinPrefixV6:         64,
		MaxBansPerChain:     50000,
		AuditLog:            "/var/log/f2b-shim/audit.jsonl",
		StateDir:            "/var/lib/f2b-shim",
		LockTimeout:         10 * time.Second,
		IptablesBackend:     "auto",
		Backend:             "rules",
		NftablesTable:       "f2b_shim",
		MaxChains:           defaultMaxChains,
		MaxHooksPerChain:    defaultMaxHooks,
		MaxBanTime:          defaultMaxBanTime,
		BanPrefixV6:         128,
		BanPrefixV4:         32,
		MaxNewBansPerMinute: defaultMaxNewBans,
		StreamIdleTimeout:   5 * time.Minute,
		StreamMaxBatch:      512,
		MaxStreamSessions:   defaultMaxStreamSessions,
	}
}

// file mirrors Policy for decoding: the keys that need parsing arrive as
// text and are turned into typed values by Parse.
type file struct {
	*Policy
	NeverBan      []string `toml:"never_ban"`
	LockTimeout   string   `toml:"lock_timeout"`
	HookPorts     []string `toml:"hook_ports"`
	NAT64Prefixes []string `toml:"nat64_prefixes"`
	MaxBanTime    string   `toml:"max_ban_time"`
	StreamIdle    string   `toml:"stream_idle_timeout"`
}

// Parse reads a TOML policy on top of the defaults. Unknown keys are an
// error: a misspelt key would otherwise silently keep a default.
func Parse(data []byte) (*Policy, error) {
	pol := Default()
	f := file{Policy: pol, LockTimeout: pol.LockTimeout.String(), MaxBanTime: "30d", StreamIdle: "5m"}
	md, err := toml.NewDecoder(bytes.NewReader(data)).Decode(&f)
	if err != nil {
		return nil, fmt.Errorf("policy is not valid TOML: %v", err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		keys := make([]string, len(und))
		for i, k := range und {
			keys[i] = k.String()
		}
		return nil, fmt.Errorf("policy has unknown key(s) %s; see the README for the valid keys", strings.Join(keys, ", "))
	}
	if pol.LockTimeout, err = time.ParseDuration(f.LockTimeout); err != nil {
		return nil, fmt.Errorf("lock_timeout %q is not a duration like \"10s\"", f.LockTimeout)
	}
	if pol.StreamIdleTimeout, err = time.ParseDuration(f.StreamIdle); err != nil {
		return nil, fmt.Errorf("stream_idle_timeout %q is not a duration like \"5m\"", f.StreamIdle)
	}
	if pol.MaxBanTime, err = ParseDays(f.MaxBanTime); err != nil {
		return nil, fmt.Errorf("max_ban_time %q is not a duration like \"30d\" or \"12h\" (\"0\" keeps bans until they are lifted)", f.MaxBanTime)
	}
	for _, s := range f.NeverBan {
		p, err := parseNeverBan(s)
		if err != nil {
			return nil, err
		}
		pol.NeverBan = append(pol.NeverBan, p)
	}
	for _, s := range f.HookPorts {
		port, err := parsePort(s)
		if err != nil {
			return nil, fmt.Errorf("hook_ports: %v", err)
		}
		pol.HookPorts = append(pol.HookPorts, port)
	}
	for _, s := range f.NAT64Prefixes {
		p, err := netip.ParsePrefix(s)
		if err != nil || !p.Addr().Is6() || p.Addr().Is4In6() || !slices.Contains(nat64Lengths, p.Bits()) {
			return nil, fmt.Errorf("nat64_prefixes entry %q must be an IPv6 prefix of length 32, 40, 48, 56, 64 or 96 (RFC 6052)", s)
		}
		pol.NAT64Prefixes = append(pol.NAT64Prefixes, p.Masked())
	}
	return pol, pol.Validate()
}

func parseNeverBan(s string) (netip.Prefix, error) {
	if p, err := netip.ParsePrefix(s); err == nil {
		return p.Masked(), nil
	}
	if a, err := netip.ParseAddr(s); err == nil && a.Zone() == "" {
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	return netip.Prefix{}, fmt.Errorf("never_ban entry %q is not an IP address or CIDR", s)
}

// Validate checks every key, so that a bad policy is refused as a whole
// before any request is judged by it.
func (p *Policy) Validate() error {
	if p.Name == "" || len(p.Name) > maxNameLen || strings.ContainsFunc(p.Name, func(r rune) bool { return !isChainRune(r) }) {
		return fmt.Errorf("name %q must be 1 to %d letters, digits, \".\", \"_\" or \"-\"", p.Name, maxNameLen)
	}
	if err := checkPrefix(p.ChainPrefix); err != nil {
		return err
	}
	if len(p.ParentChains) == 0 {
		return fmt.Errorf("parent_chains must name at least one chain, such as \"INPUT\"")
	}
	for _, c := range p.ParentChains {
		if _, err := parseChain(c); err != nil {
			return fmt.Errorf("parent_chains: %v", err)
		}
		if strings.HasPrefix(c, p.ChainPrefix) {
			return fmt.Errorf("parent chain %q must not start with chain_prefix %q, or a hook could jump between ban chains", c, p.ChainPrefix)
		}
	}
	for _, proto := range p.Protocols {
		if !isProto(proto) {
			return fmt.Errorf("protocols: %q is not a protocol name", proto)
		}
	}
	for _, t := range p.Targets {
		if t != "DROP" && t != "REJECT" {
			return fmt.Errorf("targets: %q is not allowed; only \"DROP\" and \"REJECT\" are", t)
		}
	}
	for _, w := range p.RejectWith {
		if _, ok := rejectTypes[w]; !ok {
			return fmt.Errorf("reject_with: %q is not a reject type iptables documents", w)
		}
	}
	if p.MinPrefixV4 < 1 || p.MinPrefixV4 > 32 {
		return fmt.Errorf("min_prefix_v4 %d must be from 1 to 32", p.MinPrefixV4)
	}
	if p.MinPrefixV6 < 1 || p.MinPrefixV6 > 128 {
		return fmt.Errorf("min_prefix_v6 %d must be from 1 to 128", p.MinPrefixV6)
	}
	if p.MaxBansPerChain < 1 || p.MaxBansPerChain > maxBansLimit {
		return fmt.Errorf("max_bans_per_chain %d must be from 1 to %d", p.MaxBansPerChain, maxBansLimit)
	}
	for key, path := range map[string]string{"audit_log": p.AuditLog, "state_dir": p.StateDir} {
		if !filepath.IsAbs(path) || filepath.Clean(path) != path {
			return fmt.Errorf("%s %q must be a clean absolute path", key, path)
		}
	}
	if p.LockTimeout < 100*time.Millisecond || p.LockTimeout > maxLockTimeout {
		return fmt.Errorf("lock_timeout %s must be from 100ms to %s (fail2ban kills an action after 60s)", p.LockTimeout, maxLockTimeout)
	}
	if p.StreamIdleTimeout < time.Second || p.StreamIdleTimeout > maxStreamIdle {
		return fmt.Errorf("stream_idle_timeout %s must be from 1s to %s", p.StreamIdleTimeout, maxStreamIdle)
	}
	if p.StreamMaxBatch < 1 || p.StreamMaxBatch > maxStreamBatch {
		return fmt.Errorf("stream_max_batch %d must be from 1 to %d", p.StreamMaxBatch, maxStreamBatch)
	}
	if p.MaxStreamSessions < 1 || p.MaxStreamSessions > maxStreamSessionsLimit {
		return fmt.Errorf("max_stream_sessions %d must be from 1 to %d", p.MaxStreamSessions, maxStreamSessionsLimit)
	}
	switch p.IptablesBackend {
	case "auto", "nft", "legacy":
	default:
		return fmt.Errorf("iptables_backend %q must be \"auto\", \"nft\" or \"legacy\"", p.IptablesBackend)
	}
	switch p.Backend {
	case "rules", "ipset":
	case "nftables":
		// The table is the shim's own base chain on the input hook: the
		// hooks of fail2ban's INPUT become its rules. Other parents
		// (FORWARD, DOCKER-USER) have no place in it yet.
		for _, c := range p.ParentChains {
			if c != "INPUT" {
				return fmt.Errorf("parent_chains %q: backend \"nftables\" hooks ban chains into its own input chain only; set parent_chains = [\"INPUT\"], or use backend \"rules\" or \"ipset\"", c)
			}
		}
	default:
		return fmt.Errorf("backend %q must be \"rules\", \"ipset\" or \"nftables\"", p.Backend)
	}
	if !nftIdent.MatchString(p.NftablesTable) {
		return fmt.Errorf("nftables_table %q must be 1 to 64 letters, digits or underscores, starting with a letter", p.NftablesTable)
	}
	if slices.Contains(otherTables, strings.ToLower(p.NftablesTable)) {
		return fmt.Errorf("nftables_table %q is the name of a table that the system's own firewall or another tool keeps (nftables.conf's \"inet filter\", firewalld, docker, …); the shim owns its table and may delete it: keep the default \"f2b_shim\" or choose a name of its own", p.NftablesTable)
	}
	if p.MaxBanTime < 0 {
		return fmt.Errorf("max_ban_time %s must not be negative", p.MaxBanTime)
	}
	if p.BanPrefixV6 < p.MinPrefixV6 || p.BanPrefixV6 > 128 {
		return fmt.Errorf("ban_prefix_v6 %d must be from min_prefix_v6 (%d) to 128", p.BanPrefixV6, p.MinPrefixV6)
	}
	if p.BanPrefixV4 < p.MinPrefixV4 || p.BanPrefixV4 > 32 {
		return fmt.Errorf("ban_prefix_v4 %d must be from min_prefix_v4 (%d) to 32", p.BanPrefixV4, p.MinPrefixV4)
	}
	if p.MaxNewBansPerMinute < 1 || p.MaxNewBansPerMinute > maxNewBansLimit {
		return fmt.Errorf("max_new_bans_per_minute %d must be from 1 to %d", p.MaxNewBansPerMinute, maxNewBansLimit)
	}
	if p.MaxChains < 1 || p.MaxChains > maxChainsLimit {
		return fmt.Errorf("max_chains %d must be from 1 to %d", p.MaxChains, maxChainsLimit)
	}
	if p.MaxHooksPerChain < 1 || p.MaxHooksPerChain > maxHooksLimit {
		return fmt.Errorf("max_hooks_per_chain %d must be from 1 to %d", p.MaxHooksPerChain, maxHooksLimit)
	}
	return nil
}

// ParseDays parses a duration that may also count days: "30d", "1d12h",
// "90m"; "0" is zero.
func ParseDays(s string) (time.Duration, error) {
	if s == "0" {
		return 0, nil
	}
	days, rest, found := strings.Cut(s, "d")
	if !found {
		return time.ParseDuration(s)
	}
	n, err := strconv.Atoi(days)
	if err != nil || n < 0 || n > 3650 {
		return 0, fmt.Errorf("bad number of days %q", days)
	}
	d := time.Duration(n) * 24 * time.Hour
	if rest == "" {
		return d, nil
	}
	more, err := time.ParseDuration(rest)
	return d + more, err
}

// builtinChains are the built-in chains of every iptables table.
var builtinChains = []string{"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"}

// otherTools are chain name prefixes of programs that share the proxy's
// firewall: fail2ban's own actions ("f2b-<jail>"), Docker, ufw,
// Kubernetes, libvirt, firewalld, CrowdSec and sshguard.
var otherTools = []string{"f2b-", "DOCKER", "ufw-", "ufw6-", "KUBE-", "LIBVIRT_", "IN_", "FWD_", "OUT_", "crowdsec", "CROWDSEC", "sshguard"}

// checkPrefix refuses a chain_prefix that reaches chains the mail host
// must never touch: "FORW" would allow "iptables -F FORWARD", and "f2b-"
// the proxy's own fail2ban chains.
func checkPrefix(prefix string) error {
	if _, err := parseChain(prefix); err != nil || len(prefix) >= maxChainLen || len(prefix) < minPrefixLen {
		return fmt.Errorf("chain_prefix %q must be a chain name of %d to %d characters", prefix, minPrefixLen, maxChainLen-1)
	}
	for _, b := range builtinChains {
		if strings.HasPrefix(b, prefix) {
			return fmt.Errorf("chain_prefix %q would reach the built-in chain %s; choose a prefix such as \"mail-remote-f2b-\"", prefix, b)
		}
	}
	for _, o := range otherTools {
		if strings.HasPrefix(prefix, o) || strings.HasPrefix(o, prefix) {
			return fmt.Errorf("chain_prefix %q would reach the chains of another program (%s*); choose a prefix such as \"mail-remote-f2b-\"", prefix, o)
		}
	}
	return nil
}

// Nests reports whether two chain prefixes can name the same chain: one
// policy could then flush or unhook the other's chains.
func Nests(a, b string) bool { return strings.HasPrefix(a, b) || strings.HasPrefix(b, a) }

// otherTables are table names that a distribution's nftables.conf, or a
// firewall manager, uses for a table of its own. The shim owns its table:
// it recreates its base chain, and prune and purge delete the table when
// it is empty of the shim's chains; sharing one with the host's own rules
// would make every change fail, or a repair take the host's table.
var otherTables = []string{"filter", "nat", "mangle", "raw", "security", "route", "firewalld", "docker", "libvirt", "incus", "lxd", "crowdsec", "crowdsec6", "sshguard", "fail2ban", "nixos_fw", "ufw", "tailscale", "kube_proxy", "cilium"}

// nftIdent is a table name nft accepts unquoted, so that an admin can
// type it ("nft list table inet NAME") as the docs show it.
var nftIdent = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_]{0,63}$`)
