package main

import (
	"os"
	"path/filepath"
	"testing"
)

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
	good := filepath.Join(dir, "secret")
	os.WriteFile(good, []byte("shared-by-every-gateway-replica\n"), 0o600)
	if s, err := uploadSecret(good); err != nil || s != "shared-by-every-gateway-replica" {
		t.Fatalf("secret from a file: %q %v", s, err)
	}
	short := filepath.Join(dir, "short")
	os.WriteFile(short, []byte("123\n"), 0o600)
	if _, err := uploadSecret(short); err == nil {
		t.Fatal("a 3-character secret was accepted")
	}
	if _, err := uploadSecret(filepath.Join(dir, "missing")); err == nil {
		t.Fatal("a missing secret file was accepted")
	}
}
