#!/usr/bin/env bash
# Keeps the Dockerfile honest without a Docker engine.
#
# 1. Runs the builder stage's `cargo build` command, taken from the Dockerfile itself (same
#    --locked, same --features; FEATURES=legacy-ciphers like --build-arg FEATURES=...).
# 2. Lays the binary out as the runtime stage does: /usr/local/bin/tlsbridge, WORKDIR
#    /var/lib/tlsbridge with certs/ and state/ (0750, uid/gid of USER) under a temp root.
# 3. Starts it as ENTRYPOINT + CMD would (`tlsbridge run`, no config file, an environment of the
#    Dockerfile's ENV lines only) as the image's USER (setpriv, when run as root; otherwise as
#    the calling user, which the script says), runs the HEALTHCHECK command until it passes,
#    checks /readyz, makes one TLS 1.0 device connection, sends SIGTERM and expects exit 0 and
#    a saved state/inventory.json.
#
# Also checks the Dockerfile's claims: OpenSSL vendored and linked statically (no libssl or
# libcrypto needed at run time), only libraries that gcr.io/distroless/cc-debian12 has.
#
# Usage: scripts/container-smoke.sh            (FEATURES="" as in `docker build .`)
#        FEATURES=legacy-ciphers scripts/container-smoke.sh
# The build goes to $SMOKE_TARGET_DIR (default target/container), so repeated runs are
# incremental and the default target/ is left alone. Needs the image's ports free on this host.
set -euo pipefail
cd "$(dirname "$0")/.."

FEATURES="${FEATURES:-}"
export CARGO_TARGET_DIR="${SMOKE_TARGET_DIR:-$PWD/target/container}"
say() { printf 'container-smoke: %s\n' "$*"; }
fail() {
  printf 'container-smoke: FAILED: %s\n' "$*" >&2
  exit 1
}

# --- 1. The builder stage's build command, from the Dockerfile --------------------------------
mapfile -t build_lines < <(sed -n 's/^[[:space:]]*\(cargo build .*[^[:space:]\\]\)[[:space:]]*\\\{0,1\}$/\1/p' Dockerfile)
[ "${#build_lines[@]}" -eq 1 ] || fail "expected one 'cargo build' line in the Dockerfile, found ${#build_lines[@]}"
build_cmd="${build_lines[0]}"
case "$build_cmd" in
  *--locked*) ;;
  *) fail "the Dockerfile's build is not --locked: $build_cmd" ;;
esac
say "builder stage (FEATURES=\"$FEATURES\"): $build_cmd"
eval "$build_cmd"
built="$CARGO_TARGET_DIR/release/tlsbridge"
[ -x "$built" ] || fail "no binary at $built"

# --- 2. The runtime stage's layout --------------------------------------------------------------
workdir=$(sed -n 's/^WORKDIR[[:space:]]\{1,\}//p' Dockerfile | tail -n 1)
user=$(sed -n 's/^USER[[:space:]]\{1,\}//p' Dockerfile | tail -n 1)
uid="${user%%:*}"
gid="${user#*:}"
grep -q '^ENTRYPOINT \["/usr/local/bin/tlsbridge"\]$' Dockerfile || fail "ENTRYPOINT changed: update this script"
grep -q '^CMD \["run"\]$' Dockerfile || fail "CMD changed: update this script"
grep -q 'CMD \["/usr/local/bin/tlsbridge", "health"\]' Dockerfile || fail "HEALTHCHECK changed: update this script"
mapfile -t image_env < <(sed -n 's/^ENV[[:space:]]\{1,\}\([A-Za-z_][A-Za-z0-9_]*=[^[:space:]]*\)[[:space:]]*$/\1/p' Dockerfile)
[ -n "$workdir" ] && [ -n "$uid" ] || fail "cannot read WORKDIR/USER from the Dockerfile"

root=$(mktemp -d /tmp/tlsbridge-image.XXXXXX)
pid=""
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -rf "$root"
}
trap cleanup EXIT
chmod 0755 "$root"
bin="$root/usr/local/bin/tlsbridge"
work="$root$workdir"
install -D -m 0755 "$built" "$bin"
install -d -m 0755 "$work"
install -d -m 0750 "$work/certs" "$work/state"

as_user=()
if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null; then
  chown "$uid:$gid" "$work" "$work/certs" "$work/state"
  as_user=("$(command -v setpriv)" --reuid "$uid" --regid "$gid" --clear-groups --inh-caps=-all --bounding-set=-all)
  say "running as uid $uid gid $gid (the image's USER) through setpriv"
else
  say "NOTE: not root (or no setpriv): running as uid $(id -u), not the image's USER $user"
fi

# What the image's process sees: no config file, the Dockerfile's ENV (distroless sets PATH and,
# for the nonroot user, HOME), WORKDIR as the working directory.
image() {
  (cd "$work" && exec env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/home/nonroot \
    "${image_env[@]}" "${as_user[@]}" "$bin" "$@")
}

# --- the Dockerfile's claims about the binary ---------------------------------------------------
version=$(image --version)
say "tlsbridge --version: $(echo "$version" | tr '\n' '|')"
echo "$version" | grep -q 'vendored, statically linked' || fail "not a vendored OpenSSL build"
case ",$FEATURES," in
  *,legacy-ciphers,*) echo "$version" | grep -q 'legacy ciphers: available' || fail "legacy-ciphers build without 3DES/RC4" ;;
