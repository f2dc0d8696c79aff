# tlsbridge container image.
#
#   docker build -t tlsbridge .                                   # standard build
#   docker build -t tlsbridge:legacy --build-arg FEATURES=legacy-ciphers .
#                                       # weak-cipher variant (3DES/RC4/SSLv3 devices)
#
# OpenSSL is always vendored (cargo feature `vendored`) and linked statically, so the image's
# OpenSSL is the one the binary was built with and the runtime image needs no libssl and no shell.
#
# Run:
#   docker run -d --stop-timeout 45 -p 587:2587 -p 465:2465 -p 993:2993 -p 995:2995 -p 127.0.0.1:9480:9480 \
#     -v tlsbridge-certs:/var/lib/tlsbridge/certs -v tlsbridge-state:/var/lib/tlsbridge/state \
#     tlsbridge
# With a config file:
#   ... -v /path/tlsbridge.toml:/etc/tlsbridge/tlsbridge.toml:ro \
#     tlsbridge run --config /etc/tlsbridge/tlsbridge.toml
# Environment variables (TLSBRIDGE__SECTION__KEY) override the file, including the
# TLSBRIDGE__ADMIN__LISTEN set below. The stop timeout leaves room for limits.drain_timeout (30s).

FROM rust:1-bookworm AS builder

# Extra cargo features, comma-separated: "" or "legacy-ciphers".
ARG FEATURES=""

WORKDIR /src
COPY . .

# Cache mounts keep the registry and target/ between builds; the binary is copied out of the
# cached target/ in the same step. Directory owners are set here because the runtime image has
# no shell to do it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --features "vendored${FEATURES:+,$FEATURES}" \
 && install -D -m 0755 target/release/tlsbridge /out/bin/tlsbridge \
 && install -d -o 65532 -g 65532 -m 0750 /out/data/certs /out/data/state

FROM gcr.io/distroless/cc-debian12:nonroot

ARG FEATURES=""
LABEL org.opencontainers.image.title="tlsbridge" \
      org.opencontainers.image.description="TLS upgrade proxy: legacy TLS devices to Microsoft 365 over verified TLS 1.2+" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      tlsbridge.features="vendored${FEATURES:+,$FEATURES}"

COPY --from=builder /out/bin/tlsbridge /usr/local/bin/tlsbridge
COPY --from=builder --chown=65532:65532 /out/data/ /var/lib/tlsbridge/

# Relative paths in the config (certs/, state/) resolve against this directory.
WORKDIR /var/lib/tlsbridge
# certs/: local CA and device certificate, generated on first start when missing.
# state/: inventory.json.
VOLUME ["/var/lib/tlsbridge/certs", "/var/lib/tlsbridge/state"]

# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 65532:65532

# The admin endpoint must listen beyond loopback for probes from outside the container.
# Publish it on the host's loopback only (-p 127.0.0.1:9480:9480): /clients lists device IPs.
ENV TLSBRIDGE__ADMIN__LISTEN=0.0.0.0:9480

# Default routes: smtp 2587 (STARTTLS), smtps 2465 (TLS), imaps 2993, pop3s 2995; admin 9480.
EXPOSE 2587 2465 2993 2995 9480

# Docker runs the first probe one interval after start (--start-interval needs Docker 25+), so
# the interval is also how long `docker run` / compose `depends_on: service_healthy` wait for
# "healthy"; the probe is one short process. Unhealthy after 3 failures in a row (30 s).
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["/usr/local/bin/tlsbridge", "health"]

ENTRYPOINT ["/usr/local/bin/tlsbridge"]
CMD ["run"]
