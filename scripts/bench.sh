#!/usr/bin/env bash
# The satwatch benchmarks: one command measures everything and regenerates
# BENCHMARKS.md (the figures, the machine, the exact commands, and what limits
# each figure). Figures are printed as they are measured.
#
#   1. core       in process, no broker, no database: `satwatch bench` over the
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
#   SATWATCH_BENCH_CORE_JSON   use this file's `satwatch bench --json` output
#                              instead of running it (to test the report)
#   SATWATCH_BIN               the binary (default <repo>/target/release/satwatch)
set -euo pipefail
# EPOCHREALTIME, printf and python must all write 1.5, never 1,5.
export LC_ALL=C

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    sed -n '17,22s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
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
# Everything that parses or computes (npy headers, /proc, Prometheus text, the
# report) is here, stdlib only: python3 -c "$HELPER" SUBCOMMAND ARGS...
HELPER=$(
    cat <<'PY'
import ast, json, math, os, re, struct, sys, time

def fail(msg):
    sys.exit(f"bench helper: {msg}")

def load(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default

def dump(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")

# ---------------------------------------------------------------- dataset

def npy_rows(path):
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            fail(f"{path}: not a .npy file")
        major = f.read(2)[0]
        (n,) = struct.unpack("<H" if major == 1 else "<I", f.read(2 if major == 1 else 4))
        header = ast.literal_eval(f.read(n).decode("latin1"))
    return header["shape"][0]

def pipeline_info(pipeline_path):
    import tomllib
    with open(pipeline_path, "rb") as f:
        p = tomllib.load(f)
    repo = os.path.join(os.path.dirname(pipeline_path), p["repository"]["path"])
    template = p["channels"].get("model", "{channel}")
    models = {}
    for ch in p["channels"]["ids"]:
        with open(os.path.join(repo, template.replace("{channel}", ch), "config.pbtxt")) as f:
            text = f.read()
        m = re.search(r'key:\s*"satwatch\.window"\s*value:\s*\{\s*string_value:\s*"(\d+)"', text)
        d = re.search(r"max_queue_delay_microseconds:\s*(\d+)", text)
        b = re.search(r"max_batch_size:\s*(\d+)", text)
        models[ch] = {
            "window": int(m.group(1)) if m else 64,
            "max_queue_delay_us": int(d.group(1)) if d else None,
            "max_batch_size": int(b.group(1)) if b else None,
        }
    return p, models

def cmd_expected(pipeline_path, split_dir, start, limit):
    """expected_scores samples channels warmup_samples for rows [start, start+limit)."""
    p, models = pipeline_info(pipeline_path)
    start = int(start)
    limit = int(limit) if limit else None
    scores = samples = warmup = 0
    for ch in p["channels"]["ids"]:
        rows = npy_rows(os.path.join(split_dir, ch + ".npy"))
        end = rows if limit is None else min(rows, start + limit)
        lo = min(start, end)
        w = models[ch]["window"]
        samples += end - lo
        scores += max(0, end - max(lo, w))
        warmup += max(0, min(end, w) - lo)
    print(scores, samples, len(p["channels"]["ids"]), warmup)

def cmd_window(pipeline_path):
    """The longest window of the pipeline's models: rows per channel that only fill it."""
    _, models = pipeline_info(pipeline_path)
    print(max(m["window"] for m in models.values()))

def cmd_settings(pipeline_path, out):
    """The configured delays that bound latency, read from the pipeline, the
    model configs and the source (librdkafka settings hard-coded there)."""
    p, models = pipeline_info(pipeline_path)
    delays = {m["max_queue_delay_us"] for m in models.values()}
    def linger(path):
        try:
            with open(path) as f:
                m = re.search(r'"linger\.ms",\s*"(\d+)"', f.read())
            return int(m.group(1)) if m else None
        except OSError:
            return None
    dump({
        "max_queue_delay_us": sorted(d for d in delays if d is not None),
        "window": sorted({m["window"] for m in models.values()}),
        "sink": p.get("sink", {}),
        "engine": p.get("engine", {}),
        "replay_linger_ms": linger("src/replay.rs"),
        "publisher_linger_ms": linger("src/sink/kafka.rs"),
    }, out)

# ---------------------------------------------------------------- /proc

def stat_fields(path):
    with open(path) as f:
        s = f.read()
    # comm may hold spaces and parentheses: split after the last ')'.
    return s[s.index("(") + 1 : s.rindex(")")], s[s.rindex(")") + 2 :].split()

def status_kb(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None

def proc_snap(pid, threads=True):
    try:
        comm, rest = stat_fields(f"/proc/{pid}/stat")
    except OSError:
        return None
    # rest[0] is field 3 (state): utime 14, stime 15, cutime 16, cstime 17.
    snap = {
        "pid": pid, "comm": comm, "ppid": int(rest[1]),
        "ticks": int(rest[11]) + int(rest[12]),
        "child_ticks": int(rest[13]) + int(rest[14]),
        "vmhwm_kb": status_kb(pid, "VmHWM"), "vmrss_kb": status_kb(pid, "VmRSS"),
    }
    if threads:
        snap["threads"] = {}
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            tids = []
        for tid in tids:
            try:
                tcomm, trest = stat_fields(f"/proc/{pid}/task/{tid}/stat")
            except OSError:
                continue
            snap["threads"][tid] = [tcomm, int(trest[11]) + int(trest[12])]
    return snap

def cmd_snap(out, *named):
    """Snapshot CPU ticks (process and per thread), VmHWM and the machine's
    /proc/stat: named = satwatch=PID broker=PID postgres=POSTMASTER_PID."""
    snap = {"t": time.time(), "clk_tck": os.sysconf("SC_CLK_TCK"), "procs": {}}
    with open("/proc/stat") as f:
        snap["cpu"] = [int(x) for x in f.readline().split()[1:]]
    with open("/proc/loadavg") as f:
        snap["loadavg"] = f.read().split()[:3]
    for item in named:
        name, pid = item.split("=", 1)
        if not pid:
            continue
        if name == "postgres":
            # The postmaster and its children; children that exited since are
            # in the postmaster's cutime/cstime once reaped.
            root = proc_snap(int(pid), threads=False)
            if root is None:
                continue
            ticks, n = root["ticks"] + root["child_ticks"], 1
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    try:
                        _, rest = stat_fields(f"/proc/{entry}/stat")
                    except (OSError, ValueError):
                        continue
                    if int(rest[1]) == int(pid):
                        ticks += int(rest[11]) + int(rest[12])
                        n += 1
            snap["procs"][name] = {"pid": int(pid), "ticks": ticks, "processes": n}
        else:
            s = proc_snap(int(pid))
            if s is not None:
                snap["procs"][name] = s
    dump(snap, out)

def usage_between(before, after, wall):
    """CPU seconds per process and its busiest threads between two snapshots."""
    tck = after["clk_tck"]
    out = {}
    for name, a in after["procs"].items():
        b = before["procs"].get(name)
        if b is None or b.get("pid") != a.get("pid"):
            continue
        u = {"cpu_s": (a["ticks"] - b["ticks"]) / tck}
        u["cores"] = u["cpu_s"] / wall if wall > 0 else None
        if "threads" in a:
            deltas = []
            for tid, (tcomm, ticks) in a["threads"].items():
                prev = b["threads"].get(tid, [tcomm, 0])[1]
                deltas.append((ticks - prev, tcomm, tid))
            deltas.sort(reverse=True)
            u["threads"] = len(a["threads"])
            u["busiest"] = [
                {"name": c, "tid": t, "cpu_s": d / tck, "cores": d / tck / wall if wall > 0 else None}
                for d, c, t in deltas[:5] if d > 0
            ]
            # Threads grouped by name (tokio workers, librdkafka brokers, ...).
            groups = {}
            for d, c, _ in deltas:
                key = re.sub(r"[-:#]?\d+$", "", c)
                groups[key] = groups.get(key, 0) + d
            u["by_name"] = {k: v / tck for k, v in sorted(groups.items(), key=lambda kv: -kv[1]) if v > 0}
        for k in ("vmhwm_kb", "vmrss_kb"):
            if k in a:
                u[k + "_before"] = b.get(k)
                u[k + "_after"] = a.get(k)
        if "processes" in a:
            u["processes"] = a["processes"]
        out[name] = u
    cb, ca = before["cpu"], after["cpu"]
    total = sum(ca) - sum(cb)
    idle = (ca[3] + ca[4]) - (cb[3] + cb[4])  # idle + iowait
    ncpu = os.cpu_count() or 1
    out["machine"] = {
        "busy_fraction": (total - idle) / total if total > 0 else None,
        "busy_cores": (total - idle) / total * ncpu if total > 0 else None,
        "iowait_cores": (ca[4] - cb[4]) / total * ncpu if total > 0 else None,
        "cpu_s": (total - idle) / tck,
        "nproc": ncpu,
        "loadavg_before": before["loadavg"], "loadavg_after": after["loadavg"],
    }
    return out

def parse_times(path):
    """`times` output of the subshell that ran replay: line 2 = children."""
    try:
        with open(path) as f:
            lines = f.read().split("\n")
    except OSError:
        return None
    def secs(tok):
        m = re.match(r"(\d+)m([\d.]+)s", tok)
        return int(m.group(1)) * 60 + float(m.group(2)) if m else 0.0
    user, sys_ = lines[1].split()
    return secs(user) + secs(sys_)

def parse_replay(path):
    with open(path) as f:
        text = f.read()
    m = re.search(r"replayed (\d+) samples from (\d+) channels in ([\d.]+) s \((\d+) samples/s\), (\d+) failed", text)
    if not m:
        fail(f"no summary line in {path}")
    return {"published": int(m.group(1)), "channels": int(m.group(2)), "elapsed_s": float(m.group(3)),
            "rate": int(m.group(4)), "failed": int(m.group(5))}

def replay_exit(path):
    with open(path) as f:
        t, rc = f.read().split()
    return float(t), int(rc)

# ---------------------------------------------------------------- Prometheus

def parse_metrics(path):
    """{name: [(labels dict, value)]} from the Prometheus text format."""
    series = {}
    line_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            m = line_re.match(line)
            if not m:
                continue
            labels = dict(label_re.findall(m.group(2) or ""))
            series.setdefault(m.group(1), []).append((labels, float(m.group(3))))
    return series

def total(series, name):
    return sum(v for _, v in series.get(name, []))

def histogram_quantile(q, buckets):
    """Prometheus' histogram_quantile: buckets = [(le, cumulative count)]."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][0] != math.inf:
        return None
    count = buckets[-1][1]
    if count == 0:
        return None
    rank = q * count
    for i, (le, c) in enumerate(buckets):
        if c >= rank:
            break
    if le == math.inf:
        return buckets[-2][0] if len(buckets) > 1 else None
    start, prev = (0.0, 0.0) if i == 0 else buckets[i - 1]
    if i == 0 and le <= 0:
        return le
    return start + (le - start) * (rank - prev) / (c - prev) if c > prev else le

def histogram(series, name):
    merged = {}
    for labels, v in series.get(name + "_bucket", []):
        le = math.inf if labels["le"] in ("+Inf", "Inf") else float(labels["le"])
        merged[le] = merged.get(le, 0) + v
    buckets = sorted(merged.items())
    count, s = total(series, name + "_count"), total(series, name + "_sum")
    return {
        "count": count, "sum_s": s, "mean_s": s / count if count else None,
        "p50_s": histogram_quantile(0.5, buckets), "p99_s": histogram_quantile(0.99, buckets),
        "p999_s": histogram_quantile(0.999, buckets),
        "buckets": [[("+Inf" if le == math.inf else le), c] for le, c in buckets],
    }

def metric_figures(path):
    s = parse_metrics(path)
    inferred, execs = total(s, "satwatch_inference_count_total"), total(s, "satwatch_inference_exec_count_total")
    pg = histogram(s, "satwatch_postgres_write_seconds")
    return {
        "latency": histogram(s, "satwatch_end_to_end_latency_seconds"),
        "processing": histogram(s, "satwatch_processing_latency_seconds"),
        "consumed": total(s, "satwatch_samples_consumed_total"),
        "scored": total(s, "satwatch_samples_scored_total"),
        "windows": inferred, "batches": execs,
        "mean_batch_size": inferred / execs if execs else None,
        "mean_queue_ms_per_batch": total(s, "satwatch_inference_queue_duration_us_total") / execs / 1e3 if execs else None,
        "mean_compute_ms_per_batch": total(s, "satwatch_inference_compute_infer_duration_us_total") / execs / 1e3 if execs else None,
        "pg_writes": pg["count"], "mean_pg_write_ms": pg["mean_s"] * 1e3 if pg["mean_s"] is not None else None,
        "rows_per_pg_write": total(s, "satwatch_rows_written_total") / pg["count"] if pg["count"] else None,
        "dead_letters": total(s, "satwatch_dead_letters_total"),
        "duplicates": total(s, "satwatch_samples_duplicate_total"),
        "gaps": total(s, "satwatch_samples_gap_total"),
    }

def cmd_metric(path, what):
    """One figure from a scrape, for the shell's waits: consumed | dead_letters | latency_count."""
    s = parse_metrics(path)
    if what == "dead_letters":
        print(int(total(s, "satwatch_dead_letters_total")))
    elif what == "consumed":
        print(int(total(s, "satwatch_samples_consumed_total")))
    elif what == "latency_count":
        print(int(total(s, "satwatch_end_to_end_latency_seconds_count")))
    else:
        fail(f"unknown metric {what}")

# ---------------------------------------------------------------- sections

def cmd_core(raw, out, source):
    """Validate `satwatch bench --json` output and keep it."""
    if raw == "-":
        dump({"unavailable": source}, out)
        return
    try:
        with open(raw) as f:
            text = f.read()
        # Tolerate log lines around the one JSON object.
        start, end = text.index("{"), text.rindex("}") + 1
        data = json.loads(text[start:end])
    except (OSError, ValueError) as e:
        fail(f"{raw}: not the JSON object satwatch bench --json prints: {e}")
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs:
        fail(f'{raw}: no "runs" list')
    need = ["channels", "replicas", "samples", "windows", "elapsed_s", "samples_per_s", "windows_per_s"]
    for r in runs:
        missing = [k for k in need if k not in r]
        if missing:
            fail(f"{raw}: a run lacks {', '.join(missing)}")
    data["source"] = source
    dump(data, out)

def cmd_e2e(results, out):
    meta = load(os.path.join(results, "e2e.meta.json"))
    before, after = load(os.path.join(results, "e2e.snap-before.json")), load(os.path.join(results, "e2e.snap-after.json"))
    replay = parse_replay(os.path.join(results, "e2e.replay.log"))
    t_exit, _ = replay_exit(os.path.join(results, "e2e.replay.exit"))
    # The replay's clock starts right before its first record is produced;
    # it reports that clock (0.1 s resolution) as it exits.
    t_first = max(meta["t_launch"], t_exit - replay["elapsed_s"])
    span = meta["t_done"] - t_first
    usage = usage_between(before, after, after["t"] - before["t"])
    replay["cpu_s"] = parse_times(os.path.join(results, "e2e.replay.times"))
    replay["startup_s"] = t_first - meta["t_launch"]
    fig = metric_figures(os.path.join(results, "e2e.metrics.txt"))
    dump({
        "samples": meta["samples"], "expected_scores": meta["expected"], "scores": meta["scores"],
        "span_s": span, "samples_per_s": meta["samples"] / span, "scores_per_s": meta["scores"] / span,
        "snap_wall_s": after["t"] - before["t"], "replay": replay, "usage": usage, "metrics": fig,
        "first_min_ts_lag_s": meta.get("min_ts_epoch", t_first) - t_first,
        "scored_at_replay_end": meta.get("scored_at_replay_end"),
    }, out)

def cmd_backlog(results, out):
    """The drain of a backlog: score rows over the span of their commits."""
    meta = load(os.path.join(results, "backlog.meta.json"))
    before, after = load(os.path.join(results, "backlog.snap-before.json")), load(os.path.join(results, "backlog.snap-after.json"))
    usage = usage_between(before, after, after["t"] - before["t"])
    dump({"samples": meta["samples"], "scores": meta["scores"], "span_s": meta["span_s"],
          "scores_per_s": meta["scores"] / meta["span_s"], "samples_per_s": meta["samples"] / meta["span_s"],
          "usage": usage}, out)
    print(f"   from a backlog: {meta['scores']:,} score rows committed over {meta['span_s']:.1f} s "
          f"(first to last commit): {meta['samples'] / meta['span_s']:,.0f} samples/s", flush=True)

def cmd_flood(results, out):
    """The drain of a backlog holding bad records: samples and dead letters over the span of the scores' commits."""
    meta = load(os.path.join(results, "flood.meta.json"))
    before, after = load(os.path.join(results, "flood.snap-before.json")), load(os.path.join(results, "flood.snap-after.json"))
    usage = usage_between(before, after, after["t"] - before["t"])
    dead = total(parse_metrics(os.path.join(results, "flood.metrics.txt")), "satwatch_dead_letters_total")
    dump({"samples": meta["samples"], "bad": meta["bad"], "dead_letters": dead, "scores": meta["scores"],
          "span_s": meta["span_s"], "samples_per_s": meta["samples"] / meta["span_s"],
          "dead_letters_per_s": dead / meta["span_s"], "usage": usage}, out)
    print(f"   flooded backlog: {meta['samples'] / meta['span_s']:,.0f} samples/s and {dead / meta['span_s']:,.0f} dead letters/s "
          f"({dead:,.0f} of {meta['bad']:,} bad records dead-lettered) over {meta['span_s']:.1f} s", flush=True)

def cmd_latency(results, rate, out):
    p = lambda name: os.path.join(results, f"lat-{rate}.{name}")
    meta = load(p("meta.json"))
    fig = metric_figures(p("metrics.txt"))
    replay = parse_replay(p("replay.log"))
    exact = meta.get("exact")
    dump({"rate": int(rate), "meta": meta, "replay": replay, "metrics": fig, "exact": exact,
          "round_trip": broker_alone(results, f"round-trip-{rate}"),
          "round_trip_one_partition": broker_alone(results, f"round-trip-{rate}-one-partition")}, out)

def broker_alone(results, name):
    """A `satwatch bench --round-trip` result with the broker's cores over it; None if not run."""
    rt = load(os.path.join(results, f"{name}.json"))
    cpu_path = os.path.join(results, f"{name}.cpu.json")
    if rt is not None and os.path.exists(cpu_path):
        rt["broker_cores"] = load(cpu_path).get("broker_cores")
    return rt

def cmd_div(a, b):
    print(f"{float(a) / float(b):.3f}")

def cmd_round_trip(path):
    """One log line from `satwatch bench --round-trip --json`."""
    rt = load(path)
    c, a = rt["consume"], rt["acknowledge"]
    print(f"   broker alone (no pipeline), {rt['published']:,} records at {rt['achieved_per_s']:,.0f}/s over "
          f"{rt['partitions']} partitions: publish -> consumed p50 {c['p50_ms']:.1f} / p99 {c['p99_ms']:.1f} ms, "
          f"publish -> acknowledged p50 {a['p50_ms']:.1f} / p99 {a['p99_ms']:.1f} ms", flush=True)

def cmd_round_trip_cpu(prefix):
    """The broker's cores over a round trip, from its two snapshots, into PREFIX.cpu.json."""
    before, after = load(prefix + ".snap-before.json"), load(prefix + ".snap-after.json")
    broker = usage_between(before, after, after["t"] - before["t"]).get("broker") or {}
    dump({"broker_cores": broker.get("cores")}, prefix + ".cpu.json")
    if broker.get("cores") is not None:
        print(f"   the broker used {broker['cores']:.2f} cores meanwhile", flush=True)

# ---------------------------------------------------------------- report

def f(x, nd=0, unit=""):
    if x is None:
        return "n/a"
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    return f"{x:,.{nd}f}{unit}"

def ms(x, nd=1):
    return "n/a" if x is None else f(x * 1e3, nd)

def table(header, rows, align=None):
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)

def one_thread_part(core, one):
    """The pipeline with one inference thread, next to the shipped thread count's runs."""
    if not one or "runs" not in one:
        return []
    shipped = {r["channels"]: r for r in core["runs"]}
    threads = core["runs"][0].get("backend_threads")
    rows = []
    for r in one["runs"]:
        s = shipped.get(r["channels"])
        rows.append([f(r["channels"]), f(r["samples_per_s"]), f(r.get("ceiling_windows_per_s")),
                     f(100 * r["ratio_to_ceiling"], 1, " %") if r.get("ratio_to_ceiling") is not None else "n/a",
                     f(100 * r["samples_per_s"] / s["samples_per_s"], 0, " %") if s else "n/a",
                     f(100 * s["ratio_to_ceiling"], 1, " %") if s and s.get("ratio_to_ceiling") is not None else "n/a"])
    out = ["**With one inference thread** (`satwatch bench --backend-threads 1`; the pipeline file has "
           f"{threads if threads is not None else 'its own number'}): the engine's own thread then has a core to itself instead of "
           "sharing two cores with two inference threads, and the ceiling is one thread's.", "",
           table(["channels", "samples/s", "ceiling windows/s", "pipeline / ceiling", "samples/s against the shipped threads'",
                  "pipeline / ceiling with the shipped threads"], rows), ""]
    pairs = [(r, shipped[r["channels"]]) for r in one["runs"]
             if r["channels"] in shipped and r.get("ratio_to_ceiling") is not None
             and shipped[r["channels"]].get("ratio_to_ceiling") is not None]
    if pairs:
        span = lambda xs: (f"{min(xs):.0f} %" if round(min(xs)) == round(max(xs)) else f"{min(xs):.0f}–{max(xs):.0f} %")
        one_r = span([100 * r["ratio_to_ceiling"] for r, _ in pairs])
        two_r = span([100 * s["ratio_to_ceiling"] for _, s in pairs])
        rate = span([100 * r["samples_per_s"] / s["samples_per_s"] for r, s in pairs])
        text = (f"With one inference thread the pipeline reaches {one_r} of its ceiling, against {two_r} with "
                f"{threads if threads is not None else 'the shipped number of'} threads, at {rate} of their throughput.")
        if all(r["ratio_to_ceiling"] > s["ratio_to_ceiling"] for r, s in pairs):
            text += (" The gap is the sharing of the cores: with a core of its own the engine's work overlaps the calls "
                     "instead of taking turns with them. The pipeline file keeps the faster setting.")
        out += [text, ""]
    return out

def files_part(core, files):
    """The pipeline serving the model files as they are, next to the row form's runs."""
    if not files or "runs" not in files:
        return []
    shipped = {r["channels"]: r for r in core["runs"]}
    rows = []
    for r in files["runs"]:
        s = shipped.get(r["channels"])
        rows.append([f(r["channels"]), f(r["samples_per_s"]), f(s["samples_per_s"]) if s else "n/a",
                     f(100 * s["samples_per_s"] / r["samples_per_s"] - 100, 0, " %") if s else "n/a",
                     f(100 * r["layout_share"], 1, " %") if r.get("layout_share") is not None else "n/a",
                     f(r.get("ceiling_windows_per_s")), f(s.get("ceiling_windows_per_s")) if s else "n/a",
                     f(100 * s["windows_per_s"] / r["ceiling_windows_per_s"], 1, " %") if s and r.get("ceiling_windows_per_s") else "n/a"])
    return ["**The row form against the model files** (`satwatch bench --model-files`, i.e. `[engine] row_form = false`): "
            "ONNX Runtime serves each model file as it is, on windows laid out one by one on the inference threads, "
            "where the shipped setting serves the row form (a convolution over each run of rows; src/backend/rows.rs). "
            "The last column is the row-form pipeline against the model files' own ceiling.", "",
            table(["channels", "samples/s, model files", "samples/s, row form", "row form gains",
                   "share laying out windows, model files", "ceiling windows/s, model files", "ceiling windows/s, row form",
                   "row-form pipeline / model files' ceiling"], rows), ""]

def latency_part(core):
    """Section 1's in-process latency at offered loads, if measured."""
    lat = core.get("latency") or []
    if not lat:
        return []
    return [
        "**Latency in process, at offered loads** (`--latency-rates`): after each channel's warm-up rows, samples are "
        "handed to the engine at the offered rate, in lots of about a millisecond's worth, each stamped as it goes; the "
        "figure is the time to its score row reaching the sink: the engine, the batcher's wait (`max_queue_delay`), "
        "inference and detection, with no broker and no database. This is the part of the end-to-end latency that "
        "satwatch owns (section 3 has the rest), and how it grows with channels and load.", "",
        table(["channels", "offered samples/s", "achieved samples/s", "scores", "p50 ms", "p99 ms", "p99.9 ms", "max ms"],
              [[f(l["channels"]), f(l["samples_per_s"]), f(l.get("achieved_samples_per_s")), f(l.get("scored")),
                f(l["p50_ms"], 2), f(l["p99_ms"], 2), f(l["p999_ms"], 2), f(l["max_ms"], 2)] for l in lat]), "",
    ]

def core_section(core, settings, one_thread=None, files=None):
    out = ["## 1. Core throughput, inference ceiling, scaling (in process)", ""]
    if core is None:
        return out + ["Not measured in this run.", ""]
    if "unavailable" in core:
        return out + [f"Not measured: {core['unavailable']}", ""]
    runs = core["runs"]
    if core.get("source") not in (None, "measured"):
        out += [f"> **These figures were not measured by this run**: {core['source']}.", ""]
    out += [
        "`satwatch bench` runs the pipeline's engine (windowing, dynamic batching, ONNX Runtime, detection) "
        "over the SMAP test split in process, with no broker and no database; `replicas` copies every "
        "channel that many times (27 channels each).", "",
        "**Core throughput**", "",
        table(["channels", "samples", "windows", "elapsed (s)", "samples/s", "windows/s", "share in inference", "share laying out windows", "mean batch size", "CPU s", "CPU s / elapsed s"],
              [[f(r["channels"]), f(r["samples"]), f(r["windows"]), f(r["elapsed_s"], 2), f(r["samples_per_s"]), f(r["windows_per_s"]),
                f(100 * r["inference_share"], 1, " %") if r.get("inference_share") is not None else "n/a",
                f(100 * r["layout_share"], 1, " %") if r.get("layout_share") is not None else "n/a",
                f(r.get("mean_batch_size"), 1), f(r.get("cpu_s"), 1),
                f(r["cpu_s"] / r["elapsed_s"], 2) if r.get("cpu_s") is not None and r["elapsed_s"] else "n/a"] for r in runs]), "",
        "**Inference ceiling**: the very batches the batcher formed (same models, same sizes, same number of backend threads) "
        "called back to back on ONNX Runtime, i.e. the rate if the pipeline's own work cost nothing; and the opposite, "
        "the pipeline with models that cost nothing (a backend that returns at once). The ceiling's calls all read one "
        "cache-hot input buffer.", "",
        table(["channels", "pipeline windows/s", "ceiling windows/s", "pipeline / ceiling",
               "free-model samples/s", "µs per window: measured / inference alone / pipeline alone"],
              [[f(r["channels"]), f(r["windows_per_s"]), f(r.get("ceiling_windows_per_s")),
                f(100 * r["ratio_to_ceiling"], 1, " %") if r.get("ratio_to_ceiling") is not None else "n/a",
                f(r.get("free_model_samples_per_s")),
                " / ".join([f(1e6 / r["windows_per_s"], 2),
                            f(1e6 / r["ceiling_windows_per_s"], 2) if r.get("ceiling_windows_per_s") else "n/a",
                            f(1e6 / r["free_model_samples_per_s"], 2) if r.get("free_model_samples_per_s") else "n/a"])] for r in runs]), "",
    ]
    out += one_thread_part(core, one_thread)
    out += files_part(core, files)
    out += [
        "**Scaling**", "",
        table(["channels", "samples/s", "peak RSS (MiB)", "channel state (MiB)", "bytes per channel"],
              [[f(r["channels"]), f(r["samples_per_s"]),
                f(r["peak_rss_bytes"] / 2**20, 1) if r.get("peak_rss_bytes") is not None else "n/a",
                f(r["channel_state_bytes"] / 2**20, 2) if r.get("channel_state_bytes") is not None else "n/a",
                f(r.get("bytes_per_channel"))] for r in runs]), "",
        "(Peak RSS is the process's high-water mark so far (`getrusage`): the runs share one process, so it only grows "
        "from row to row; channel state is computed from the engine's buffers, not sampled.)", "",
    ]
    out += latency_part(core)
    # What limits it.
    notes = []
    shares = [r.get("inference_share") for r in runs if r.get("inference_share") is not None]
    if shares:
        lo, hi = min(shares), max(shares)
        kind = ("the core pipeline is inference-bound" if lo >= 0.75 else
                "inference is the larger part of the work, not all of it" if lo >= 0.5 else
                "inference is not the main cost" if hi < 0.5 else "the split between inference and the rest varies with the channel count")
        notes.append(f"The backend threads spend {100*lo:.0f}–{100*hi:.0f} % of their wall time inside ONNX Runtime calls: {kind}.")
    layout = [r.get("layout_share") for r in runs if r.get("layout_share") is not None]
    if layout and shares:
        lo_l, hi_l = min(layout), max(layout)
        notes.append(f"Another {100*lo_l:.0f}–{100*hi_l:.0f} % of it goes to preparing the calls' inputs "
                     "(`satwatch_inference_compute_input_duration_us_total`). ONNX Runtime serves the shipped models in their "
                     "row form (src/backend/rows.rs), which reads each channel's run of rows in place, so no window is copied "
                     "out on its own: a batch's runs of up to four lengths go one call per length, read in place (at 2,700 "
                     "channels a batch holds about a hundred runs of 5 and 6 windows); only runs of more lengths are "
                     "copied into one padded tensor. Serving the model files instead, on windows laid out one by one, "
                     "took 14–21 % of this time (the comparison below).")
    ratios = [(r["channels"], r.get("ratio_to_ceiling")) for r in runs if r.get("ratio_to_ceiling") is not None]
    if ratios:
        notes.append("The pipeline reaches " + ", ".join(f"{100*x:.0f} % ({c:,} channels)" for c, x in ratios)
                     + " of the bare inference rate.")
    free = [r for r in runs if r.get("free_model_samples_per_s") and r.get("ceiling_windows_per_s")]
    if free:
        r = free[0]
        inf_us, own_us, meas_us = 1e6 / r["ceiling_windows_per_s"], 1e6 / r["free_model_samples_per_s"], 1e6 / r["windows_per_s"]
        notes.append(f"At {r['channels']:,} channels a window costs {meas_us:.2f} µs of wall time: {inf_us:.2f} µs of it is inference "
                     f"(the ceiling) and the pipeline's own work (windowing, batching, detection, hand-offs between threads) "
                     f"alone runs at {own_us:.2f} µs per sample (free models); "
                     + ("the two add up to about the measured cost: on these cores the stages run one after the other rather than overlapping."
                        if abs(inf_us + own_us - meas_us) < 0.25 * meas_us else
                        f"together {inf_us + own_us:.2f} µs, {'less' if inf_us + own_us < meas_us else 'more'} than measured "
                        f"({'contention between the stages' if inf_us + own_us < meas_us else 'the stages overlap on the two backend threads'})."))
    slow = [r for r in runs if r.get("pipeline_inference_us_per_window") and r.get("ceiling_inference_us_per_window")]
    # A window is `window` rows of 25 f32 values (100 bytes a row).
    window_kb = " or ".join(f"{w * 100 / 1000:.1f} KB" for w in settings.get("window", [])) or "a window's rows"
    if slow:
        r = slow[0]
        p_us, c_us = r["pipeline_inference_us_per_window"], r["ceiling_inference_us_per_window"]
        notes.append(f"The calls themselves are slower inside the pipeline: at {r['channels']:,} channels a backend thread spends "
                     f"{p_us:.2f} µs per window inside ONNX Runtime there, against {c_us:.2f} µs when the same calls run back to back "
                     f"({p_us / c_us:.1f}×): the engine's own thread shares the two cores with the backend threads, and time a call "
                     "spends preempted counts as inside it. The engine's thread queues only row numbers and copies each channel's "
                     "run of rows once per batch (100 bytes per sample), and the calls read those runs as they are, where "
                     f"laying out each window ({window_kb}) used to come first.")
    bsz = [(r["channels"], r.get("mean_batch_size")) for r in runs if r.get("mean_batch_size")]
    if bsz:
        notes.append("Mean batch size " + ", ".join(f"{b:.1f} at {c:,} channels" for c, b in bsz)
                     + " (a batch holds windows of one model; the 27 channels have a model each and replicas share their channel's model).")
    cores = [(r["channels"], r["cpu_s"] / r["elapsed_s"]) for r in runs if r.get("cpu_s") and r.get("elapsed_s")]
    if cores:
        ncpu = os.cpu_count() or 1
        notes.append("CPU use: " + ", ".join(f"{x:.2f} cores at {c:,} channels" for c, x in cores)
                     + f" of the machine's {ncpu}" + (" — the run is bounded by the cores available." if max(x for _, x in cores) > 0.85 * ncpu else "."))
    if len(runs) > 1 and runs[0].get("samples_per_s"):
        notes.append("Throughput relative to 27 channels: " + ", ".join(
            f"{100 * r['samples_per_s'] / runs[0]['samples_per_s']:.0f} % at {r['channels']:,} channels" for r in runs[1:]) + ".")
    bpc = [(r["channels"], r.get("bytes_per_channel")) for r in runs if r.get("bytes_per_channel")]
    if bpc:
        if len({round(b) for _, b in bpc}) == 1:
            per = f"a constant {bpc[0][1]/1024:.1f} KiB per channel"
        else:
            per = "about " + ", ".join(f"{b/1024:.1f} KiB per channel at {c:,}" for c, b in bpc)
        notes.append(f"Channel state (the window's rows, room for as many again, the Kafka offsets kept for them, the detector's state) costs {per} at rest; "
                     "a queued window adds one row (100 bytes) to its channel and an entry to its model's queue until its batch is "
                     "cut, about 200 bytes in all, so a full queue (`max_pending_windows`) adds a few MB. Peak RSS adds the loaded models, ONNX Runtime's buffers, "
                     "the batches in flight and the data set held in memory.")
    out += ["**What limits these figures.** " + " ".join(notes), ""]
    return out

def backlog_lines(b, flood=None):
    """The backlog run, as a paragraph and a table; nothing if it did not run."""
    if b is None:
        return []
    u = b["usage"]
    rows = [["**from a backlog: samples/s** (first to last `scores` commit)", f"**{f(b['samples_per_s'])}**"],
            ["score rows committed", f"{b['scores']:,} over {f(b['span_s'], 1, ' s')}"]]
    labels = {"satwatch": "satwatch run", "broker": "Apache Kafka (broker)", "postgres": "PostgreSQL"}
    for key, label in labels.items():
        if key in u and u[key].get("cores") is not None:
            rows.append([f"{label}, cores over the drain", f(u[key]["cores"], 2)])
    if flood is not None:
        rows.append([f"**flooded**: {flood['bad'] // max(flood['samples'], 1)} malformed records after each sample, samples/s",
                     f"**{f(flood['samples_per_s'])}**"])
        rows.append(["flooded: dead letters/s (over the same span)",
                     f"{f(flood['dead_letters_per_s'])} ({flood['dead_letters']:,.0f} of {flood['bad']:,})"])
    return ["**From a backlog.** The whole split is published first, with no consumer; then `satwatch run` starts "
            "and drains it. The span runs from the first to the last commit of a `scores` row "
            "(PostgreSQL's commit timestamps). The flooded run does the same with malformed records interleaved "
            "(`satwatch replay --bad-records-per-sample`), each dead-lettered as `malformed_json`.", "",
            table(["figure", "value"], rows), ""]

def e2e_section(e, settings, backlog=None, flood=None):
    out = ["## 2. End to end (broker and PostgreSQL)", ""]
    if e is None:
        return out + ["Not measured in this run (`--skip-e2e`).", ""]
    out += backlog_lines(backlog, flood)
    out += ["**During a full-speed replay.**", ""]
    r, u, m = e["replay"], e["usage"], e["metrics"]
    span = e["span_s"]
    out += [
        f"`satwatch run` consumes from the broker and commits to PostgreSQL; `satwatch replay --max-rate` publishes "
        f"{e['samples']:,} samples (27 channels interleaved row by row). The span runs from the replay's first record "
        f"to the moment `scores` holds all {e['expected_scores']:,} expected rows (polled every 100 ms).", "",
        table(["figure", "value"], [
            ["samples replayed", f(e["samples"])],
            ["score rows committed", f"{e['scores']:,} (expected {e['expected_scores']:,})"],
            ["span: first record produced → last score committed", f(span, 2, " s")],
            ["**end-to-end throughput**", f"**{f(e['samples_per_s'])} samples/s**"],
            ["replay (load generator) alone", f"{f(r['elapsed_s'], 1, ' s')}, {f(r['rate'])} samples/s"],
            ["satwatch finished after the replay by", f(span - r["elapsed_s"], 2, " s")],
            ["score rows committed while the replay ran", f"{100 * e['scored_at_replay_end'] / e['expected_scores']:.0f} %" if e.get("scored_at_replay_end") is not None else "n/a"],
            ["mean inference batch size", f(m.get("mean_batch_size"), 1)],
            ["PostgreSQL writes (mean rows per write, mean write time)", f"{f(m.get('pg_writes'))} ({f(m.get('rows_per_pg_write'))} rows, {f(m.get('mean_pg_write_ms'), 1)} ms)"],
            ["time from `ts` to durable under this full-speed load, p50 / p99 (histogram; backlog, not a latency figure)", f"{ms(m['latency']['p50_s'], 0)} ms / {ms(m['latency']['p99_s'], 0)} ms"],
        ]), "",
        "**CPU over the span** (`/proc/<pid>/stat` utime+stime; cores = CPU seconds / wall seconds)", "",
    ]
    rows = []
    names = {"satwatch": "satwatch run", "broker": "Apache Kafka (broker)", "postgres": "PostgreSQL (all its processes)"}
    for key, label in names.items():
        x = u.get(key)
        if not x:
            continue
        busiest = x.get("busiest") or []
        top = ", ".join(f"{t['name']} {t['cores']:.2f}" for t in busiest[:3]) if busiest else "n/a"
        peak = x.get("vmhwm_kb_after")
        rows.append([label, f(x["cpu_s"], 1), f(x["cores"], 2), top, f(x.get("threads") or x.get("processes")),
                     f"{peak/1024:,.0f} MiB" if peak else "n/a"])
    if r.get("cpu_s") is not None:
        rows.append(["satwatch replay (load generator)", f(r["cpu_s"], 1), f(r["cpu_s"] / span, 2), "n/a", "n/a", "n/a"])
    mach = u["machine"]
    ours = sum(u[k]["cpu_s"] for k in names if k in u) + (r.get("cpu_s") or 0)
    rows.append([f"whole machine ({mach['nproc']} cores)", f(mach["cpu_s"], 1), f(mach["busy_cores"], 2), "", "", ""])
    rows.append(["of which not the above (other load, the bench's polling)", f(max(0.0, mach["cpu_s"] - ours), 1),
                 f(max(0.0, mach["cpu_s"] - ours) / e["snap_wall_s"], 2), "", "", ""])
    out += [table(["process", "CPU s", "cores", "busiest threads (cores)", "threads/processes", "peak RSS"], rows), ""]
    sw = u.get("satwatch", {})
    out += [f"satwatch's peak RSS (VmHWM) was {f((sw.get('vmhwm_kb_before') or 0)/1024)} MiB before the replay and "
            f"{f((sw.get('vmhwm_kb_after') or 0)/1024)} MiB after it.", ""]
    # What limits it.
    notes = []
    if mach["busy_fraction"] is not None:
        iowait = mach.get("iowait_cores") or 0
        notes.append(f"The machine's {mach['nproc']} cores were {100*mach['busy_fraction']:.0f} % busy over the span"
                     + (f" (plus {iowait:.2f} cores' worth of I/O wait)" if iowait >= 0.01 else "")
                     + (" — the run is CPU-bound as a whole: every process here competes for the same cores, so the figure is a "
                        "property of this machine as much as of satwatch." if mach["busy_fraction"] > 0.85 else "."))
    for key, label in names.items():
        x = u.get(key)
        if not x or not x.get("busiest"):
            continue
        t = x["busiest"][0]
        verdict = ("one thread saturated a core" if t["cores"] > 0.85 else
                   "no single thread saturated a core")
        notes.append(f"{label}: {x['cores']:.2f} cores in total; busiest thread `{t['name']}` at {t['cores']:.2f} cores ({verdict}).")
    if r.get("cpu_s") is not None:
        notes.append(f"The load generator used {r['cpu_s']/span:.2f} cores.")
    if "satwatch" in u and "broker" in u:
        sw_, tn = u["satwatch"]["cpu_s"], u["broker"]["cpu_s"]
        bigger = "the broker (Apache Kafka)" if tn > sw_ else "satwatch"
        notes.append(f"The largest consumer of CPU was {bigger} ({max(sw_, tn):.1f} CPU s against {min(sw_, tn):.1f}); "
                     f"satwatch needed {1e6*sw_/e['samples']:.0f} µs of CPU per sample end to end, the broker "
                     f"{1e6*tn/e['samples']:.0f} µs (it takes each sample in from the replay and serves it out to satwatch).")
    lag = span - r["elapsed_s"]
    if lag < 0.2 * span:
        notes.append(f"satwatch kept pace with the replay (all scores committed {lag:.1f} s after the last record was acknowledged), "
                     "so the end-to-end rate is set by how fast the broker ingests and serves records on these cores, not by satwatch's own ceiling (section 1).")
    else:
        notes.append(f"satwatch fell behind the replay ({lag:.1f} s of backlog to drain after the replay ended).")
    out += ["**What limits this figure.** " + " ".join(notes), ""]
    return out

def rt_ms(lat, key):
    """Publish-to-consume quantile of the broker-alone run at this rate (seconds), if there was one."""
    rt = lat.get("round_trip")
    return rt["consume"][key] / 1e3 if rt else None

def one_partition_sentence(rt, default, target):
    """The broker-alone run with one partition per topic, as a sentence; empty if not run."""
    if not rt:
        return ""
    c = rt["consume"]
    cores = f", the broker at {rt['broker_cores']:.2f} cores" if rt.get("broker_cores") is not None else ""
    instead = f" instead of {default['partitions']}" if default else ""
    return (f" With one partition per topic ({rt['partitions']} partitions to poll{instead}; "
            f"`SATWATCH_PARTITIONS=1 ./init-kafka.sh`): p50 {c['p50_ms']:,.1f} / p99 {c['p99_ms']:,.1f} ms{cores}, "
            f"{'still over' if c['p99_ms'] / 1e3 >= target else 'within'} the target.")

def latency_section(lats, settings):
    out = ["## 3. Latency at fixed offered loads", ""]
    if lats is None:
        return out + ["Not measured in this run (`--skip-e2e`).", ""]
    qd = settings.get("max_queue_delay_us") or []
    qd_ms = qd[0] / 1000 if len(qd) == 1 else None
    target = (qd_ms + 20) / 1e3 if qd_ms is not None else None
    sink = settings.get("sink", {})
    out += [
        "For each rate: fresh broker and PostgreSQL, `satwatch run`, then the warm-up rows (the first "
        f"{', '.join(str(w) for w in settings.get('window', [64]))} of each channel, which produce no score) replayed at full speed "
        f"and consumed, then `satwatch replay --rate R --start {max(settings.get('window', [64]))} --limit L` with L rows per channel "
        f"(at least {LAT_SAMPLES:,} samples or {LAT_SECONDS} s, whichever is shorter). Latency is from the sample's `ts` (stamped by the replay as "
        "it publishes) to (a) its `scores` row committed, exactly: the commit time of the row's PostgreSQL transaction "
        "(`pg_xact_commit_timestamp(xmin)`, with `track_commit_timestamp = on`; the *commit* columns), and (b) its forecast "
        "visible to a `read_committed` consumer: `satwatch_end_to_end_latency_seconds`, observed when the Kafka transaction that "
        "carries the forecast and commits the sample's offset has committed (the p50/p99/p99.9 columns; quantiles interpolated "
        "within buckets as Prometheus' `histogram_quantile` does, so only as fine as the buckets: 1, 2.5, 5, 10, 20, 50, 100 ms, ...).", "",
    ]
    rows = []
    held_back = []
    for l in lats:
        lat, ex, r, m = l["metrics"]["latency"], l.get("exact") or {}, l["replay"], l["metrics"]
        own = m.get("processing") or {}
        during = l["meta"].get("scored_at_replay_end")
        share = during / l["meta"]["expected"] if during is not None and l["meta"]["expected"] else None
        if share is not None and share < 0.5 and r["elapsed_s"] >= 1.0:
            held_back.append((l["rate"], share))
        rows.append([f(l["rate"]), f(r["published"]), f(r["rate"]), f(lat["count"]),
                     f(100 * share, 0, " %") if share is not None else "n/a",
                     ms(lat["p50_s"]), ms(lat["p99_s"]), ms(lat["p999_s"]),
                     ms(own.get("p50_s")), ms(own.get("p99_s")),
                     ms(ex.get("p50")), ms(ex.get("p99")), ms(ex.get("p999")), ms(ex.get("max")),
                     f(m.get("mean_batch_size"), 1), f(m.get("mean_queue_ms_per_batch"), 2), f(m.get("mean_pg_write_ms"), 1),
                     ms(rt_ms(l, "p50_ms")), ms(rt_ms(l, "p99_ms")), f((l.get("round_trip") or {}).get("broker_cores"), 2)])
    out += [table(["offered samples/s", "samples", "achieved samples/s", "scored", "scored during the replay", "p50 ms", "p99 ms", "p99.9 ms",
                   "own p50 ms", "own p99 ms", "commit p50 ms", "commit p99 ms", "commit p99.9 ms", "commit max ms", "mean batch", "batcher wait ms", "PG write ms",
                   "broker alone p50 ms", "broker alone p99 ms", "broker alone: broker cores"], rows), ""]
    out += ["(p50/p99/p99.9: the histogram; own: satwatch's own share, `satwatch_processing_latency_seconds`, from the moment "
            "satwatch takes the record from Kafka to its score row being committed, i.e. the commit latency less the producer, the "
            "broker and the consumer fetch; commit …: exact, to the PostgreSQL commit; batcher wait: mean time the oldest window "
            "of a batch waited for dispatch; PG write: mean write transaction; scored during the replay: the share of score rows "
            "committed before the replay exited, near 100 % when records flow as they are offered; broker alone: "
            "`satwatch bench --round-trip` on the same services just before satwatch starts (which also warms the broker's JIT), "
            "publish to consume with no pipeline in between: "
            "records at the same rate, keyed and spread over the same partitions as the replay's, consumed with the consumer "
            "settings `satwatch run` uses; broker cores: the broker's CPU seconds over that run per wall second.)", ""]
    if held_back:
        out += ["> **Warning: these latencies are not satwatch's.** At " + ", ".join(f"{r:,}/s only {100*s_:.0f} %" for r, s_ in held_back)
                + " of the samples were scored before the replay finished, while satwatch scored every sample it was given within "
                "seconds: the load generator held the records back instead of publishing them at the offered rate (it hands "
                "records to the Kafka client in bursts, up to 20,000 at a time, rather than as it paces them), and each record's "
                "`ts` is stamped when it is encoded, so the time it waited inside `satwatch replay` counts as latency.", ""]
    at1k = next((l for l in lats if l["rate"] == 1000), None)
    if target is not None:
        if at1k is not None and (at1k.get("exact") or {}).get("p99") is not None:
            p99 = at1k["exact"]["p99"]
            met = p99 < target
            visible = at1k["metrics"]["latency"]["p99_s"]
            out += [f"**Target**: p99 from `ts` to the `scores` commit at 1,000 samples/s below `max_queue_delay` + 20 ms = "
                    f"{qd_ms:g} + 20 = {target*1e3:g} ms. Measured (exact): {p99*1e3:,.1f} ms: **{'met' if met else 'not met'}**"
                    + (f"; to the forecast visible to a read_committed consumer (histogram): p99 {visible*1e3:,.1f} ms" if visible is not None else "")
                    + (f". satwatch's own share, from taking the record from Kafka to the commit: p99 {at1k['metrics']['processing']['p99_s']*1e3:,.1f} ms, "
                       f"{'within' if at1k['metrics']['processing']['p99_s'] < target else 'over'} the target on its own"
                       if (at1k['metrics'].get('processing') or {}).get('p99_s') is not None else "")
                    + (" — but see the warning above: the load generator, not satwatch, set this figure." if any(r == 1000 for r, _ in held_back) else ".")
                    + (f" The broker alone, with no pipeline (`satwatch bench --round-trip` at 1,000 records/s): publish to consume "
                       f"p50 {rt_ms(at1k, 'p50_ms')*1e3:,.1f} / p99 {rt_ms(at1k, 'p99_ms')*1e3:,.1f} ms, "
                       f"{'already over' if rt_ms(at1k, 'p99_ms') >= target else 'within'} the target before satwatch does anything"
                       + (f"; serving those 1,000 records/s kept the broker {at1k['round_trip']['broker_cores']:.2f} cores busy."
                          if (at1k.get("round_trip") or {}).get("broker_cores") is not None else ".")
                       if rt_ms(at1k, "p99_ms") is not None else "")
                    + one_partition_sentence(at1k.get("round_trip_one_partition"), at1k.get("round_trip"), target), ""]
        else:
            out += [f"**Target**: p99 at 1,000 samples/s below {target*1e3:g} ms: not measured in this run.", ""]
    # What limits it: the configured waits a sample meets on its way.
    notes = []
    parts = []
    if settings.get("replay_linger_ms") is not None:
        parts.append(f"the replay's producer lingers up to {settings['replay_linger_ms']} ms before sending (after `ts` is stamped)")
    parts.append("the broker stores it and hands it to satwatch's consumer fetch")
    if qd_ms is not None:
        parts.append(f"the batcher waits up to max_queue_delay = {qd_ms:g} ms for more windows")
    if sink.get("max_batch_delay_ms") is not None:
        parts.append(f"the sink gathers outputs for up to max_batch_delay_ms = {sink['max_batch_delay_ms']} ms, then commits one PostgreSQL transaction")
    if settings.get("publisher_linger_ms") is not None:
        parts.append(f"for the histogram only: the forecasts are then published (producer linger {settings['publisher_linger_ms']} ms) "
                     "and acknowledged by the broker (acks=all)")
    notes.append("A sample meets these waits in turn: " + "; ".join(parts) + ".")
    for l in lats:
        m, ex = l["metrics"], l.get("exact") or {}
        hist_mean = m["latency"]["mean_s"]
        if ex.get("mean") is None or hist_mean is None:
            continue
        if any(r == l["rate"] for r, _ in held_back):
            notes.append(f"At {l['rate']:,}/s the figures are set by the load generator holding records back (see the warning), "
                         f"so satwatch's own share cannot be read from them; batcher wait ({f(m.get('mean_queue_ms_per_batch'), 1)} ms per batch), "
                         f"inference ({f(m.get('mean_compute_ms_per_batch'), 1)} ms per batch) and the PostgreSQL write "
                         f"({f(m.get('mean_pg_write_ms'), 1)} ms) are satwatch's parts, measured under the resulting bursts.")
            continue
        known = (m.get("mean_queue_ms_per_batch") or 0) + (m.get("mean_compute_ms_per_batch") or 0) + (m.get("mean_pg_write_ms") or 0)
        rest = ex["mean"] * 1e3 - known
        notes.append(f"At {l['rate']:,}/s the mean is {ex['mean']*1e3:.1f} ms to the commit and {hist_mean*1e3:.1f} ms in the histogram "
                     f"(so {1e3*(hist_mean - ex['mean']):.1f} ms of publishing and acknowledgement after the commit); of the {ex['mean']*1e3:.1f} ms, "
                     f"batcher wait + inference + the PostgreSQL write account for {known:.1f} ms, leaving {rest:.1f} ms for the Kafka leg "
                     "(producer linger, broker, consumer fetch), the sink's batching wait and the hand-offs between tasks.")
    out += ["**What limits these figures.** " + " ".join(notes), ""]
    return out

LAT_SAMPLES = LAT_SECONDS = 0

def grouped_section(path):
    """Section 4 from training/grouped_study.py's tables, when it ran."""
    try:
        with open(path) as fh:
            study = fh.read().strip()
    except FileNotFoundError:
        return []
    out = ["## 4. One call for all models, or one per model", "",
           "`training/grouped_study.py` stacks the 27 forecasters' weights into one ONNX graph (input [27, B, W, 25], W the window, checked "
           "against each model's own output) and times, on ONNX Runtime with one thread per session, a round of B windows for "
           "every model: 27 calls (what satwatch does), one grouped call, and either on two threads at once. Its reading of the "
           "figures is in `training/grouped_study.md`.", "", study, ""]
    # The first table: | B | windows | per-model | per-model x2 | grouped | ... | grouped speed-up | split speed-up |
    rows = []
    for line in study.splitlines():
        cells = [c.strip().replace(",", "").rstrip("×") for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[0].isdigit():
            try:
                rows.append([float(c) for c in cells])
            except ValueError:
                pass
    if rows:
        small, large = rows[0], rows[-1]
        out += [f"**What it shows.** With {small[0]:.0f} window per model a grouped call is {small[7]:.2f}× as fast as one call per "
                f"model (the fixed cost of a call and of each node is paid once instead of 27 times); with {large[0]:.0f} it is "
                f"{large[7]:.2f}×. Two calls at once take a round at {large[2] / large[3]:.2f}× the speed of one at a time at "
                f"{large[0]:.0f} windows per model. satwatch keeps one call per model, two at once (`backend_threads = 2`): at "
                "full speed its batches hold 100–150 windows per model, where grouping gains nothing, and at low rates, where it "
                "would, inference is a small share of a core and of the latency; a grouped call would also make every model wait "
                "for the same batch size and make a one-model hot swap rebuild the group.", ""]
    return out

def cmd_render(results, out_path):
    global LAT_SAMPLES, LAT_SECONDS
    machine = load(os.path.join(results, "machine.json"))
    settings = load(os.path.join(results, "settings.json"), {})
    LAT_SAMPLES, LAT_SECONDS = machine["lat_samples"], machine["lat_seconds"]
    core = load(os.path.join(results, "core.json"))
    e2e = load(os.path.join(results, "e2e.json"))
    lat_files = sorted((f for f in os.listdir(results) if re.fullmatch(r"latency-\d+\.json", f)),
                       key=lambda n: int(re.search(r"\d+", n).group()))
    lats = [load(os.path.join(results, n)) for n in lat_files] if lat_files else None
    with open(os.path.join(results, "commands.txt")) as fh:
        commands = fh.read().rstrip("\n")
    m = machine
    lines = [
        "# Benchmarks", "",
        f"Generated by `scripts/bench.sh{' --quick' if m['quick'] else ''}{' --skip-e2e' if m['skip_e2e'] else ''}` on {m['date']}; "
        f"the whole run took {m['total_s']} s. Every figure comes from that run: rerun the script to refresh this file "
        f"(it overwrites it). Raw figures, logs and metrics scrapes are kept in `{m['results_dir']}/`.", "",
    ]
    if m["quick"]:
        lines += ["> **Quick mode**: smaller runs to check the harness; do not quote these figures.", ""]
    lines += [
        "## Machine", "",
        table(["", ""], [
            ["CPU", f"{m['cpu_model']}, `nproc` = {m['nproc']}"],
            ["memory", m["memory"]],
            ["kernel", m["kernel"]],
            ["rustc", m["rustc"]],
            ["ONNX Runtime", m["ort"]],
            ["broker", m.get("broker", "n/a")],
            ["PostgreSQL", m["postgres"]],
            ["satwatch", m["satwatch"]],
            ["load average before / after the run", f"{m['loadavg_start']} / {m['loadavg_end']}"],
        ], align=["---", "---"]), "",
        "All processes (satwatch, the broker, PostgreSQL, the load generator) share these cores. A load average "
        "well above zero before the run means something else was using them too.", "",
        "## Commands", "",
        "Run from the repository root, in this order (`scripts/bench.sh` does all of it; the services are started "
        "afresh before each `satwatch run`, with `scripts/services.sh` on the bench's own ports):", "",
        "```sh", commands, "```", "",
    ]
    lines += core_section(core, settings, load(os.path.join(results, "core-1thread.json")),
                          load(os.path.join(results, "core-files.json")))
    lines += e2e_section(e2e, settings, load(os.path.join(results, "backlog.json")),
                         load(os.path.join(results, "flood.json")))
    lines += latency_section(lats, settings)
    lines += grouped_section(os.path.join(results, "grouped.md"))
    text = "\n".join(lines)
    # The backend section comes from `satwatch bench --backend` runs (some on
    # GPU machines this script never sees): carry it over unchanged.
    try:
        with open(out_path) as fh:
            previous = fh.read()
        kept = previous.find("\n## Backends (the GPU path)")
        if kept >= 0:
            text = text.rstrip("\n") + "\n" + previous[kept:]
    except FileNotFoundError:
        pass
    with open(out_path, "w") as fh:
        fh.write(text.rstrip("\n") + "\n")

def cmd_print(results, section):
    """Print one section's tables (as they will appear in the report)."""
    settings = load(os.path.join(results, "settings.json"), {})
    machine = load(os.path.join(results, "machine.json"), {})
    global LAT_SAMPLES, LAT_SECONDS
    LAT_SAMPLES, LAT_SECONDS = machine.get("lat_samples", 0), machine.get("lat_seconds", 0)
    if section == "core":
        text = core_section(load(os.path.join(results, "core.json")), settings,
                            load(os.path.join(results, "core-1thread.json")),
                            load(os.path.join(results, "core-files.json")))
    elif section == "e2e":
        text = e2e_section(load(os.path.join(results, "e2e.json")), settings,
                           load(os.path.join(results, "backlog.json")), load(os.path.join(results, "flood.json")))
    else:
        text = latency_section([load(os.path.join(results, f"latency-{section}.json"))], settings)
    print("\n".join(l for l in text if not l.startswith("**What limits")))

def cmd_machine(out, *kv):
    d = dict(item.split("=", 1) for item in kv)
    for k in ("quick", "skip_e2e", "lat_samples", "lat_seconds"):
        d[k] = int(d[k])
    old = load(out, {})
    old.update(d)
    dump(old, out)

COMMANDS = {
    "expected": cmd_expected, "window": cmd_window, "settings": cmd_settings, "snap": cmd_snap, "metric": cmd_metric,
    "core": cmd_core, "e2e": cmd_e2e, "backlog": cmd_backlog, "flood": cmd_flood, "latency": cmd_latency, "render": cmd_render,
    "print": cmd_print, "machine": cmd_machine, "div": cmd_div, "round_trip": cmd_round_trip,
    "round_trip_cpu": cmd_round_trip_cpu,
}
if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    fail("usage: SUBCOMMAND ARGS (" + ", ".join(COMMANDS) + ")")
COMMANDS[sys.argv[1]](*sys.argv[2:])
PY
)
py() { python3 -c "$HELPER" "$@"; }

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

# broker_round_trip NAME: the broker alone (`satwatch bench --round-trip` at
# $rate for $rt_seconds) on the services just started, into $RESULTS/NAME.json,
# with the broker's CPU over it: a light load does not mean an idle broker
# (fetch requests, replication of the internal topics, log flushes).
broker_round_trip() {
    local name=$1
    record_cmd "$BIN" bench --pipeline "$PIPELINE" --round-trip --rate "$rate" --seconds "$rt_seconds" --json
    py snap "$RESULTS/$name.snap-before.json" "broker=$broker_pid"
    "$BIN" bench --pipeline "$PIPELINE" --round-trip --rate "$rate" --seconds "$rt_seconds" --json \
        >"$RESULTS/$name.json" 2>"$RESULTS/$name.log" ||
        die "satwatch bench --round-trip failed (log: $RESULTS/$name.log)"
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
python3 -c 'import tomllib' 2>/dev/null || die "python3 >= 3.11 is needed (tomllib)"
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
py settings "$PIPELINE" "$RESULTS/settings.json"
log "bench: $(nproc) cores ($cpu_model), load average $(cut -d' ' -f1-3 /proc/loadavg); state $STATE"

# ------------------------------------------------------------ 1. core

section="1. core (satwatch bench)"
log "== $section"
# Only this run's figures: a comparison left from an earlier run must not show.
rm -f "$RESULTS/core-1thread.json" "$RESULTS/core-files.json"
bench_args=(bench --pipeline "$PIPELINE" --data "$DATA" --replicas "$REPLICAS"
    --latency-rates "$CORE_LATENCY_RATES" --latency-seconds "$CORE_LATENCY_SECONDS" --json)
if [[ -n $CORE_JSON ]]; then
    [[ -f $CORE_JSON ]] || die "SATWATCH_BENCH_CORE_JSON=$CORE_JSON: no such file"
    note "section 1 from $CORE_JSON (SATWATCH_BENCH_CORE_JSON), not measured"
    py core "$CORE_JSON" "$RESULTS/core.json" "taken from $CORE_JSON (SATWATCH_BENCH_CORE_JSON)"
elif "$BIN" bench --help >/dev/null 2>&1; then
    note "1. core throughput, inference ceiling, scaling (in process)"
    record_cmd "$BIN" "${bench_args[@]}"
    # Deadline: generous, but a hung bench must not hang the script.
    timeout "$WAIT_TIMEOUT" "$BIN" "${bench_args[@]}" >"$RESULTS/core.raw.json" 2>"$RESULTS/core.log" \
        || die "satwatch bench failed or ran past ${WAIT_TIMEOUT}s (log: $RESULTS/core.log)"
    py core "$RESULTS/core.raw.json" "$RESULTS/core.json" measured
    # The same with one inference thread: on two cores the engine's own
    # thread then has a core to itself (and the ceiling is one thread's).
    one_args=(bench --pipeline "$PIPELINE" --data "$DATA" --replicas "$ONE_THREAD_REPLICAS" --backend-threads 1 --json)
    record_cmd "$BIN" "${one_args[@]}"
    timeout "$WAIT_TIMEOUT" "$BIN" "${one_args[@]}" >"$RESULTS/core-1thread.raw.json" 2>"$RESULTS/core-1thread.log" \
        || die "satwatch bench --backend-threads 1 failed or ran past ${WAIT_TIMEOUT}s (log: $RESULTS/core-1thread.log)"
    py core "$RESULTS/core-1thread.raw.json" "$RESULTS/core-1thread.json" measured
    # The model files as they are, on laid-out windows: what the row form gains.
    files_args=(bench --pipeline "$PIPELINE" --data "$DATA" --replicas "$ONE_THREAD_REPLICAS" --model-files --json)
    record_cmd "$BIN" "${files_args[@]}"
    timeout "$WAIT_TIMEOUT" "$BIN" "${files_args[@]}" >"$RESULTS/core-files.raw.json" 2>"$RESULTS/core-files.log" \
        || die "satwatch bench --model-files failed or ran past ${WAIT_TIMEOUT}s (log: $RESULTS/core-files.log)"
    py core "$RESULTS/core-files.raw.json" "$RESULTS/core-files.json" measured
else
    log "   $BIN has no 'bench' subcommand: section 1 is skipped"
    py core - "$RESULTS/core.json" "\`$BIN_SHOWN\` has no \`bench\` subcommand (build a newer satwatch)."
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
    read -r expected samples _ _ < <(py expected "$PIPELINE" "$DATA/$SPLIT" 0 "$E2E_LIMIT")
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
    read -r window < <(py window "$PIPELINE")
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
        read -r _ warm _ _ < <(py expected "$PIPELINE" "$DATA/$SPLIT" 0 "$window")
        start_replay "lat-$rate-warmup" replay --pipeline "$PIPELINE" --data "$DATA" --split "$SPLIT" --channels all --max-rate --limit "$window"
        finish_replay "lat-$rate-warmup"
        wait_metric consumed "$warm"
        # Rows per channel: LAT_SAMPLES samples or LAT_SECONDS seconds, whichever is shorter.
        read -r channels < <(py expected "$PIPELINE" "$DATA/$SPLIT" 0 1 | cut -d' ' -f3)
        limit=$(((want + channels - 1) / channels))
        read -r expected samples _ _ < <(py expected "$PIPELINE" "$DATA/$SPLIT" "$window" "$limit")
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
