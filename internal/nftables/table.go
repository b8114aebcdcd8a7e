package nftables

import (
	"errors"
	"fmt"
	"sync"
	"syscall"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"github.com/mdlayher/netlink/nltest"
	"golang.org/x/sys/unix"
)

// DefaultTable is the name of the shim's table when the policy names none.
// It is an identifier that nft accepts unquoted, and says whose it is.
const DefaultTable = "f2b_shim"

// BaseChain is the chain of the shim's table on the input hook. It holds
// only hooks: one rule per hook, each a jump to a ban chain.
const BaseChain = "input"

// basePriority runs the shim's chain just before the filter chains
// (priority filter = 0) of any other table, iptables-nft's included: a ban
// is decided before the host's own rules accept the packet. It does not
// take precedence over a drop elsewhere, which nftables cannot give.
const basePriority = -1

// maxTableName is the kernel's NFT_TABLE_MAXNAMELEN minus the NUL.
const maxTableName = 255

// Socket buffer sizes, set with SO_SNDBUFFORCE and SO_RCVBUFFORCE (the
// shim has CAP_NET_ADMIN): a transaction is one sendmsg, which the kernel
// refuses with EMSGSIZE when it is larger than the send buffer, and every
// message of it is acknowledged into the receive buffer, where too many
// acknowledgements overflow as ENOBUFS. maxTransactionBytes holds the
// largest batch AddBans allows (maxBansPerTransaction IPv6 prefixes, each
// added, deleted and added again: about 34 MB) with room to spare; the
// kernel takes memory for what is sent, not for the limit.
const (
	maxTransactionBytes = 64 << 20
	receiveBufferBytes  = 8 << 20
)

// Table is the shim's own inet table: one base chain on the input hook,
// and per ban chain a regular chain and a set pair. Every change goes
// through a Batch, which the kernel applies as one transaction.
//
// A Table holds the process's one nftables connection; its methods may
// be called from several goroutines.
type Table struct {
	conn  *nftables.Conn
	table *nftables.Table
	base  *nftables.Chain
	// retried counts transactions sent again after ENOBUFS (for tests).
	retried  int
	connOpts []nftables.ConnOption
	// addrSets keeps single addresses in a hash set beside the interval
	// set (WithAddressSets).
	addrSets bool
}

// libraryMu serialises every call into google/nftables: its allocSetID,
// which names new sets within a transaction, is an unsynchronised package
// global (v0.3.0), so two connections, or two goroutines on one, could
// give two sets the same ID.
var libraryMu sync.Mutex

// opened enforces one Table per process, for the same reason.
var (
	openedMu sync.Mutex
	opened   bool
)

// Option configures Open.
type Option func(*options)

type options struct {
	netns    int
	dial     nltest.Func
	addrSets bool
}

// WithAddressSets keeps each family's single addresses (/32, /128) in a
// hash set of their own, beside the interval set that holds prefixes:
// "ip saddr @CHAIN-v4-addr", one more rule per family. The kernel's
// interval sets (an rbtree) do work in proportion to the set at each
// commit, so one ban in a set of 50,000 costs milliseconds; a hash set's
// cost stays flat (BenchmarkSetKind). Both layouts read back the same.
func WithAddressSets() Option { return func(o *options) { o.addrSets = true } }

// WithNetNS opens the table in the network namespace that fd refers to,
// instead of the process's own. The system tests use it.
func WithNetNS(fd int) Option { return func(o *options) { o.netns = fd } }

// WithTestDial sends every netlink message to dial instead of the kernel:
// the byte-level unit tests record them.
func WithTestDial(dial nltest.Func) Option { return func(o *options) { o.dial = dial } }

