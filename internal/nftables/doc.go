// Package nftables is the shim's nftables backend, at intent level: it
// keeps fail2ban's chains, hooks and bans in one inet table that the shim
// owns, and changes it over netlink (github.com/google/nftables), with no
// program per ban and one kernel transaction per batch.
//
// # Why it exists
//
// Debian no longer installs iptables by default, and fail2ban's own
// default there is nftables. With this backend a proxy needs neither
// iptables nor ipset; a stream's whole batch of bans is one transaction;
// and max_ban_time is an element timeout, so a ban lifts on time even if
// no f2b-shim process ever runs again.
//
// # The table
//
//	table inet f2b_shim {
//		set CHAIN-v4 { type ipv4_addr; flags interval,timeout; }
//		set CHAIN-v6 { type ipv6_addr; flags interval,timeout; }
//		chain input {
//			type filter hook input priority filter - 1; policy accept;
//			meta nfproto ipv4 tcp dport { 25, 465, 587 } jump CHAIN  # a hook
//		}
//		chain CHAIN {
//			ip saddr @CHAIN-v4 reject with icmp port-unreachable
//			ip6 saddr @CHAIN-v6 reject with icmpv6 port-unreachable
//		}
//	}
//
// A hook is a jump to the ban chain, as in iptables, and not a verdict of
// its own: fail2ban names the target with each ban, not with the hook, so
// the target belongs to the ban chain (SetVerdict). fail2ban starts,
// checks and stops each family on its own (iptables, ip6tables), so every
// part but the nft chain itself has a family: the sets, the verdict rules
// and the hooks; a request for one family never changes the other's, and
// the chain goes when the last family's part does. A packet that matches
// no ban reaches the end of the ban chain and returns, which is the
// meaning of fail2ban's "-A CHAIN -j RETURN"; that rule is implicit, so no
// order of calls can lose it.
// Each prefix is one interval element ([start, end+1)), so a /64 is one
// element and a lookup costs the same at any number of bans. The kernel's
// interval sets (an rbtree) cost time in proportion to the set at every
// commit, though; WithAddressSets keeps single addresses in a hash set
// beside the interval set (one more rule per family), whose cost per ban
// stays flat. Both layouts read back the same.
//
// # The safety argument
//
//   - The package changes only its own table. Every name it sends is
//     built from typed values (policy.Chain, netip.Prefix, policy.Target,
//     policy.PortRange) and checked again here; no text of a client's
//     reaches the kernel, and no other table is read or written.
//   - Its base chain only ever jumps to ban chains, and ban chains only
//     ever drop or reject: nothing here can accept a packet that the
//     host's own rules would drop. Its policy is accept.
//   - A Batch is one netlink transaction (Conn.Flush): the kernel applies
//     all of it or none. Every element change is idempotent by
//     construction (add without NLM_F_EXCL; a delete is preceded by an
//     add of the same element), so a batch can be sent again when the
//     kernel's acknowledgement is lost (ENOBUFS), and a re-ban refreshes
//     its timeout on every kernel.
//   - Reads are typed and total: ReadBack turns the table into hooks,
//     verdicts and prefixes, and lists what it does not recognise as
//     foreign instead of guessing, so reconcile can compare and repair.
//   - google/nftables v0.3.0 keeps a package global (allocSetID) without
//     a lock: the package allows one open Table per process and takes one
//     lock around every call into the library.
//   - The library puts all elements of a call into one attribute with a
//     16-bit length: elements go out in messages of at most
//     maxElementsPerMessage. Interval sets need their end elements from
//     the caller: the range math is here, tested at /0, /32 and /128.
package nftables
