#!/usr/bin/env bash
# The satwatch demo, end to end, on a fresh Debian 12 machine: install what is
# missing, build, start a broker and PostgreSQL, create the topics, start
# `satwatch run`, replay the SMAP test split as fast as the broker takes it,
# wait until every replayed sample past warm-up is scored, stop satwatch
# cleanly and print what it found and where to look.
#
# Usage: scripts/demo.sh             (no arguments; works with no TTY and CI=true)
#
# The demo has its own state dir and ports, so it never touches the services
# of the tests or a user's `scripts/services.sh up`. Each run starts from a
# clean state (the demo's services are stopped and its state dir removed), so
# the figures are for exactly one replay. The services are left running at
# the end so the results can be inspected.
#
# Env:   SATWATCH_DEMO_STATE       state dir (default <repo>/.local/demo)
#        SATWATCH_DEMO_KAFKA_PORT  broker port (default 19392; its KRaft controller
#                                  listens on the next port up)
#        SATWATCH_DEMO_PG_PORT     PostgreSQL port (default 55532)
#        SATWATCH_DEMO_HTTP_ADDR   satwatch's HTTP address (default 127.0.0.1:18000)
#        SATWATCH_DEMO_BUILD=0     skip `cargo build --release` (use the existing binary)
#        SATWATCH_DEMO_TIMEOUT     seconds to wait for scoring to finish (default 300)
#        SATWATCH_CACHE            cache dir for setup.sh (default ~/.cache/satwatch)
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ $# -ne 0 ]]; then
    echo "usage: $0   (takes no arguments; settings come from the environment)" >&2
    exit 2
fi

cd "$SATWATCH_ROOT"

STATE=${SATWATCH_DEMO_STATE:-$SATWATCH_ROOT/.local/demo}
# Not 19192: that is where `scripts/services.sh up cluster` starts by default.
KAFKA_PORT=${SATWATCH_DEMO_KAFKA_PORT:-19392}
PG_PORT=${SATWATCH_DEMO_PG_PORT:-55532}
HTTP_ADDR=${SATWATCH_DEMO_HTTP_ADDR:-127.0.0.1:18000}
SCORE_TIMEOUT=${SATWATCH_DEMO_TIMEOUT:-300}
READY_TIMEOUT=60
STOP_TIMEOUT=30
PIPELINE=pipelines/smap.toml
DATA=data/smap
SPLIT="test"
BIN=$SATWATCH_ROOT/target/release/satwatch
SATWATCH_LOG=$STATE/satwatch.log
BASE_URL=http://$HTTP_ADDR

# services.sh reads these; exported so every call below uses the demo's.
export SATWATCH_STATE=$STATE SATWATCH_KAFKA_PORT=$KAFKA_PORT SATWATCH_PG_PORT=$PG_PORT
# The controller port follows the broker's (+1): a value left in the caller's
# environment for other services must not steer the demo's broker onto it.
unset SATWATCH_KAFKA_CONTROLLER_PORT
export SATWATCH_HTTP_ADDR=$HTTP_ADDR SATWATCH_BIN=$BIN
# Never let anything stop to ask a question: CI has no stdin.
export DEBIAN_FRONTEND=noninteractive

