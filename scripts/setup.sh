#!/usr/bin/env bash
# Install everything a fresh Debian 12 machine needs to build, run and test
# satwatch: apt packages (a Java 17+ runtime and Maven among them), ONNX
# Runtime's shared library (from PyPI's wheel, in a venv) and Apache Kafka's
# broker jars (from Maven Central, through deploy/kafka-local/pom.xml); with
# --training also the training venv (training/requirements.txt, for
# training/train.py and the tests that train a small model: torch, a few GB,
# which running the shipped models does not need).
# Idempotent: each step is skipped when its result is already there, so
# running it on every CI run costs seconds.
# Building satwatch itself (cargo build) is not its job.
#
# Usage: scripts/setup.sh [--training]   (works with no TTY and CI=true)
# Env:   SATWATCH_CACHE      cache dir for the venv and Kafka's jars (default ~/.cache/satwatch)
#        SATWATCH_KAFKA_LIB  where Kafka's jars go (default $SATWATCH_CACHE/kafka/<version>/lib)
#        SATWATCH_JAVA       the java to check (default $JAVA_HOME/bin/java, else java on PATH)
#        PYTHON              interpreter used to create the venv (default python3)
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TRAINING=0
case "${1:-}" in
"") ;;
--training) TRAINING=1 ;;
*)
    echo "usage: $0 [--training]" >&2
    exit 2
    ;;
esac

# Never let apt, debconf or pip stop to ask a question: CI has no stdin.
export DEBIAN_FRONTEND=noninteractive
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

APT_PACKAGES=(build-essential libssl-dev pkg-config postgresql python3-venv)
# Java and Maven only when missing: a machine may well have a newer JDK (or
# Maven) from elsewhere, which apt's openjdk-17 package would not replace.
if ! java_ok >/dev/null; then
    APT_PACKAGES+=(openjdk-17-jre-headless)
fi
if ! command -v mvn >/dev/null 2>&1; then
    APT_PACKAGES+=(maven)
fi

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

step_training() {
    local requirements=$SATWATCH_ROOT/training/requirements.txt
    local stamp=$TRAIN_VENV/satwatch-requirements.txt
    # The stamp is the requirements file the venv was last installed from.
    if [[ -x $TRAIN_VENV/bin/python ]] && cmp -s "$requirements" "$stamp"; then
        log "training venv: already present ($TRAIN_VENV)"
        return 0
    fi
    local python=${PYTHON:-python3}
    command -v "$python" >/dev/null 2>&1 || die "$python not found (needed to create $TRAIN_VENV)"
    mkdir -p "$SATWATCH_CACHE"
    if [[ ! -x $TRAIN_VENV/bin/python ]]; then
        "$python" -m venv "$TRAIN_VENV" || die "could not create venv $TRAIN_VENV (is python3-venv installed?)"
    fi
    log "training venv: installing training/requirements.txt into $TRAIN_VENV (torch: a few GB, once)"
    "$TRAIN_VENV/bin/python" -m pip install -q -r "$requirements" \
        || die "pip install -r training/requirements.txt into $TRAIN_VENV failed"
    cp "$requirements" "$stamp"
    log "training venv: done"
}

step_java() {
    local java major
    java=$(find_java)
    [[ -n $java ]] || die "no java found (SATWATCH_JAVA, \$JAVA_HOME/bin/java, PATH): Kafka needs Java $JAVA_MIN_VERSION or newer"
    major=$(java_major "$java")
    # A JAVA_HOME or SATWATCH_JAVA pointing at an old JDK is not something apt
    # can fix: say which java was found and how to choose another.
    if [[ -z $major ]] || ((major < JAVA_MIN_VERSION)); then
        die "$java is Java ${major:-?}; Kafka $KAFKA_VERSION needs $JAVA_MIN_VERSION or newer: set SATWATCH_JAVA (or JAVA_HOME) to one, e.g. /usr/lib/jvm/java-17-openjdk-amd64/bin/java"
    fi
    command -v mvn >/dev/null 2>&1 || die "mvn not found on PATH (needed to fetch Kafka's jars): install maven"
    log "java $major and maven: present ($java, $(command -v mvn))"
}

step_kafka() {
    check_kafka_version
    if kafka_lib_ok; then
        log "kafka $KAFKA_VERSION: already present ($KAFKA_LIB)"
        return 0
    fi
    # A directory named by SATWATCH_KAFKA_LIB is the caller's: never replace it.
    if [[ -n ${SATWATCH_KAFKA_LIB:-} && -e $KAFKA_LIB ]]; then
        die "SATWATCH_KAFKA_LIB=$KAFKA_LIB has no kafka_2.13-$KAFKA_VERSION.jar and log4j-slf4j-impl jar: point it at a complete set, or at a directory that does not exist yet (setup.sh fetches into it), or unset it"
    fi
    mkdir -p "$SATWATCH_CACHE" "${KAFKA_LIB%/*}"
    # Two setup.sh runs (two CI jobs on one machine) would both download and
    # then race on the rename: serialise them, and look again once we hold it.
    exec 9>"$SATWATCH_CACHE/kafka-fetch.lock"
    flock 9
    if kafka_lib_ok; then
        log "kafka $KAFKA_VERSION: already present (fetched by a concurrent run)"
        return 0
    fi
    # Temp dirs of runs that were interrupted: no other run is fetching now.
    rm -rf "$KAFKA_LIB".tmp.*
    local logf=$SATWATCH_CACHE/kafka-$KAFKA_VERSION-fetch.log tmp
    # Download into a temp dir next to KAFKA_LIB, then rename: an interrupted
    # download never leaves a KAFKA_LIB that kafka_lib_ok would take as complete.
    tmp=$(mktemp -d "$KAFKA_LIB.tmp.XXXXXX")
    log "kafka $KAFKA_VERSION: fetching the broker's jars from Maven Central (log: $logf)"
    if ! mvn -B -ntp -f "$KAFKA_POM" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$tmp" </dev/null >"$logf" 2>&1; then
        rm -rf "$tmp"
        tail -n 30 "$logf" >&2
        die "mvn could not fetch Kafka $KAFKA_VERSION's jars (is Maven Central reachable? full log: $logf)"
    fi
    [[ -f $tmp/kafka_2.13-$KAFKA_VERSION.jar ]] || {
        rm -rf "$tmp"
        die "mvn succeeded but kafka_2.13-$KAFKA_VERSION.jar is not among the jars (log: $logf)"
    }
    # A KAFKA_LIB in the cache that failed kafka_lib_ok is incomplete: replace it.
    rm -rf "$KAFKA_LIB"
    mv -T "$tmp" "$KAFKA_LIB"
    kafka_lib_ok || die "Kafka's jars were fetched into $KAFKA_LIB but it still looks incomplete (no log4j-slf4j-impl jar?)"
    log "kafka $KAFKA_VERSION: done ($(find "$KAFKA_LIB" -name '*.jar' | wc -l) jars in $KAFKA_LIB)"
}

step_apt
step_java
step_rust
step_onnxruntime
if ((TRAINING)); then
    step_training
fi
step_kafka
log "setup complete; for services run: scripts/services.sh up && eval \"\$(scripts/services.sh env)\""