// Open connects to nftables and returns the table called name
// (DefaultTable when name is ""). It does not create anything: Ensure, or
// the first batch, does.
func Open(name string, opts ...Option) (*Table, error) {
	if name == "" {
		name = DefaultTable
	}
	if err := checkName("table", name, maxTableName); err != nil {
		return nil, err
	}
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	openedMu.Lock()
	defer openedMu.Unlock()
	if opened {
		return nil, errors.New("f2b-shim: an nftables table is already open in this process; use that one (the nftables library keeps per-process state that two connections would share unsafely)")
	}
	connOpts := []nftables.ConnOption{nftables.AsLasting()}
	if o.dial != nil {
		connOpts = append(connOpts, nftables.WithTestDial(o.dial))
	} else {
		connOpts = append(connOpts, nftables.WithSockOptions(bigBuffers))
	}
	if o.netns != 0 {
		connOpts = append(connOpts, nftables.WithNetNSFd(o.netns))
	}
	conn, err := nftables.New(connOpts...)
	if err != nil {
		return nil, fmt.Errorf("f2b-shim: cannot open a netlink socket to nftables: %w\nf2b-shim: hint: the nftables backend needs CAP_NET_ADMIN and a kernel with nf_tables", err)
	}
	opened = true
	t := &nftables.Table{Name: name, Family: nftables.TableFamilyINet}
	prio := nftables.ChainPriority(basePriority)
	policy := nftables.ChainPolicyAccept
	return &Table{
		conn:     conn,
		connOpts: connOpts,
		addrSets: o.addrSets,
		table:    t,
		base: &nftables.Chain{
			Name: BaseChain, Table: t, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookInput, Priority: &prio, Policy: &policy,
		},
	}, nil
}

// Close releases the connection; another Open may follow.
func (t *Table) Close() error {
	openedMu.Lock()
	defer openedMu.Unlock()
	opened = false
	return t.conn.CloseLasting()
}

// reconnect replaces the connection; the caller holds libraryMu.
func (t *Table) reconnect() error {
	_ = t.conn.CloseLasting()
	conn, err := nftables.New(t.connOpts...)
	if err != nil {
		return fmt.Errorf("f2b-shim: cannot reopen the netlink socket to nftables: %w", err)
	}
	t.conn = conn
	return nil
}

// Name is the table's name.
func (t *Table) Name() string { return t.table.Name }

func bigBuffers(c *netlink.Conn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, maxTransactionBytes)
		if serr == nil {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, receiveBufferBytes)
		}
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return fmt.Errorf("netlink socket buffers: %w", err)
	}
	return nil
}

// checkName refuses names the kernel would refuse or cut, and names with
// bytes a listing would show ambiguously. The policy's chain grammar is
// narrower still; this is the package's own guard.
func checkName(what, name string, maxLen int) error {
	if name == "" || len(name) > maxLen {
		return fmt.Errorf("f2b-shim: nftables %s name %q must be 1 to %d bytes long", what, name, maxLen)
	}
	for _, r := range name {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-') {
			return fmt.Errorf("f2b-shim: nftables %s name %q may only hold letters, digits, \".\", \"_\" and \"-\"", what, name)
		}
	}
	return nil
}

// flush sends the queued messages as one transaction. A transaction that
// meets ENOBUFS may or may not have been applied: the kernel dropped an
// acknowledgement, not necessarily the change. Every batch this package
// builds is idempotent (an add is an add without NLM_F_EXCL, a delete is
// preceded by an add of the same element), so it is sent once more, and
// the second answer is the batch's. A batch that inserts or deletes rules
// is not idempotent, and its caller is told to read the table back.
func (t *Table) flush(queue func(c *nftables.Conn) error, idempotent bool) error {
	libraryMu.Lock()
	defer libraryMu.Unlock()
	if err := queue(t.conn); err != nil {
		// The library has no way to drop queued messages but a Flush,
		// which would send half a batch: a new connection drops them.
		return errors.Join(err, t.reconnect())
	}
	err := t.conn.Flush()
	if errors.Is(err, syscall.ENOBUFS) && idempotent {
		t.retried++
		if err := t.reconnect(); err != nil {
			return err
		}
		if err := queue(t.conn); err != nil {
			return errors.Join(err, t.reconnect())
		}
		err = t.conn.Flush()
	}
	if errors.Is(err, syscall.ENOBUFS) {
		// The library stops reading at ENOBUFS: the acknowledgements the
		// kernel did not drop are still in the socket. A Flush on it reads
		// them as its own, or waits for ones that never come (a stream
		// session hung in receiveAckAware, holding the policy's lock), so
		// the next call starts on a new socket.
		return errors.Join(err, t.reconnect())
	}
	return err
}
