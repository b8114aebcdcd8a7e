package cli

import (
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"unicode"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f2b-shim/f2b-shim/policy"
)

// TestDocsNameEveryPolicyKeyAndExitCode keeps the reference page, the man
// page and the usage text true to the code: every policy key and every exit
// code must be documented in each. The README only leads the way in; the
// reference lives in docs/reference.md.
func TestDocsNameEveryPolicyKeyAndExitCode(t *testing.T) {
	keys := []string{"never_ban", "lock_timeout", "hook_ports", "nat64_prefixes", "max_ban_time", "stream_idle_timeout"} // decoded as text, see policy.Parse
	typ := reflect.TypeOf(policy.Policy{})
	for i := range typ.NumField() {
		if k := typ.Field(i).Tag.Get("toml"); k != "" && k != "-" {
			keys = append(keys, k)
		}
	}
	require.Len(t, keys, 29)
	codes := []int{ExitOK, ExitCheckFalse, ExitUsage, ExitDenied, ExitFirewall, ExitSetup}
	for _, doc := range []string{referencePage, "../../docs/f2b-shim.8", "../../examples/policy.toml"} {
		data, err := os.ReadFile(doc)
		require.NoError(t, err)
		text := string(data)
		for _, k := range keys {
			assert.True(t, strings.Contains(strings.ReplaceAll(text, `\-`, "-"), k), "%s does not document the policy key %q", doc, k)
		}
	}
	for _, doc := range []string{referencePage, "../../docs/f2b-shim.8"} {
		data, err := os.ReadFile(doc)
		require.NoError(t, err)
		for _, c := range codes {
			var marker string
			if strings.HasSuffix(doc, ".8") {
				marker = ".B " + strconv.Itoa(c) + "\n"
			} else {
				marker = "| " + strconv.Itoa(c) + " |"
			}
			assert.True(t, strings.Contains(string(data), marker), "%s does not document exit code %d", doc, c)
		}
	}
	for _, c := range codes {
		assert.True(t, strings.Contains(usage, "  "+strconv.Itoa(c)+" "), "usage does not document exit code %d", c)
	}
	for _, sub := range subcommands {
		assert.True(t, strings.Contains(usage, "f2b-shim "+sub+" "), "usage does not document %q", sub)
		for _, doc := range []string{referencePage, "../../docs/f2b-shim.8"} {
			data, err := os.ReadFile(doc)
			require.NoError(t, err)
			assert.True(t, strings.Contains(strings.ReplaceAll(string(data), `\-`, "-"), "f2b-shim "+sub), "%s does not document the subcommand %q", doc, sub)
		}
	}
}

// referencePage is where the policy keys, the exit codes and the
// subcommands are documented in full.
const referencePage = "../../docs/reference.md"

// subcommands are the admin subcommands, each of which the reference page,
// the man page and the usage text name.
var subcommands = []string{"check", "restore", "list", "reconcile", "audit", "expire", "ban", "unban", "prune", "metrics", "status", "relay", "outbox"}

// TestDocsLinksResolve checks that every relative link in the README and
// in docs/*.md names a file of the repository and, with a #fragment, a
// heading of that file: pages move, and a link into a moved section is
// the first thing a reader trips over.
func TestDocsLinksResolve(t *testing.T) {
	docs, err := filepath.Glob("../../docs/*.md")
	require.NoError(t, err)
	docs = append([]string{"../../README.md"}, docs...)
	require.GreaterOrEqual(t, len(docs), 6, "the README and the pages of docs/")
	for _, doc := range docs {
		t.Run(filepath.Base(doc)+" links only to what exists", func(t *testing.T) {
			assert.Empty(t, brokenLinks(t, doc))
		})
	}
}

// TestBrokenLinksFindsWhatIsMissing shows that the link check can fail:
// each case is a page with one link, broken or not.
func TestBrokenLinksFindsWhatIsMissing(t *testing.T) {
	for _, tc := range []struct {
		name, link string
		broken     bool
	}{
		{"a link to a file that exists resolves", "other.md", false},
		{"a link to a heading of another page resolves", "other.md#the-plain-action-proxy-iptablesconf", false},
		{"a link to a heading of its own page resolves", "#one-proxy-several-mail-hosts", false},
		{"a link to a directory resolves", "sub/", false},
		{"an absolute URL is not checked", "https://example.org/nowhere", false},
		{"a link to a missing file is broken", "gone.md", true},
		{"a link to a missing heading is broken", "other.md#gone", true},
		{"a link to a missing heading of its own page is broken", "#gone", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			require.NoError(t, os.Mkdir(filepath.Join(dir, "sub"), 0o755))
			require.NoError(t, os.WriteFile(filepath.Join(dir, "other.md"), []byte("# Other\n\n## The plain action: `proxy-iptables.conf`\n"), 0o644))
			page := "# Page\n\n## One proxy, several mail hosts\n\nSee [there](" + tc.link + ").\n\n```\n[not a link](inside-a-code-block.md)\n```\n"
			require.NoError(t, os.WriteFile(filepath.Join(dir, "page.md"), []byte(page), 0o644))
			broken := brokenLinks(t, filepath.Join(dir, "page.md"))
			if tc.broken {
				assert.Equal(t, []string{tc.link}, broken)
			} else {
				assert.Empty(t, broken)
			}
		})
	}
}

// markdownLink matches an inline link's target: [text](target).
var markdownLink = regexp.MustCompile(`\]\(([^)\s]+)\)`)

// brokenLinks returns the relative links of the Markdown file doc, outside
// code blocks, whose file or heading does not exist.
func brokenLinks(t *testing.T, doc string) []string {
	t.Helper()
	data, err := os.ReadFile(doc)
	require.NoError(t, err)
	var broken []string
	inCode := false
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "```") {
			inCode = !inCode
			continue
		}
		if inCode {
			continue
		}
		for _, m := range markdownLink.FindAllStringSubmatch(line, -1) {
			link := m[1]
			if strings.Contains(link, "://") || strings.HasPrefix(link, "mailto:") {
				continue
			}
			file, fragment, _ := strings.Cut(link, "#")
			target := doc
			if file != "" {
				target = filepath.Join(filepath.Dir(doc), file)
			}
			info, err := os.Stat(target)
			if err != nil {
				broken = append(broken, link)
				continue
			}
			if fragment != "" && (info.IsDir() || !slices.Contains(headingAnchors(t, target), fragment)) {
				broken = append(broken, link)
			}
		}
	}
	return broken
}

// headingAnchors returns the anchors GitHub gives the headings of a
// Markdown file: lower case, punctuation dropped, spaces as hyphens, and
// "-N" after a repeated one.
func headingAnchors(t *testing.T, file string) []string {
	t.Helper()
	data, err := os.ReadFile(file)
	require.NoError(t, err)
	var anchors []string
	seen := map[string]int{}
	inCode := false
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "```") {
			inCode = !inCode
		}
		if inCode || !strings.HasPrefix(line, "#") {
			continue
		}
		heading := strings.TrimSpace(strings.TrimLeft(line, "#"))
		var b strings.Builder
		for _, r := range strings.ToLower(heading) {
			switch {
			case unicode.IsLetter(r) || unicode.IsDigit(r) || r == '-' || r == '_':
				b.WriteRune(r)
			case r == ' ':
				b.WriteRune('-')
			}
		}
		anchor := b.String()
		if n := seen[anchor]; n > 0 {
			anchors = append(anchors, anchor+"-"+strconv.Itoa(n))
		} else {
			anchors = append(anchors, anchor)
		}
		seen[anchor]++
	}
	return anchors
}
