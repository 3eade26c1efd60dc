#!/usr/bin/env bash
# Local backing services for the satwatch demo and tests, on 127.0.0.1 only:
#   - tansu, a Kafka-protocol broker (no Kafka/Docker engine can run here), on
#     $SATWATCH_KAFKA_PORT (default 19092), storing in SQLite;
#   - a throwaway PostgreSQL on $SATWATCH_PG_PORT (default 55432), database satwatch.
# State, pid files and logs live in $SATWATCH_STATE (default <repo>/.local).
#
# Usage: scripts/services.sh up|down|status|env [kafka|postgres]
#   up      start (idempotent: already running is fine), wait until ready
#   down    stop cleanly (data is kept; rm -rf the state dir to start afresh)
#   status  print each service's state; exit 0 only when all asked-for are up
#   env     print export lines:   eval "$(scripts/services.sh env)"
# A second argument limits up/down/status to one service.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KAFKA_PORT=${SATWATCH_KAFKA_PORT:-19092}
PG_PORT=${SATWATCH_PG_PORT:-55432}
STATE=${SATWATCH_STATE:-$SATWATCH_ROOT/.local}
# Readiness deadline in seconds: generous for a loaded 2-core CI machine, but
# bounded so a broken service fails the run instead of hanging it.
DEADLINE=${SATWATCH_SERVICES_TIMEOUT:-60}

TANSU_DIR=$STATE/tansu
TANSU_PID=$STATE/tansu.pid
TANSU_LOG=$STATE/tansu.log
PGDATA=$STATE/postgres
PG_LOG=$STATE/postgres.log

usage() {
    echo "usage: $0 up|down|status|env [kafka|postgres]" >&2
    exit 2
}

# ---------------------------------------------------------------- tansu

tansu_pid() {
    # Print the pid from the pid file when that process is alive and is tansu
    # (a stale pid file may name a pid that was reused by something else).
    [[ -f $TANSU_PID ]] || return 1
    local pid
    pid=$(<"$TANSU_PID")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    # Read into a variable rather than pipe into grep -q: under pipefail an
    # early grep exit can fail the pipeline with SIGPIPE.
    local cmdline
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmdline == *tansu* ]] || return 1
    printf '%s\n' "$pid"
}

kafka_up() {
    local pid
    if pid=$(tansu_pid); then
        log "kafka (tansu): already running (pid $pid, 127.0.0.1:$KAFKA_PORT)"
        return 0
    fi
    [[ -x $TANSU_BIN ]] || die "tansu not found at $TANSU_BIN: run scripts/setup.sh first"
    # Someone else on our port would make us "ready" while talking to the wrong broker.
    if tcp_open 127.0.0.1 "$KAFKA_PORT"; then
        die "port $KAFKA_PORT is already in use by another process: set SATWATCH_KAFKA_PORT"
    fi
    mkdir -p "$TANSU_DIR"
    # The sqlite path is relative to the working directory (an absolute
    # sqlite:///path is mangled by tansu 0.6), hence the cd. memory:// is never
    # used: it silently skips records when a consumer resumes mid-batch.
    # exec keeps $! equal to tansu's pid; nohup + </dev/null detach it from the
    # caller so it outlives this script and a closed terminal.
    (
        cd "$TANSU_DIR"
        exec nohup "$TANSU_BIN" broker \
            --cluster-id satwatch \
            --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
            --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
            --storage-engine "sqlite://tansu.db"
    ) >>"$TANSU_LOG" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$TANSU_PID"
    # Ready means it accepts TCP connections on the port; poll with a deadline
    # instead of a fixed sleep, and stop early if the process dies.
    local end=$((SECONDS + DEADLINE))
    until tcp_open 127.0.0.1 "$KAFKA_PORT"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$TANSU_PID"
            tail -n 20 "$TANSU_LOG" >&2
            die "tansu exited during startup (log: $TANSU_LOG)"
        fi
        if ((SECONDS >= end)); then
            tail -n 20 "$TANSU_LOG" >&2
            die "tansu not accepting connections on 127.0.0.1:$KAFKA_PORT after ${DEADLINE}s (log: $TANSU_LOG)"
        fi
        sleep 0.2
    done
    log "kafka (tansu): started (pid $pid, 127.0.0.1:$KAFKA_PORT, log $TANSU_LOG)"
}

kafka_down() {
    local pid
    if ! pid=$(tansu_pid); then
        rm -f "$TANSU_PID"
        log "kafka (tansu): not running"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    local end=$((SECONDS + 15))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= end)); then
            # Only after a fair chance to shut down: SQLite survives a kill, but
            # a clean stop is still preferable.
            log "kafka (tansu): did not stop in 15s; sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    rm -f "$TANSU_PID"
    log "kafka (tansu): stopped"
}

kafka_status() {
    local pid
    if pid=$(tansu_pid) && tcp_open 127.0.0.1 "$KAFKA_PORT"; then
        echo "kafka (tansu): running (pid $pid, 127.0.0.1:$KAFKA_PORT)"
    else
        echo "kafka (tansu): stopped"
        return 1
    fi
}

