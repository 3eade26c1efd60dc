#!/usr/bin/env bash
# Local backing services for the satwatch demo, tests and benchmarks, on
# 127.0.0.1 only:
#   - Apache Kafka $KAFKA_VERSION (scripts/lib.sh), one KRaft node acting as
#     broker and controller, on $SATWATCH_KAFKA_PORT (default 19092; its
#     controller on $SATWATCH_KAFKA_CONTROLLER_PORT, default the port + 1);
#   - a throwaway PostgreSQL on $SATWATCH_PG_PORT (default 55432), database satwatch;
#   - on request (`cluster`), a three-node Kafka cluster for failover work: each
#     node broker and controller, brokers on $SATWATCH_CLUSTER_PORT + 0, 2, 4
#     (default 19192, 19194, 19196), controllers on the port after each.
# Kafka runs from the jars scripts/setup.sh fetched ($SATWATCH_KAFKA_LIB) with
# Java 17+ ($SATWATCH_JAVA, else $JAVA_HOME/bin/java, else java on PATH).
# State, pid files and logs live in $SATWATCH_STATE (default <repo>/.local):
# kafka/ (cluster.id, server.properties, data/), kafka.pid, kafka.log,
# postgres/, postgres.log, and for the cluster cluster/ (cluster.id,
# node1..3/, node1..3.pid, node1..3.log).
#
# Usage: scripts/services.sh up|down|status|env [kafka|postgres|cluster]
#   up      start (idempotent: already running is fine), wait until ready
#   down    stop cleanly (data is kept; rm -rf the state dir to start afresh)
#   status  print each service's state; exit 0 only when all asked-for are up
#   env     print export lines:   eval "$(scripts/services.sh env)"
# A second argument limits up/down/status to one service. Without one, up and
# status mean kafka and postgres; down also stops a cluster started in the
# same state dir. `env cluster` points SATWATCH_BROKERS at the cluster's three
# brokers (and SATWATCH_REPLICATION_FACTOR, read by ./init-kafka.sh, at 3).
# Env:   SATWATCH_KAFKA_HEAP        heap of each Kafka JVM (default 768m)
#        SATWATCH_SERVICES_TIMEOUT  readiness deadline in seconds (default 60)
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KAFKA_PORT=${SATWATCH_KAFKA_PORT:-19092}
[[ $KAFKA_PORT =~ ^[0-9]+$ ]] || die "SATWATCH_KAFKA_PORT must be a number: got '$KAFKA_PORT'"
KAFKA_CONTROLLER_PORT=${SATWATCH_KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}
CLUSTER_PORT=${SATWATCH_CLUSTER_PORT:-19192}
PG_PORT=${SATWATCH_PG_PORT:-55432}
STATE=${SATWATCH_STATE:-$SATWATCH_ROOT/.local}
# 768 MiB is plenty for these workloads and keeps three nodes affordable
# (Kafka's own start script would take 1 GiB each).
KAFKA_HEAP=${SATWATCH_KAFKA_HEAP:-768m}
# Readiness deadline in seconds: generous for a loaded 2-core CI machine, but
# bounded so a broken service fails the run instead of hanging it.
DEADLINE=${SATWATCH_SERVICES_TIMEOUT:-60}
# SIGTERM makes Kafka shut down in a controlled way (leadership handed over,
# logs flushed and closed cleanly, so no recovery on the next start); KILL
# only after this many seconds.
KAFKA_STOP_TIMEOUT=30

for v in KAFKA_CONTROLLER_PORT CLUSTER_PORT PG_PORT DEADLINE; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a number: got '${!v}'"
done
[[ $KAFKA_HEAP =~ ^[0-9]+[kKmMgG]?$ ]] || die "SATWATCH_KAFKA_HEAP must be a JVM size such as 768m: got '$KAFKA_HEAP'"

KAFKA_DIR=$STATE/kafka
KAFKA_PID=$STATE/kafka.pid
KAFKA_LOG=$STATE/kafka.log
CLUSTER_DIR=$STATE/cluster
CLUSTER_NODES=(1 2 3)
PGDATA=$STATE/postgres
PG_LOG=$STATE/postgres.log

