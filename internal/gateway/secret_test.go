package gateway

import (
	"os"
	"path/filepath"
	"testing"
)

// The upload secret comes from the operator's file, trimmed, and at least MinUploadSecretLength long;
// without a file it is 32 random bytes, different in every process.
func TestUploadSecret(t *testing.T) {
	a, err := uploadSecret("")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := uploadSecret("")
	if len(a) != 64 || a == b {
		t.Fatalf("random secrets %q and %q: want 64 hex characters, different each time", a, b)
	}
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	if s, err := uploadSecret(write("secret", "shared-by-every-gateway-replica\n")); err != nil || s != "shared-by-every-gateway-replica" {
		t.Fatalf("secret from a file: %q %v", s, err)
	}
	if s, err := uploadSecret(write("sixteen", "  0123456789abcdef\n")); err != nil || s != "0123456789abcdef" {
		t.Fatalf("a 16-character secret: %q %v", s, err)
	}
	for name, content := range map[string]string{"short": "123\n", "fifteen": "0123456789abcde", "blank": " \n\t\n"} {
		if _, err := uploadSecret(write(name, content)); err == nil {
			t.Errorf("secret file %s (%q) was accepted", name, content)
		}
	}
	if _, err := uploadSecret(filepath.Join(dir, "missing")); err == nil {
		t.Fatal("a missing secret file was accepted")
	}
}
