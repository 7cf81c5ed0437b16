# syntax=docker/dockerfile:1
# switchboard container image.
#   docker build -t switchboard .
#   docker run -p 8080:8080 -v switchboard-data:/var/lib/switchboard \
#     -e SWITCHBOARD__AUTH__INGEST_TOKENS=... -e SWITCHBOARD__AUTH__ADMIN_TOKENS=... switchboard
# A configuration file can be mounted and passed: ... switchboard run --config /etc/switchboard/switchboard.toml

############################ build ############################
FROM rust:1.95-bookworm AS builder
WORKDIR /src

# Dependencies first, built against a dummy crate with the same manifest: this layer is only rebuilt
# when Cargo.toml or Cargo.lock change, not on every source edit.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > benches/routing.rs \
 && cargo build --release --locked \
 && rm -rf src benches

# The real crate (config/ is compiled in: default.toml and the built-in lexicon).
COPY src ./src
COPY benches ./benches
COPY config ./config
COPY schemas ./schemas
# Newer mtimes than the dummy build, so cargo rebuilds the crate itself.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && install -D -m 0755 target/release/switchboard /out/switchboard

############################ run ############################
FROM debian:bookworm-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# A fixed numeric uid, so Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 switchboard \
 && useradd --system --uid 10001 --gid switchboard --home-dir /var/lib/switchboard \
      --no-create-home --shell /usr/sbin/nologin switchboard \
 && install -d -o switchboard -g switchboard -m 0750 /var/lib/switchboard

COPY --from=builder /out/switchboard /usr/local/bin/switchboard

# Listen on all interfaces inside the container; the SQLite store lives on the volume. Demo tokens are
# refused off loopback: provide SWITCHBOARD__AUTH__INGEST_TOKENS, SWITCHBOARD__AUTH__ADMIN_TOKENS and
# SWITCHBOARD__AUTH__AGENT_TOKENS__<AGENT_ID> at run time.
ENV SWITCHBOARD__SERVER__LISTEN=0.0.0.0:8080 \
    SWITCHBOARD__STORE__PATH=/var/lib/switchboard/switchboard.sqlite \
    SWITCHBOARD__AUTH__DEMO_TOKENS=false

USER 10001:10001
WORKDIR /var/lib/switchboard
VOLUME ["/var/lib/switchboard"]
EXPOSE 8080

# The slim image has no curl, and the binary has no health subcommand (yet), so bash (always in
# debian-slim) sends a plain HTTP/1.0 request over /dev/tcp: no extra package, nothing to patch.
# The port follows SWITCHBOARD__SERVER__LISTEN if it is overridden.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${SWITCHBOARD__SERVER__LISTEN##*:} && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q '^HTTP/1\\.[01] 200 '"]

# Exec form: switchboard is PID 1 and receives SIGTERM directly (graceful drain on stop).
ENTRYPOINT ["switchboard"]
CMD ["run"]
