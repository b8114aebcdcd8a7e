// Package privilege lets f2b-shim run as an unprivileged user. The binary
// carries the file capabilities cap_net_admin,cap_net_raw+ep; before it
// runs iptables it raises both as ambient capabilities, so that iptables,
// which has no file capabilities of its own, inherits them across exec.
//
// It uses the raw capget/capset/prctl system calls through
// syscall.AllThreadsSyscall, which applies them to every thread of the Go
// runtime at once (capabilities are per thread on Linux). That call needs
// a binary built with CGO_ENABLED=0, as the README's build line does.
package privilege

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
	"unsafe"
)

// Capability numbers from linux/capability.h and prctl constants from
// linux/prctl.h.
const (
	capNetAdmin          = 12
	capNetRaw            = 13
	capVersion3          = 0x20080522
	prCapAmbient         = 47
	prCapAmbientRaise    = 2
	sysPrctl             = syscall.SYS_PRCTL
	sysCapget, sysCapset = syscall.SYS_CAPGET, syscall.SYS_CAPSET
)

// needed are the capabilities iptables needs: NET_ADMIN to change the
// firewall, NET_RAW for the raw socket iptables-legacy opens.
var needed = []struct {
	bit  uint
	name string
}{{capNetAdmin, "CAP_NET_ADMIN"}, {capNetRaw, "CAP_NET_RAW"}}

type capHeader struct {
	version uint32
	pid     int32
}

type capData struct {
	effective, permitted, inheritable uint32
}

// ErrMissing is returned when a non-root shim lacks the capabilities.
var ErrMissing = errors.New("missing capabilities")

// Prepare makes sure the iptables that the shim runs next will have the
// capabilities it needs. As root it does nothing: iptables runs as root.
func Prepare() error {
	if os.Geteuid() == 0 {
		return nil
	}
	hdr := capHeader{version: capVersion3}
	var data [2]capData
	if _, _, e := syscall.RawSyscall(sysCapget, uintptr(unsafe.Pointer(&hdr)), uintptr(unsafe.Pointer(&data[0])), 0); e != 0 {
		return fmt.Errorf("capget: %v", e)
	}
	var missing []string
	for _, c := range needed {
		if data[0].permitted&(1<<c.bit) == 0 {
			missing = append(missing, c.name)
		}
	}
	if len(missing) > 0 {
		self, _ := os.Executable()
		return fmt.Errorf("%w: f2b-shim runs as uid %d without %s; its file capabilities are gone (a package upgrade or a copy drops them); run: setcap cap_net_admin,cap_net_raw+ep %s",
			ErrMissing, os.Getuid(), strings.Join(missing, ", "), self)
	}
	for _, c := range needed {
		data[0].inheritable |= 1 << c.bit
		data[0].effective |= 1 << c.bit
	}
	hdr.pid = 0
	if _, _, e := syscall.AllThreadsSyscall(sysCapset, uintptr(unsafe.Pointer(&hdr)), uintptr(unsafe.Pointer(&data[0])), 0); e != 0 {
		return explain("capset", e)
	}
	for _, c := range needed {
		if _, _, e := syscall.AllThreadsSyscall(sysPrctl, prCapAmbient, prCapAmbientRaise, uintptr(c.bit)); e != 0 {
			return explain("raising "+c.name+" as an ambient capability", e)
		}
	}
	return nil
}

func explain(what string, e syscall.Errno) error {
	if e == syscall.ENOTSUP {
		return fmt.Errorf("%s: this f2b-shim was built with cgo; rebuild it with CGO_ENABLED=0 to run it as a non-root user", what)
	}
	return fmt.Errorf("%s: %v", what, e)
}
