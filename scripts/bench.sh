#!/usr/bin/env bash
# Benchmark: builds the release proxy and the load generator (examples/loadgen/), then runs the
# same load against tlsbridge and, when installed, nginx (stream module), HAProxy and stunnel,
# each configured for the same job (TLS 1.0 devices in, verified TLS 1.2 out) and pinned to CPU 0,
# with the load generator and its rustls upstreams on CPU 1. It measures CPU ms per device
# handshake, MiB/s relayed over 4 connections, KiB RSS per idle relayed connection (2,000 open)
# and RSS before / at / 10 s after an 8,000-connection burst, and prints one Markdown table.
# A copy goes to $TARGET/bench/latest.md (and latest.json). All on 127.0.0.1.
#
#   scripts/bench.sh                      # the comparison: about 5 minutes on 2 cores
#   scripts/bench.sh --contenders nginx --burst 0 --duration 3      # a quicker look
#   scripts/bench.sh --scenarios handshake,smtp,throughput,idle     # tlsbridge alone, in detail
#   scripts/bench.sh --contenders-offer-tls13   # the others offer TLS 1.2 and 1.3 upstream too
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

# The machine's speed at the time, for comparing runs made at different times (a shared host
# can be 15 % slower one hour than the next): the cost of the signature every handshake makes.
if command -v openssl >/dev/null; then
  pin=()
  if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then pin=(taskset -c 0); fi
  "${pin[@]}" openssl speed -seconds 2 rsa2048 2>/dev/null |
    awk '/^rsa 2048/ { printf "- Machine speed after the run: one RSA-2048 signature took %.3f ms on CPU 0 (`openssl speed rsa2048`); scripts/handshake-floor.sh measures the device handshake alone.\n", $4 * 1000 }' |
    tee -a "$target/bench/latest.md"
fi
