package cli

import (
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/f2b-shim/f2b-shim/internal/relay"
)

// listFlag is a flag that may be given more than once, each value a
// comma- or space-separated list (as fail2ban writes "a, b").
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error {
	*l = append(*l, strings.FieldsFunc(v, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' })...)
	return nil
}

// runRelay is "f2b-shim relay", on the mail host: the child of
// proxy-stream.py that keeps the jail's outbox and streams it to every
// proxy. Its stdin and stdout are the action's; its stderr goes to
// fail2ban's log, one "LEVEL: message" line each.
func runRelay(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := newFlagSet("relay")
	var proxies, parents, protocols, sshOpts listFlag
	fs.Var(&proxies, "proxy", "ssh destination of a proxy (repeat, or a comma-separated list)")
	fs.Var(&parents, "parent", "chains the ban chain is hooked into (proxy-iptables.conf's chain); default INPUT")
	fs.Var(&protocols, "protocol", "protocols of the hooks; default tcp")
	fs.Var(&sshOpts, "ssh-option", "an extra ssh -o option (repeat)")
	outbox := fs.String("outbox", "", "the jail's outbox directory")
	chain := fs.String("chain", "", "the ban chain: chain_prefix + the jail's name")
	j := relay.DefaultJail("")
	fs.StringVar(&j.Port, "port", j.Port, "the hooks' ports")
	fs.StringVar(&j.Type, "type", j.Type, "multiport, oneport or allports")
	fs.StringVar(&j.Blocktype, "blocktype", j.Blocktype, "the target of IPv4 bans")
	fs.StringVar(&j.Blocktype6, "blocktype6", j.Blocktype6, "the target of IPv6 bans")
	fs.StringVar(&j.Returntype, "returntype", j.Returntype, "the chain's last rule")
	ssh := fs.String("ssh", "ssh", "the ssh client")
	sshConfig := fs.String("ssh-config", "", "ssh -F file")
	sshKey := fs.String("ssh-key", "", "ssh -i key")
	drain := fs.Duration("drain", 10*time.Second, "how long to keep delivering after fail2ban stops the jail")
	acks := fs.String("acks", "lines", `"groups": answer "ok N" per group commit (proxy-stream.py of this version); "lines": "ok" per line (earlier versions)`)
	if err := fs.Parse(args); err != nil {
		return usageError(stderr, "relay: "+err.Error())
	}
	if fs.NArg() > 0 || *outbox == "" || *chain == "" || len(proxies) == 0 {
		return usageError(stderr, "relay needs --outbox DIR, --chain NAME and at least one --proxy, and takes no other arguments")
	}
	if *acks != "lines" && *acks != "groups" {
		return usageError(stderr, "relay: --acks is lines or groups")
	}
	j.Chain = *chain
	if len(parents) > 0 {
		j.Parents = parents
	}
	if len(protocols) > 0 {
		j.Protocols = protocols
	}
	if err := j.Check(); err != nil {
		return usageError(stderr, "relay: "+err.Error())
	}
	var mu sync.Mutex
	logf := func(level, format string, a ...any) {
		mu.Lock()
		defer mu.Unlock()
		fmt.Fprintf(stderr, "%s: %s\n", level, relay.Printable(fmt.Sprintf(format, a...)))
	}
	// The session is kept open anyway: no ControlMaster, whose shared
	// connection would outlive the relay and hide a session's failure.
	sshArgs := []string{"-o", "BatchMode=yes", "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4", "-o", "ConnectTimeout=10", "-o", "ControlMaster=no", "-o", "ControlPath=none"}
	if *sshConfig != "" {
		sshArgs = append(sshArgs, "-F", *sshConfig)
	}
	if *sshKey != "" {
		sshArgs = append(sshArgs, "-i", *sshKey)
	}
	for _, o := range sshOpts {
		sshArgs = append(sshArgs, "-o", o)
	}
	box, err := relay.OpenOutbox(*outbox, proxies, logf)
	if err != nil {
		logf("error", "outbox: %v", err)
		return ExitSetup
	}
	defer box.Close()
	restart := make(chan struct{})
	go watchBinary(binaryCheck, restart, logf)
	quit := make(chan struct{})
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	go func() {
		<-sigs
		close(quit)
	}()
	err = relay.Run(relay.Config{
		Jail: j, Proxies: proxies, Outbox: box, Drain: *drain, Logf: logf, Quit: quit, Restart: restart,
		GroupAcks: *acks == "groups",
		Dial:      relay.SSHDialer(*ssh, sshArgs),
	}, stdin, stdout)
	if err != nil {
		logf("error", "%v", err)
		return ExitFirewall
	}
	return ExitOK
}

// binaryCheck is how often a relay looks whether its binary was
// replaced: an upgrade takes effect within this, without fail2ban's
// restart.
const binaryCheck = 10 * time.Second

// watchBinary closes replaced once the file at the relay's own path is
// no longer the binary it runs (a package upgrade renames a new one over
// it): the relay then ends, and the action starts the new binary.
func watchBinary(every time.Duration, replaced chan<- struct{}, logf func(level, format string, a ...any)) {
	var running syscall.Stat_t
	if err := syscall.Stat("/proc/self/exe", &running); err != nil {
		return
	}
	path, err := os.Readlink("/proc/self/exe")
	if err != nil || strings.HasSuffix(path, " (deleted)") {
		return
	}
	for range time.Tick(every) {
		var now syscall.Stat_t
		if syscall.Stat(path, &now) != nil {
			// Mid-upgrade: the new file is not there yet.
			continue
		}
		if now.Ino != running.Ino || now.Dev != running.Dev {
			logf("info", "the f2b-shim binary %s was replaced (an upgrade): this relay ends, and the action starts the new one, which goes on from the outbox", path)
			close(replaced)
			return
		}
	}
}
