#!/usr/bin/env python3
"""Grouped-model study (issue 6, "Beyond"): is one call over all channels' windows, with the
27 forecasters' weights stacked into one graph, faster than one call per model?

    ~/.cache/satwatch/venv/bin/python training/grouped_study.py [--out FILE] [--batches 1,4,16,64,256]

Reads the shipped model_repository/smap_*/1/model.onnx (all the same residual MLP:
Flatten, Gemm W*25->hidden, Relu, Gemm hidden->10, plus window[:, -1, 0]; W is the models'
satwatch.window) and builds, in a temp dir, one grouped ONNX model: input `windows`
[C, B, W, 25] -> output `forecast` [C, B, 10], a batched MatMul over stacked
[C, W*25, hidden] and [C, hidden, 10] weights plus biases and the
residual. It checks the grouped models against each channel's own model on real normalised
windows from data/smap/test and stops if any forecast differs by more than --tol.

Then it times, with onnxruntime on the CPU and intra_op = inter_op = 1 thread per session
(how satwatch runs ORT: one call at a time per backend thread), for each per-model batch
size B:
  per-model      C calls, one per model, B windows each, on one Python thread;
  per-model x2   the same C calls split over 2 Python threads (ORT releases the GIL);
  grouped        one call of the grouped model with C x B windows;
  grouped x2     the grouped model split in two halves (two grouped models), one per thread;
  grouped-split  one call too, but the graph Splits `windows` by channel and runs each
                 channel's original nodes (2-D Gemm weights) on its slice, then Concats.
It also times one sess.run of an Identity model: the fixed cost of a call from Python.
Each figure is the best of --repeats runs of at least --min-time s (the machine is shared).
A "round" is every model's B windows once; the table gives µs per round and windows/s.
Nothing is written to model_repository/.
"""

import argparse, re, subprocess, sys, tempfile, threading, time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from threshold_study import shipped_window  # noqa: E402  (exits unless all models share one window)

ROOT = Path(__file__).resolve().parent.parent
W, F, H = shipped_window(), 25, 10  # window rows (one for every shipped model), features, horizon


def load_channels():
    """(channel, model path, center, scale, weights) for every shipped model, sorted by channel."""
    out = []
    for cfg in sorted((ROOT / "model_repository").glob("smap_*/config.pbtxt")):
        p = dict(re.findall(r'key: "satwatch\.(\w+)" value: \{ string_value: "([^"]*)"', cfg.read_text()))
        center = np.array(p["norm_center"].split(","), np.float32)
        scale = np.array(p["norm_scale"].split(","), np.float32)
        path = cfg.parent / "1/model.onnx"
        model = onnx.load(str(path))
        ops = [n.op_type for n in model.graph.node if n.op_type != "Constant"]
        # The grouped graph reproduces this exact graph; a different one must not be stacked silently.
        if ops != ["Slice", "Gather", "Flatten", "Gemm", "Relu", "Gemm", "Add"]:
            sys.exit(f"{path}: unexpected graph {ops}; the grouped model assumes train.py's residual MLP")
        for n in model.graph.node:
            if n.op_type == "Gemm":
                a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
                if a.get("transB") != 1 or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0):
                    sys.exit(f"{path}: Gemm {n.name} has attributes {a}; expected transB=1, alpha=beta=1")
        w = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        if w["hidden.weight"].shape[1] != W * F or w["out.weight"].shape[0] != H:
            sys.exit(f"{path}: weight shapes {w['hidden.weight'].shape}, {w['out.weight'].shape}")
        out.append((cfg.parent.name[5:], path, center, scale, w))
    if not out:
        sys.exit("no model_repository/smap_*/config.pbtxt found")
    return out


