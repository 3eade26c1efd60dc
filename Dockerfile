# syntax=docker/dockerfile:1
# satwatch container image: build the release binary, then ship it on a slim
# Debian with ONNX Runtime's shared library (from PyPI's wheel) beside it.
#   docker build -t satwatch:local .
#   docker compose up           (see docker-compose.yml)

# ---------------------------------------------------------------- builder
FROM rust:1.95-bookworm AS builder
# librdkafka is built from source by rdkafka-sys (configure + make) and its ssl
# feature links OpenSSL; protobuf is compiled by protox, so no protoc is needed.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache mounts keep the crates.io download and the target dir between builds
# (the bundled librdkafka alone takes over a minute to compile). The binary is
# copied out because the cached target dir is not part of the image layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin satwatch \
 && install -m 0755 target/release/satwatch /usr/local/bin/satwatch

# ---------------------------------------------------------------- runtime
FROM debian:bookworm-slim AS runtime
# libssl3/ca-certificates: rdkafka's TLS; python3-venv: a venv for the
# onnxruntime wheel, which is the supported way to get libonnxruntime.so for
# this exact version (satwatch loads it at run time via ORT_DYLIB_PATH).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
ARG ORT_VERSION=1.31.1
# The stable /opt/ort/capi link keeps ORT_DYLIB_PATH independent of Python's
# minor version inside the venv path.
RUN python3 -m venv /opt/ort \
 && /opt/ort/bin/pip install --no-cache-dir --disable-pip-version-check "onnxruntime==${ORT_VERSION}" \
 && ln -s "$(dirname "$(find /opt/ort/lib -name "libonnxruntime.so.${ORT_VERSION}" | head -n1)")" /opt/ort/capi \
 && test -f "/opt/ort/capi/libonnxruntime.so.${ORT_VERSION}"
ENV ORT_DYLIB_PATH=/opt/ort/capi/libonnxruntime.so.${ORT_VERSION} \
    SATWATCH_HTTP_ADDR=0.0.0.0:8000 \
    RUST_LOG=info

# Run unprivileged: satwatch needs no root, only read access to its files.
RUN useradd --system --home-dir /app --shell /usr/sbin/nologin satwatch
WORKDIR /app
COPY --from=builder /usr/local/bin/satwatch /usr/local/bin/satwatch
COPY pipelines/ pipelines/
COPY model_repository/ model_repository/
COPY data/ data/
COPY init-kafka.sh ./
USER satwatch
EXPOSE 8000
ENTRYPOINT ["satwatch"]
CMD ["run", "--pipeline", "pipelines/smap.toml"]