[[ $STATE == /* && $STATE != / ]] || die "SATWATCH_DEMO_STATE must be an absolute path other than /: got '$STATE'"

# ------------------------------------------------------------ phase timing

PHASE_NAMES=()
PHASE_SECS=()
phase_name=""
phase_start=0
phase() {
    phase_end
    phase_name=$1
    phase_start=$SECONDS
    log "== $phase_name"
}
phase_end() {
    if [[ -n $phase_name ]]; then
        local took=$((SECONDS - phase_start))
        PHASE_NAMES+=("$phase_name")
        PHASE_SECS+=("$took")
        log "   $phase_name: done in ${took}s"
        phase_name=""
    fi
}

# ------------------------------------------------------------ cleanup

satwatch_pid=""
finished=0
on_exit() {
    local rc=$?
    if [[ -n $satwatch_pid ]] && kill -0 "$satwatch_pid" 2>/dev/null; then
        log "stopping the background satwatch (pid $satwatch_pid)"
        kill -TERM "$satwatch_pid" 2>/dev/null || true
        local end=$((SECONDS + STOP_TIMEOUT))
        while kill -0 "$satwatch_pid" 2>/dev/null && ((SECONDS < end)); do sleep 0.5; done
        kill -KILL "$satwatch_pid" 2>/dev/null || true
    fi
    if [[ $finished -eq 0 ]]; then
        echo "demo FAILED${phase_name:+ in phase: $phase_name} (exit $rc)" >&2
        if [[ -f $SATWATCH_LOG ]]; then
            echo "satwatch log: $SATWATCH_LOG" >&2
        fi
        echo "the demo's services may still be running; stop them with:" >&2
        echo "  SATWATCH_STATE=$STATE SATWATCH_KAFKA_PORT=$KAFKA_PORT SATWATCH_PG_PORT=$PG_PORT scripts/services.sh down" >&2
    fi
}
trap on_exit EXIT
# A ^C or a CI cancel should clean up too (the EXIT trap does the work).
trap 'exit 130' INT
trap 'exit 143' TERM

satwatch_log_tail() {
    if [[ -f $SATWATCH_LOG ]]; then
        echo "---- last 30 lines of $SATWATCH_LOG" >&2
        tail -n 30 "$SATWATCH_LOG" >&2
        echo "----" >&2
    fi
}

# q SQL: one value from the demo's database, unaligned, no headers.
q() { psql -X -qtA -v ON_ERROR_STOP=1 "$DATABASE_URL" -c "$1"; }

# ------------------------------------------------------------ 1. setup

phase "setup (scripts/setup.sh: apt packages, Java and Maven, ONNX Runtime, Apache Kafka's jars from Maven Central)"
scripts/setup.sh
# setup.sh may have found cargo in ~/.cargo/bin without it being on our PATH.
if ! command -v cargo >/dev/null 2>&1 && [[ -x $HOME/.cargo/bin/cargo ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
for tool in curl psql python3; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found on PATH (scripts/setup.sh should have installed it)"
done

# ------------------------------------------------------------ 2. build

if [[ ${SATWATCH_DEMO_BUILD:-1} == 0 ]]; then
    phase "build (skipped: SATWATCH_DEMO_BUILD=0)"
    [[ -x $BIN ]] || die "$BIN missing: unset SATWATCH_DEMO_BUILD to build it"
else
    phase "build (cargo build --release; the first build takes several minutes)"
    cargo build --release || die "cargo build --release failed"
    [[ -x $BIN ]] || die "cargo build --release did not produce $BIN"
fi

# ------------------------------------------------------------ 3. services

phase "services (fresh broker on 127.0.0.1:$KAFKA_PORT and PostgreSQL on 127.0.0.1:$PG_PORT; state $STATE)"
if tcp_open "${HTTP_ADDR%:*}" "${HTTP_ADDR##*:}"; then
    die "$HTTP_ADDR is already in use by another process: set SATWATCH_DEMO_HTTP_ADDR"
fi
scripts/services.sh down
if [[ -d $STATE ]]; then
    # Only ever remove a directory that looks like services.sh state.
    for entry in "$STATE"/* "$STATE"/.[!.]*; do
        [[ -e $entry ]] || continue
        case ${entry##*/} in
        kafka | kafka.log | kafka.pid | cluster | postgres | postgres.log | initdb.log | satwatch.log | replay.log | metrics.txt | plan.json) ;;
        *) die "$STATE holds ${entry##*/}, which the demo did not write: refusing to remove it (set SATWATCH_DEMO_STATE)" ;;
        esac
    done
    rm -rf "$STATE"
    log "removed the previous demo state ($STATE)"
fi
scripts/services.sh up
services_env=$(scripts/services.sh env)
eval "$services_env"
[[ -n ${ORT_DYLIB_PATH:-} ]] || die "libonnxruntime not found: scripts/setup.sh should have installed it"
log "SATWATCH_BROKERS=$SATWATCH_BROKERS DATABASE_URL=$DATABASE_URL SATWATCH_HTTP_ADDR=$SATWATCH_HTTP_ADDR"

# ------------------------------------------------------------ 4. topics

phase "topics (./init-kafka.sh)"
./init-kafka.sh

