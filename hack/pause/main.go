// Command pause is the sandbox (pause) container of the test cluster that hack/cluster.sh brings up:
// it holds a pod's namespaces and does nothing until it is told to stop. The machines the tests run
// on cannot pull registry.k8s.io/pause, so the cluster builds this one and serves it under that name
// from its own registry. Workload pods of the tests run it too, as a command that stays Running.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	// As PID 1 of a pod that shares its process namespace, reap the children that others leave.
	signal.Ignore(syscall.SIGCHLD)
	s := <-sig
	fmt.Fprintf(os.Stderr, "pause: %s, exiting\n", s)
}