# ---------------------------------------------------------------- postgres

PG_BIN=$(pg_bindir)

# initdb and the server refuse to run as root: as root run them as the
# postgres user (which must then own the data dir); otherwise as ourselves.
as_pg() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

pg_running() { [[ -f $PGDATA/PG_VERSION ]] && as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; }
pg_ready() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -d postgres -U postgres; }
psql_pg() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres "$@"; }

postgres_up() {
    [[ -n $PG_BIN && -x $PG_BIN/pg_ctl ]] || die "PostgreSQL server binaries not found: run scripts/setup.sh first"
    mkdir -p "$STATE"
    if [[ $(id -u) -eq 0 ]]; then
        # The postgres user needs to reach the data dir: a state dir under a
        # private home (e.g. /root) would make initdb fail with a vague error.
        runuser -u postgres -- test -x "$STATE" \
            || die "user postgres cannot enter $STATE: set SATWATCH_STATE to a directory it can reach"
    fi
    if ! [[ -f $PGDATA/PG_VERSION ]]; then
        mkdir -p "$PGDATA"
        if [[ $(id -u) -eq 0 ]]; then chown postgres: "$PGDATA"; fi
        chmod 700 "$PGDATA"
        # trust auth: a local throwaway server bound to 127.0.0.1 only.
        as_pg "$PG_BIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 >"$STATE/initdb.log" 2>&1 \
            || { tail -n 20 "$STATE/initdb.log" >&2; die "initdb failed (log: $STATE/initdb.log)"; }
    fi
    if pg_running; then
        log "postgres: already running (127.0.0.1:$PG_PORT)"
    else
        if tcp_open 127.0.0.1 "$PG_PORT"; then
            die "port $PG_PORT is already in use by another process: set SATWATCH_PG_PORT"
        fi
        # The server (running as postgres) appends to this log.
        touch "$PG_LOG"
        if [[ $(id -u) -eq 0 ]]; then chown postgres: "$PG_LOG"; fi
        # Socket in the data dir (-k) so we never need /var/run/postgresql;
        # fsync=off because this data is disposable and CI disks are slow.
        as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$PG_LOG" -w -t "$DEADLINE" start \
            -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k '$PGDATA' -c fsync=off" >/dev/null \
            || { tail -n 20 "$PG_LOG" >&2; die "postgres failed to start (log: $PG_LOG)"; }
        log "postgres: started (127.0.0.1:$PG_PORT, log $PG_LOG)"
    fi
    # pg_ctl -w already waits, but also when it was "already running" the
    # server may still be recovering: poll pg_isready with a deadline.
    local end=$((SECONDS + DEADLINE))
    until pg_ready; do
        ((SECONDS < end)) || die "postgres not ready on 127.0.0.1:$PG_PORT after ${DEADLINE}s (log: $PG_LOG)"
        sleep 0.2
    done
    if [[ -z $(psql_pg -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'satwatch'") ]]; then
        psql_pg -d postgres -c "CREATE DATABASE satwatch" >/dev/null
        log "postgres: created database satwatch"
    fi
}

postgres_down() {
    if ! pg_running; then
        log "postgres: not running"
        return 0
    fi
    # fast: roll back open transactions and stop now, instead of waiting for clients.
    as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w -t 30 stop >/dev/null || die "postgres did not stop (log: $PG_LOG)"
    log "postgres: stopped"
}

postgres_status() {
    if pg_running && pg_ready; then
        echo "postgres: running (127.0.0.1:$PG_PORT, pid $(head -n1 "$PGDATA/postmaster.pid"))"
    else
        echo "postgres: stopped"
        return 1
    fi
}

# ---------------------------------------------------------------- main

print_env() {
    printf 'export SATWATCH_BROKERS=%q\n' "127.0.0.1:$KAFKA_PORT"
    printf 'export DATABASE_URL=%q\n' "postgres://postgres@127.0.0.1:$PG_PORT/satwatch"
    local lib
    lib=$(find_ort_lib)
    if [[ -n $lib ]]; then
        printf 'export ORT_DYLIB_PATH=%q\n' "$lib"
    else
        # Still print the other lines: only model-running commands need it.
        echo "warning: libonnxruntime.so.$ORT_VERSION not found under $ORT_VENV; run scripts/setup.sh" >&2
    fi
}

[[ $# -ge 1 && $# -le 2 ]] || usage
cmd=$1
which=${2:-all}
case $which in all | kafka | postgres) ;; *) usage ;; esac

case $cmd in
up)
    # postgres first: it is the quicker one to fail on a misconfigured machine.
    [[ $which == kafka ]] || postgres_up
    [[ $which == postgres ]] || kafka_up
    ;;
down)
    [[ $which == postgres ]] || kafka_down
    [[ $which == kafka ]] || postgres_down
    ;;
status)
    rc=0
    if [[ $which != postgres ]]; then kafka_status || rc=3; fi
    if [[ $which != kafka ]]; then postgres_status || rc=3; fi
    exit "$rc"
    ;;
env)
    [[ $which == all ]] || usage
    print_env
    ;;
*) usage ;;
esac