def grouped_model(weights):
    """One graph computing every channel's forecaster on its own slice of `windows`."""
    c = len(weights)
    hidden = weights[0]["hidden.weight"].shape[0]
    w1 = np.stack([w["hidden.weight"].T for w in weights]).astype(np.float32)  # [C, 1600, hidden]
    b1 = np.stack([w["hidden.bias"][None, :] for w in weights]).astype(np.float32)  # [C, 1, hidden]
    w2 = np.stack([w["out.weight"].T for w in weights]).astype(np.float32)  # [C, hidden, 10]
    b2 = np.stack([w["out.bias"][None, :] for w in weights]).astype(np.float32)  # [C, 1, 10]
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    inits += [i64("flat_shape", [0, 0, W * F]), i64("last_start", [W - 1, 0]), i64("last_end", [W, 1]),
              i64("last_axes", [2, 3]), i64("squeeze_axes", [3])]
    nodes = [
        # Reshape's 0 copies the input's dim: [C, B, 64, 25] -> [C, B, 1600], B stays dynamic.
        helper.make_node("Reshape", ["windows", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w1"], ["h_mm"]),
        helper.make_node("Add", ["h_mm", "b1"], ["h_pre"]),
        helper.make_node("Relu", ["h_pre"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["o_mm"]),
        helper.make_node("Add", ["o_mm", "b2"], ["delta"]),
        # The residual: the last row's feature 0, [C, B, 1, 1] -> [C, B, 1], broadcast over the horizon.
        helper.make_node("Slice", ["windows", "last_start", "last_end", "last_axes"], ["last4"]),
        helper.make_node("Squeeze", ["last4", "squeeze_axes"], ["last"]),
        helper.make_node("Add", ["last", "delta"], ["forecast"]),
    ]
    return finish(nodes, "smap_grouped", inits, c)


def split_model(models):
    """One graph, one call, but each channel keeps its own Gemm pair: Split `windows` on the
    channel axis, run every channel's original nodes on its slice, Concat the forecasts.
    (ORT prepacks a 2-D constant Gemm weight; the stacked 3-D MatMul above may not get that.)"""
    c = len(models)
    nodes, inits = [helper.make_node("Split", ["windows", "split_sizes"], [f"x{i}" for i in range(c)], axis=0)], []
    inits.append(numpy_helper.from_array(np.ones(c, np.int64), "split_sizes"))
    for i, m in enumerate(models):
        ren = lambda n, i=i: f"c{i}/{n}"  # every channel's names get their own prefix
        for t in m.graph.initializer:
            t2 = onnx.TensorProto()
            t2.CopyFrom(t)
            t2.name = ren(t.name)
            inits.append(t2)
        # [1, B, 64, 25] -> [B, 64, 25]: the slice now looks exactly like the original input.
        inits.append(numpy_helper.from_array(np.array([0], np.int64), f"c{i}/axis0"))
        nodes.append(helper.make_node("Squeeze", [f"x{i}", f"c{i}/axis0"], [ren("window")]))
        for n in m.graph.node:
            n2 = onnx.NodeProto()
            n2.CopyFrom(n)
            n2.name = ren(n.name)
            del n2.input[:], n2.output[:]
            n2.input.extend(ren(x) if x else x for x in n.input)
            n2.output.extend(ren(x) for x in n.output)
            nodes.append(n2)
        nodes.append(helper.make_node("Unsqueeze", [ren("forecast"), f"c{i}/axis0"], [f"f{i}"]))
    nodes.append(helper.make_node("Concat", [f"f{i}" for i in range(c)], ["forecast"], axis=0))
    return finish(nodes, "smap_grouped_split", inits, c)


def finish(nodes, name, inits, c):
    """The checked model of a grouped graph: `windows` [C, B, W, F] in, `forecast` [C, B, H] out."""
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("windows", TensorProto.FLOAT, [c, "batch", W, F])],
        [helper.make_tensor_value_info("forecast", TensorProto.FLOAT, [c, "batch", H])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="grouped_study")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_windows(center, scale, ch, n):
    """n normalised windows spread evenly over the channel's test split, as satwatch cuts them."""
    x = np.load(ROOT / f"data/smap/test/{ch}.npy")
    z = ((x - center) * (np.float32(1) / scale)).astype(np.float32)
    ends = np.linspace(W - 1, len(x) - 1, n).astype(np.int64)
    return np.ascontiguousarray(z[ends[:, None] + np.arange(-W + 1, 1)[None, :]])


def session(path):
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.inter_op_num_threads = 1
    o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def best_time(step, repeats, min_time):
    """Best seconds per call of step(k) (which runs k rounds) over `repeats` runs of >= min_time s."""
    k = 1
    while True:  # calibrate k so that one run lasts at least min_time
        t = time.perf_counter()
        step(k)
        dt = time.perf_counter() - t
        if dt >= min_time:
            break
        k = max(k * 2, int(k * min_time / max(dt, 1e-9) * 1.2))
    best = dt / k
    for _ in range(repeats - 1):
        t = time.perf_counter()
        step(k)
        best = min(best, (time.perf_counter() - t) / k)
    return best


def on_two_threads(work_a, work_b):
    """step(k) running work_a(k) and work_b(k) at once on two threads; a run ends when both have."""
    def step(k):
        ts = [threading.Thread(target=f, args=(k,)) for f in (work_a, work_b)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    return step


def per_model_rounds(pairs):
    """k rounds of one sess.run per model; pairs = [(session, feed)]."""
    def work(k):
        for _ in range(k):
            for s, feed in pairs:
                s.run(["forecast"], feed)
    return work


def run_rounds(s, feed):
    """k rounds of one call of session s."""
    def work(k):
        for _ in range(k):
            s.run(["forecast"], feed)
    return work


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="also write the markdown tables here")
    ap.add_argument("--batches", default="1,4,16,64,256", help="per-model batch sizes B")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds per timed run")
    ap.add_argument("--tol", type=float, default=1e-4, help="max |grouped - per-model| allowed")
    ap.add_argument("--verify-windows", type=int, default=512, help="windows per channel in the check")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime before: {load_before}", flush=True)

    chans = load_channels()
    c = len(chans)
    half = (c + 1) // 2
    n_win = max(args.verify_windows, max(batches))
    wins = np.stack([test_windows(center, scale, ch, n_win) for ch, _, center, scale, _ in chans])  # [C, n, 64, 25]
    singles = [session(path) for _, path, _, _, _ in chans]
    weights = [w for *_, w in chans]
    protos = [onnx.load(str(path)) for _, path, _, _, _ in chans]

    tmp = tempfile.TemporaryDirectory(prefix="satwatch_grouped_")

    def built(model, name):
        p = Path(tmp.name) / name
        onnx.save(model, str(p))
        print(f"built {p} ({p.stat().st_size / 1e6:.2f} MB)")
        return session(p)

    grouped = built(grouped_model(weights), "grouped.onnx")
    grouped_halves = [built(grouped_model(weights[:half]), "grouped_a.onnx"),
                      built(grouped_model(weights[half:]), "grouped_b.onnx")]
    split = built(split_model(protos), "grouped_split.onnx")

    # Check: every grouped form must give each channel's own forecasts.
    ref = np.stack([s.run(["forecast"], {"window": wins[i]})[0] for i, s in enumerate(singles)])
    checks = {
        "grouped": grouped.run(["forecast"], {"windows": wins})[0],
        "grouped halves": np.concatenate([grouped_halves[0].run(["forecast"], {"windows": wins[:half]})[0],
                                          grouped_halves[1].run(["forecast"], {"windows": wins[half:]})[0]]),
        "grouped-split": split.run(["forecast"], {"windows": wins})[0],
    }
    for name, g in checks.items():
        if g.shape != ref.shape:
            sys.exit(f"FAIL: {name} output shape {g.shape}, per-model {ref.shape}")
        diff = np.abs(g - ref)
        worst = np.unravel_index(np.argmax(diff), diff.shape)
        print(f"check {name}: {c} channels x {n_win} test windows, max |diff| = {diff.max():.3g} "
              f"(channel {chans[worst[0]][0]}), max |forecast| = {np.abs(ref).max():.3g}")
        if not diff.max() <= args.tol:
            sys.exit(f"FAIL: {name} differs from the per-model forecasts by {diff.max():.3g} > {args.tol}")

    # The fixed cost of one sess.run from Python, to separate call overhead from model work.
    ident = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["window"], ["forecast"])], "identity",
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, [1, H])],
        [helper.make_tensor_value_info("forecast", TensorProto.FLOAT, [1, H])]),
        opset_imports=[helper.make_opsetid("", 17)])
    ident.ir_version = 8
    empty = built(ident, "identity.onnx")
    call_s = best_time(run_rounds(empty, {"window": np.zeros((1, H), np.float32)}), args.repeats, args.min_time)
    print(f"one sess.run of an Identity model: {call_s * 1e6:.1f} µs", flush=True)

    names = ["per-model", "per-model x2", "grouped", "grouped x2", "grouped-split"]
    rows = []
    for b in batches:
        x = np.ascontiguousarray(wins[:, :b])  # [C, B, 64, 25]
        pairs = [(s, {"window": np.ascontiguousarray(x[i])}) for i, s in enumerate(singles)]
        modes = {
            "per-model": per_model_rounds(pairs),
            "per-model x2": on_two_threads(per_model_rounds(pairs[:half]), per_model_rounds(pairs[half:])),
            "grouped": run_rounds(grouped, {"windows": x}),
            "grouped x2": on_two_threads(run_rounds(grouped_halves[0], {"windows": np.ascontiguousarray(x[:half])}),
                                         run_rounds(grouped_halves[1], {"windows": np.ascontiguousarray(x[half:])})),
            "grouped-split": run_rounds(split, {"windows": x}),
        }
        t = {m: best_time(modes[m], args.repeats, args.min_time) for m in names}
        rows.append((b, t))
        print(f"B={b:4d}: " + ", ".join(f"{m} {v * 1e6:,.1f} µs" for m, v in t.items()), flush=True)

    load_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime after: {load_after}")

    lines = [
        f"{c} models, onnxruntime {ort.__version__} on the CPU, intra_op = inter_op = 1 thread per session, "
        f"called from Python; best of {args.repeats} runs of ≥ {args.min_time} s each. A round is every "
        f"model's B windows once ({c}×B windows). x2: the same work split over 2 Python threads.",
        "",
        "**µs per round** (lower is better; speed-up = per-model time / grouped time)",
        "",
        "| B per model | windows per round | " + " | ".join(names) + " | grouped speed-up | grouped-split speed-up |",
        "|---:|---:|" + "---:|" * (len(names) + 2),
    ]
    for b, t in rows:
        lines.append(f"| {b} | {c * b:,} | " + " | ".join(f"{t[m] * 1e6:,.1f}" for m in names)
                     + f" | {t['per-model'] / t['grouped']:.2f}× | {t['per-model'] / t['grouped-split']:.2f}× |")
    lines += ["", "**windows/s**", "", "| B per model | " + " | ".join(names) + " |",
              "|---:|" + "---:|" * len(names)]
    for b, t in rows:
        lines.append(f"| {b} | " + " | ".join(f"{c * b / t[m]:,.0f}" for m in names) + " |")
    lines += ["", f"Fixed cost of one `sess.run` from Python (an Identity model on 10 floats): {call_s * 1e6:.1f} µs, "
              f"so {c} per-model calls pay about {c * call_s * 1e6:,.0f} µs per round in calls alone.",
              "", f"load before: `{load_before}`  ", f"load after: `{load_after}`"]
    table = "\n".join(lines)
    print()
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    tmp.cleanup()


if __name__ == "__main__":
    main()