# ------------------------------------------------------------ 5. start satwatch

phase "start (satwatch run --pipeline $PIPELINE, waiting for $BASE_URL/v2/health/ready)"
"$BIN" run --pipeline "$PIPELINE" >"$SATWATCH_LOG" 2>&1 </dev/null &
satwatch_pid=$!
log "satwatch run: pid $satwatch_pid, log $SATWATCH_LOG"
end=$((SECONDS + READY_TIMEOUT))
until [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$BASE_URL/v2/health/ready" || true) == 200 ]]; do
    if ! kill -0 "$satwatch_pid" 2>/dev/null; then
        rc=0
        wait "$satwatch_pid" || rc=$?
        satwatch_pid=""
        satwatch_log_tail
        die "satwatch run exited during startup with status $rc (log: $SATWATCH_LOG)"
    fi
    if ((SECONDS >= end)); then
        curl -s --max-time 2 "$BASE_URL/v2/health/ready" >&2 || true
        satwatch_log_tail
        die "satwatch not ready at $BASE_URL/v2/health/ready after ${READY_TIMEOUT}s (log: $SATWATCH_LOG)"
    fi
    sleep 0.5
done
log "satwatch is ready"

# ------------------------------------------------------------ 6. replay

phase "replay (satwatch replay --split $SPLIT --channels all --max-rate)"
"$BIN" replay --pipeline "$PIPELINE" --data "$DATA" --split "$SPLIT" --channels all --max-rate 2>&1 \
    | tee "$STATE/replay.log" || die "satwatch replay failed (log: $STATE/replay.log)"
replayed=$(sed -n 's/^replayed \([0-9][0-9]*\) samples.*/\1/p' "$STATE/replay.log" | tail -n 1)
[[ -n $replayed ]] || die "could not read the sample count from satwatch replay's output (log: $STATE/replay.log)"

# ------------------------------------------------------------ 7. scoring

# Expected scores: per channel, the rows past its model's window (the first
# score is at seq = window), as `satwatch plan` counts them from the pipeline,
# the model repository and the split's .npy files.
"$BIN" plan --pipeline "$PIPELINE" --data "$DATA" --split "$SPLIT" --json >"$STATE/plan.json" ||
    die "satwatch plan failed"
read -r expected channels < <(python3 -c 'import json, sys; p = json.load(open(sys.argv[1])); print(p["replay"]["expected_scores"], len(p["channels"]))' "$STATE/plan.json") || true
[[ ${expected:-} =~ ^[0-9]+$ ]] || die "could not compute the expected number of scores from $DATA/$SPLIT"

phase "scoring (waiting until 'scores' holds $expected rows and stops changing; deadline ${SCORE_TIMEOUT}s)"
end=$((SECONDS + SCORE_TIMEOUT))
last=-1
scored=0
while :; do
    if ! kill -0 "$satwatch_pid" 2>/dev/null; then
        rc=0
        wait "$satwatch_pid" || rc=$?
        satwatch_pid=""
        satwatch_log_tail
        die "satwatch run exited with status $rc while scoring (log: $SATWATCH_LOG)"
    fi
    scored=$(q "select count(*) from scores") || die "could not query PostgreSQL at $DATABASE_URL"
    if [[ $scored -eq $last && $scored -eq $expected ]]; then
        break
    fi
    if [[ $scored -ne $last ]]; then
        log "   scores: $scored / $expected"
    fi
    if ((scored > expected)); then
        die "'scores' holds $scored rows, more than the $expected expected"
    fi
    if ((SECONDS >= end)); then
        satwatch_log_tail
        die "after ${SCORE_TIMEOUT}s 'scores' holds $scored rows (last poll: $last); expected $expected and no change between polls (log: $SATWATCH_LOG)"
    fi
    last=$scored
    sleep 2
done
log "all $expected samples past warm-up are scored"

# Scrape the metrics while satwatch still serves them.
curl -sf --max-time 5 "$BASE_URL/metrics" >"$STATE/metrics.txt" || die "GET $BASE_URL/metrics failed"
dead_letters=$(awk '/^satwatch_dead_letters_total([{ ])/ { s += $NF } END { printf "%d", s }' "$STATE/metrics.txt")

# ------------------------------------------------------------ 8. stop

phase "stop (SIGTERM to satwatch, deadline ${STOP_TIMEOUT}s)"
kill -TERM "$satwatch_pid"
end=$((SECONDS + STOP_TIMEOUT))
while kill -0 "$satwatch_pid" 2>/dev/null; do
    if ((SECONDS >= end)); then
        satwatch_log_tail
        die "satwatch did not exit within ${STOP_TIMEOUT}s of SIGTERM (log: $SATWATCH_LOG)"
    fi
    sleep 0.2
done
rc=0
wait "$satwatch_pid" || rc=$?
satwatch_pid=""
if [[ $rc -ne 0 ]]; then
    satwatch_log_tail
    die "satwatch exited with status $rc after SIGTERM, expected 0 (log: $SATWATCH_LOG)"
fi
log "satwatch exited with status 0"
phase_end

# ------------------------------------------------------------ 9. summary

forecast_rows=$(q "select count(*) from forecasts")
anomalous=$(q "select count(*) from scores where anomalous")
events=$(q "select subsystem, count(*), count(*) filter (where state = 'closed') from anomaly_events group by subsystem order by subsystem")
events_total=$(q "select count(*) || ' opened, ' || count(*) filter (where state = 'closed') || ' closed' from anomaly_events")
by_cause=$(q "select coalesce(cause, 'unknown'), count(*), coalesce(sum(end_seq - start_seq + 1) filter (where state = 'closed'), 0) from anomaly_events group by 1 order by 2 desc")
psql_cmd="psql $DATABASE_URL"

echo
echo "==================== satwatch demo: summary ===================="
printf '%-28s %s\n' "samples replayed:" "$replayed ($SPLIT split, $channels channels)"
printf '%-28s %s\n' "samples scored (scores):" "$scored (expected $expected: rows - warm-up window per channel)"
printf '%-28s %s\n' "forecasts rows:" "$forecast_rows"
printf '%-28s %s\n' "anomalous samples:" "$anomalous"
printf '%-28s %s\n' "anomaly events:" "$events_total"
if [[ -n $events ]]; then
    printf '    %-10s %8s %8s\n' subsystem opened closed
    while IFS='|' read -r sub opened closed; do
        printf '    %-10s %8s %8s\n' "$sub" "$opened" "$closed"
    done <<<"$events"
    printf '    %-10s %8s %8s\n' cause opened "samples in closed events"
    while IFS='|' read -r cause n samples; do
        printf '    %-10s %8s %8s\n' "$cause" "$n" "$samples"
    done <<<"$by_cause"
fi
printf '%-28s %s\n' "dead letters:" "$dead_letters"
echo
echo "phase timings:"
total_secs=0
for i in "${!PHASE_NAMES[@]}"; do
    printf '    %5ss  %s\n' "${PHASE_SECS[$i]}" "${PHASE_NAMES[$i]%% (*}"
    total_secs=$((total_secs + PHASE_SECS[i]))
done
printf '    %5ss  %s\n' "$total_secs" total
echo
echo "where to look:"
echo "    Kafka ($SATWATCH_BROKERS): topics anomalies, forecasts, telemetry.dlq"
echo "    PostgreSQL: tables scores, forecasts, anomaly_events"
echo "        $psql_cmd -c \"select * from anomaly_events order by channel, start_seq\""
echo "    metrics (scraped before shutdown): $STATE/metrics.txt"
echo "        live at $BASE_URL/metrics while satwatch runs:"
echo "        SATWATCH_BROKERS=$SATWATCH_BROKERS DATABASE_URL=$DATABASE_URL SATWATCH_HTTP_ADDR=$HTTP_ADDR ORT_DYLIB_PATH=$ORT_DYLIB_PATH \\"
echo "            target/release/satwatch run --pipeline $PIPELINE"
echo "    logs: $SATWATCH_LOG, $STATE/kafka.log, $STATE/postgres.log"
echo
echo "the demo's broker and PostgreSQL are still running; stop them with:"
echo "    SATWATCH_STATE=$STATE SATWATCH_KAFKA_PORT=$KAFKA_PORT SATWATCH_PG_PORT=$PG_PORT scripts/services.sh down"
finished=1
