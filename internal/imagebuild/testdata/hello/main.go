// Command hello stands in for imagemesh's commands in imagebuild's tests: small, and it links net,
// which is linked dynamically unless cgo is off.
package main

import (
	"net"
	"os"
)

func main() { os.Stdout.WriteString(net.JoinHostPort("hello", "5000") + "\n") }