usage() {
    echo "usage: $0 up|down|status|env [kafka|postgres|cluster]" >&2
    exit 2
}

# ---------------------------------------------------------------- kafka, common

JAVA=""
# need_kafka: find java and the jars, or die saying how to get them. Only
# called when a Kafka node is about to start, so that down, status, env and
# the postgres-only commands work on a machine without them.
need_kafka() {
    [[ -z $JAVA ]] || return 0
    kafka_lib_ok || die "Apache Kafka $KAFKA_VERSION's jars not found in $KAFKA_LIB: run scripts/setup.sh first"
    [[ -f $KAFKA_LOG4J ]] || die "$KAFKA_LOG4J is missing (it belongs to the repository)"
    JAVA=$(java_ok) || die "no Java $JAVA_MIN_VERSION or newer found (SATWATCH_JAVA, \$JAVA_HOME/bin/java, PATH): run scripts/setup.sh first"
}

# storage_tool ARGS...: Kafka's kafka-storage.sh, in the foreground. A small
# heap and the quick-starting JIT tier: it runs for a second.
storage_tool() {
    "$JAVA" -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
        "-Dlog4j2.configurationFile=$KAFKA_LOG4J" -cp "$KAFKA_LIB/*" kafka.tools.StorageTool "$@"
}

# cluster_id DIR: print the cluster id kept in DIR/cluster.id, making one with
# Kafka's own generator the first time (it avoids the ids Kafka reserves).
cluster_id() {
    local file=$1/cluster.id id
    if [[ ! -s $file ]]; then
        mkdir -p "$1"
        # The last line: anything the JVM or log4j might say comes before it.
        id=$(storage_tool random-uuid 2>&1 </dev/null | tail -n 1) || true
        [[ $id =~ ^[A-Za-z0-9_-]{22}$ ]] || die "kafka.tools.StorageTool random-uuid printed '$id', not a cluster id"
        printf '%s\n' "$id" >"$file"
    fi
    id=$(<"$file")
    [[ $id =~ ^[A-Za-z0-9_-]{22}$ ]] || die "$file holds '$id', not a Kafka cluster id: remove $1 to start afresh"
    printf '%s\n' "$id"
}

# write_props DIR NODE_ID PORT CONTROLLER_PORT single|cluster: DIR/server.properties.
# Written on every start, so that a changed port or setting takes effect; the
# data (DIR/data) is kept.
write_props() {
    local dir=$1 id=$2 port=$3 cport=$4 mode=$5
    {
        echo "# Written by scripts/services.sh on every start: edits are lost."
        echo "process.roles=broker,controller"
        echo "node.id=$id"
        echo "listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport"
        echo "advertised.listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport"
        echo "inter.broker.listener.name=PLAINTEXT"
        echo "controller.listener.names=CONTROLLER"
        echo "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
        echo "log.dirs=$dir/data"
        # A consumer group's first join would otherwise wait 3 s for more members.
        echo "group.initial.rebalance.delay.ms=0"
        # The internal topics' defaults are 50 partitions each: slow to create
        # on two cores, and pointless for one consumer group.
        echo "offsets.topic.num.partitions=3"
        echo "transaction.state.log.num.partitions=3"
        # satwatch creates its topics with the partition count it wants; a
        # typo'd topic name should fail loudly rather than be auto-created.
        echo "auto.create.topics.enable=false"
        if [[ $mode == single ]]; then
            # A dynamic quorum of one (formatted with --standalone).
            echo "controller.quorum.bootstrap.servers=127.0.0.1:$cport"
            # One broker: nothing can be replicated. The defaults (3, 2) would
            # make the internal topics, and so groups and transactions, fail.
            echo "default.replication.factor=1"
            echo "min.insync.replicas=1"
            echo "offsets.topic.replication.factor=1"
            echo "transaction.state.log.replication.factor=1"
            echo "transaction.state.log.min.isr=1"
            echo "share.coordinator.state.topic.replication.factor=1"
            echo "share.coordinator.state.topic.min.isr=1"
        else
            # A static quorum of the three nodes (formatted without --standalone).
            local voters="" n
            for n in "${CLUSTER_NODES[@]}"; do
                voters+="${voters:+,}$n@127.0.0.1:$(cluster_controller_port "$n")"
            done
            echo "controller.quorum.voters=$voters"
            # Every topic on all three brokers, and acks=all survives one down.
            echo "default.replication.factor=3"
            echo "min.insync.replicas=2"
            echo "offsets.topic.replication.factor=3"
            echo "transaction.state.log.replication.factor=3"
            echo "transaction.state.log.min.isr=2"
        fi
    } >"$dir/server.properties.tmp"
    mv "$dir/server.properties.tmp" "$dir/server.properties"
}

