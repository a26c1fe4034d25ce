#!/usr/bin/env bash
# Runs the benchmarks: each measures the agent and its reference side by side in one run and reports
# the ratio (see test/e2e/bench_test.go). Output: go test's benchmark lines, benchstat-compatible.
set -euo pipefail
cd "$(dirname "$0")/.."
export IMAGEMESH_TOOLS=${IMAGEMESH_TOOLS:-$(hack/test-deps.sh)}
# The cluster simulation is skipped: it runs for many minutes and has a target of its own (make bench-sim).
exec go test ./test/e2e ./pkg/peering -run '^$' -bench "${BENCH:-.}" -skip "${SKIP:-^BenchmarkCluster$}" -benchtime 1x -timeout 30m "$@"
