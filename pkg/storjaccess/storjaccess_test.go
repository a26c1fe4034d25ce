package storjaccess

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A garbage grant is an error that says where it came from and never quotes it.
func TestLoadRefusesGarbage(t *testing.T) {
	file := filepath.Join(t.TempDir(), "access")
	if err := os.WriteFile(file, []byte("SECRET-garbage\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv(Env, "SECRET-from-env")
	for _, tc := range []struct{ inline, file, from string }{
		{"SECRET-inline", file, "the access parameter"},
		{"", file, "access grant file " + file},
		{"", "", "$" + Env},
	} {
		_, err := Load(tc.inline, tc.file)
		if err == nil || !strings.Contains(err.Error(), tc.from+" does not hold a valid access grant") || strings.Contains(err.Error(), "SECRET") {
			t.Errorf("Load(%q, %q) = %v; want an error naming %q and quoting nothing", tc.inline, tc.file, err, tc.from)
		}
	}
	if _, err := Parse(" SECRET-garbage "); err == nil || !strings.Contains(err.Error(), "not valid") || strings.Contains(err.Error(), "SECRET") {
		t.Errorf("Parse = %v; want an error quoting nothing", err)
	}
}

func TestLoadNothing(t *testing.T) {
	t.Setenv(Env, "")
	if _, err := Load("", ""); err == nil || !strings.Contains(err.Error(), "no access grant") {
		t.Errorf("Load = %v; want no access grant", err)
	}
	if _, err := Load("", filepath.Join(t.TempDir(), "missing")); err == nil || !strings.Contains(err.Error(), "read access grant") {
		t.Errorf("Load = %v; want a read error", err)
	}
}
