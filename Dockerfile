# syntax=docker/dockerfile:1
# The hookline images: one image, three binaries (hookline-producer, hookline-consumer, and the
# hookline CLI for the sample receiver and the simulated CI). docker-compose.yml picks the command.
#
# Build stage: the same toolchain packages and the same cargo command as CI (.ci/run installs
# build-essential, make and pkg-config because rdkafka-sys builds librdkafka and zstd from source;
# scripts/check-compose checks that this file and CI agree).
FROM rust:1.95-bookworm AS builder
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends build-essential make pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# --locked: build exactly the committed Cargo.lock, as CI does.
RUN cargo build --release --locked --workspace --bins \
    && mkdir -p /out \
    && cp target/release/hookline target/release/hookline-producer target/release/hookline-consumer /out/

# Runtime stage: Debian slim, no toolchain, a non-root user. curl is there for the healthchecks.
FROM debian:bookworm-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 hookline \
    && useradd --system --uid 10001 --gid hookline --no-create-home --shell /usr/sbin/nologin hookline
COPY --from=builder /out/ /usr/local/bin/
USER 10001:10001
# The services listen on 0.0.0.0 inside the container; the defaults of the binaries are loopback.
ENV HOOKLINE_LISTEN=0.0.0.0:8080
EXPOSE 8080
CMD ["hookline", "--help"]
