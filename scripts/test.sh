#!/usr/bin/env bash
# Run satwatch's whole test suite: install what is missing (scripts/setup.sh),
# point the build and the tests at ONNX Runtime, then
# `cargo test --release --all-targets --features cuda,onnx-gpu`: one build that
# also compiles the GPU backends (they load CUDA and ONNX Runtime's GPU
# providers at run time, so this needs no CUDA) and runs their tests, which
# skip, saying so, where there is no GPU. The integration tests start their
# own Apache Kafka nodes (a JVM each, from the jars setup.sh fetched) and
# PostgreSQL on free ports, so no services are started here.
#
# Usage: scripts/test.sh [CARGO TEST ARGS...]
#   e.g. scripts/test.sh -- --nocapture
#        scripts/test.sh --test pipeline -- some_test_name
# Works with CI=true and no TTY.
# Env:   SATWATCH_CACHE      cache dir for the venv and Kafka's jars (default ~/.cache/satwatch)
#        SATWATCH_KAFKA_LIB  Kafka's jars (default $SATWATCH_CACHE/kafka/<version>/lib)
#        SATWATCH_JAVA       the java to run Kafka with (default $JAVA_HOME/bin/java, else java on PATH)
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cd "$SATWATCH_ROOT"

log "setup: scripts/setup.sh --training (tests/any_width.rs trains a model)"
scripts/setup.sh --training

if ! command -v cargo >/dev/null 2>&1 && [[ -x $HOME/.cargo/bin/cargo ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

# Where the tests find what setup.sh installed.
ORT_DYLIB_PATH=$(find_ort_lib)
[[ -n $ORT_DYLIB_PATH ]] || die "libonnxruntime.so.$ORT_VERSION not found under $ORT_VENV: scripts/setup.sh should have installed it"
kafka_lib_ok || die "Apache Kafka $KAFKA_VERSION's jars not found in $KAFKA_LIB: scripts/setup.sh should have fetched them"
[[ -f $KAFKA_LOG4J ]] || die "$KAFKA_LOG4J is missing (it belongs to the repository)"
java=$(java_ok) || die "no Java $JAVA_MIN_VERSION or newer found (SATWATCH_JAVA, \$JAVA_HOME/bin/java, PATH): scripts/setup.sh should have installed one"
pg=$(pg_bindir)
[[ -n $pg && -x $pg/initdb ]] || die "PostgreSQL server binaries (initdb) not found: scripts/setup.sh should have installed them"
# The test harness starts its brokers with these: the same jars, java and
# logging setup as scripts/services.sh, whatever the tests' environment says.
export ORT_DYLIB_PATH SATWATCH_CACHE SATWATCH_PG_BINDIR=$pg
export SATWATCH_KAFKA_LIB=$KAFKA_LIB SATWATCH_JAVA=$java SATWATCH_KAFKA_LOG4J=$KAFKA_LOG4J

# A user's `eval "$(scripts/services.sh env)"` must not steer the tests (or
# the satwatch processes they spawn) to the user's broker and database: the
# environment overrides the pipeline file.
for v in SATWATCH_BROKERS SATWATCH_REPLICATION_FACTOR DATABASE_URL SATWATCH_HTTP_ADDR; do
    if [[ -n ${!v:-} ]]; then
        log "unsetting $v for the tests (they start their own services)"
        unset "$v"
    fi
done

# No colour codes or progress bars in CI logs.
if [[ ! -t 1 ]]; then
    export CARGO_TERM_COLOR=never CARGO_TERM_PROGRESS_WHEN=never
fi

log "ORT_DYLIB_PATH=$ORT_DYLIB_PATH"
log "SATWATCH_KAFKA_LIB=$SATWATCH_KAFKA_LIB SATWATCH_JAVA=$SATWATCH_JAVA SATWATCH_PG_BINDIR=$SATWATCH_PG_BINDIR"
# shellcheck disable=SC2054  # "cuda,onnx-gpu" is one argument, on purpose
cmd=(cargo test --release --all-targets --features cuda,onnx-gpu "$@")
log "running: ${cmd[*]}"
start=$SECONDS
rc=0
"${cmd[@]}" </dev/null || rc=$?
if [[ $rc -ne 0 ]]; then
    log "tests FAILED (exit $rc) after $((SECONDS - start))s"
    exit "$rc"
fi
log "tests passed in $((SECONDS - start))s"
