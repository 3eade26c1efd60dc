# shellcheck shell=bash disable=SC2034  # variables here are used by the scripts that source it
# Shared settings and helpers for scripts/*.sh. Source it; do not run it.
# Kept in one place so setup.sh (which installs things) and services.sh (which
# uses them) can never disagree on where the cache, tansu or ONNX Runtime live.

# The repository root, whatever directory the caller runs from.
SATWATCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Expensive installs live outside the repo so that fresh clones (CI clones the
# repo anew for every run) reuse them instead of rebuilding tansu each time.
SATWATCH_CACHE=${SATWATCH_CACHE:-${HOME:?HOME is unset: set SATWATCH_CACHE}/.cache/satwatch}

# Pinned versions: satwatch is built against ONNX Runtime API 1.31 (ort's
# load-dynamic + api-31) and tested against tansu 0.6.0 (see shared/ENVIRONMENT.md).
TANSU_VERSION=0.6.0
ORT_VERSION=1.31.1
TANSU_BIN=${SATWATCH_TANSU_BIN:-$SATWATCH_CACHE/tansu/bin/tansu}
ORT_VENV=$SATWATCH_CACHE/venv

# log: timestamped progress line on stdout (CI logs are read after the fact).
log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
# die: one clear line on stderr and a non-zero exit.
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# smap_pipeline_copy DEST REPOSITORY: pipelines/smap.toml written to DEST with
# its model repository set to REPOSITORY (made absolute), for the scripts that
# run variants of the shipped pipeline from elsewhere. Fails if the shipped
# file no longer has the line it replaces, rather than leave the copy pointing
# at a relative path that resolves next to DEST.
smap_pipeline_copy() {
    local dest=$1 repository
    repository=$(cd "$2" && pwd) || die "no model repository at $2"
    grep -q '^path = "../model_repository"$' "$SATWATCH_ROOT/pipelines/smap.toml" ||
        die "pipelines/smap.toml has no line path = \"../model_repository\" to repoint"
    sed "s|^path = \"../model_repository\"$|path = \"$repository\"|" \
        "$SATWATCH_ROOT/pipelines/smap.toml" >"$dest"
}

# find_ort_lib: print the path of libonnxruntime.so.$ORT_VERSION, or nothing.
# An ORT_DYLIB_PATH already set by the caller wins when the file exists. The
# venv's python minor version is globbed rather than hard-coded.
find_ort_lib() {
    if [[ -n ${ORT_DYLIB_PATH:-} && -f $ORT_DYLIB_PATH ]]; then
        printf '%s\n' "$ORT_DYLIB_PATH"
        return 0
    fi
    local f
    for f in "$ORT_VENV"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so."$ORT_VERSION"; do
        if [[ -f $f ]]; then
            printf '%s\n' "$f"
            return 0
        fi
    done
    return 0
}

# pg_bindir: directory of PostgreSQL's server binaries (initdb, pg_ctl), which
# Debian keeps off PATH. SATWATCH_PG_BINDIR overrides; else the newest installed.
pg_bindir() {
    if [[ -n ${SATWATCH_PG_BINDIR:-} ]]; then
        printf '%s\n' "$SATWATCH_PG_BINDIR"
        return 0
    fi
    local d best=""
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x $d/initdb ]] && best=$d
    done
    if [[ -z $best ]] && command -v pg_config >/dev/null 2>&1; then
        best=$(pg_config --bindir)
    fi
    printf '%s\n' "$best"
}

# tcp_open HOST PORT: true when something accepts TCP connections there.
# Uses bash's /dev/tcp so no netcat is needed; timeout bounds a hung connect.
tcp_open() {
    # shellcheck disable=SC2016  # $1/$2 expand in the inner bash, on purpose
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}
