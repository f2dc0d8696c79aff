#!/usr/bin/env bash
# Benchmark: builds the release proxy and the load generator (examples/loadgen.rs), then measures
# handshakes/s and set-up latency, the SMTP leg overlap, throughput and memory per idle
# connection, all on 127.0.0.1 against a local TLS 1.2 upstream, and prints a Markdown report.
# A copy goes to $TARGET/bench/latest.md (and latest.json).
#
#   scripts/bench.sh                      # the full run: about 2-3 minutes on 2 cores
#   scripts/bench.sh --duration 3 --idle 500 --scenarios handshake,idle
#   scripts/bench.sh --help               # the load generator's options
#
# Nothing listens on or connects to anything but loopback. The proxy runs as a child process
# of the load generator and is killed when it exits (also on errors, Ctrl-C and SIGTERM).
set -euo pipefail
cd "$(dirname "$0")/.."

target=${CARGO_TARGET_DIR:-target}
loadgen="$target/release/examples/loadgen"

if [ "${1:-}" = --help ] || [ "${1:-}" = -h ]; then
  cargo build --quiet --release --locked --bin tlsbridge --example loadgen
  exec "$loadgen" --help
fi

# Idle connections take two descriptors each in the load generator and two in the proxy: raise
# the soft limit to the hard one (at most 65536). The proxy inherits it.
hard=$(ulimit -Hn)
want=65536
if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then
  want=$hard
fi
ulimit -n "$want" 2>/dev/null || echo "bench.sh: could not raise ulimit -n; it stays $(ulimit -n)" >&2

echo "bench.sh: cargo build --release --bin tlsbridge --example loadgen" >&2
cargo build --quiet --release --locked --bin tlsbridge --example loadgen

mkdir -p "$target/bench"
revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if ! git diff --quiet HEAD 2>/dev/null; then
  revision="$revision with uncommitted changes"
fi
command="scripts/bench.sh${*:+ $*}"

"$loadgen" --proxy-bin "$target/release/tlsbridge" --json "$target/bench/latest.json" \
  --command-line "$command (tlsbridge $revision; ulimit -n $(ulimit -n))" "$@" \
  | tee "$target/bench/latest.md"
