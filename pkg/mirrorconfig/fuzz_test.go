package mirrorconfig

import (
	"bytes"
	"testing"
)

// FuzzParse holds Parse, which every agent runs on the ConfigMap the controller writes, to: no
// panic; a document it accepts has a non-empty host at most once per registry; and it survives the
// trip the controller and the agents make with it, Marshal then Parse, with the same Hash (what
// agents report as applied) and the same bytes on a second trip.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"",
		"registries: []",
		"registries: null",
		"registries: [{host: a.test, imageSource: one, endpoint: 'http://127.0.0.1:5000'}]",
		`{"registries":[{"host":"docker.io","imageSource":"hub","credentialsSecret":"hub-creds","peersResolveTags":true,"prefetch":["docker.io/library/alpine:3.20"]}]}`,
		`registries:
- host: registry.example.org
  imageSource: images
  sources:
  - {type: IPFS, root: images.example.org, endpoint: 'http://127.0.0.1:5001'}
  - {type: Storj, bucket: images, prefix: registry, accessSecret: storj}
  nodeSelector:
    matchLabels: {pool: gpu}
    matchExpressions:
    - {key: zone, operator: In, values: [a, b]}
`,
		"registries: [{host: a.test, imageSource: x, nodeSelector: {}}]",
		"registries: [{host: a.test, imageSource: x, nodeSelector: {matchLabels: {}}, sources: [], prefetch: []}]",
		// Scalars YAML would read as something else.
		"registries: [{host: 'null', imageSource: '~', endpoint: 'yes', prefetch: ['0x10', '1e3', 'true', '']}]",
		"registries: [{host: \"\\xe9\", imageSource: \"\\ud800\"}]",
		"registries: [{host: \"a\\u0000b\", imageSource: \"\\t\\n\"}]",
		"registries: [{host: \"a\\u0080b\", imageSource: x}]",                                // a control character YAML cannot write
		"registries: [{host: \"\\xe9\", imageSource: x}, {host: \"\\xe8\", imageSource: y}]", // one host once invalid UTF-8 is replaced
		// Invalid ones.
		"registries: [{host: a.test, imageSource: x, mirrorOf: y}]",
		"registries: [{host: a.test, imageSource: x}, {host: a.test, imageSource: y}]",
		"registries: [{imageSource: x}]",
		"registries: [{host: a.test, host: b.test}]",
		"registries: {host: a.test}",
		"registries: [{host: [a]}]",
		"registries: [{host: a.test, peersResolveTags: maybe}]",
		"a: &a [*a]",
		"base: &b {host: a.test, imageSource: x}\nregistries: [*b]",
		"registries: [{<<: {host: a.test}, imageSource: x}]",
		"registries: [!!binary aGVsbG8=]",
		"registries:\n\t- host: a.test",
		"--- \n---\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		doc, err := Parse(b)
		if err != nil {
			return
		}
		seen := map[string]bool{}
		for _, r := range doc.Registries {
			if r.Host == "" || seen[r.Host] {
				t.Fatalf("Parse accepted registry host %q empty or twice:\n%s", r.Host, b)
			}
			seen[r.Host] = true
		}
		out, err := doc.Marshal()
		if err != nil {
			t.Fatalf("Marshal of a parsed document: %v\n%s", err, b)
		}
		back, err := Parse(out)
		if err != nil {
			t.Fatalf("Parse of its own Marshal: %v\ninput:\n%s\nmarshaled:\n%s", err, b, out)
		}
		if back.Hash() != doc.Hash() {
			t.Fatalf("hash changed over Marshal and Parse: %s, then %s\ninput:\n%s\nmarshaled:\n%s", doc.Hash(), back.Hash(), b, out)
		}
		again, err := back.Marshal()
		if err != nil || !bytes.Equal(again, out) {
			t.Fatalf("second Marshal differs (%v):\n%s\nthen:\n%s", err, out, again)
		}
	})
}
