#!/usr/bin/env bash
# Install everything a fresh Debian 12 machine needs to build, run and test
# satwatch: apt packages, ONNX Runtime's shared library (from PyPI's wheel, in a
# venv) and the tansu Kafka broker. Idempotent: each step is skipped when its
# result is already there, so running it on every CI run costs seconds.
# Building satwatch itself (cargo build) is not its job.
#
# Usage: scripts/setup.sh            (no arguments; works with no TTY and CI=true)
# Env:   SATWATCH_CACHE   cache dir for the venv and tansu (default ~/.cache/satwatch)
#        PYTHON           interpreter used to create the venv (default python3)
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ $# -ne 0 ]]; then
    echo "usage: $0   (takes no arguments)" >&2
    exit 2
fi

# Never let apt, debconf or pip stop to ask a question: CI has no stdin.
export DEBIAN_FRONTEND=noninteractive
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

APT_PACKAGES=(build-essential libssl-dev pkg-config postgresql python3-venv)

step_apt() {
    local missing=() p
    for p in "${APT_PACKAGES[@]}"; do
        # dpkg-query exits 0 for removed-but-configured packages too, so check the status text.
        if [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true) != "install ok installed" ]]; then
            missing+=("$p")
        fi
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "apt packages (${APT_PACKAGES[*]}): already present"
        return 0
    fi
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || die "apt packages missing (${missing[*]}) and not root, no sudo: install them by hand"
        sudo=(sudo -n)
    fi
    log "apt packages: installing ${missing[*]}"
    # apt-get update only when something must be installed: it is the slow part.
    "${sudo[@]}" apt-get update -qq || die "apt-get update failed"
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
    log "apt packages: done"
}

step_rust() {
    # rustup's downloads are not reachable from these machines, so a missing
    # toolchain cannot be fixed here: say so plainly instead of failing later.
    if ! command -v cargo >/dev/null 2>&1 && [[ -x $HOME/.cargo/bin/cargo ]]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo not found on PATH or in ~/.cargo/bin: install a Rust toolchain (1.95+) first"
    log "rust toolchain: already present ($(cargo --version))"
}

step_onnxruntime() {
    local lib
    lib=$(find_ort_lib)
    if [[ -n $lib ]]; then
        log "onnxruntime $ORT_VERSION: already present ($lib)"
        return 0
    fi
    local python=${PYTHON:-python3}
    command -v "$python" >/dev/null 2>&1 || die "$python not found (needed to create $ORT_VENV)"
    mkdir -p "$SATWATCH_CACHE"
    if [[ ! -x $ORT_VENV/bin/python ]]; then
        "$python" -m venv "$ORT_VENV" || die "could not create venv $ORT_VENV (is python3-venv installed?)"
    fi
    log "onnxruntime $ORT_VERSION: installing into $ORT_VENV"
    "$ORT_VENV/bin/python" -m pip install -q "onnxruntime==$ORT_VERSION" \
        || die "pip install onnxruntime==$ORT_VERSION failed"
    # Don't trust the env var here: look for the file the install just made.
    lib=$(ORT_DYLIB_PATH='' find_ort_lib)
    [[ -n $lib ]] || die "onnxruntime installed but libonnxruntime.so.$ORT_VERSION not found under $ORT_VENV"
    log "onnxruntime $ORT_VERSION: done ($lib)"
}

tansu_ok() { [[ -x $TANSU_BIN ]] && "$TANSU_BIN" --version >/dev/null 2>&1; }

step_tansu() {
    if tansu_ok; then
        log "tansu $TANSU_VERSION: already present ($TANSU_BIN)"
        return 0
    fi
    mkdir -p "$SATWATCH_CACHE"
    local logf=$SATWATCH_CACHE/tansu-install.log
    # Two cargo installs into the same root would each spend 10 minutes of both
    # cores building the same thing. Serialise setup.sh runs with a lock, and
    # wait for an install started some other way (by hand) instead of racing it.
    exec 9>"$SATWATCH_CACHE/tansu-install.lock"
    flock 9
    if tansu_ok; then
        log "tansu $TANSU_VERSION: already present (installed by a concurrent run)"
        return 0
    fi
    if pgrep -f "cargo install tansu" >/dev/null 2>&1; then
        log "tansu $TANSU_VERSION: an install is already running; waiting for it (log: $logf)"
        while pgrep -f "cargo install tansu" >/dev/null 2>&1; do sleep 10; done
        tansu_ok || die "the running tansu install ended without a working $TANSU_BIN (see $logf)"
        log "tansu $TANSU_VERSION: done"
        return 0
    fi
    log "tansu $TANSU_VERSION: building from crates.io, takes ~10 min (started $(date -u +%H:%M) UTC; log: $logf)"
    # libsql is the storage engine: without a storage feature tansu refuses every request,
    # and its memory:// engine loses records on resume (shared/ENVIRONMENT.md).
    if ! cargo install tansu --version "$TANSU_VERSION" --locked --features libsql \
        --root "$SATWATCH_CACHE/tansu" >"$logf" 2>&1; then
        tail -n 30 "$logf" >&2
        die "cargo install tansu failed (full log: $logf)"
    fi
    tansu_ok || die "cargo install tansu succeeded but $TANSU_BIN does not run"
    log "tansu $TANSU_VERSION: done at $(date -u +%H:%M) UTC"
}

step_apt
step_rust
step_onnxruntime
step_tansu
log "setup complete; for services run: scripts/services.sh up && eval \"\$(scripts/services.sh env)\""
