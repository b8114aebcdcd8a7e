// Package hostile loads the adversarial corpus, corpus.txt: command lines
// a compromised mail host might send, grouped by category. The policy
// package's tests, its fuzz seeds and the namespace test all use it.
package hostile

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
)

// Entry is one hostile command line and the category it belongs to.
type Entry struct {
	Category string
	Line     string
	// Lineno is its line in corpus.txt, for messages.
	Lineno int
}

// Load reads corpus.txt.
func Load() ([]Entry, error) {
	_, self, _, _ := runtime.Caller(0)
	path := filepath.Join(filepath.Dir(self), "corpus.txt")
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []Entry
	category := ""
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		text := sc.Text()
		switch {
		case strings.HasPrefix(text, "## "):
			category = strings.TrimPrefix(text, "## ")
		case text == "" || strings.HasPrefix(text, "#"):
		default:
			line, err := strconv.Unquote(text)
			if err != nil {
				return nil, fmt.Errorf("%s:%d: not a Go string literal: %v", path, n, err)
			}
			out = append(out, Entry{Category: category, Line: line, Lineno: n})
		}
	}
	return out, sc.Err()
}
