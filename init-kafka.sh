#!/usr/bin/env bash
# Create satwatch's Kafka topics (the seven telemetry.* topics, anomalies,
# forecasts and telemetry.dlq) against $SATWATCH_BROKERS. Idempotent: topics
# that already exist are left alone, so it is safe to run on every start
# (docker-compose runs it as the one-shot init-kafka service).
#
# Usage: SATWATCH_BROKERS=host:port ./init-kafka.sh
# Env:   SATWATCH_BROKERS             bootstrap servers (required)
#        SATWATCH_PARTITIONS          partitions per topic (default 3)
#        SATWATCH_REPLICATION_FACTOR  replication factor (default 1: one broker;
#                                     `scripts/services.sh env cluster` sets 3)
#        SATWATCH_PIPELINE            pipeline file (default pipelines/smap.toml next to this script)
#        SATWATCH_BIN                 satwatch binary (default: satwatch on PATH, else target/release/satwatch)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [[ $# -ne 0 ]]; then
    echo "usage: SATWATCH_BROKERS=host:port $0   (settings come from the environment)" >&2
    exit 2
fi
: "${SATWATCH_BROKERS:?SATWATCH_BROKERS must name the Kafka bootstrap servers, e.g. 127.0.0.1:19092}"

bin=${SATWATCH_BIN:-}
if [[ -z $bin ]]; then
    if command -v satwatch >/dev/null 2>&1; then
        bin=satwatch
    elif [[ -x $here/target/release/satwatch ]]; then
        bin=$here/target/release/satwatch
    else
        echo "error: satwatch not on PATH and $here/target/release/satwatch missing: set SATWATCH_BIN or cargo build --release" >&2
        exit 1
    fi
fi

args=(topics --pipeline "${SATWATCH_PIPELINE:-$here/pipelines/smap.toml}"
    --partitions "${SATWATCH_PARTITIONS:-3}"
    --replication-factor "${SATWATCH_REPLICATION_FACTOR:-1}")

# A broker that just passed its healthcheck can still refuse admin requests for
# a moment (controller election): retry a few times before giving up.
for attempt in 1 2 3 4 5; do
    if "$bin" "${args[@]}"; then
        exit 0
    fi
    if ((attempt < 5)); then
        echo "init-kafka: attempt $attempt failed; retrying in 3s" >&2
        sleep 3
    fi
done
echo "error: could not create topics on $SATWATCH_BROKERS after 5 attempts" >&2
exit 1
