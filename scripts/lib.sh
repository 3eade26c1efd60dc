# shellcheck shell=bash disable=SC2034  # variables here are used by the scripts that source it
# Shared settings and helpers for scripts/*.sh. Source it; do not run it.
# Kept in one place so setup.sh (which installs things) and services.sh (which
# uses them) can never disagree on where the cache, Kafka or ONNX Runtime live.

# The repository root, whatever directory the caller runs from.
SATWATCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Expensive installs live outside the repo so that fresh clones (CI clones the
# repo anew for every run) reuse them instead of fetching them again each time.
SATWATCH_CACHE=${SATWATCH_CACHE:-${HOME:?HOME is unset: set SATWATCH_CACHE}/.cache/satwatch}

# Pinned versions: satwatch is built against ONNX Runtime API 1.31 (ort's
# load-dynamic + api-31) and tested against Apache Kafka 4.3.2, whose jars
# deploy/kafka-local/pom.xml fetches from Maven Central (there is no tarball
# download on these machines). KAFKA_VERSION must equal kafka.version in that
# pom (check_kafka_version): the cache dir and the jar setup.sh looks for are
# named after it. docker-compose.yml's apache/kafka image tag follows it too.
KAFKA_VERSION=4.3.2
ORT_VERSION=1.31.1
KAFKA_LIB=${SATWATCH_KAFKA_LIB:-$SATWATCH_CACHE/kafka/$KAFKA_VERSION/lib}
KAFKA_POM=$SATWATCH_ROOT/deploy/kafka-local/pom.xml
# Console logging at WARN, except the `Kafka Server started` line that marks readiness.
KAFKA_LOG4J=$SATWATCH_ROOT/deploy/kafka-local/log4j2.properties
# Kafka 4.x brokers need Java 17 or newer.
JAVA_MIN_VERSION=17
ORT_VENV=$SATWATCH_CACHE/venv
# training/train.py's interpreter (torch, onnx; training/requirements.txt), which
# tests/any_width.rs runs too. The file names it for the tests' sake: keep the two in step.
TRAIN_VENV=$SATWATCH_CACHE/train-venv

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

# check_kafka_version: die unless KAFKA_VERSION above equals kafka.version in
# deploy/kafka-local/pom.xml. A bump of one without the other would fetch one
# version into a cache dir named after the other, and never find it complete.
check_kafka_version() {
    local pom_version
    pom_version=$(sed -n 's|.*<kafka\.version>[[:space:]]*\([^<[:space:]]*\)[[:space:]]*</kafka\.version>.*|\1|p' "$KAFKA_POM" 2>/dev/null | head -n 1)
    [[ -n $pom_version ]] || die "no <kafka.version> found in $KAFKA_POM"
    [[ $pom_version == "$KAFKA_VERSION" ]] ||
        die "KAFKA_VERSION=$KAFKA_VERSION in scripts/lib.sh but kafka.version=$pom_version in deploy/kafka-local/pom.xml: change them together"
}

# kafka_lib_ok: true when KAFKA_LIB holds the broker jar of KAFKA_VERSION and
# the log4j binding (without it the broker runs, but silently: no readiness
# line to wait for). setup.sh only ever renames a complete download into place.
kafka_lib_ok() {
    [[ -f $KAFKA_LIB/kafka_2.13-$KAFKA_VERSION.jar ]] &&
        compgen -G "$KAFKA_LIB/log4j-slf4j-impl-*.jar" >/dev/null
}

# find_java: print the java to run Kafka with, or nothing: SATWATCH_JAVA when
# set, else $JAVA_HOME/bin/java (what Kafka's own start scripts use), else java
# on PATH. It does not check the version: see java_major.
find_java() {
    if [[ -n ${SATWATCH_JAVA:-} ]]; then
        printf '%s\n' "$SATWATCH_JAVA"
    elif [[ -n ${JAVA_HOME:-} && -x $JAVA_HOME/bin/java ]]; then
        printf '%s\n' "$JAVA_HOME/bin/java"
    else
        command -v java 2>/dev/null || true
    fi
}

# java_major JAVA: print JAVA's major version (8 for "1.8.0_x", 17 for
# "17.0.15"), or nothing when it does not run.
java_major() {
    local out
    out=$("$1" -version 2>&1) || return 0
    if [[ $out =~ version\ \"1\.([0-9]+) ]]; then
        printf '%s\n' "${BASH_REMATCH[1]}"
    elif [[ $out =~ version\ \"([0-9]+) ]]; then
        printf '%s\n' "${BASH_REMATCH[1]}"
    fi
}

# java_ok: print the java from find_java when it is Java $JAVA_MIN_VERSION or
# newer; otherwise print nothing and fail.
java_ok() {
    local java major
    java=$(find_java)
    [[ -n $java ]] || return 1
    major=$(java_major "$java")
    if [[ -z $major ]] || ((major < JAVA_MIN_VERSION)); then return 1; fi
    printf '%s\n' "$java"
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
