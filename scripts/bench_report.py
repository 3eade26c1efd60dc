#!/usr/bin/env python3
"""scripts/bench.sh's figures and report: everything that parses or computes
(/proc snapshots, Prometheus text, `satwatch bench ... --json`, `satwatch plan
--json`, the markdown of BENCHMARKS.md). Stdlib only.

    python3 scripts/bench_report.py SUBCOMMAND ARGS...

Each subcommand reads files the bench wrote into its results directory and
writes JSON or markdown next to them, or prints a figure for the shell; the
COMMANDS table at the end lists them. scripts/test_bench_report.py tests it.
"""
import json, math, os, re, sys, time


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

# ---------------------------------------------------------------- the plan
# What the pipeline and its models amount to comes from `satwatch plan
# --json`, never from reading pipelines/*.toml or config.pbtxt here: the
# binary's own loading cannot disagree with `satwatch run`.

def cmd_expected(plan_path):
    """The replay a `satwatch plan --data ... --json` describes, for the shell:
    expected_scores samples channels warm_up."""
    plan = load(plan_path)
    if plan is None or "replay" not in plan:
        fail(f"{plan_path}: not the output of satwatch plan --data ... --json")
    r = plan["replay"]
    print(r["expected_scores"], r["samples"], len(plan["channels"]), r["warm_up"])

def cmd_window(plan_path):
    """The longest window of the pipeline's models: rows per channel that only fill it."""
    print(load(plan_path)["window"])

def cmd_settings(plan_path, out):
    """The configured delays that bound latency: the models' batching, the
    windows and the sink's settings from `satwatch plan --json`, and the
    producers' linger."""
    plan = load(plan_path)
    dump({
        "max_queue_delay_us": sorted({m["max_queue_delay_us"] for m in plan["models"]}),
        "window": sorted({c["window"] for c in plan["channels"]}),
        "sink": plan["sink"],
        "engine": plan["engine"],
        "replay_linger_ms": plan["producers"]["replay_paced_linger_ms"],
        "publisher_linger_ms": plan["producers"]["publisher_linger_ms"],
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
    """Validate `satwatch bench pipeline --json` output and keep it."""
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
        fail(f"{raw}: not the JSON object satwatch bench pipeline --json prints: {e}")
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
    """A `satwatch bench broker` result with the broker's cores over it; None if not run."""
    rt = load(os.path.join(results, f"{name}.json"))
    cpu_path = os.path.join(results, f"{name}.cpu.json")
    if rt is not None and os.path.exists(cpu_path):
        rt["broker_cores"] = load(cpu_path).get("broker_cores")
    return rt

def cmd_div(a, b):
    print(f"{float(a) / float(b):.3f}")

def cmd_round_trip(path):
    """One log line from `satwatch bench broker --json`."""
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
    out = ["**With one inference thread** (`satwatch bench pipeline --backend-threads 1`; the pipeline file has "
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
    return ["**The row form against the model files** (`satwatch bench pipeline --model-files`, i.e. `[engine] row_form = false`): "
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
        "`satwatch bench pipeline` runs the pipeline's engine (windowing, dynamic batching, ONNX Runtime, detection) "
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
        f"{', '.join(str(w) for w in settings['window'])} of each channel, which produce no score) replayed at full speed "
        f"and consumed, then `satwatch replay --rate R --start {max(settings['window'])} --limit L` with L rows per channel "
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
            "`satwatch bench broker` on the same services just before satwatch starts (which also warms the broker's JIT), "
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
                    + (f" The broker alone, with no pipeline (`satwatch bench broker` at 1,000 records/s): publish to consume "
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
    # The backend section comes from `satwatch bench pipeline|backend --backend` runs (some on
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

def main(argv):
    if len(argv) < 2 or argv[1] not in COMMANDS:
        fail("usage: SUBCOMMAND ARGS (" + ", ".join(COMMANDS) + ")")
    COMMANDS[argv[1]](*argv[2:])

if __name__ == "__main__":
    main(sys.argv)
