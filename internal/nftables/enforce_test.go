package nftables

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/f2b-shim/f2b-shim/policy"
	"github.com/f2b-shim/f2b-shim/test/nstest"
)

// inNS runs f with the calling thread in the namespace: the sockets f
// opens belong to it, and stay there after the thread returns.
func inNS(t testing.TB, ns *nstest.Netns, f func()) {
	t.Helper()
	runtime.LockOSThread()
	self, err := os.Open("/proc/thread-self/ns/net")
	require.NoError(t, err)
	defer self.Close()
	target, err := os.Open(filepath.Join("/var/run/netns", ns.Name))
	require.NoError(t, err)
	defer target.Close()
	require.NoError(t, unix.Setns(int(target.Fd()), unix.CLONE_NEWNET))
	defer func() {
		// A thread that cannot go back is left locked: Go ends it with
		// the goroutine instead of reusing it in the wrong namespace.
		if unix.Setns(int(self.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
	}()
	f()
}

// Addresses on the namespace's loopback: the proxy, a client that gets
// banned and one that does not. A connection between two of them passes
// the input hook like one from outside.
const (
	proxy4, banned4, other4 = "192.0.2.1", "198.51.100.7", "198.51.100.8"
	proxy6, banned6, other6 = "2001:db8::1", "2001:db8:1:2::7", "2001:db8:9::8"
)

// lab is a namespace with those addresses, a listener on each given port
// of both proxy addresses, and the shim's table open in it.
type lab struct {
	t   *testing.T
	ns  *nstest.Netns
	tbl *Table
}

func newLab(t *testing.T, opts []Option, ports ...int) *lab {
	tbl, ns := nsTable(t, opts...)
	for _, a := range []string{proxy4 + "/32", banned4 + "/32", other4 + "/32"} {
		ns.MustRun(t, "ip", "addr", "add", a, "dev", "lo")
	}
	for _, a := range []string{proxy6 + "/128", banned6 + "/128", other6 + "/128"} {
		ns.MustRun(t, "ip", "addr", "add", a, "dev", "lo", "nodad")
	}
	inNS(t, ns, func() {
		for _, p := range ports {
			for _, a := range []string{proxy4, proxy6} {
				l, err := net.Listen("tcp", net.JoinHostPort(a, fmt.Sprint(p)))
				require.NoError(t, err)
				t.Cleanup(func() { l.Close() })
				go func() {
					for {
						c, err := l.Accept()
						if err != nil {
							return
						}
						c.Close()
					}
				}()
			}
		}
	})
	return &lab{t: t, ns: ns, tbl: tbl}
}

// dropWait is how long a connection attempt waits for an answer before
// it counts as dropped: a SYN on loopback is answered at once, and the
// first retransmission of a dropped one comes after a second.
const dropWait = 1500 * time.Millisecond

// connect says what became of a TCP connection from one address to another.
func (l *lab) connect(from, to string, port int) string {
	var err error
	inNS(l.t, l.ns, func() {
		d := net.Dialer{Timeout: dropWait, LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
		var c net.Conn
		c, err = d.Dial("tcp", net.JoinHostPort(to, fmt.Sprint(port)))
		if err == nil {
			c.Close()
		}
	})
	var ne net.Error
	switch {
	case err == nil:
		return "connected"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return "unreachable"
	case errors.As(err, &ne) && ne.Timeout():
		return "dropped"
	}
	return err.Error()
}

func TestSystemEnforcement(t *testing.T) {
	for _, layout := range layouts {
		t.Run(layout.name, func(t *testing.T) { testSystemEnforcement(t, layout.opts) })
	}
}

func testSystemEnforcement(t *testing.T, opts []Option) {
	tests := []struct {
		name         string
		hook         Hook
		target4      policy.Target
		target6      policy.Target
		hooked, free int // a port the hook covers, and one it does not (0: none)
		want         string
	}{
		{"oneport REJECT refuses a banned client on the hooked port only", Hook{Chain: "f2b-sshd", Proto: "tcp", Ports: []policy.PortRange{pr(22, 22)}}, reject4, reject6, 22, 80, "refused"},
		{"multiport DROP drops a banned client on a hooked port only", Hook{Chain: "f2b-mail", Proto: "tcp", Ports: []policy.PortRange{pr(25, 25), pr(465, 465), pr(587, 587)}}, drop, drop, 465, 80, "dropped"},
		{"allports REJECT with host-unreachable refuses every port", Hook{Chain: "f2b-all", Proto: "tcp"},
			policy.Target{Kind: policy.Reject, RejectWith: "icmp-host-unreachable"}, policy.Target{Kind: policy.Reject, RejectWith: "icmp6-addr-unreachable"}, 80, 0, "unreachable"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ports := []int{tt.hooked}
			if tt.free != 0 {
				ports = append(ports, tt.free)
			}
			l := newLab(t, opts, ports...)
			fams := []struct {
				proxy, banned, other string
				bits                 int
			}{{proxy4, banned4, other4, 32}, {proxy6, banned6, other6, 64}}
			for _, f := range fams {
				require.Equal(t, "connected", l.connect(f.banned, f.proxy, tt.hooked), "before the ban")
			}
			require.NoError(t, l.tbl.Do(func(b *Batch) {
				ensureBoth(b, tt.hook.Chain)
				b.SetVerdict(tt.hook.Chain, policy.IPv4, tt.target4)
				b.SetVerdict(tt.hook.Chain, policy.IPv6, tt.target6)
				for _, fam := range []policy.Family{policy.IPv4, policy.IPv6} {
					h := tt.hook
					h.Family = fam
					b.EnsureHook(h)
				}
				// The IPv6 ban is a widened /64 around the client.
				b.AddBans(tt.hook.Chain, bans(0, banned4+"/32", "2001:db8:1:2::/64"))
			}))
			for _, f := range fams {
				assert.Equal(t, tt.want, l.connect(f.banned, f.proxy, tt.hooked), "the banned %s client on the hooked port", f.proxy)
				assert.Equal(t, "connected", l.connect(f.other, f.proxy, tt.hooked), "another %s client on the hooked port", f.proxy)
				if tt.free != 0 {
					assert.Equal(t, "connected", l.connect(f.banned, f.proxy, tt.free), "the banned %s client on a port without hook", f.proxy)
				}
			}
			require.NoError(t, l.tbl.Do(func(b *Batch) {
				b.RemoveBans(tt.hook.Chain, prefixes(banned4+"/32", "2001:db8:1:2::/64"))
			}))
			for _, f := range fams {
				assert.Equal(t, "connected", l.connect(f.banned, f.proxy, tt.hooked), "the unbanned %s client", f.proxy)
			}
		})
	}
}

func TestSystemExpiry(t *testing.T) {
	for _, layout := range layouts {
		t.Run(layout.name, func(t *testing.T) { testSystemExpiry(t, layout.opts) })
	}
}

func testSystemExpiry(t *testing.T, opts []Option) {
	l := newLab(t, opts, 22)
	hook := Hook{Family: policy.IPv4, Chain: "f2b-sshd", Proto: "tcp", Ports: []policy.PortRange{pr(22, 22)}}
	require.NoError(t, l.tbl.Do(func(b *Batch) {
		ensureBoth(b, hook.Chain)
		b.SetVerdict(hook.Chain, policy.IPv4, reject4)
		b.EnsureHook(hook)
		b.AddBans(hook.Chain, []Ban{{Prefix: netip.MustParsePrefix(banned4 + "/32"), Timeout: time.Second}})
	}))
	require.Equal(t, "refused", l.connect(banned4, proxy4, 22))

	t.Run("the kernel lifts a ban when its timeout ends, with no process of ours", func(t *testing.T) {
		require.NoError(t, nstest.WaitFor(10*time.Second, func() bool {
			_, found, err := l.tbl.Check(hook.Chain, netip.MustParsePrefix(banned4+"/32"))
			return err == nil && !found
		}))
		assert.Equal(t, "connected", l.connect(banned4, proxy4, 22))
	})

	t.Run("a re-ban refreshes the timeout", func(t *testing.T) {
		p := netip.MustParsePrefix(banned4 + "/32")
		require.NoError(t, l.tbl.Do(func(b *Batch) { b.AddBans(hook.Chain, []Ban{{Prefix: p, Timeout: time.Minute}}) }))
		first, found, err := l.tbl.Check(hook.Chain, p)
		require.NoError(t, err)
		require.True(t, found)
		require.NoError(t, nstest.WaitFor(10*time.Second, func() bool {
			e, _, err := l.tbl.Check(hook.Chain, p)
			return err == nil && e.Expires < first.Expires-200*time.Millisecond
		}), "time passes for the ban")
		worn, _, err := l.tbl.Check(hook.Chain, p)
		require.NoError(t, err)
		require.NoError(t, l.tbl.Do(func(b *Batch) { b.AddBans(hook.Chain, []Ban{{Prefix: p, Timeout: time.Minute}}) }))
		fresh, _, err := l.tbl.Check(hook.Chain, p)
		require.NoError(t, err)
		assert.Greater(t, fresh.Expires, worn.Expires, "the re-ban starts the minute again")

		require.NoError(t, l.tbl.Do(func(b *Batch) { b.AddBans(hook.Chain, []Ban{{Prefix: p, Timeout: time.Hour}}) }))
		longer, _, err := l.tbl.Check(hook.Chain, p)
		require.NoError(t, err)
		assert.Equal(t, time.Hour, longer.Timeout, "a re-ban with a longer max_ban_time takes it")
		require.NoError(t, l.tbl.Do(func(b *Batch) { b.AddBans(hook.Chain, []Ban{{Prefix: p}}) }))
		kept, _, err := l.tbl.Check(hook.Chain, p)
		require.NoError(t, err)
		assert.Zero(t, kept.Timeout, "a re-ban without max_ban_time keeps the ban until it is lifted")
	})
}
