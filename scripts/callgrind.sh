#!/usr/bin/env bash
# Instruction counts of the release proxy under callgrind: a regression guard that, unlike a
# timing, repeats on a busy machine (within about 1%). Prints instructions per TLS 1.0 device
# session (ECDHE-RSA-AES128-SHA handshake, a 32-byte echo, clean close; the upstream leg
# resumed) and per MiB relayed each way, with the start-up baseline subtracted:
#
#   per session  = (Ir[1 + N sessions] - Ir[1 session]) / N
#   per MiB      = (Ir[1 session + 1 connection moving M MiB] - Ir[1 session] - per session) / M
#
# The loadgen (examples/loadgen/) runs the upstreams and the devices outside valgrind; only the
# proxy is counted. Everything on 127.0.0.1.
#
#   scripts/callgrind.sh                  # N=100 sessions, M=32 MiB: about 2 minutes
#   SESSIONS=20 MIB=8 scripts/callgrind.sh
#   KEEP=1 scripts/callgrind.sh           # keep the callgrind.out files (callgrind_annotate)
#   PROXY_BIN=path/to/tlsbridge scripts/callgrind.sh   # count another build of the proxy
set -euo pipefail
cd "$(dirname "$0")/.."

sessions=${SESSIONS:-100}
mib=${MIB:-32}
target=${CARGO_TARGET_DIR:-target}
loadgen="$target/release/examples/loadgen"
command -v valgrind >/dev/null || { echo "callgrind.sh: valgrind is not installed" >&2; exit 1; }

echo "callgrind.sh: cargo build --release --bin tlsbridge --example loadgen" >&2
if [ -n "${PROXY_BIN:-}" ]; then
  cargo build --quiet --release --locked --example loadgen
else
  cargo build --quiet --release --locked --bin tlsbridge --example loadgen
fi
proxy=${PROXY_BIN:-$target/release/tlsbridge}

out=$(mktemp -d "${TMPDIR:-/tmp}/tlsbridge-callgrind.XXXXXX")
if [ -z "${KEEP:-}" ]; then
  trap 'rm -rf "$out"' EXIT
fi

# One run: the proxy under callgrind doing a fixed amount of work; prints its total Ir.
count() {
  local name=$1
  shift
  "$loadgen" --proxy-bin "$proxy" --scenarios count \
    --proxy-wrapper "valgrind --tool=callgrind --callgrind-out-file=$out/$name.out" \
    "$@" >/dev/null 2>"$out/$name.log" || {
    echo "callgrind.sh: run $name failed:" >&2
    tail -20 "$out/$name.log" >&2
    exit 1
  }
  awk '/^(totals|summary):/ { print $2; exit }' "$out/$name.out"
}

base=$(count base --count-handshakes 0)
many=$(count sessions --count-handshakes "$sessions")
down=$(count down --count-handshakes 0 --count-mib "$mib" --count-direction down)
up=$(count up --count-handshakes 0 --count-mib "$mib" --count-direction up)

per_session=$(( (many - base) / sessions ))
per_mib_down=$(( (down - base - per_session) / mib ))
per_mib_up=$(( (up - base - per_session) / mib ))

printf '| measure (callgrind Ir, proxy process) | instructions |\n|---|--:|\n'
printf '| start-up, 1 session, shutdown (baseline) | %d |\n' "$base"
printf '| per TLS 1.0 device session (N=%d) | %d |\n' "$sessions" "$per_session"
printf '| per MiB relayed upstream -> device (M=%d) | %d |\n' "$mib" "$per_mib_down"
printf '| per MiB relayed device -> upstream (M=%d) | %d |\n' "$mib" "$per_mib_up"
printf '\n%s; %s (%s)\n' "$(valgrind --version)" "$proxy" \
  "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "${KEEP:-}" ]; then
  echo "callgrind.sh: kept $out (callgrind_annotate $out/sessions.out)" >&2
fi
