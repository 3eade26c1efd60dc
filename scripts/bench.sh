#!/usr/bin/env bash
# The satwatch benchmarks: one command measures everything and regenerates
# BENCHMARKS.md (the figures, the machine, the exact commands, and what limits
# each figure). Figures are printed as they are measured.
#
#   1. core       in process, no broker, no database: `satwatch bench pipeline` over the
#                 SMAP test split, 27 channels replicated 1, 10, 100 times:
#                 throughput, the inference ceiling, memory per channel.
#   2. end to end the full test split (221,174 samples) through a real broker
#                 (Apache Kafka, one KRaft node) and PostgreSQL: samples/s from the replay's first
#                 record to the last score row committed, and the CPU seconds
#                 of satwatch, the broker, PostgreSQL and the load generator.
#   3. latency    satwatch_end_to_end_latency_seconds at fixed offered loads
#                 (100, 1,000, 10,000 samples/s): p50, p99, p99.9, with fresh
#                 services for each rate.
#   4. grouped    training/grouped_study.py: one call for all 27 models (stacked
#                 weights) against one call per model, and two calls at once
#                 (needs `pip install onnx` in the ORT venv; skipped otherwise).
#
# Usage: scripts/bench.sh [--skip-e2e] [--quick] [--out FILE]
#   --skip-e2e   only the in-process part (no broker, no PostgreSQL needed)
#   --quick      smaller runs (replicas 1,10; 2,000 rows per channel end to
#                end; 5 s per latency rate) to check the harness, not to quote
#   --out FILE   where to write the report (default <repo>/BENCHMARKS.md)
#   --render-only  rewrite the report from the last run's raw figures
#
# It has its own state dir and ports, like scripts/demo.sh, so it never touches
# the services of the tests, the demo or a user's `scripts/services.sh up`.
# Services are started afresh for every measured run and stopped at the end
# (and on any failure or ^C). It does not build: run `cargo build --release`
# first (scripts/setup.sh fetches Kafka and installs PostgreSQL and ONNX Runtime).
#
# Env (flags win over env):
#   SATWATCH_BENCH_STATE       state dir (default <repo>/.local/bench): services,
#                              logs, raw results (results/*.json, metrics)
#   SATWATCH_BENCH_KAFKA_PORT  broker port (default 19292)
#   SATWATCH_BENCH_PG_PORT     PostgreSQL port (default 55632)
#   SATWATCH_BENCH_HTTP_ADDR   satwatch's HTTP address (default 127.0.0.1:18100)
#   SATWATCH_BENCH_SKIP_E2E=1, SATWATCH_BENCH_QUICK=1, SATWATCH_BENCH_OUT=FILE
#   SATWATCH_BENCH_REPLICAS    core replicas (default 1,10,100; quick 1,10)
#   SATWATCH_BENCH_RATES       latency rates in samples/s (default 100,1000,10000)
#   SATWATCH_BENCH_TIMEOUT     seconds any one wait may take (default 300)
#   SATWATCH_BENCH_CORE_JSON   use this file's `satwatch bench pipeline --json` output
#                              instead of running it (to test the report)
#   SATWATCH_BIN               the binary (default <repo>/target/release/satwatch)
set -euo pipefail
# EPOCHREALTIME, printf and python must all write 1.5, never 1,5.
export LC_ALL=C

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    sed -n '20,25s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
    exit "${1:-2}"
}

SKIP_E2E=${SATWATCH_BENCH_SKIP_E2E:-0}
QUICK=${SATWATCH_BENCH_QUICK:-0}
OUT=${SATWATCH_BENCH_OUT:-$SATWATCH_ROOT/BENCHMARKS.md}
RENDER_ONLY=0
while (($#)); do
    case $1 in
    --skip-e2e) SKIP_E2E=1 ;;
    --quick) QUICK=1 ;;
    --render-only) RENDER_ONLY=1 ;;
    --out)
        (($# >= 2)) || usage
        OUT=$2
        shift
        ;;
    -h | --help) usage 0 ;;
    *) usage ;;
    esac
    shift
