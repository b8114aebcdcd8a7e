package relay

import (
	"fmt"
	"strings"
	"unicode/utf8"
)

// Printable escapes every byte of s that a terminal, a log or a
// line-based reader could act on: C0 and C1 controls (a carriage return
// ends a line for the action, which reads the relay with Python's
// universal newlines), DEL, the Unicode line and paragraph separators,
// and bytes that are not UTF-8. What a proxy answers, what ssh says and
// the names found in an outbox directory go through it before they reach
// fail2ban's log or the admin's terminal, so none can forge a line.
func Printable(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			fmt.Fprintf(&b, `\x%02x`, s[i])
		case r < 0x20 || r >= 0x7f && r <= 0x9f || r == 0x2028 || r == 0x2029:
			fmt.Fprintf(&b, `\u%04x`, r)
		default:
			b.WriteString(s[i : i+size])
		}
		i += size
	}
	return b.String()
}
