#!/usr/bin/env bash
# Run satwatch's whole test suite: install what is missing (scripts/setup.sh),
# point the build and the tests at ONNX Runtime, then
# `cargo test --release --all-targets --features cuda,onnx-gpu`: one build that
# also compiles the GPU backends (they load CUDA and ONNX Runtime's GPU
# providers at run time, so this needs no CUDA) and runs their tests, which
# skip, saying so, where there is no GPU. The integration tests start their
# own tansu broker and PostgreSQL on free ports, so no services are started here.
#
# Usage: scripts/test.sh [CARGO TEST ARGS...]
#   e.g. scripts/test.sh -- --nocapture
#        scripts/test.sh --test pipeline -- some_test_name
# Works with CI=true and no TTY.
# Env:   SATWATCH_CACHE   cache dir for the venv and tansu (default ~/.cache/satwatch)
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cd "$SATWATCH_ROOT"

log "setup: scripts/setup.sh"
scripts/setup.sh

if ! command -v cargo >/dev/null 2>&1 && [[ -x $HOME/.cargo/bin/cargo ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

# Where the tests find what setup.sh installed.
ORT_DYLIB_PATH=$(find_ort_lib)
[[ -n $ORT_DYLIB_PATH ]] || die "libonnxruntime.so.$ORT_VERSION not found under $ORT_VENV: scripts/setup.sh should have installed it"
[[ -x $TANSU_BIN ]] || die "tansu not found at $TANSU_BIN: scripts/setup.sh should have installed it"
pg=$(pg_bindir)
[[ -n $pg && -x $pg/initdb ]] || die "PostgreSQL server binaries (initdb) not found: scripts/setup.sh should have installed them"
export ORT_DYLIB_PATH SATWATCH_CACHE SATWATCH_TANSU_BIN=$TANSU_BIN SATWATCH_PG_BINDIR=$pg

# A user's `eval "$(scripts/services.sh env)"` must not steer the tests (or
# the satwatch processes they spawn) to the user's broker and database: the
# environment overrides the pipeline file.
for v in SATWATCH_BROKERS DATABASE_URL SATWATCH_HTTP_ADDR; do
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
log "SATWATCH_TANSU_BIN=$SATWATCH_TANSU_BIN SATWATCH_PG_BINDIR=$SATWATCH_PG_BINDIR"
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