done
[[ $OUT == /* ]] || OUT=$PWD/$OUT

cd "$SATWATCH_ROOT"

STATE=${SATWATCH_BENCH_STATE:-$SATWATCH_ROOT/.local/bench}
KAFKA_PORT=${SATWATCH_BENCH_KAFKA_PORT:-19292}
PG_PORT=${SATWATCH_BENCH_PG_PORT:-55632}
HTTP_ADDR=${SATWATCH_BENCH_HTTP_ADDR:-127.0.0.1:18100}
WAIT_TIMEOUT=${SATWATCH_BENCH_TIMEOUT:-300}
RATES=${SATWATCH_BENCH_RATES:-100,1000,10000}
CORE_JSON=${SATWATCH_BENCH_CORE_JSON:-}
BIN=${SATWATCH_BIN:-$SATWATCH_ROOT/target/release/satwatch}
PIPELINE=pipelines/smap.toml
DATA=data/smap
SPLIT="test"
READY_TIMEOUT=60
STOP_TIMEOUT=30
# The flooded backlog publishes this many malformed records after each sample.
FLOOD_BAD=${SATWATCH_BENCH_FLOOD_BAD:-2}
# The one-inference-thread comparison runs these replica counts.
ONE_THREAD_REPLICAS=1,10
if [[ $QUICK == 1 ]]; then
    REPLICAS=${SATWATCH_BENCH_REPLICAS:-1,10}
    ONE_THREAD_REPLICAS=1
    E2E_LIMIT=2000    # rows per channel end to end
    LAT_SAMPLES=5000  # per latency rate: this many samples ...
    LAT_SECONDS=5     # ... or this many seconds, whichever is shorter
    CORE_LATENCY_SECONDS=1
else
    REPLICAS=${SATWATCH_BENCH_REPLICAS:-1,10,100}
    E2E_LIMIT=""
    LAT_SAMPLES=20000
    LAT_SECONDS=20
    CORE_LATENCY_SECONDS=5
fi
# Section 1's in-process latency: these offered loads at every replica count.
CORE_LATENCY_RATES=1000,10000,100000

[[ $STATE == /* && $STATE != / ]] || die "SATWATCH_BENCH_STATE must be an absolute path other than /: got '$STATE'"
[[ $REPLICAS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "SATWATCH_BENCH_REPLICAS must be a comma-separated list of integers: got '$REPLICAS'"
[[ $RATES =~ ^[0-9]+(,[0-9]+)*$ ]] || die "SATWATCH_BENCH_RATES must be a comma-separated list of integers: got '$RATES'"
[[ $WAIT_TIMEOUT =~ ^[0-9]+$ ]] || die "SATWATCH_BENCH_TIMEOUT must be whole seconds: got '$WAIT_TIMEOUT'"

SVC=$STATE/services    # services.sh state: kafka, postgres, their logs; wiped per run
PG_TEMPLATE=$STATE/pg-template # a fresh PostgreSQL data dir, copied for each run (initdb is slow)
RESULTS=$STATE/results # raw figures (JSON), logs, metrics scrapes; wiped per bench
BASE_URL=http://$HTTP_ADDR
# How the binary is shown in the report's commands.
BIN_SHOWN=${BIN#"$SATWATCH_ROOT"/}
ORT_VENV_SHOWN=${ORT_VENV/#$HOME/\~}

# services.sh and `satwatch run` read these; exported so everything below
# uses the bench's services and never the default ones.
export SATWATCH_STATE=$SVC SATWATCH_KAFKA_PORT=$KAFKA_PORT SATWATCH_PG_PORT=$PG_PORT
# The broker's controller port follows its port (+1), whatever the caller's
# environment says for other services.
unset SATWATCH_KAFKA_CONTROLLER_PORT
export SATWATCH_HTTP_ADDR=$HTTP_ADDR SATWATCH_BIN=$BIN

# ------------------------------------------------------------ python helper
# Everything that parses or computes (/proc, Prometheus text, the figures the
# binary prints, the report) is in scripts/bench_report.py, stdlib only, with
# its own tests (scripts/test_bench_report.py).
py() { python3 "$SATWATCH_ROOT/scripts/bench_report.py" "$@"; }

# plan_replay START [LIMIT]: what a replay of rows [START, START+LIMIT) of
# every channel gives (LIMIT empty: to the end of the split), as `satwatch
# plan` counts it from the pipeline, its models and the data; sets expected
# (score rows), samples and channels.
plan_replay() {
    local args=(plan --pipeline "$PIPELINE" --data "$DATA" --split "$SPLIT" --start "$1" --json)
    [[ -z ${2:-} ]] || args+=(--limit "$2")
    "$BIN" "${args[@]}" >"$RESULTS/plan-replay.json" 2>"$RESULTS/plan-replay.log" ||
        die "satwatch plan failed (log: $RESULTS/plan-replay.log)"
    read -r expected samples channels _ < <(py expected "$RESULTS/plan-replay.json")
    [[ $expected =~ ^[0-9]+$ ]] || die "could not read the expected score rows from $RESULTS/plan-replay.json"
}

# ------------------------------------------------------------ bookkeeping

run_started=$SECONDS
satwatch_pid=""
replay_pidfile=""
services_started=0
finished=0
section=""
SATWATCH_LOG=""

# record_cmd ARGS: the command as the report shows it (binary path shortened).
record_cmd() {
    local out=() a
    for a in "$@"; do
        [[ $a == "$BIN" ]] && a=$BIN_SHOWN
        if [[ $a =~ ^[A-Za-z0-9_./,:=@%+-]+$ ]]; then
            out+=("$a")
        else
            out+=("$(printf '%q' "$a")")
        fi
    done
    printf '%s\n' "${out[*]}" >>"$RESULTS/commands.txt"
}
# note TEXT: a comment line in the report's command list.
note() { printf '# %s\n' "$*" >>"$RESULTS/commands.txt"; }

stop_replay() {
    if [[ -n $replay_pidfile && -f $replay_pidfile ]]; then
        local pid
        pid=$(<"$replay_pidfile")
        if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
        fi
    fi
    replay_pidfile=""
}

# stop_satwatch: SIGTERM, wait (deadline), insist on exit status 0.
stop_satwatch() {
    [[ -n $satwatch_pid ]] || return 0
    kill -TERM "$satwatch_pid" 2>/dev/null || true
    local end=$((SECONDS + STOP_TIMEOUT))
    while kill -0 "$satwatch_pid" 2>/dev/null; do
        if ((SECONDS >= end)); then
            kill -KILL "$satwatch_pid" 2>/dev/null || true
            satwatch_pid=""
            die "satwatch did not exit within ${STOP_TIMEOUT}s of SIGTERM (log: $SATWATCH_LOG)"
        fi
        sleep 0.2
    done
    local rc=0
    wait "$satwatch_pid" || rc=$?
    satwatch_pid=""
    ((rc == 0)) || die "satwatch exited with status $rc after SIGTERM (log: $SATWATCH_LOG)"
}

on_exit() {
    local rc=$?
    set +e
    stop_replay
    if [[ -n $satwatch_pid ]] && kill -0 "$satwatch_pid" 2>/dev/null; then
        log "stopping the background satwatch (pid $satwatch_pid)"
        kill -TERM "$satwatch_pid" 2>/dev/null
        local end=$((SECONDS + STOP_TIMEOUT))
        while kill -0 "$satwatch_pid" 2>/dev/null && ((SECONDS < end)); do sleep 0.2; done
        kill -KILL "$satwatch_pid" 2>/dev/null
    fi
    if [[ $services_started == 1 ]]; then
        scripts/services.sh down >/dev/null 2>&1 || echo "could not stop the bench's services: SATWATCH_STATE=$SVC scripts/services.sh down" >&2
    fi
    if [[ $finished == 0 ]]; then
        echo "bench FAILED${section:+ in: $section} (exit $rc); logs and raw figures in $RESULTS" >&2
        if [[ -n $SATWATCH_LOG && -f $SATWATCH_LOG ]]; then
            echo "---- last 20 lines of $SATWATCH_LOG" >&2
            tail -n 20 "$SATWATCH_LOG" >&2
        fi
    fi
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wipe_dir DIR: remove a directory the bench owns, refusing anything unexpected in it.
wipe_dir() {
    local dir=$1 entry
    shift
    [[ -d $dir ]] || return 0
    for entry in "$dir"/* "$dir"/.[!.]*; do
        [[ -e $entry ]] || continue
        local ok=0 name=${entry##*/} pattern
        for pattern in "$@"; do
            # shellcheck disable=SC2053  # glob match on purpose
            [[ $name == $pattern ]] && ok=1
        done
        ((ok)) || die "$dir holds $name, which the bench did not write: refusing to remove it (set SATWATCH_BENCH_STATE)"
    done
    rm -rf "$dir"
}

