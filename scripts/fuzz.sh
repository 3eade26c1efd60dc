#!/usr/bin/env bash
# Runs each cargo-fuzz target for a bounded time (default 60 s each).
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
# Targets: decode_telemetry, parse_model_config, parse_pipeline, drive_engine (default: all).
# cargo-fuzz needs nightly features; the machine's stable toolchain provides
# them with RUSTC_BOOTSTRAP=1. Findings land in fuzz/artifacts/<target>/.
# CI does not run this (it is bounded by time, not by a pass/fail oracle).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds=${1:-60}
shift || true
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    targets=(decode_telemetry parse_model_config parse_pipeline drive_engine)
fi
[[ $seconds =~ ^[0-9]+$ ]] || { echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]" >&2; exit 2; }

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz (once)"
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
status=0
for target in "${targets[@]}"; do
    corpus="fuzz/corpus/$target"
    mkdir -p "$corpus"
    cp -n fuzz/corpus-seeds/"$target"/* "$corpus"/ 2>/dev/null || true
    echo "fuzz: building $target"
    if ! (cd fuzz && cargo fuzz build "$target"); then
        echo "fuzz: $target does not build (not a finding)" >&2
        status=2
        continue
    fi
    echo "fuzz: $target for ${seconds}s"
    if ! (cd fuzz && cargo fuzz run "$target" "corpus/$target" -- -max_total_time="$seconds" -max_len=131072); then
        echo "fuzz: $target FOUND A FAILURE; see fuzz/artifacts/$target/" >&2
        status=1
    fi
done
exit "$status"
