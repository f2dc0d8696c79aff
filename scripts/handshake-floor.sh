#!/usr/bin/env bash
# What a TLS 1.0 device handshake costs on this machine before any proxying: nginx (stream
# module) terminates the benchmark's handshakes (ECDHE-RSA-AES128-SHA, RSA-2048, no session
# reuse) and answers with a fixed string, with no upstream leg, no log and no relay. Its CPU per
# handshake is the floor under any OpenSSL-based proxy doing this job; `openssl speed` adds the
# signature and the key exchange alone. nginx is pinned to CPU 0 and `openssl s_time` to CPU 1,
# as in scripts/bench.sh. Everything on 127.0.0.1.
#
#   scripts/handshake-floor.sh            # 3 runs of 6 s, about 30 s
#   RUNS=5 SECONDS_PER_RUN=10 scripts/handshake-floor.sh
set -euo pipefail

runs=${RUNS:-3}
seconds=${SECONDS_PER_RUN:-6}
module=/usr/lib/nginx/modules/ngx_stream_module.so
command -v nginx >/dev/null || { echo "handshake-floor.sh: nginx is not installed" >&2; exit 1; }
[ -e "$module" ] || { echo "handshake-floor.sh: $module is missing (libnginx-mod-stream)" >&2; exit 1; }

dir=$(mktemp -d "${TMPDIR:-/tmp}/tlsbridge-floor.XXXXXX")
nginx_pid=
cleanup() {
  [ -n "$nginx_pid" ] && kill "$nginx_pid" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

openssl req -x509 -newkey rsa:2048 -nodes -keyout "$dir/key.pem" -out "$dir/cert.pem" \
  -days 2 -subj /CN=floor.test 2>/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$dir/nginx.conf" <<EOF
load_module $module;
worker_processes 1; daemon off; master_process off;
pid $dir/nginx.pid; error_log $dir/error.log warn;
events { worker_connections 4096; }
stream {
  server {
    listen 127.0.0.1:$port ssl;
    ssl_certificate $dir/cert.pem; ssl_certificate_key $dir/key.pem;
    ssl_protocols TLSv1 TLSv1.1 TLSv1.2; ssl_ciphers DEFAULT:@SECLEVEL=0;
    return "ok\n";
  }
}
EOF

cpu0=() cpu1=()
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
  cpu0=(taskset -c 0) cpu1=(taskset -c 1)
fi
"${cpu0[@]}" nginx -c "$dir/nginx.conf" -p "$dir" &
nginx_pid=$!
for _ in $(seq 50); do
  (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done

ticks() { awk '{print $14 + $15}' "/proc/$nginx_pid/stat"; }
hz=$(getconf CLK_TCK)
echo "nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'), $(openssl version), $(nproc) CPUs"
echo "nginx terminating TLS 1.0 ECDHE-RSA-AES128-SHA (RSA-2048), no upstream, $seconds s per run:"
for run in $(seq "$runs"); do
  before=$(ticks)
  handshakes=$("${cpu1[@]}" openssl s_time -connect "127.0.0.1:$port" -new -time "$seconds" \
    -tls1 -cipher 'ECDHE-RSA-AES128-SHA:@SECLEVEL=0' 2>/dev/null |
    awk '/connections in .*s;/ { print $1; exit }')
  after=$(ticks)
  awk -v t=$((after - before)) -v n="$handshakes" -v hz="$hz" -v run="$run" \
    'BEGIN { printf "  run %d: %.3f ms CPU per handshake (%d handshakes)\n", run, t * 1000 / hz / n, n }'
done
echo "openssl speed, the same CPU:"
"${cpu0[@]}" openssl speed -seconds 2 rsa2048 2>/dev/null |
  awk '/^rsa 2048/ { printf "  RSA-2048 signature: %.3f ms\n", $4 * 1000 }'
"${cpu0[@]}" openssl speed -seconds 2 ecdhx25519 2>/dev/null |
  awk '/X25519/ { printf "  X25519 key agreement: %.3f ms (key generation comes on top)\n", 1000 / $NF }'