# ------------------------------------------------------------ services

# fresh_services [commit_ts]: stop, wipe and start the broker and PostgreSQL;
# with commit_ts=1 PostgreSQL records commit timestamps (for exact latencies).
fresh_services() {
    local commit_ts=${1:-0}
    scripts/services.sh down >/dev/null
    wipe_dir "$SVC" kafka postgres kafka.log kafka.pid postgres.log initdb.log
    services_started=1
    if ! [[ -d $PG_TEMPLATE ]]; then
        # initdb once per bench (it takes seconds); each run copies the result.
        scripts/services.sh up postgres >/dev/null
        scripts/services.sh down postgres >/dev/null
        cp -a "$SVC/postgres" "$PG_TEMPLATE"
        wipe_dir "$SVC" postgres postgres.log initdb.log
    fi
    mkdir -p "$SVC"
    cp -a "$PG_TEMPLATE" "$SVC/postgres"
    if [[ $commit_ts == 1 ]]; then
        # Appending keeps the file's owner (the postgres user when run as root).
        printf 'track_commit_timestamp = on\n' >>"$SVC/postgres/postgresql.auto.conf"
    fi
    scripts/services.sh up | sed 's/^/    /'
    local env_lines
    env_lines=$(scripts/services.sh env)
    eval "$env_lines"
    if [[ $commit_ts == 1 && $(psql -X -qtA "$DATABASE_URL" -c "SHOW track_commit_timestamp") != on ]]; then
        die "could not turn on track_commit_timestamp"
    fi
    broker_pid=$(<"$SVC/kafka.pid")
    pg_pid=$(head -n 1 "$SVC/postgres/postmaster.pid")
    SATWATCH_BIN=$BIN ./init-kafka.sh | sed 's/^/    /'
}

# broker_round_trip NAME: the broker alone (`satwatch bench broker` at
# $rate for $rt_seconds) on the services just started, into $RESULTS/NAME.json,
# with the broker's CPU over it: a light load does not mean an idle broker
# (fetch requests, replication of the internal topics, log flushes).
broker_round_trip() {
    local name=$1
    record_cmd "$BIN" bench broker --pipeline "$PIPELINE" --rate "$rate" --seconds "$rt_seconds" --json
    py snap "$RESULTS/$name.snap-before.json" "broker=$broker_pid"
    "$BIN" bench broker --pipeline "$PIPELINE" --rate "$rate" --seconds "$rt_seconds" --json \
        >"$RESULTS/$name.json" 2>"$RESULTS/$name.log" ||
        die "satwatch bench broker failed (log: $RESULTS/$name.log)"
    py snap "$RESULTS/$name.snap-after.json" "broker=$broker_pid"
    py round_trip "$RESULTS/$name.json"
    py round_trip_cpu "$RESULTS/$name"
}

