// Package storjaccess reads Storj access grants, with storj.io/uplink alone: the agent, the Storj
// source, the controller and the storage driver share it, so that reading a grant does not link
// distribution's storage drivers into the binaries that only read from Storj.
//
// A grant is a secret: no error of this package quotes it, or any part of it.
package storjaccess

import (
	"fmt"
	"os"
	"strings"

	"storj.io/uplink"
)

// Env is the environment variable a serialized access grant is read from when nothing else names one.
const Env = "STORJ_ACCESS"

// Parse parses a serialized grant; surrounding white space (a file's newline) is ignored.
func Parse(serialized string) (*uplink.Access, error) {
	access, err := uplink.ParseAccess(strings.TrimSpace(serialized))
	if err != nil {
		// uplink's message names no part of the grant.
		return nil, fmt.Errorf("the access grant is not valid: %w", err)
	}
	return access, nil
}

// Load reads a grant given inline, else from file, else from $STORJ_ACCESS, in that order. Its
// errors say where the grant came from.
func Load(inline, file string) (*uplink.Access, error) {
	serialized, from := inline, "the access parameter"
	if serialized == "" && file != "" {
		b, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("read access grant: %w", err)
		}
		serialized, from = string(b), "access grant file "+file
	}
	if serialized == "" {
		serialized, from = os.Getenv(Env), "$"+Env
	}
	serialized = strings.TrimSpace(serialized)
	if serialized == "" {
		return nil, fmt.Errorf("no access grant: give one in a file (accessfile, --storj-access-file) or in $%s", Env)
	}
	access, err := uplink.ParseAccess(serialized)
	if err != nil {
		return nil, fmt.Errorf("%s does not hold a valid access grant: %w", from, err)
	}
	return access, nil
}