esac
libs=$(ldd "$bin" 2>&1 || true)
if echo "$libs" | grep -Eq 'libssl|libcrypto|not found'; then
  fail "the binary needs libraries the runtime image lacks:
$libs"
fi
# gcr.io/distroless/cc-debian12: glibc, libgcc_s (and libstdc++, libgomp); nothing else.
unexpected=$(echo "$libs" | awk '{print $1}' | grep -Ev '^(linux-vdso\.so\.1|/lib64/ld-linux-x86-64\.so\.2|/lib/ld-linux-aarch64\.so\.1|lib(c|m|dl|rt|pthread|gcc_s|stdc\+\+)\.so\.[0-9]+)$' || true)
[ -z "$unexpected" ] || fail "libraries that distroless/cc may not have: $unexpected"

# --- 3. Start like ENTRYPOINT + CMD -----------------------------------------------------------
admin_listen=$(printf '%s\n' "${image_env[@]}" | sed -n 's/^TLSBRIDGE__ADMIN__LISTEN=//p')
[ -n "$admin_listen" ] || fail "the Dockerfile sets no TLSBRIDGE__ADMIN__LISTEN"
admin_port="${admin_listen##*:}"
exposed=$(sed -n 's/^EXPOSE[[:space:]]\{1,\}//p' Dockerfile)
for port in $exposed; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    fail "port $port is in use on this host; the image's defaults need it"
  fi
done

log="$root/tlsbridge.log"
# Not through image(): the background job must be tlsbridge itself (exec all the way down), so
# that $pid gets the SIGTERM and `wait` its exit code.
(cd "$work" && exec env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/home/nonroot \
  "${image_env[@]}" "${as_user[@]}" "$bin" run) >"$log" 2>&1 &
pid=$!
say "started pid $pid in $work"

healthy=""
for _ in $(seq 1 150); do
  kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; fail "tlsbridge exited during start-up"; }
  if image health >/dev/null 2>&1; then
    healthy=yes
    break
  fi
  sleep 0.2
done
[ -n "$healthy" ] || { cat "$log" >&2; fail "HEALTHCHECK (tlsbridge health) did not pass within 30s"; }
say "HEALTHCHECK: $(image health)"

exec 3<>"/dev/tcp/127.0.0.1/$admin_port" || fail "no admin endpoint on 127.0.0.1:$admin_port"
printf 'GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' >&3
readyz=$(cat <&3)
exec 3<&-
echo "$readyz" | head -n 1 | grep -q ' 200 ' || fail "/readyz: $readyz"
say "/readyz: $(echo "$readyz" | head -n 1 | tr -d '\r')"

for file in ca.crt ca.key tlsbridge.crt tlsbridge.key; do
  [ -s "$work/certs/$file" ] || fail "certs/$file was not generated"
done

# One legacy device on imaps (TLS 1.0): it lands in the inventory after the handshake,
# whatever becomes of the upstream leg (no network to Microsoft 365 is needed).
if command -v openssl >/dev/null; then
  imaps=$(grep -A3 'name = "imaps"' config/default.toml | sed -n 's/^listen = ".*:\([0-9]*\)"/\1/p')
  device=$(timeout 15 openssl s_client -connect "127.0.0.1:$imaps" -tls1 -cipher 'DEFAULT:@SECLEVEL=0' </dev/null 2>&1 || true)
  echo "$device" | grep -Eq 'Protocol *: TLSv1$' || { echo "$device" >&2; fail "TLS 1.0 device handshake on $imaps"; }
  say "TLS 1.0 device handshake on port $imaps: ok"
else
  say "NOTE: no openssl CLI: skipped the device connection"
fi

# --- SIGTERM: drain, save, exit 0 --------------------------------------------------------------
[ "$(cat "/proc/$pid/comm" 2>/dev/null)" = tlsbridge ] || fail "pid $pid is not tlsbridge"
stopping=$(date +%s%N)
kill -TERM "$pid"
for _ in $(seq 1 450); do
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
if kill -0 "$pid" 2>/dev/null; then
  cat "$log" >&2
  fail "still running 45s after SIGTERM (docker's --stop-timeout)"
fi
rc=0
wait "$pid" || rc=$?
pid=""
[ "$rc" = 0 ] || { cat "$log" >&2; fail "exit code $rc after SIGTERM"; }
inventory="$work/state/inventory.json"
[ -s "$inventory" ] || { cat "$log" >&2; fail "no state/inventory.json after shutdown"; }
if command -v openssl >/dev/null; then
  grep -q 'TLSv1' "$inventory" || { cat "$inventory" >&2; fail "the device is not in inventory.json"; }
fi
if [ "${#as_user[@]}" -gt 0 ]; then
  owner=$(stat -c %u "$inventory")
  [ "$owner" = "$uid" ] || fail "inventory.json owned by $owner, not $uid"
fi
grep -q 'error' "$log" && say "NOTE: errors in the log:" && grep 'error' "$log" | head -n 5
say "exit 0 $(( ($(date +%s%N) - stopping) / 1000000 )) ms after SIGTERM, state/inventory.json saved ($(wc -c <"$inventory") bytes)"
say "ok"