# node_format DIR CLUSTER_ID [--standalone]: format DIR/data, once. A formatted
# node (meta.properties present) is left alone: a restart keeps its topics,
# offsets and metadata.
node_format() {
    local dir=$1 id=$2
    shift 2
    [[ -f $dir/data/meta.properties ]] && return 0
    # A data dir without meta.properties holds nothing Kafka could use (an
    # interrupted format), and the tool refuses a half-formatted one: start afresh.
    rm -rf "$dir/data"
    if ! storage_tool format "$@" -t "$id" -c "$dir/server.properties" >"$dir/format.log" 2>&1 </dev/null; then
        tail -n 20 "$dir/format.log" >&2
        die "formatting $dir/data failed (log: $dir/format.log)"
    fi
}

# props_port PROPS: the broker (PLAINTEXT) port a node's server.properties names.
props_port() {
    sed -n 's|^listeners=PLAINTEXT://127\.0\.0\.1:\([0-9]*\),.*|\1|p' "$1" 2>/dev/null
}

# node_pid PIDFILE PROPS: print the pid from PIDFILE when that process is
# alive and is the Kafka node started with PROPS (a stale pid file may name a
# pid reused by something else: another node, a test's broker).
node_pid() {
    [[ -f $1 ]] || return 1
    local pid cmdline
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    # Read into a variable rather than pipe into grep -q: under pipefail an
    # early grep exit can fail the pipeline with SIGPIPE.
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmdline == *" kafka.Kafka $2 "* ]] || return 1
    printf '%s\n' "$pid"
}

# node_launch DIR PIDFILE LOGFILE PORTS...: start the node DIR/server.properties
# describes, in the background, and write its pid. Sets LAUNCH_PID, and
# LAUNCH_OFFSET to the log's size before the start: the log is appended to
# across restarts, and readiness must look at this run's lines only.
LAUNCH_PID=""
LAUNCH_OFFSET=0
node_launch() {
    local dir=$1 pidfile=$2 logfile=$3 port
    shift 3
    # Someone else on our ports would make us "ready" while talking to the
    # wrong broker, or make the node die on a bind error after its JVM start.
    for port in "$@"; do
        if tcp_open 127.0.0.1 "$port"; then
            die "port $port is already in use by another process: set SATWATCH_KAFKA_PORT, SATWATCH_KAFKA_CONTROLLER_PORT or SATWATCH_CLUSTER_PORT"
        fi
    done
    LAUNCH_OFFSET=$(stat -c %s "$logfile" 2>/dev/null || echo 0)
    # The JVM flags of Kafka's kafka-run-class.sh, bar the heap. exec keeps $!
    # equal to the JVM's pid; nohup + </dev/null detach it from the caller so
    # it outlives this script and a closed terminal.
    (
        exec nohup "$JAVA" "-Xms$KAFKA_HEAP" "-Xmx$KAFKA_HEAP" -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
            -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
            "-Dlog4j2.configurationFile=$KAFKA_LOG4J" -cp "$KAFKA_LIB/*" kafka.Kafka "$dir/server.properties"
    ) >>"$logfile" 2>&1 </dev/null &
    LAUNCH_PID=$!
    echo "$LAUNCH_PID" >"$pidfile"
}