# start_satwatch NAME: `satwatch run` in the background, wait until ready.
start_satwatch() {
    SATWATCH_LOG=$RESULTS/$1.satwatch.log
    "$BIN" run --pipeline "$PIPELINE" >"$SATWATCH_LOG" 2>&1 </dev/null &
    satwatch_pid=$!
    local end=$((SECONDS + READY_TIMEOUT))
    until [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$BASE_URL/v2/health/ready" || true) == 200 ]]; do
        if ! kill -0 "$satwatch_pid" 2>/dev/null; then
            local rc=0
            wait "$satwatch_pid" || rc=$?
            satwatch_pid=""
            die "satwatch run exited during startup with status $rc (log: $SATWATCH_LOG)"
        fi
        ((SECONDS < end)) || die "satwatch not ready at $BASE_URL/v2/health/ready after ${READY_TIMEOUT}s (log: $SATWATCH_LOG)"
        sleep 0.2
    done
    log "satwatch run is ready (pid $satwatch_pid)"
}

check_satwatch_alive() {
    if ! kill -0 "$satwatch_pid" 2>/dev/null; then
        local rc=0
        wait "$satwatch_pid" || rc=$?
        satwatch_pid=""
        die "satwatch run exited with status $rc while under load (log: $SATWATCH_LOG)"
    fi
}

# start_replay NAME ARGS: `satwatch ARGS` (a replay) in the background. Its
# exit time and status go to NAME.replay.exit, its CPU time (the subshell's
# children) to NAME.replay.times.
start_replay() {
    local name=$1
    shift
    record_cmd "$BIN" "$@"
    replay_pidfile=$RESULTS/$name.replay.pid
    rm -f "$RESULTS/$name.replay.exit"
    (
        rc=0
        "$BIN" "$@" >"$RESULTS/$name.replay.log" 2>&1 </dev/null &
        echo "$!" >"$replay_pidfile"
        wait "$!" || rc=$?
        printf '%s %s\n' "$EPOCHREALTIME" "$rc" >"$RESULTS/$name.replay.exit"
        times >"$RESULTS/$name.replay.times"
        exit "$rc"
    ) &
    replay_sub=$!
}

# finish_replay NAME: wait (deadline) for the replay; it must have succeeded.
finish_replay() {
    local name=$1 end=$((SECONDS + WAIT_TIMEOUT)) rc=0
    while kill -0 "$replay_sub" 2>/dev/null; do
        ((SECONDS < end)) || die "satwatch replay still running after ${WAIT_TIMEOUT}s (log: $RESULTS/$name.replay.log)"
        sleep 0.1
    done
    wait "$replay_sub" || rc=$?
    replay_pidfile=""
    ((rc == 0)) || {
        tail -n 5 "$RESULTS/$name.replay.log" >&2
        die "satwatch replay failed with status $rc (log: $RESULTS/$name.replay.log)"
    }
    log "   $(grep '^replayed' "$RESULTS/$name.replay.log")"
}

replay_failed() {
    # True when the replay has exited with a non-zero status.
    local name=$1 t rc
    [[ -f $RESULTS/$name.replay.exit ]] || return 1
    read -r t rc <"$RESULTS/$name.replay.exit"
    [[ -n $t && $rc != 0 ]]
}

# pg_open / pg_query SQL / pg_close: one psql session kept open as a
# coprocess, so polling every 100 ms does not fork a psql and a backend each time.
pg_open() {
    coproc PSQL { exec psql -X -qtA -v ON_ERROR_STOP=1 "$DATABASE_URL" 2>&1; }
}
pg_query() {
    printf '%s;\n' "$1" >&"${PSQL[1]}"
    IFS= read -r -t 10 REPLY <&"${PSQL[0]}" || die "no answer from PostgreSQL to: $1"
}
pg_close() {
    if [[ -n ${PSQL_PID:-} ]]; then
        printf '\\q\n' >&"${PSQL[1]}" || true
        wait "$PSQL_PID" 2>/dev/null || true
    fi
}

# wait_scores NAME EXPECTED: poll `scores` every 100 ms until it holds
# EXPECTED rows; sets t_done (epoch seconds) to the first poll that saw them
# and scored_at_replay_end to the rows there were when the replay exited.
wait_scores() {
    local name=$1 expected=$2 end=$((SECONDS + WAIT_TIMEOUT)) next_log=$((SECONDS + 5))
    scored_at_replay_end=""
    pg_open
    while :; do
        pg_query "select count(*) from scores"
        [[ $REPLY =~ ^[0-9]+$ ]] || die "unexpected answer from PostgreSQL: $REPLY"
        # How much was scored while the replay still ran (a sound load
        # generator delivers as it goes, so this is nearly everything).
        if [[ -z $scored_at_replay_end && -f $RESULTS/$name.replay.exit ]]; then
            scored_at_replay_end=$REPLY
        fi
        if ((REPLY >= expected)); then
            t_done=$EPOCHREALTIME
            scored_at_replay_end=${scored_at_replay_end:-$REPLY}
            break
        fi
        check_satwatch_alive
        if replay_failed "$name"; then
            die "satwatch replay failed (log: $RESULTS/$name.replay.log)"
        fi
        ((SECONDS < end)) || die "after ${WAIT_TIMEOUT}s 'scores' holds $REPLY rows, expected $expected (log: $SATWATCH_LOG)"
        if ((SECONDS >= next_log)); then
            log "   scores: $REPLY / $expected"
            next_log=$((SECONDS + 5))
        fi
        sleep 0.1
    done
    pg_close
    ((REPLY == expected)) || die "'scores' holds $REPLY rows, more than the $expected expected"
}

# scrape FILE: GET /metrics into FILE.
scrape() { curl -sf --max-time 5 "$BASE_URL/metrics" >"$1" || die "GET $BASE_URL/metrics failed"; }

# wait_metric WHAT VALUE: poll /metrics until the figure reaches VALUE.
wait_metric() {
    local what=$1 want=$2 end=$((SECONDS + WAIT_TIMEOUT)) got tmp=$RESULTS/poll.metrics.txt
    while :; do
        scrape "$tmp"
        got=$(py metric "$tmp" "$what")
        ((got >= want)) && break
        check_satwatch_alive
        ((SECONDS < end)) || die "after ${WAIT_TIMEOUT}s $what is $got, expected $want (log: $SATWATCH_LOG)"
        sleep 0.1
    done
    rm -f "$tmp"
}

if [[ $RENDER_ONLY == 1 ]]; then
    [[ -f $RESULTS/machine.json && -f $RESULTS/commands.txt ]] || die "no raw figures in $RESULTS: run the bench first"
    py render "$RESULTS" "$OUT"
    finished=1
    log "rewrote $OUT from $RESULTS"
    exit 0
fi

# ------------------------------------------------------------ preflight

section="preflight"
[[ -x $BIN ]] || die "$BIN missing: run cargo build --release first (or set SATWATCH_BIN)"
for tool in python3 getconf; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found on PATH"
done
ORT_DYLIB_PATH=$(find_ort_lib)
[[ -n $ORT_DYLIB_PATH ]] || die "libonnxruntime.so.$ORT_VERSION not found: run scripts/setup.sh"
export ORT_DYLIB_PATH
if [[ $SKIP_E2E != 1 ]]; then
    for tool in curl psql; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool not found on PATH (scripts/setup.sh installs it)"
    done
    if tcp_open "${HTTP_ADDR%:*}" "${HTTP_ADDR##*:}"; then
        die "$HTTP_ADDR is already in use by another process: set SATWATCH_BENCH_HTTP_ADDR"
    fi
fi
if [[ -d $STATE ]]; then
    for entry in "$STATE"/* "$STATE"/.[!.]*; do
        [[ -e $entry ]] || continue
        case ${entry##*/} in services | results | pg-template) ;; *) die "$STATE holds ${entry##*/}, which the bench did not write: set SATWATCH_BENCH_STATE" ;; esac
    done
