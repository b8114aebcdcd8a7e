package audit

import (
	"bytes"
	"log/syslog"
)

// SendSyslog sends the record to syslog (journald reads the same socket)
// with the identifier f2b-shim and the facility authpriv: warning for
// denials and failures, info for the rest. network and addr are those of
// syslog.Dial; empty ones mean the local syslog socket.
func SendSyslog(network, addr string, r Record) error {
	w, err := syslog.Dial(network, addr, syslog.LOG_AUTHPRIV|syslog.LOG_INFO, "f2b-shim")
	if err != nil {
		return err
	}
	defer w.Close()
	line, err := r.Line()
	if err != nil {
		return err
	}
	msg := string(bytes.TrimSuffix(line, []byte("\n")))
	if r.Decision == Deny || r.Result == "failed" {
		return w.Warning(msg)
	}
	return w.Info(msg)
}
