#!/usr/bin/env bash
# The container image, built and run by a real Docker engine.
#
# 1. Installs docker.io, debootstrap and docker-compose when missing (Debian packages).
# 2. Starts a private dockerd (vfs storage, no bridge, no iptables) whose data root is kept in
#    $TLSBRIDGE_DOCKER_CACHE (default /var/tmp/tlsbridge-docker), so base images and the build
#    cache survive between runs. vfs stores every layer in full (a builder-stage layer is about
#    1.1 GB), so when the data root grows past $TLSBRIDGE_DOCKER_CACHE_GB (default 4) the
#    build-stage snapshots are pruned; the base images and the cargo cache mounts (registry,
#    target/) are kept, about 2 GB.
#    The daemon is stopped when the script ends.
# 3. Makes local stand-ins for the two base images, under exactly the names the Dockerfile uses
#    (no image registry is needed), unless they exist already:
#      rust:1-bookworm                         debootstrap'd bookworm + build-essential,
#                                              pkg-config, perl, this host's CA bundle and its
#                                              Rust stable toolchain
#      gcr.io/distroless/cc-debian12:nonroot   libc6, libgcc-s1, CA certificates, base-files,
#                                              user nonroot (65532), no shell
# 4. Builds the real Dockerfile: `docker build .` and `--build-arg FEATURES=legacy-ciphers`.
# 5. Runs the images as the README says (host network, ports set through the environment) and
#    the compose example (deploy/compose) against a local TLS 1.2-only upstream, printing one
#    PASS or FAIL line per check.
#
# Every listener is on 127.0.0.1, on ports the kernel picks. Needs root.
# Usage: scripts/container-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

cache="${TLSBRIDGE_DOCKER_CACHE:-/var/tmp/tlsbridge-docker}"
cache_gb="${TLSBRIDGE_DOCKER_CACHE_GB:-4}"
# Bump when the way the stand-in base images are made changes: they are rebuilt.
standin_recipe=1
# The Debian mirror for debootstrap: DEBIAN_MIRROR, else the first one this host's apt uses.
mirror="${DEBIAN_MIRROR:-$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
  /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v '^[[:space:]]*#' |
  grep -oE '(https?|file)://[^ ]+' | grep -v -- '-security' | head -n 1 || true)}"
image=tlsbridge:ci
legacy_image=tlsbridge:ci-legacy
docker=/usr/bin/docker

started=$(date +%s)
failures=0
exec 8>&1 # results go here even when a check's own output is redirected
say() { printf 'container-test: %s\n' "$*" >&8; }
pass() { printf 'container-test: PASS %s\n' "$*" >&8; }
fail() {
  printf 'container-test: FAIL %s\n' "$*" >&8
  failures=$((failures + 1))
}
# A failure that leaves nothing else worth checking.
die() {
  printf 'container-test: FAIL %s\n' "$*" >&8
  exit 1
}
elapsed() { echo "$(($(date +%s) - ${1:-$started}))s"; }
check() { # check NAME COMMAND...: PASS or FAIL by the command's status
  local name=$1
  shift
  if "$@"; then pass "$name"; else fail "$name"; fi
}

[ "$(id -u)" = 0 ] || die "needs root (dockerd, debootstrap, apt-get)"

# --- 1. Packages --------------------------------------------------------------------------------
export DEBIAN_FRONTEND=noninteractive
need=()
[ -x /usr/sbin/dockerd ] && [ -x /usr/bin/docker ] || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -x /usr/bin/docker-compose ] || need+=(docker-compose)
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
/usr/bin/python3 -c 'import yaml' 2>/dev/null || need+=(python3-yaml)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

mkdir -p "$cache"
exec 9>"$cache/lock"
flock -w 1800 9 || die "another run holds $cache/lock"

# The 3DES-only device client: nassl carries its own OpenSSL 1.0.2 with 3DES compiled in (Debian's
# OpenSSL clients have no 3DES), installed with pip into the cache, not into the system.
pylib="$cache/python"
if ! PYTHONPATH="$pylib" python3 -c 'import nassl.legacy_ssl_client' 2>/dev/null; then
  say "installing nassl (pip) into $pylib"
  python3 -m pip install -q --disable-pip-version-check --target "$pylib" nassl
fi

