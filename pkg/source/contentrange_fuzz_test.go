package source

import (
	"regexp"
	"strconv"
	"testing"
)

// contentRangeGrammar is RFC 9110's Content-Range for one satisfied byte range with a known length:
// "bytes" SP first-pos "-" last-pos "/" complete-length, digits only.
var contentRangeGrammar = regexp.MustCompile(`^bytes ([0-9]+)-([0-9]+)/([0-9]+)$`)

// FuzzParseContentRange holds parseContentRange, which reads the Content-Range of a registry's 206
// answer to a resumed blob fetch, to the grammar: it accepts exactly the well-formed ranges that lie
// within their object, and what it returns is what the header says.
func FuzzParseContentRange(f *testing.F) {
	for _, s := range []string{
		"bytes 0-0/1", "bytes 0-9/10", "bytes 5-9/10", "bytes 100-1048575/1048576",
		"bytes 9223372036854775806-9223372036854775806/9223372036854775807",
		"bytes 0-9/9",                    // past the end
		"bytes 9-5/10",                   // reversed
		"bytes -1-9/10",                  // negative
		"bytes 0-9/*",                    // unknown length
		"bytes */10",                     // unsatisfied
		"bytes 0-9/10 ",                  // trailing space
		"bytes 0-9/10, bytes 0-1/10",     // two ranges
		"bytes 0-9/10garbage",            // trailing junk
		"bytes +0-9/10",                  // a sign
		"bytes0-9/10",                    // no space
		"bytes  0-9/10",                  // two spaces
		"Bytes 0-9/10",                   // unit's case
		"bytes 0x0-0x9/0x10",             // not decimal
		"bytes 0-9/99999999999999999999", // overflow
		"bytes 0-9/1_0",
		"",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, h string) {
		start, total, err := parseContentRange(h)
		m := contentRangeGrammar.FindStringSubmatch(h)
		var first, last, length int64
		valid := m != nil
		if valid {
			var e1, e2, e3 error
			first, e1 = strconv.ParseInt(m[1], 10, 64)
			last, e2 = strconv.ParseInt(m[2], 10, 64)
			length, e3 = strconv.ParseInt(m[3], 10, 64)
			valid = e1 == nil && e2 == nil && e3 == nil && first <= last && last < length
		}
		switch {
		case err != nil && valid:
			t.Fatalf("parseContentRange(%q) = %v, want %d of %d", h, err, first, length)
		case err == nil && !valid:
			t.Fatalf("parseContentRange(%q) accepted a malformed or impossible range: start %d, total %d", h, start, total)
		case err == nil && (start != first || total != length):
			t.Fatalf("parseContentRange(%q) = %d of %d, want %d of %d", h, start, total, first, length)
		case err == nil && (start < 0 || start >= total):
			t.Fatalf("parseContentRange(%q) = start %d outside an object of %d bytes", h, start, total)
		}
	})
}