fi
# Stop services a previous, interrupted bench may have left behind, then start clean.
scripts/services.sh down >/dev/null
wipe_dir "$RESULTS" '*'
wipe_dir "$PG_TEMPLATE" '*'
mkdir -p "$RESULTS"
: >"$RESULTS/commands.txt"

# The machine.
cpu_model=$(sed -n 's/^model name[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo | head -n 1)
mem_kb=$(sed -n 's/^MemTotal:[[:space:]]*\([0-9]*\) kB/\1/p' /proc/meminfo)
rustc_version=$( (rustc --version || "$HOME/.cargo/bin/rustc" --version) 2>/dev/null || echo unknown)
pg_version=$("$(pg_bindir)/postgres" --version 2>/dev/null || echo unknown)
git_rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then git_rev+=" + uncommitted changes"; fi
py machine "$RESULTS/machine.json" \
    "date=$(date -u '+%Y-%m-%d %H:%M UTC')" "cpu_model=${cpu_model:-unknown}" "nproc=$(nproc)" \
    "memory=$(awk -v kb="${mem_kb:-0}" 'BEGIN { printf "%.1f GiB", kb / 1048576 }')" \
    "kernel=$(uname -sr)" "rustc=$rustc_version" "ort=ONNX Runtime $ORT_VERSION (${ORT_DYLIB_PATH##*/})" \
    "broker=Apache Kafka $KAFKA_VERSION (one KRaft node, broker and controller; heap ${SATWATCH_KAFKA_HEAP:-768m})" "postgres=$pg_version (fsync=off)" \
    "satwatch=$("$BIN" --version 2>/dev/null || echo satwatch), git $git_rev" \
    "loadavg_start=$(cut -d' ' -f1-3 /proc/loadavg)" "quick=$QUICK" "skip_e2e=$SKIP_E2E" \
    "lat_samples=$LAT_SAMPLES" "lat_seconds=$LAT_SECONDS" "results_dir=${RESULTS#"$SATWATCH_ROOT"/}"
# What the pipeline and its models are, as the binary reads them.
"$BIN" plan --pipeline "$PIPELINE" --json >"$RESULTS/plan.json" 2>"$RESULTS/plan.log" ||
    die "satwatch plan failed (log: $RESULTS/plan.log)"
py settings "$RESULTS/plan.json" "$RESULTS/settings.json"
log "bench: $(nproc) cores ($cpu_model), load average $(cut -d' ' -f1-3 /proc/loadavg); state $STATE"

# ------------------------------------------------------------ 1. core

section="1. core (satwatch bench pipeline)"
log "== $section"
# Only this run's figures: a comparison left from an earlier run must not show.
rm -f "$RESULTS/core-1thread.json" "$RESULTS/core-files.json"
bench_args=(bench pipeline --pipeline "$PIPELINE" --data "$DATA" --replicas "$REPLICAS"
    --latency-rates "$CORE_LATENCY_RATES" --latency-seconds "$CORE_LATENCY_SECONDS" --json)
if [[ -n $CORE_JSON ]]; then
    [[ -f $CORE_JSON ]] || die "SATWATCH_BENCH_CORE_JSON=$CORE_JSON: no such file"
    note "section 1 from $CORE_JSON (SATWATCH_BENCH_CORE_JSON), not measured"
    py core "$CORE_JSON" "$RESULTS/core.json" "taken from $CORE_JSON (SATWATCH_BENCH_CORE_JSON)"
elif "$BIN" bench pipeline --help >/dev/null 2>&1; then
    note "1. core throughput, inference ceiling, scaling (in process)"
    record_cmd "$BIN" "${bench_args[@]}"
    # Deadline: generous, but a hung bench must not hang the script.
    timeout "$WAIT_TIMEOUT" "$BIN" "${bench_args[@]}" >"$RESULTS/core.raw.json" 2>"$RESULTS/core.log" \
        || die "satwatch bench pipeline failed or ran past ${WAIT_TIMEOUT}s (log: $RESULTS/core.log)"
    py core "$RESULTS/core.raw.json" "$RESULTS/core.json" measured
    # The same with one inference thread: on two cores the engine's own
    # thread then has a core to itself (and the ceiling is one thread's).
    one_args=(bench pipeline --pipeline "$PIPELINE" --data "$DATA" --replicas "$ONE_THREAD_REPLICAS" --backend-threads 1 --json)
    record_cmd "$BIN" "${one_args[@]}"
    timeout "$WAIT_TIMEOUT" "$BIN" "${one_args[@]}" >"$RESULTS/core-1thread.raw.json" 2>"$RESULTS/core-1thread.log" \
        || die "satwatch bench pipeline --backend-threads 1 failed or ran past ${WAIT_TIMEOUT}s (log: $RESULTS/core-1thread.log)"
    py core "$RESULTS/core-1thread.raw.json" "$RESULTS/core-1thread.json" measured
    # The model files as they are, on laid-out windows: what the row form gains.
    files_args=(bench pipeline --pipeline "$PIPELINE" --data "$DATA" --replicas "$ONE_THREAD_REPLICAS" --model-files --json)
    record_cmd "$BIN" "${files_args[@]}"
    timeout "$WAIT_TIMEOUT" "$BIN" "${files_args[@]}" >"$RESULTS/core-files.raw.json" 2>"$RESULTS/core-files.log" \
        || die "satwatch bench pipeline --model-files failed or ran past ${WAIT_TIMEOUT}s (log: $RESULTS/core-files.log)"
    py core "$RESULTS/core-files.raw.json" "$RESULTS/core-files.json" measured
else
    log "   $BIN has no 'bench pipeline' subcommand: section 1 is skipped"
    py core - "$RESULTS/core.json" "\`$BIN_SHOWN\` has no \`bench pipeline\` subcommand (build a newer satwatch)."
fi
py print "$RESULTS" core

# ------------------------------------------------------------ 2. end to end

if [[ $SKIP_E2E != 1 ]]; then
    section="2. end to end"
    log "== $section (fresh services on 127.0.0.1:$KAFKA_PORT and 127.0.0.1:$PG_PORT)"
    note "2. end to end: fresh services, topics, satwatch run, then the replay"
    note "SATWATCH_STATE=.local/bench/services SATWATCH_KAFKA_PORT=$KAFKA_PORT SATWATCH_PG_PORT=$PG_PORT scripts/services.sh up"
    note "SATWATCH_BROKERS=127.0.0.1:$KAFKA_PORT ./init-kafka.sh"
    note "SATWATCH_BROKERS=127.0.0.1:$KAFKA_PORT DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/satwatch SATWATCH_HTTP_ADDR=$HTTP_ADDR $BIN_SHOWN run --pipeline $PIPELINE &"
    fresh_services 0
    start_satwatch e2e
    plan_replay 0 "$E2E_LIMIT"
    replay_args=(replay --pipeline "$PIPELINE" --data "$DATA" --split "$SPLIT" --channels all --max-rate)
    [[ -z $E2E_LIMIT ]] || replay_args+=(--limit "$E2E_LIMIT")
    py snap "$RESULTS/e2e.snap-before.json" "satwatch=$satwatch_pid" "broker=$broker_pid" "postgres=$pg_pid"
    t_launch=$EPOCHREALTIME
    start_replay e2e "${replay_args[@]}"
    log "   replaying $samples samples at full speed; waiting for $expected score rows"
    wait_scores e2e "$expected"
    scores=$REPLY
    py snap "$RESULTS/e2e.snap-after.json" "satwatch=$satwatch_pid" "broker=$broker_pid" "postgres=$pg_pid"
    finish_replay e2e
    scrape "$RESULTS/e2e.metrics.txt"
    min_ts=$(psql -X -qtA "$DATABASE_URL" -c "select extract(epoch from min(ts)) from scores")
    cat >"$RESULTS/e2e.meta.json" <<EOF
{"t_launch": $t_launch, "t_done": $t_done, "samples": $samples, "expected": $expected, "scores": $scores, "scored_at_replay_end": $scored_at_replay_end, "min_ts_epoch": ${min_ts:-null}}
EOF
    stop_satwatch
    py e2e "$RESULTS" "$RESULTS/e2e.json"
    py print "$RESULTS" e2e

    section="2. end to end from a backlog"
    log "== $section"
    note "2. from a backlog: fresh services (track_commit_timestamp on), topics, the whole replay, then satwatch run drains it"
    fresh_services 1
    start_replay backlog "${replay_args[@]}"
    finish_replay backlog
    log "   $samples samples published; starting satwatch run to drain them"
    start_satwatch backlog
    py snap "$RESULTS/backlog.snap-before.json" "satwatch=$satwatch_pid" "broker=$broker_pid" "postgres=$pg_pid"
    wait_scores backlog "$expected"
    scores=$REPLY
    py snap "$RESULTS/backlog.snap-after.json" "satwatch=$satwatch_pid" "broker=$broker_pid" "postgres=$pg_pid"
    span_s=$(psql -X -qtA -v ON_ERROR_STOP=1 "$DATABASE_URL" -c "
        select extract(epoch from max(pg_xact_commit_timestamp(xmin)) - min(pg_xact_commit_timestamp(xmin)))::float8 from scores")
    printf '{"samples": %s, "scores": %s, "span_s": %s}\n' "$samples" "$scores" "$span_s" >"$RESULTS/backlog.meta.json"
    stop_satwatch
    py backlog "$RESULTS" "$RESULTS/backlog.json"

    section="2. end to end from a backlog flooded with bad records"
    log "== $section"
    note "2. a flood: as the backlog, with $FLOOD_BAD malformed records after each sample (replay --bad-records-per-sample $FLOOD_BAD)"
    fresh_services 1
    start_replay flood "${replay_args[@]}" --bad-records-per-sample "$FLOOD_BAD"
    finish_replay flood
    log "   $samples samples and $((samples * FLOOD_BAD)) malformed records published; starting satwatch run to drain them"
    start_satwatch flood
    py snap "$RESULTS/flood.snap-before.json" "satwatch=$satwatch_pid" "broker=$broker_pid" "postgres=$pg_pid"
    wait_scores flood "$expected"
    scores=$REPLY
    wait_metric dead_letters "$((samples * FLOOD_BAD))"
    py snap "$RESULTS/flood.snap-after.json" "satwatch=$satwatch_pid" "broker=$broker_pid" "postgres=$pg_pid"
    scrape "$RESULTS/flood.metrics.txt"
    span_s=$(psql -X -qtA -v ON_ERROR_STOP=1 "$DATABASE_URL" -c "
        select extract(epoch from max(pg_xact_commit_timestamp(xmin)) - min(pg_xact_commit_timestamp(xmin)))::float8 from scores")
    printf '{"samples": %s, "bad": %s, "scores": %s, "span_s": %s}\n' "$samples" "$((samples * FLOOD_BAD))" "$scores" "$span_s" >"$RESULTS/flood.meta.json"
    stop_satwatch
    py flood "$RESULTS" "$RESULTS/flood.json"
fi

# ------------------------------------------------------------ 3. latency

if [[ $SKIP_E2E != 1 ]]; then
    note "3. latency: for each rate R, fresh services (PostgreSQL with track_commit_timestamp = on), topics, satwatch run, then:"
    IFS=, read -r -a rate_list <<<"$RATES"
    # Rows per channel that only fill the window: replayed before each measured part.
    read -r window < <(py window "$RESULTS/plan.json")
    for rate in "${rate_list[@]}"; do
        section="3. latency at $rate samples/s"
        log "== $section"
        want=$((rate * LAT_SECONDS < LAT_SAMPLES ? rate * LAT_SECONDS : LAT_SAMPLES))
        rt_seconds=$(py div "$want" "$rate")
        if [[ $rate == 1000 ]]; then
            # The broker alone with one partition per topic (7 to poll instead
            # of 21): how much of the round trip is per partition polled.
            SATWATCH_PARTITIONS=1 fresh_services
            note "at 1,000/s, on fresh services with one partition per topic (SATWATCH_PARTITIONS=1 ./init-kafka.sh):"
            broker_round_trip "round-trip-$rate-one-partition"
        fi
        # The broker alone, on the services satwatch is then measured on:
        # records published at the same rate, keyed and spread like the
        # replay, consumed with satwatch's consumer settings, no pipeline in
        # between. It also warms the broker: a fresh JVM spends its first
        # tens of seconds compiling its hot paths (the C2 compiler thread
        # took a quarter of a core in the end-to-end run), which a broker in
        # service has long done.
        fresh_services 1
        broker_round_trip "round-trip-$rate"
        start_satwatch "lat-$rate"
        # Warm-up: the rows that only fill the windows, at full speed, consumed
        # before the measured part starts.
        plan_replay 0 "$window"
        warm=$samples
        start_replay "lat-$rate-warmup" replay --pipeline "$PIPELINE" --data "$DATA" --split "$SPLIT" --channels all --max-rate --limit "$window"
        finish_replay "lat-$rate-warmup"
        wait_metric consumed "$warm"
        # Rows per channel: LAT_SAMPLES samples or LAT_SECONDS seconds, whichever is shorter.
        limit=$(((want + channels - 1) / channels))
        plan_replay "$window" "$limit"
        start_replay "lat-$rate" replay --pipeline "$PIPELINE" --data "$DATA" --split "$SPLIT" --channels all --rate "$rate" --start "$window" --limit "$limit"
        log "   replaying $samples samples at $rate samples/s; waiting for $expected score rows"
        wait_scores "lat-$rate" "$expected"
        scores=$REPLY
        log "   $((100 * scored_at_replay_end / expected)) % of the score rows were committed while the replay ran"
        finish_replay "lat-$rate"
        # The histogram is observed once the batch's forecasts are also acknowledged.
        wait_metric latency_count "$expected"
        scrape "$RESULTS/lat-$rate.metrics.txt"
        exact=$(psql -X -qtA -F ' ' -v ON_ERROR_STOP=1 "$DATABASE_URL" -c "
            select count(*), percentile_cont(0.5) within group (order by l), percentile_cont(0.99) within group (order by l),
                   percentile_cont(0.999) within group (order by l), avg(l), max(l), min(l)
            from (select extract(epoch from pg_xact_commit_timestamp(xmin) - ts)::float8 as l from scores) s")
        read -r n p50 p99 p999 mean max min <<<"$exact"
        cat >"$RESULTS/lat-$rate.meta.json" <<EOF
{"limit": $limit, "samples": $samples, "expected": $expected, "scores": $scores, "scored_at_replay_end": $scored_at_replay_end,
 "exact": {"count": $n, "p50": $p50, "p99": $p99, "p999": $p999, "mean": $mean, "max": $max, "min": $min}}
EOF
        stop_satwatch
        py latency "$RESULTS" "$rate" "$RESULTS/latency-$rate.json"
        py print "$RESULTS" "$rate"
    done
    note "then: curl http://$HTTP_ADDR/metrics (satwatch_end_to_end_latency_seconds) and, in PostgreSQL:"
    note "select percentile_cont(0.99) within group (order by extract(epoch from pg_xact_commit_timestamp(xmin) - ts)) from scores"
    section="stopping the services"
    scripts/services.sh down >/dev/null
    services_started=0
fi

# ------------------------------------------------------------ 4. grouped

# The "beyond" question: one call for all 27 models (their weights stacked in
# one graph) against one call per model, and two calls at once. It needs the
# onnx package next to onnxruntime in the venv (`pip install onnx`).
if [[ $QUICK != 1 ]] && "$ORT_VENV/bin/python" -c 'import onnx, onnxruntime' 2>/dev/null; then
    section="4. one call for all models"
    log "== $section (training/grouped_study.py)"
    note "4. one call for all models (stacked weights) against one call per model, and two calls at once"
    note "$ORT_VENV_SHOWN/bin/python training/grouped_study.py --out .local/bench/results/grouped.md"
    timeout "$WAIT_TIMEOUT" "$ORT_VENV/bin/python" "$SATWATCH_ROOT/training/grouped_study.py" --out "$RESULTS/grouped.md" \
        >"$RESULTS/grouped.log" 2>&1 || die "training/grouped_study.py failed (log: $RESULTS/grouped.log)"
else
    log "   section 4 skipped (quick mode, or no onnx module in $ORT_VENV: pip install onnx there)"
fi

# ------------------------------------------------------------ report

section="report"
total_s=$((SECONDS - run_started))
py machine "$RESULTS/machine.json" "loadavg_end=$(cut -d' ' -f1-3 /proc/loadavg)" "total_s=$total_s" \
    "quick=$QUICK" "skip_e2e=$SKIP_E2E" "lat_samples=$LAT_SAMPLES" "lat_seconds=$LAT_SECONDS"
py render "$RESULTS" "$OUT"
finished=1
log "wrote $OUT (the whole bench took ${total_s}s)"