# --- 2. A private Docker engine -----------------------------------------------------------------
run=$(mktemp -d /tmp/tlsbridge-container-test.XXXXXX)
chmod 0755 "$run" # bind-mounted files must be readable by the image's user
dockerd_dir="$cache/engine"
sock="$dockerd_dir/docker.sock"
export DOCKER_HOST="unix://$sock"
export DOCKER_BUILDKIT=1 COMPOSE_DOCKER_CLI_BUILD=1
export PATH="/usr/bin:$PATH" # docker-compose calls `docker`: the 20.10 client, like the daemon
dockerd_pid=""
bg_pids=()

stop_dockerd() {
  local pid
  pid=$(cat "$dockerd_dir/dockerd.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ]; then
    kill -TERM "$pid"
    for _ in $(seq 1 300); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  # dockerd leaves its default network namespace mounted.
  if mountpoint -q "$dockerd_dir/exec/netns/default" 2>/dev/null; then
    umount "$dockerd_dir/exec/netns/default" || umount -l "$dockerd_dir/exec/netns/default" || true
  fi
  rm -f "$dockerd_dir/dockerd.pid"
}
# Unreferenced images, then the build cache above its bound. Docker's own accounting
# (--keep-storage) does not see vfs snapshot sizes: measure the data root.
prune_cache() {
  local used_gb
  $docker image prune -f >/dev/null 2>&1 || true
  used_gb=$(du -s --block-size=1G "$cache/data-root" | cut -f1)
  if [ "$used_gb" -gt "$cache_gb" ]; then
    $docker builder prune -af --filter type=regular >/dev/null 2>&1 || true
    say "data root ${used_gb} GB > ${cache_gb} GB: pruned the build-stage snapshots (base images and cargo cache mounts kept), now $(du -s --block-size=1G "$cache/data-root" | cut -f1) GB"
  fi
}
cleanup() {
  local rc=$?
  for pid in "${bg_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [ -S "$sock" ]; then
    $docker ps -aq --filter label=tlsbridge.test=1 | xargs -r $docker rm -f -v >/dev/null 2>&1 || true
    $docker volume ls -q --filter label=tlsbridge.test=1 | xargs -r $docker volume rm -f >/dev/null 2>&1 || true
    $docker volume rm -f tlsbridge-ci_certs tlsbridge-ci_state >/dev/null 2>&1 || true
    prune_cache
  fi
  stop_dockerd
  for dir in "$run"/rootfs-*; do
    if mountpoint -q "$dir/proc" 2>/dev/null; then umount "$dir/proc" || umount -l "$dir/proc" || true; fi
  done
  if ! grep -q " $run/" /proc/mounts; then rm -rf "$run"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$dockerd_dir/exec" "$cache/data-root"
stop_dockerd # a daemon left over by an interrupted run
# Its own containerd namespaces: it may share a system containerd with another dockerd.
/usr/sbin/dockerd --iptables=false --ip6tables=false --bridge=none --storage-driver=vfs \
  --containerd-namespace tlsbridge-ci --containerd-plugins-namespace tlsbridge-ci-plugins \
  --data-root "$cache/data-root" --exec-root "$dockerd_dir/exec" \
  --pidfile "$dockerd_dir/dockerd.pid" -H "$DOCKER_HOST" >"$dockerd_dir/dockerd.log" 2>&1 &
dockerd_pid=$!
for _ in $(seq 1 300); do
  $docker version >/dev/null 2>&1 && break
  kill -0 "$dockerd_pid" 2>/dev/null || { tail -n 20 "$dockerd_dir/dockerd.log"; die "dockerd did not start"; }
  sleep 0.1
done
$docker version >/dev/null 2>&1 || die "dockerd did not answer on $sock"
say "dockerd $($docker version -f '{{.Server.Version}}') on $sock (data root $cache/data-root)"

# --- 3. Stand-in base images --------------------------------------------------------------------
toolchain=$(ls -d "${RUSTUP_HOME:-$HOME/.rustup}"/toolchains/stable-* 2>/dev/null | head -n 1 || true)
[ -n "$toolchain" ] && [ -x "$toolchain/bin/cargo" ] || die "no Rust stable toolchain under ${RUSTUP_HOME:-$HOME/.rustup}/toolchains"
rust_version=$("$toolchain/bin/rustc" --version | awk '{print $2}')
standin_key="recipe $standin_recipe, rust $rust_version, $(sha256sum /etc/ssl/certs/ca-certificates.crt | cut -c1-16)"
label_of() { $docker image inspect -f '{{index .Config.Labels "tlsbridge.standin"}}' "$1" 2>/dev/null || true; }

make_standins() {
  local t0 root rt debs
  t0=$(date +%s)
  root="$run/rootfs-builder"
  rt="$run/rootfs-runtime"
  [ -n "$mirror" ] || die "no Debian mirror in /etc/apt/sources.list*: set DEBIAN_MIRROR"
  say "making the stand-in base images (rust $rust_version, Debian mirror $mirror)"
  debootstrap --variant=minbase bookworm "$root" "$mirror" >"$run/debootstrap.log" 2>&1 ||
    { tail -n 20 "$run/debootstrap.log"; die "debootstrap"; }
  mount -t proc proc "$root/proc"
  echo "deb $mirror bookworm main" >"$root/etc/apt/sources.list"
  chroot "$root" apt-get update -qq
  chroot "$root" apt-get install -y -qq --no-install-recommends \
    build-essential pkg-config perl make >"$run/apt.log" 2>&1 || { tail -n 20 "$run/apt.log"; die "apt-get install in the builder root"; }
  # The runtime image's packages, as distroless cc-debian12 has them.
  debs="$root/var/tmp/debs"
  mkdir -p "$debs"
  chroot "$root" sh -c 'cd /var/tmp/debs && apt-get download -qq libc6 libgcc-s1 ca-certificates base-files netbase tzdata' 2>/dev/null
  umount "$root/proc"
  mkdir -p "$rt"
  for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$rt"; done
  rm -rf "$debs"
  chroot "$root" apt-get clean
  rm -rf "$root"/var/lib/apt/lists/*

  # Builder: the host's CA bundle (cargo fetches crates through it) and the Rust toolchain,
  # laid out as the official image does (RUSTUP_HOME/CARGO_HOME under /usr/local).
  install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  local tc_dir="$root/usr/local/rustup/toolchains/$(basename "$toolchain")"
  mkdir -p "$tc_dir" "$root/usr/local/cargo/bin"
  tar -C "$toolchain" --exclude=./share/doc -cf - . | tar -C "$tc_dir" -xf -
  for tool in "$tc_dir"/bin/*; do
    ln -s "../../rustup/toolchains/$(basename "$toolchain")/bin/$(basename "$tool")" "$root/usr/local/cargo/bin/$(basename "$tool")"
  done
  tar -C "$root" --numeric-owner -cf - . | $docker import \
    --change 'ENV RUSTUP_HOME=/usr/local/rustup' \
    --change 'ENV CARGO_HOME=/usr/local/cargo' \
    --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "ENV RUST_VERSION=$rust_version" \
    --change "LABEL tlsbridge.standin=\"$standin_key\"" \
    - rust:1-bookworm >/dev/null
  rm -rf "$root"

  # Runtime: distroless's layout. No shell, no package manager.
  cat "$rt"/usr/share/ca-certificates/mozilla/*.crt >"$rt/etc/ssl/certs/ca-certificates.crt"
  printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' 'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
    'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$rt/etc/passwd"
  printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'tty:x:5:' 'staff:x:50:' 'nonroot:x:65532:' >"$rt/etc/group"
  install -d -m 0700 "$rt/root"
  install -d -m 0700 -o 65532 -g 65532 "$rt/home/nonroot"
  install -d -m 1777 "$rt/tmp"
  rm -rf "$rt/usr/share/doc" "$rt/usr/share/man" "$rt/usr/share/lintian" "$rt/usr/share/locale"
  [ ! -e "$rt/bin/sh" ] && [ ! -e "$rt/usr/bin/sh" ] || die "the runtime stand-in has a shell"
  tar -C "$rt" --numeric-owner -cf - . | $docker import \
    --change 'USER 65532' \
    --change 'WORKDIR /home/nonroot' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change "LABEL tlsbridge.standin=\"$standin_key\"" \
    - gcr.io/distroless/cc-debian12:nonroot >/dev/null
  rm -rf "$rt"
  say "stand-in base images made in $(elapsed "$t0")"
}

if [ "$(label_of rust:1-bookworm)" = "$standin_key" ] &&
  [ "$(label_of gcr.io/distroless/cc-debian12:nonroot)" = "$standin_key" ]; then
  say "reusing the stand-in base images ($standin_key)"
else
  make_standins
fi
check "stand-in base images rust:1-bookworm and gcr.io/distroless/cc-debian12:nonroot exist" \
  $docker image inspect rust:1-bookworm gcr.io/distroless/cc-debian12:nonroot >/dev/null


# --- 4. The real Dockerfile ---------------------------------------------------------------------
build() { # build TAG [docker build args...]
  local tag=$1 t0
  shift
  t0=$(date +%s)
  if $docker build --network host --progress plain -t "$tag" "$@" . >"$run/build-$tag.log" 2>&1; then
    pass "docker build${*:+ $*} . ($tag, $(elapsed "$t0"))"
  else
    tail -n 40 "$run/build-$tag.log"
    die "docker build${*:+ $*} . ($tag)"
  fi
}
build "$image"
build "$legacy_image" --build-arg FEATURES=legacy-ciphers
mb() { echo "$(($($docker image inspect -f '{{.Size}}' "$1") / 1000000)) MB"; }
say "image sizes: $image $(mb "$image"), $legacy_image $(mb "$legacy_image"); runtime base stand-in $(mb gcr.io/distroless/cc-debian12:nonroot)"
if [ "${CONTAINER_TEST_STOP_AFTER:-}" = build ]; then exit 0; fi

# --- 5. Running it ------------------------------------------------------------------------------
label=(--label tlsbridge.test=1)
# Test peers, written into the run directory.
cat >"$run/upstream.py" <<'PY'
# A TLS 1.2-only echo server (the stand-in for Microsoft 365): prints each upstream leg's TLS.
import socketserver, ssl, sys
cert, key, port_file = sys.argv[1:4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
ctx.load_cert_chain(cert, key)
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        try:
            tls = ctx.wrap_socket(self.request, server_side=True)
        except (ssl.SSLError, OSError) as err:
            print(f"upstream handshake failed: {err}", flush=True)
            return
        print(f"upstream leg {tls.version()} {tls.cipher()[0]}", flush=True)
        try:
            while data := tls.recv(65536):
                tls.sendall(data)
        except (ssl.SSLError, OSError):
            pass
        finally:
            tls.close()
class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
server = Server(("127.0.0.1", 0), Echo)
with open(port_file + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
import os; os.rename(port_file + ".tmp", port_file)
server.serve_forever()
PY
cat >"$run/device.py" <<'PY'
# A TLS 1.0 device (the host's OpenSSL): verifies the proxy against its CA, sends a line every
# 0.25 s for HOLD seconds and expects each one echoed; READY_FILE is written after the first.
import socket, ssl, sys, time
port, ca, hold = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
ready = sys.argv[4] if len(sys.argv) > 4 else None
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1
ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
ctx.load_verify_locations(ca)
raw = socket.create_connection(("127.0.0.1", port), timeout=20)
tls = ctx.wrap_socket(raw, server_hostname="localhost")
n, end = 0, time.monotonic() + hold
while True:
    msg = f"line {n}\n".encode()
    tls.sendall(msg)
    got = b""
    while len(got) < len(msg):
        chunk = tls.recv(len(msg) - len(got))
        if not chunk:
            sys.exit(f"session ended after {n} lines")
        got += chunk
    if got != msg:
        sys.exit(f"echo {got!r} != {msg!r}")
    n += 1
    if n == 1 and ready:
        open(ready, "w").write("1")
    if time.monotonic() >= end:
        break
    time.sleep(0.25)
print(f"{tls.version()} {tls.cipher()[0]}: {n} lines echoed")
tls.close()
PY
cat >"$run/des3.py" <<'PY'
# A device that offers only DES-CBC3-SHA over TLS 1.0 (nassl's own OpenSSL 1.0.2).
import socket, sys
from nassl.legacy_ssl_client import LegacySslClient
from nassl.ssl_client import OpenSslVersionEnum, OpenSslVerifyEnum
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=15)
client = LegacySslClient(underlying_socket=sock, ssl_version=OpenSslVersionEnum.TLSV1,
                         ssl_verify=OpenSslVerifyEnum.NONE)
client.set_cipher_list("DES-CBC3-SHA")
try:
    client.do_handshake()
except Exception as err:
    sys.exit(f"handshake failed: {err}")
client.write(b"3des line\n")
got = b""
while not got.endswith(b"\n"):
    got += client.read(1024)
print(f"TLSv1 {client.get_current_cipher_name()}: {got!r}")
client.shutdown()
sock.close()
PY

# The upstream's test CA and certificate (127.0.0.1), trusted by the proxy via extra_roots.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj '/CN=tlsbridge test upstream CA' \
  -keyout "$run/upstream-ca.key" -out "$run/upstream-ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj '/CN=127.0.0.1' \
  -keyout "$run/upstream.key" -out "$run/upstream.csr" 2>/dev/null
printf '%s\n' 'subjectAltName=IP:127.0.0.1,DNS:localhost' 'basicConstraints=CA:FALSE' \
  'extendedKeyUsage=serverAuth' >"$run/upstream.ext"
openssl x509 -req -days 2 -in "$run/upstream.csr" -CA "$run/upstream-ca.crt" -CAkey "$run/upstream-ca.key" \
  -CAcreateserial -extfile "$run/upstream.ext" -out "$run/upstream.crt" 2>/dev/null
chmod 0644 "$run/upstream-ca.crt"
python3 "$run/upstream.py" "$run/upstream.crt" "$run/upstream.key" "$run/upstream.port" >"$run/upstream.log" 2>&1 &
bg_pids+=($!)
for _ in $(seq 1 100); do [ -s "$run/upstream.port" ] && break; sleep 0.1; done
up_port=$(cat "$run/upstream.port")

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# logged CONTAINER PATTERN: the container's log has PATTERN within 5 s (tlsbridge writes its log
# lines in batches, at most 50 ms after they happen).
logged() {
  local i
  for i in $(seq 50); do
    $docker logs "$1" 2>&1 | grep -q -- "$2" && return 0
    sleep 0.1
  done
  return 1
}
route_env() { # route_env NAME LISTEN_PORT: a tcp route to the local upstream, as TLSBRIDGE__ROUTE
  printf '[{name="%s", listen="127.0.0.1:%s", protocol="tcp", device_tls="tls", upstream="127.0.0.1:%s", upstream_tls="tls"}]' "$1" "$2" "$up_port"
}
now_ms() { echo $(($(date +%s%N) / 1000000)); }
wait_ready() { # wait_ready ADMIN_PORT: prints ms until /readyz answered 200, or fails
  local t0 code
  t0=$(now_ms)
  for _ in $(seq 1 300); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/readyz" || true)
    if [ "$code" = 200 ]; then
      echo $(($(now_ms) - t0))
      return 0
    fi
    sleep 0.05
  done
  return 1
}
wait_healthy() { # wait_healthy CONTAINER: prints seconds until `healthy`
  local t0 status
  t0=$(date +%s)
  for _ in $(seq 1 120); do
    status=$($docker inspect -f '{{.State.Health.Status}}' "$1" 2>/dev/null || echo gone)
    case "$status" in
      healthy) echo $(($(date +%s) - t0)); return 0 ;;
      unhealthy | gone) return 1 ;;
    esac
    sleep 0.5
  done
  return 1
}
mountpoint_of() { $docker volume inspect -f '{{.Mountpoint}}' "$1"; }
s_client_session() { # s_client_session PORT CA [NAME]: a TLS 1.0 device session, openssl s_client
  local out name=${3:-localhost}
  out=$( (printf 'hello from a TLS 1.0 device\n'; sleep 2) |
    timeout 20 openssl s_client -connect "127.0.0.1:$1" -tls1 -cipher 'DEFAULT:@SECLEVEL=0' \
      -CAfile "$2" -verify_return_error -verify_hostname "$name" -servername "$name" 2>&1 || true)
  echo "$out" >"$run/s_client.log"
  echo "$out" | grep -Eq '^ *Protocol *: TLSv1$' &&
    echo "$out" | grep -q '^hello from a TLS 1.0 device$' &&
    echo "$out" | grep -q 'Verify return code: 0 (ok)'
}
inventory_connections() { # total connections recorded in a state volume's inventory.json
  /usr/bin/python3 -c '
import json, sys
def total(v):
    if isinstance(v, dict):
        return (v["connections"] if isinstance(v.get("connections"), int) else 0) + sum(total(x) for x in v.values() if isinstance(x, (dict, list)))
    if isinstance(v, list):
        return sum(total(x) for x in v)
    return 0
print(total(json.load(open(sys.argv[1]))))' "$1"
}
stop_check() { # stop_check WHAT CONTAINER STOP-COMMAND...: exit 0 within the stop timeout
  local what=$1 name=$2 t0 took rc
  shift 2
  t0=$(now_ms)
  "$@" >"$run/stop.log" 2>&1 || cat "$run/stop.log"
  took=$(($(now_ms) - t0))
  rc=$($docker inspect -f '{{.State.ExitCode}}' "$name")
  if [ "$rc" = 0 ] && [ "$took" -lt 45000 ]; then
    pass "$what: exit code 0 after ${took} ms (stop timeout 45 s)"
  else
    fail "$what: exit code $rc after ${took} ms"
    $docker logs "$name" 2>&1 | tail -n 20
  fi
}

$docker ps -aq --filter label=tlsbridge.test=1 | xargs -r $docker rm -f -v >/dev/null
$docker volume ls -q --filter label=tlsbridge.test=1 | xargs -r $docker volume rm -f >/dev/null
$docker volume rm -f tlsbridge-ci_certs tlsbridge-ci_state >/dev/null
$docker volume create "${label[@]}" tlsbridge-ci-certs >/dev/null
$docker volume create "${label[@]}" tlsbridge-ci-state >/dev/null
volumes=(-v tlsbridge-ci-certs:/var/lib/tlsbridge/certs -v tlsbridge-ci-state:/var/lib/tlsbridge/state)
upstream_ca=(-v "$run/upstream-ca.crt:/etc/tlsbridge/upstream-ca.crt:ro")

version=$($docker run --rm --network none "$image" --version)
say "$image --version: $(echo "$version" | tr '\n' ' ')"

# 5a. Environment-only configuration, fresh volumes.
admin=$(free_port)
port=$(free_port)
t0=$(now_ms)
$docker run -d --name tlsbridge-ci-env "${label[@]}" --network host --stop-timeout 45 \
  -e TLSBRIDGE__ADMIN__LISTEN="127.0.0.1:$admin" \
  -e TLSBRIDGE__ROUTE="$(route_env echo "$port")" \
  -e TLSBRIDGE__UPSTREAM_TLS__EXTRA_ROOTS=/etc/tlsbridge/upstream-ca.crt \
  "${upstream_ca[@]}" "${volumes[@]}" "$image" >/dev/null
run_ms=$(($(now_ms) - t0))
if ready_ms=$(wait_ready "$admin"); then
  pass "env-only config: /readyz 200, $((run_ms + ready_ms)) ms after docker run (docker run -d took ${run_ms} ms, then ${ready_ms} ms to ready, with the CA and device key generated)"
else
  $docker logs tlsbridge-ci-env 2>&1 | tail -n 20
  die "env-only config: /readyz never answered 200"
fi
if healthy_s=$(wait_healthy tlsbridge-ci-env); then
  pass "HEALTHCHECK: docker inspect says healthy ${healthy_s} s after /readyz"
else
  fail "HEALTHCHECK: not healthy ($($docker inspect -f '{{json .State.Health}}' tlsbridge-ci-env))"
fi
certs_dir=$(mountpoint_of tlsbridge-ci-certs)
state_dir=$(mountpoint_of tlsbridge-ci-state)
cp "$certs_dir/ca.crt" "$run/proxy-ca.crt"
ca_fp=$(openssl x509 -in "$run/proxy-ca.crt" -noout -fingerprint -sha256 | cut -d= -f2)
if s_client_session "$port" "$run/proxy-ca.crt"; then
  pass "TLS 1.0 device session (openssl s_client -tls1) through the proxy to a TLS 1.2-only upstream: echoed, proxy certificate verified"
else
  cat "$run/s_client.log"
  fail "TLS 1.0 device session with openssl s_client"
fi
check "upstream leg was TLS 1.2 ($(grep -m1 'upstream leg' "$run/upstream.log" || echo none))" \
  grep -q 'upstream leg TLSv1.2' "$run/upstream.log"
if out=$(PYTHONPATH="$pylib" python3 "$run/des3.py" "$port" 2>&1); then
  fail "the default image accepted a 3DES-only device: $out"
else
  pass "the default image refuses a 3DES-only device ($out)"
fi
owners=$(stat -c '%u:%g mode %a' "$certs_dir" "$state_dir" | sort -u | paste -sd, -)
check "certs/ and state/ volumes owned by 65532:65532 ($owners)" \
  test "$(stat -c '%u:%g' "$certs_dir" "$state_dir" | sort -u)" = "65532:65532"
keys=$(stat -c '%n %u %a' "$certs_dir"/*.key | sed "s|$certs_dir/||" | paste -sd, -)
check "private keys owned by 65532, mode 0600 ($keys)" \
  test -z "$(stat -c '%u %a' "$certs_dir"/*.key | grep -v '^65532 600$')"
# Drain: a session held open across `docker stop` goes on until it ends by itself.
rm -f "$run/held.ready"
python3 -W ignore "$run/device.py" "$port" "$run/proxy-ca.crt" 4 "$run/held.ready" >"$run/held.log" 2>&1 &
held=$!
bg_pids+=("$held")
for _ in $(seq 1 100); do [ -e "$run/held.ready" ] && break; sleep 0.1; done
stop_check "docker stop with a session open (drain)" tlsbridge-ci-env $docker stop -t 45 tlsbridge-ci-env
if wait "$held"; then
  pass "the held session finished during the drain ($(cat "$run/held.log"))"
else
  fail "the held session was cut: $(cat "$run/held.log")"
fi
check "the log says it drained" logged tlsbridge-ci-env 'draining'
before=$(inventory_connections "$state_dir/inventory.json" 2>/dev/null || echo 0)
check "state/inventory.json saved at stop, owned by 65532, mode 0600 ($before connections)" \
  test "$(stat -c '%u %a' "$state_dir/inventory.json" 2>/dev/null)" = "65532 600"
$docker rm -v tlsbridge-ci-env >/dev/null

# 5b. A mounted config file, the same volumes, a new container.
admin2=$(free_port)
port2=$(free_port)
cat >"$run/tlsbridge.toml" <<TOML
state_dir = "state"

[log]
format = "json"

[upstream_tls]
extra_roots = ["/etc/tlsbridge/upstream-ca.crt"]

[[route]]
name = "from-file"
listen = "127.0.0.1:$port2"
protocol = "tcp"
device_tls = "tls"
upstream = "127.0.0.1:$up_port"
upstream_tls = "tls"
TOML
chmod 0644 "$run/tlsbridge.toml"
t0=$(now_ms)
$docker run -d --name tlsbridge-ci-file "${label[@]}" --network host --stop-timeout 45 \
  -e TLSBRIDGE__ADMIN__LISTEN="127.0.0.1:$admin2" \
  -v "$run/tlsbridge.toml:/etc/tlsbridge/tlsbridge.toml:ro" \
  "${upstream_ca[@]}" "${volumes[@]}" "$image" run --config /etc/tlsbridge/tlsbridge.toml >/dev/null
run_ms=$(($(now_ms) - t0))
if ready_ms=$(wait_ready "$admin2"); then
  pass "mounted config file: /readyz 200, $((run_ms + ready_ms)) ms after docker run (docker run -d took ${run_ms} ms, then ${ready_ms} ms to ready, certificates already there)"
else
  fail "mounted config file: /readyz never answered 200"
fi
if s_client_session "$port2" "$run/proxy-ca.crt"; then
  pass "mounted config file: its route relays a TLS 1.0 device session"
else
  cat "$run/s_client.log"
  fail "mounted config file: TLS 1.0 device session"
fi
check "mounted config file: its log.format = json is in effect" \
  logged tlsbridge-ci-file '"route":"from-file"'
ca_fp2=$(openssl x509 -in "$certs_dir/ca.crt" -noout -fingerprint -sha256 | cut -d= -f2)
check "certs volume persists across docker rm + a new container (same CA, SHA-256 ${ca_fp:0:23}...)" \
  test "$ca_fp" = "$ca_fp2"
clients=$(curl -s "http://127.0.0.1:$admin2/clients" || true)
check "state volume persists: the new container's /clients lists the device seen by the old one" \
  grep -q '127.0.0.1' <<<"$clients"
stop_check "docker stop (config-file container)" tlsbridge-ci-file $docker stop -t 45 tlsbridge-ci-file
after=$(inventory_connections "$state_dir/inventory.json" 2>/dev/null || echo 0)
check "inventory kept and added to ($before connections before, $after after)" test "$after" -gt "$before"
$docker rm -v tlsbridge-ci-file >/dev/null

# 5c. The legacy-ciphers image.
legacy_version=$($docker run --rm --network none "$legacy_image" --version)
say "$legacy_image --version: $(echo "$legacy_version" | tr '\n' ' ')"
check "legacy-ciphers image: --version names its vendored OpenSSL with legacy ciphers available" \
  grep -q 'legacy ciphers: available' <<<"$legacy_version"
admin3=$(free_port)
port3=$(free_port)
$docker run -d --name tlsbridge-ci-legacy "${label[@]}" --network host --stop-timeout 45 \
  -e TLSBRIDGE__ADMIN__LISTEN="127.0.0.1:$admin3" \
  -e TLSBRIDGE__ROUTE="$(route_env legacy "$port3")" \
  -e TLSBRIDGE__UPSTREAM_TLS__EXTRA_ROOTS=/etc/tlsbridge/upstream-ca.crt \
  -e TLSBRIDGE__DEVICE_TLS__CIPHERS='AES128-SHA:DES-CBC3-SHA:@SECLEVEL=0' \
  "${upstream_ca[@]}" "$legacy_image" >/dev/null
wait_ready "$admin3" >/dev/null || fail "legacy-ciphers image: /readyz never answered 200"
if out=$(PYTHONPATH="$pylib" python3 "$run/des3.py" "$port3" 2>&1) && grep -q 'DES-CBC3-SHA' <<<"$out"; then
  pass "legacy-ciphers image relays a 3DES-only TLS 1.0 device (nassl client: $out)"
else
  fail "legacy-ciphers image and a 3DES-only device: $out"
fi
check "legacy-ciphers image logs the device as legacy_client with DES-CBC3-SHA" \
  logged tlsbridge-ci-legacy 'DES-CBC3-SHA'
stop_check "docker stop (legacy-ciphers container)" tlsbridge-ci-legacy $docker stop -t 45 tlsbridge-ci-legacy
$docker rm -v tlsbridge-ci-legacy >/dev/null
if [ "${CONTAINER_TEST_STOP_AFTER:-}" = run ]; then exit "$((failures > 0))"; fi

# --- 6. The compose example ---------------------------------------------------------------------
# deploy/compose as shipped, with what this engine cannot do replaced: no bridge network, so host
# networking instead of `ports:` (compose refuses both together), the routes and admin port on
# free loopback ports through the environment (which wins over the mounted tlsbridge.toml), the
# upstream test CA mounted in, and `build.network: host` so RUN steps reach the registries.
admin4=$(free_port)
port4=$(free_port)
compose_file="$run/docker-compose.yml"
/usr/bin/python3 - "$repo/deploy/compose" "$compose_file" "$admin4" "$(route_env compose "$port4")" "$run/upstream-ca.crt" <<'PY'
import os, sys, yaml
src_dir, dst, admin, route, ca = sys.argv[1:6]
doc = yaml.safe_load(open(os.path.join(src_dir, "docker-compose.yml")))
svc = doc["services"]["tlsbridge"]
svc["build"]["context"] = os.path.normpath(os.path.join(src_dir, svc["build"]["context"]))
svc["build"]["network"] = "host"
svc["volumes"] = [os.path.normpath(os.path.join(src_dir, v)) if v.startswith(".") else v
                  for v in svc["volumes"]] + [f"{ca}:/etc/tlsbridge/upstream-ca.crt:ro"]
del svc["ports"]
svc["network_mode"] = "host"
env = svc.get("environment") or {}
env.update({"TLSBRIDGE__ADMIN__LISTEN": f"127.0.0.1:{admin}", "TLSBRIDGE__ROUTE": route,
            "TLSBRIDGE__UPSTREAM_TLS__EXTRA_ROOTS": "/etc/tlsbridge/upstream-ca.crt"})
svc["environment"] = env
svc["labels"] = {"tlsbridge.test": "1"}
yaml.safe_dump(doc, open(dst, "w"), sort_keys=False)
PY
compose=(/usr/bin/docker-compose -p tlsbridge-ci -f "$compose_file")
cleanup_compose() { "${compose[@]}" down -v >/dev/null 2>&1 || true; }
check "compose: the shipped tlsbridge.toml passes \`tlsbridge check\` in the image" \
  $docker run --rm --network none -v "$repo/deploy/compose/tlsbridge.toml:/etc/tlsbridge/tlsbridge.toml:ro" \
  "$image" check --config /etc/tlsbridge/tlsbridge.toml >"$run/check.log" 2>&1
t0=$(date +%s)
if "${compose[@]}" up -d --build >"$run/compose-up.log" 2>&1; then
  pass "compose: docker-compose up -d --build ($(/usr/bin/docker-compose version --short), $(elapsed "$t0"))"
else
  tail -n 30 "$run/compose-up.log"
  cleanup_compose
  die "compose: docker-compose up -d --build"
fi
cid=$("${compose[@]}" ps -q tlsbridge)
if ms=$(wait_ready "$admin4"); then pass "compose: /readyz 200"; else fail "compose: /readyz never answered 200"; fi
if s=$(wait_healthy "$cid"); then
  pass "compose: HEALTHCHECK healthy ($("${compose[@]}" ps | tail -n 1 | grep -o 'Up.*healthy)'))"
else
  fail "compose: not healthy"
fi
# The shipped tlsbridge.toml's device_tls.names.
if s_client_session "$port4" "$(mountpoint_of tlsbridge-ci_certs)/ca.crt" tlsbridge.example.lan; then
  pass "compose: TLS 1.0 device session relayed to the TLS 1.2-only upstream"
else
  cat "$run/s_client.log"
  fail "compose: TLS 1.0 device session"
fi
check "compose: JSON log (the shipped tlsbridge.toml) records the session" \
  logged "$cid" '"route":"compose"'
stop_check "compose: docker-compose stop" "$cid" "${compose[@]}" stop
cleanup_compose

say "finished in $(elapsed) with $failures failure(s)"
[ "$failures" = 0 ]
