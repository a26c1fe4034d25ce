package mirrorconfig

import (
	"strings"
	"testing"
)

func TestParseAndHash(t *testing.T) {
	doc := Document{Registries: []Registry{{Host: "a.test", ImageSource: "one", Endpoint: "http://127.0.0.1:5000"}}}
	b, err := doc.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	back, err := Parse(b)
	if err != nil || back.Hash() != doc.Hash() {
		t.Fatalf("round trip: %v, hash %s vs %s", err, back.Hash(), doc.Hash())
	}
	changed := doc
	changed.Registries = []Registry{{Host: "a.test", ImageSource: "one", Endpoint: "http://127.0.0.1:5001"}}
	if changed.Hash() == doc.Hash() {
		t.Fatal("a changed document has the same hash")
	}
	if empty, err := Parse(nil); err != nil || len(empty.Registries) != 0 {
		t.Fatalf("empty ConfigMap: %v", err)
	}
	for name, body := range map[string]string{
		"unknown field": "registries: [{host: a.test, imageSource: x, mirrorOf: y}]",
		"twice":         "registries: [{host: a.test, imageSource: x}, {host: a.test, imageSource: y}]",
		"no host":       "registries: [{imageSource: x}]",
	} {
		if _, err := Parse([]byte(body)); err == nil || !strings.Contains(err.Error(), "mirror configuration") {
			t.Errorf("%s: %v", name, err)
		}
	}
}
