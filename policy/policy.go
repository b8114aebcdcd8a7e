package policy

import (
	"bytes"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
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
	// Backend is "rules" (one iptables rule per ban) or "ipset" (bans in
	// hash:net sets, one rule per target).
	Backend string `toml:"backend"`
}

// Limits on the policy itself, each with its reason.
const (
	// maxLockTimeout stays well under fail2ban's 60 s action timeout, so the
	// shim always answers before fail2ban kills it.
	maxLockTimeout = 50 * time.Second
	// maxBansLimit keeps a typo from allowing an unbounded chain.
	maxBansLimit = 1_000_000
	// maxNameLen keeps the name short in every audit line.
	maxNameLen = 64
)

// Default returns the built-in policy, the one used without --policy.
func Default() *Policy {
	var with []string
	for t := range rejectTypes {
		with = append(with, t)
	}
	slices.Sort(with)
	return &Policy{
		Name:            "default",
		ChainPrefix:     "mail-remote-f2b-",
		ParentChains:    []string{"INPUT"},
		Protocols:       []string{"tcp", "udp"},
		Targets:         []string{"REJECT", "DROP"},
		RejectWith:      with,
		MinPrefixV4:     24,
		MinPrefixV6:     64,
		MaxBansPerChain: 50000,
		AuditLog:        "/var/log/f2b-shim/audit.jsonl",
		StateDir:        "/var/lib/f2b-shim",
		LockTimeout:     10 * time.Second,
		IptablesBackend: "auto",
		Backend:         "rules",
	}
}

// file mirrors Policy for decoding: the keys that need parsing arrive as
// text and are turned into typed values by Parse.
type file struct {
	*Policy
	NeverBan    []string `toml:"never_ban"`
	LockTimeout string   `toml:"lock_timeout"`
}

// Parse reads a TOML policy on top of the defaults. Unknown keys are an
// error: a misspelt key would otherwise silently keep a default.
func Parse(data []byte) (*Policy, error) {
	pol := Default()
	f := file{Policy: pol, LockTimeout: pol.LockTimeout.String()}
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
	for _, s := range f.NeverBan {
		p, err := parseNeverBan(s)
		if err != nil {
			return nil, err
		}
		pol.NeverBan = append(pol.NeverBan, p)
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
	if _, err := parseChain(p.ChainPrefix); err != nil || len(p.ChainPrefix) >= maxChainLen {
		return fmt.Errorf("chain_prefix %q must be a chain name shorter than %d characters", p.ChainPrefix, maxChainLen)
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
	switch p.IptablesBackend {
	case "auto", "nft", "legacy":
	default:
		return fmt.Errorf("iptables_backend %q must be \"auto\", \"nft\" or \"legacy\"", p.IptablesBackend)
	}
	if p.Backend != "rules" && p.Backend != "ipset" {
		return fmt.Errorf("backend %q must be \"rules\" or \"ipset\"", p.Backend)
	}
	return nil
}