# node_started LOGFILE OFFSET: true once this run's part of the log says
# `Kafka Server started` (logged after the broker has joined the quorum,
# caught up with the metadata and been unfenced: ready for clients).
node_started() {
    grep -q 'Kafka Server started' < <(tail -c "+$(($2 + 1))" "$1" 2>/dev/null)
}

# wait_ready NODE...: wait, with one deadline for all, until every NODE is
# ready (the readiness line, and the port accepting connections); die early
# when one exits. NODE is "label|pid|pidfile|logfile|offset|port". The
# cluster's nodes are waited for together: none is ready before a majority of
# the controllers runs.
wait_ready() {
    local end=$((SECONDS + DEADLINE)) node label pid pidfile logfile offset port pending which
    while :; do
        pending=0
        for node in "$@"; do
            IFS='|' read -r label pid pidfile logfile offset port <<<"$node"
            if ! kill -0 "$pid" 2>/dev/null; then
                rm -f "$pidfile"
                tail -n 20 "$logfile" >&2
                die "$label exited during startup (log: $logfile)"
            fi
            if ! node_started "$logfile" "$offset" || ! tcp_open 127.0.0.1 "$port"; then
                pending=1
                if ((SECONDS >= end)); then
                    tail -n 20 "$logfile" >&2
                    which=kafka
                    [[ $label != "kafka cluster"* ]] || which=cluster
                    die "$label not ready on 127.0.0.1:$port after ${DEADLINE}s (no 'Kafka Server started' in $logfile yet, or the port closed); it is left running: scripts/services.sh down $which"
                fi
            fi
        done
        ((pending)) || return 0
        sleep 0.2
    done
}

