package audit

import (
	"strconv"
	"unicode/utf8"
)

// Text is a string from an untrusted source. It marshals to a JSON string
// in which every byte that a terminal, a log viewer or a line-based tool
// could act on is escaped: C0 and C1 controls, DEL, the Unicode line and
// paragraph separators, quotes and backslashes. Bytes that are not UTF-8
// become U+FFFD; Record.CommandB64 keeps the original bytes.
type Text string

// MarshalJSON implements json.Marshaler.
func (t Text) MarshalJSON() ([]byte, error) {
	out := make([]byte, 0, len(t)+2)
	out = append(out, '"')
	s := string(t)
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		i += size
		switch {
		case r == utf8.RuneError && size == 1:
			out = append(out, `\ufffd`...)
		case r == '"':
			out = append(out, `\"`...)
		case r == '\\':
			out = append(out, `\\`...)
		case needsEscape(r):
			out = append(out, `\u`...)
			hex := strconv.FormatInt(int64(r), 16)
			for range 4 - len(hex) {
				out = append(out, '0')
			}
			out = append(out, hex...)
		default:
			out = utf8.AppendRune(out, r)
		}
	}
	return append(out, '"'), nil
}

func needsEscape(r rune) bool {
	return r < 0x20 || (r >= 0x7f && r <= 0x9f) || r == 0x2028 || r == 0x2029
}

func validText(s string) bool { return utf8.ValidString(s) }