# stop_nodes NODE...: SIGTERM every running NODE ("label|pidfile|props") at
# once, then wait; KILL what is left after KAFKA_STOP_TIMEOUT seconds. The
# cluster's nodes stop together: stopped one by one, the last ones would lose
# their controller quorum and wait for it in their controlled shutdown.
stop_nodes() {
    local node label pidfile props pid pids=() labels=() i
    for node in "$@"; do
        IFS='|' read -r label pidfile props <<<"$node"
        if pid=$(node_pid "$pidfile" "$props"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            labels+=("$label")
        else
            log "$label: not running"
        fi
    done
    local end=$((SECONDS + KAFKA_STOP_TIMEOUT)) start=$SECONDS
    for i in "${!pids[@]}"; do
        while kill -0 "${pids[$i]}" 2>/dev/null; do
            if ((SECONDS >= end)); then
                # Only after a fair chance to shut down: Kafka recovers from a
                # kill, but then spends the next start checking its logs.
                log "${labels[$i]}: did not stop in ${KAFKA_STOP_TIMEOUT}s; sending KILL"
                kill -KILL "${pids[$i]}" 2>/dev/null || true
                break
            fi
            sleep 0.2
        done
        log "${labels[$i]}: stopped after $((SECONDS - start))s"
    done
    for node in "$@"; do
        IFS='|' read -r label pidfile props <<<"$node"
        node_pid "$pidfile" "$props" >/dev/null || rm -f "$pidfile"
    done
}

# ---------------------------------------------------------------- kafka, one node

kafka_node() { printf 'kafka|%s|%s\n' "$KAFKA_PID" "$KAFKA_DIR/server.properties"; }

kafka_up() {
    local pid running
    if pid=$(node_pid "$KAFKA_PID" "$KAFKA_DIR/server.properties"); then
        running=$(props_port "$KAFKA_DIR/server.properties")
        [[ $running == "$KAFKA_PORT" ]] ||
            die "kafka is already running on 127.0.0.1:$running (pid $pid), not $KAFKA_PORT: scripts/services.sh down kafka first"
        log "kafka: already running (pid $pid, 127.0.0.1:$KAFKA_PORT)"
        return 0
    fi
    need_kafka
    mkdir -p "$KAFKA_DIR"
    local id start=$SECONDS
    id=$(cluster_id "$KAFKA_DIR")
    write_props "$KAFKA_DIR" 1 "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" single
    # --standalone: the node is the whole (dynamic) controller quorum.
    node_format "$KAFKA_DIR" "$id" --standalone
    node_launch "$KAFKA_DIR" "$KAFKA_PID" "$KAFKA_LOG" "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"
    wait_ready "kafka|$LAUNCH_PID|$KAFKA_PID|$KAFKA_LOG|$LAUNCH_OFFSET|$KAFKA_PORT"
    log "kafka: started in $((SECONDS - start))s (Apache Kafka $KAFKA_VERSION, pid $LAUNCH_PID, 127.0.0.1:$KAFKA_PORT, controller 127.0.0.1:$KAFKA_CONTROLLER_PORT, log $KAFKA_LOG)"
}

kafka_down() { stop_nodes "$(kafka_node)"; }

kafka_status() {
    local pid
    if pid=$(node_pid "$KAFKA_PID" "$KAFKA_DIR/server.properties") && tcp_open 127.0.0.1 "$KAFKA_PORT"; then
        echo "kafka: running (Apache Kafka $KAFKA_VERSION, pid $pid, 127.0.0.1:$KAFKA_PORT)"
    else
        echo "kafka: stopped"
        return 1
    fi
}

# ---------------------------------------------------------------- kafka, three nodes

cluster_port() { echo $((CLUSTER_PORT + 2 * ($1 - 1))); }
cluster_controller_port() { echo $((CLUSTER_PORT + 2 * ($1 - 1) + 1)); }
cluster_brokers() {
    local n out=""
    for n in "${CLUSTER_NODES[@]}"; do out+="${out:+,}127.0.0.1:$(cluster_port "$n")"; done
    printf '%s\n' "$out"
}
cluster_node() { printf 'kafka cluster node %s|%s|%s\n' "$1" "$CLUSTER_DIR/node$1.pid" "$CLUSTER_DIR/node$1/server.properties"; }

# cluster_up: start the nodes that are not running (all of them, or one that
# was stopped or killed to test failover: it rejoins), then wait for them.
cluster_up() {
    local n pid id start=$SECONDS missing=() waits=()
    for n in "${CLUSTER_NODES[@]}"; do
        if pid=$(node_pid "$CLUSTER_DIR/node$n.pid" "$CLUSTER_DIR/node$n/server.properties"); then
            [[ $(props_port "$CLUSTER_DIR/node$n/server.properties") == "$(cluster_port "$n")" ]] ||
                die "kafka cluster node $n is already running on other ports (pid $pid): scripts/services.sh down cluster first"
        else
            missing+=("$n")
        fi
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "kafka cluster: already running ($(cluster_brokers))"
        return 0
    fi
    need_kafka
    mkdir -p "$CLUSTER_DIR"
    # One id for all three nodes: formatted with different ids they would
    # refuse each other.
    id=$(cluster_id "$CLUSTER_DIR")
    for n in "${missing[@]}"; do
        mkdir -p "$CLUSTER_DIR/node$n"
        write_props "$CLUSTER_DIR/node$n" "$n" "$(cluster_port "$n")" "$(cluster_controller_port "$n")" cluster
        node_format "$CLUSTER_DIR/node$n" "$id"
    done
    for n in "${missing[@]}"; do
        node_launch "$CLUSTER_DIR/node$n" "$CLUSTER_DIR/node$n.pid" "$CLUSTER_DIR/node$n.log" \
            "$(cluster_port "$n")" "$(cluster_controller_port "$n")"
        waits+=("kafka cluster node $n|$LAUNCH_PID|$CLUSTER_DIR/node$n.pid|$CLUSTER_DIR/node$n.log|$LAUNCH_OFFSET|$(cluster_port "$n")")
    done
    wait_ready "${waits[@]}"
    log "kafka cluster: node(s) ${missing[*]} started in $((SECONDS - start))s (Apache Kafka $KAFKA_VERSION; brokers $(cluster_brokers); logs $CLUSTER_DIR/node*.log)"
}

cluster_down() {
    local n nodes=() running=0
    for n in "${CLUSTER_NODES[@]}"; do
        nodes+=("$(cluster_node "$n")")
        if node_pid "$CLUSTER_DIR/node$n.pid" "$CLUSTER_DIR/node$n/server.properties" >/dev/null; then running=1; fi
    done
    if ((running)); then
        stop_nodes "${nodes[@]}"
    else
        rm -f "$CLUSTER_DIR"/node*.pid
        log "kafka cluster: not running"
    fi
}

cluster_status() {
    local n pid rc=0
    for n in "${CLUSTER_NODES[@]}"; do
        if pid=$(node_pid "$CLUSTER_DIR/node$n.pid" "$CLUSTER_DIR/node$n/server.properties") &&
            tcp_open 127.0.0.1 "$(cluster_port "$n")"; then
            echo "kafka cluster node $n: running (pid $pid, 127.0.0.1:$(cluster_port "$n"))"
        else
            echo "kafka cluster node $n: stopped"
            rc=1
        fi
    done
    return "$rc"
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

# export_line NAME VALUE: one line for eval, quoted only where needed (%q
# would also escape the commas of a broker list, which is valid but hard to read).
export_line() {
    if [[ $2 =~ ^[A-Za-z0-9_.:,/@+=-]*$ ]]; then
        printf 'export %s=%s\n' "$1" "$2"
    else
        printf 'export %s=%q\n' "$1" "$2"
    fi
}

# print_env [cluster]: the export lines for the single node, or for the cluster.
print_env() {
    if [[ ${1:-} == cluster ]]; then
        export_line SATWATCH_BROKERS "$(cluster_brokers)"
        # ./init-kafka.sh: every topic on all three brokers.
        export_line SATWATCH_REPLICATION_FACTOR 3
    else
        export_line SATWATCH_BROKERS "127.0.0.1:$KAFKA_PORT"
        # Explicit, so an earlier `eval "$(... env cluster)"` in the same shell
        # does not leave ./init-kafka.sh asking one broker for 3 replicas.
        export_line SATWATCH_REPLICATION_FACTOR 1
    fi
    export_line DATABASE_URL "postgres://postgres@127.0.0.1:$PG_PORT/satwatch"
    local lib
    lib=$(find_ort_lib)
    if [[ -n $lib ]]; then
        export_line ORT_DYLIB_PATH "$lib"
    else
        # Still print the other lines: only model-running commands need it.
        echo "warning: libonnxruntime.so.$ORT_VERSION not found under $ORT_VENV; run scripts/setup.sh" >&2
    fi
}

[[ $# -ge 1 && $# -le 2 ]] || usage
cmd=$1
which=${2:-all}
case $which in all | kafka | postgres | cluster) ;; *) usage ;; esac

case $cmd in
up)
    # postgres first: it is the quicker one to fail on a misconfigured machine.
    # The cluster only when asked for by name: it is three JVMs.
    if [[ $which == all || $which == postgres ]]; then postgres_up; fi
    if [[ $which == all || $which == kafka ]]; then kafka_up; fi
    if [[ $which == cluster ]]; then cluster_up; fi
    ;;
down)
    if [[ $which == all || $which == kafka ]]; then kafka_down; fi
    # A plain `down` stops a cluster too, if one was ever started here, so that
    # callers that then remove the state dir never pull it from under a JVM.
    if [[ $which == cluster || ($which == all && -d $CLUSTER_DIR) ]]; then cluster_down; fi
    if [[ $which == all || $which == postgres ]]; then postgres_down; fi
    ;;
status)
    rc=0
    if [[ $which == all || $which == kafka ]]; then kafka_status || rc=3; fi
    if [[ $which == cluster ]]; then cluster_status || rc=3; fi
    if [[ $which == all || $which == postgres ]]; then postgres_status || rc=3; fi
    exit "$rc"
    ;;
env)
    case $which in
    all) print_env ;;
    cluster) print_env cluster ;;
    *) usage ;;
    esac
    ;;
*) usage ;;
esac
