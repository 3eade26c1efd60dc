#!/usr/bin/env python3
"""Train the per-channel SMAP forecasters and write the Triton-style model repository.

    python training/train.py --data data/smap --out model_repository

For every channel found in `<data>/train/*.npy` (or the ones given with `--channels`):

* take the channel's width F from its train split: column 0 is the telemetry value (the
  target), the others its command columns (SMAP: F = 25; any F >= 1 works, and the model
  is written for that F);
* normalise each of the F features with the train split's mean and max(std, 0.05);
* cut windows of `--window` rows (all F features) -> the next `--horizon` values of
  feature 0; the first 80% of the windows (by time) fit the model, the last 20% are
  for early stopping and for calibrating the one-step error;
* fit a residual MLP: forecast = last normalised value + Linear->ReLU->Linear(window);
* export it to ONNX (opset 17) at `<out>/smap_<ch>/1/model.onnx`, check it against
  onnxruntime, and write `<out>/smap_<ch>/config.pbtxt` (Triton ModelConfig text format,
  input dims `[window, F]`, with the normalisation and calibration in `parameters`).

Only `train/` is read for fitting; of `test/` only each file's shape is read (to check its
width), and its rows only with `--fixtures`, to write the reference tensors for the Rust
tests. Everything runs on the CPU, single-threaded, with
fixed seeds and deterministic algorithms, so a rerun writes byte-identical files.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

TARGET_FEATURE = 0
SCALE_FLOOR = 0.05
ERROR_FLOOR = 1e-3
FIT_FRACTION = 0.8
# Train drift: the share of the train split's target values, after its first DRIFT_BASELINE
# rows, that lie outside those rows' range (at least DRIFT_MIN_WIDTH wide) by more than
# DRIFT_MARGIN of its width. The first rows play the part the stream's first
# `[detect.baseline] samples` (640) play in satwatch; a channel that drifts all through its
# train split (a counter, a ramp, a slow trend) gets no level or excursion score, whose
# alarms would run to the end of its stream (`[detect.baseline] max_train_drift`).
DRIFT_BASELINE = 640
DRIFT_MIN_WIDTH = 0.05
DRIFT_MARGIN = 0.01
MAX_BATCH_SIZE = 512
OPSET = 17
ONNX_TOLERANCE = 1e-5
FIXTURE_CHANNELS = ("A-1", "T-1")
FIXTURE_ENDS = tuple(range(999, 8000, 1000))  # window end rows in the test split


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="SMAP folder with train/ (and test/)")
    p.add_argument("--out", type=Path, required=True, help="model repository to (re)write")
    p.add_argument("--channels", default="", help="comma-separated, e.g. A-1,E-2 (default: all in <data>/train)")
    p.add_argument("--features", type=int, default=None,
                   help="values per row every channel must have (default: each channel's train split width)")
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--horizon", type=int, default=10)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=200, help="maximum epochs (early stopping usually ends sooner)")
    p.add_argument("--patience", type=int, default=20, help="epochs without validation improvement before stopping")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--fixtures", type=Path, default=None,
                   help=f"also write reference tensors for {', '.join(FIXTURE_CHANNELS)} here (e.g. tests/fixtures)")
    return p.parse_args(argv)


def set_determinism(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


class ResidualMLP(nn.Module):
    """forecast[:, i] = window[:, -1, 0] + MLP(flatten(window))[:, i]."""

    def __init__(self, window: int, features: int, hidden: int, horizon: int):
        super().__init__()
        self.window = window
        self.hidden = nn.Linear(window * features, hidden)
        self.out = nn.Linear(hidden, horizon)
        # Start exactly at the naive last-value forecast; training only adds corrections.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        # Slice + Gather with constant, positive indices: [B, W, F] -> [B, 1].
        last = window[:, self.window - 1 : self.window, TARGET_FEATURE]
        h = torch.relu(self.hidden(torch.flatten(window, 1)))
        return last + self.out(h)


def f32_repr(x) -> str:
    return repr(float(np.float32(x)))


def normalisation(train: np.ndarray):
    x = train.astype(np.float64)
    center = x.mean(axis=0).astype(np.float32)
    scale = np.maximum(x.std(axis=0), SCALE_FLOOR).astype(np.float32)
    return center, scale


def normalise(x: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
    # float32 arithmetic, the same as the Rust side does it.
    return ((x.astype(np.float32) - center) / scale).astype(np.float32)


def make_windows(z: np.ndarray, window: int, horizon: int):
    """Windows ending at t = W-1 .. N-H-1: inputs z[t-W+1..t], targets z[t+1..t+H, 0]."""
    n = z.shape[0]
    count = n - window - horizon + 1
    if count <= 0:
        return None, None, None
    ends = np.arange(window - 1, window - 1 + count)
    idx = ends[:, None] + np.arange(-window + 1, 1)[None, :]
    x = z[idx]  # [count, W, F]
    tidx = ends[:, None] + np.arange(1, horizon + 1)[None, :]
    y = z[tidx, TARGET_FEATURE]  # [count, H]
    return np.ascontiguousarray(x), np.ascontiguousarray(y), ends


@torch.no_grad()
def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float(torch.mean((model(x) - y) ** 2))


def naive_mse(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.mean((x[:, -1:, TARGET_FEATURE] - y) ** 2))


def train_channel(x_fit, y_fit, x_val, y_val, args):
    model = ResidualMLP(args.window, x_fit.shape[2], args.hidden, args.horizon)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    # Epoch 0 is the untrained model, i.e. exactly the naive forecast: the kept weights
    # are never worse than naive on validation.
    best_val = mse(model, x_val, y_val)
    best_state = copy.deepcopy(model.state_dict())
    best_epoch = 0
    stale = 0
    n = x_fit.shape[0]
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, args.batch_size):
            b = perm[i : i + args.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = torch.mean((model(x_fit[b]) - y_fit[b]) ** 2)
            loss.backward()
            opt.step()
        val = mse(model, x_val, y_val)
        if val < best_val:
            best_val, best_epoch, stale = val, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= args.patience:
                break
    model.load_state_dict(best_state)
    flush_subnormals(model)
    model.eval()
    return model, best_epoch


def flush_subnormals(model: nn.Module) -> None:
    """Zero the weights too small for a normal float32. The weights of inputs that are
    always zero in a channel's train split (most of its command flags) get no gradient but
    weight decay, and Adam walks them down into the subnormal range. They add nothing to a
    forecast, but once such an input is non-zero every product with them is a subnormal
    operation, which Intel CPUs run up to 15 times slower (measured with ONNX Runtime on a
    Xeon; AMD EPYC shows no difference)."""
    tiny = torch.finfo(torch.float32).tiny
    with torch.no_grad():
        for p in model.parameters():
            p[p.abs() < tiny] = 0.0


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # The TorchScript exporter is asked for on purpose (plain, stable graph); silence its deprecation notice.
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchScript-based ONNX export.*")
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=["window"],
        output_names=["forecast"],
        dynamic_axes={"window": {0: "batch"}, "forecast": {0: "batch"}},
        do_constant_folding=True,
    )


def ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def check_onnx(path: Path, model: nn.Module, x: torch.Tensor, window: int, features: int, horizon: int) -> float:
    import onnx

    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    allowed = {"Flatten", "Reshape", "Gemm", "MatMul", "Add", "Relu", "Slice", "Gather", "Constant"}
    ops = {n.op_type for n in m.graph.node}
    if not ops <= allowed:
        raise SystemExit(f"{path}: unexpected ONNX ops {sorted(ops - allowed)}")
    sess = ort_session(path)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    if inp.name != "window" or inp.shape[1:] != [window, features] or inp.type != "tensor(float)":
        raise SystemExit(f"{path}: bad input {inp.name} {inp.shape} {inp.type}")
    if out.name != "forecast" or out.shape[1:] != [horizon] or out.type != "tensor(float)":
        raise SystemExit(f"{path}: bad output {out.name} {out.shape} {out.type}")
    got = sess.run(["forecast"], {"window": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    diff = float(np.max(np.abs(got - want)))
    if not diff <= ONNX_TOLERANCE:
        raise SystemExit(f"{path}: onnxruntime differs from torch by {diff:g} (> {ONNX_TOLERANCE:g})")
    return diff


def train_drift(target: np.ndarray) -> float:
    """The share of `target` after its first DRIFT_BASELINE values outside their range (see above)."""
    if target.shape[0] <= DRIFT_BASELINE:
        return 0.0
    base, rest = target[:DRIFT_BASELINE], target[DRIFT_BASELINE:]
    low, high = float(base.min()), float(base.max())
    margin = DRIFT_MARGIN * max(high - low, DRIFT_MIN_WIDTH)
    return float(np.mean((rest > high + margin) | (rest < low - margin)))


def config_pbtxt(ch, args, center, scale, err_mean, err_std, train_rows, drift) -> str:
    features = len(center)

    def param(key, value):
        return f'parameters: {{ key: "satwatch.{key}" value: {{ string_value: "{value}" }} }}\n'

    return (
        "# Generated by training/train.py: retrain with "
        "`python training/train.py --data data/smap --out model_repository`.\n"
        f'name: "smap_{ch}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {MAX_BATCH_SIZE}\n"
        "version_policy: { latest: { num_versions: 1 } }\n"
        "input [\n"
        "  {\n"
        '    name: "window"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {args.window}, {features} ]\n"
        "  }\n"
        "]\n"
        "output [\n"
        "  {\n"
        '    name: "forecast"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {args.horizon} ]\n"
        "  }\n"
        "]\n"
        "instance_group [\n"
        "  {\n"
        "    count: 1\n"
        "    kind: KIND_CPU\n"
        "  }\n"
        "]\n"
        "dynamic_batching {\n"
        "  preferred_batch_size: [ 64, 512 ]\n"
        "  max_queue_delay_microseconds: 2000\n"
        "}\n"
        + param("window", args.window)
        + param("horizon", args.horizon)
        + param("target_feature", TARGET_FEATURE)
        + param("norm_center", ",".join(f32_repr(v) for v in center))
        + param("norm_scale", ",".join(f32_repr(v) for v in scale))
        + param("error_mean", f32_repr(err_mean))
        + param("error_std", f32_repr(err_std))
        + param("train_rows", train_rows)
        + param("train_drift", f"{drift:.4f}")
    )


def write_fixtures(ch, args, center, scale, onnx_path: Path) -> None:
    test = np.load(args.data / "test" / f"{ch}.npy")
    if test.shape[0] <= max(FIXTURE_ENDS):
        raise SystemExit(f"{ch}: test split too short for fixtures: {test.shape}")
    z = normalise(test, center, scale)
    x = np.stack([z[t - args.window + 1 : t + 1] for t in FIXTURE_ENDS]).astype(np.float32)
    y = ort_session(onnx_path).run(["forecast"], {"window": x})[0].astype(np.float32)
    args.fixtures.mkdir(parents=True, exist_ok=True)
    np.save(args.fixtures / f"smap_{ch}_reference_input.npy", x)
    np.save(args.fixtures / f"smap_{ch}_reference_forecast.npy", y)


def channel_width(ch: str, args) -> int:
    """The channel's width: values per row of its train split (column 0 the telemetry value,
    the rest its command columns), which the model is built for. Its test split, when there
    is one, must have the same width: the model could not serve, replay or evaluate it
    otherwise. `--features`, when given, is the width every channel must have."""
    shapes = {}
    for split in ("train", "test"):
        path = args.data / split / f"{ch}.npy"
        if split == "train" or path.exists():
            shapes[split] = np.load(path, mmap_mode="r").shape  # the header only
    for split, shape in shapes.items():
        if len(shape) != 2 or shape[1] < 1:
            raise SystemExit(
                f"{ch}: {args.data / split / (ch + '.npy')} has shape {shape}; expected [rows, features] "
                "with column 0 the telemetry value"
            )
    width = shapes["train"][1]
    if args.features is not None and width != args.features:
        raise SystemExit(
            f"{ch}: the train split has {width} values per row; --features asks for {args.features}"
        )
    if "test" in shapes and shapes["test"][1] != width:
        raise SystemExit(
            f"{ch}: the test split has {shapes['test'][1]} values per row, the train split {width}: "
            f"a model trained on this channel takes {width}, so the test split could not be served with it"
        )
    return width


def run_channel(ch: str, args) -> dict:
    set_determinism(args.seed)  # per channel: a channel's result does not depend on the others
    train = np.load(args.data / "train" / f"{ch}.npy")
    if not np.all(np.isfinite(train)):
        raise SystemExit(f"{ch}: non-finite values in train split")
    center, scale = normalisation(train)
    z = normalise(train, center, scale)
    x, y, ends = make_windows(z, args.window, args.horizon)
    if x is None or x.shape[0] < 10:
        raise SystemExit(f"{ch}: only {train.shape[0]} train rows, too few for window {args.window}")
    n_fit = int(FIT_FRACTION * x.shape[0])
    x_fit, y_fit = torch.from_numpy(x[:n_fit]), torch.from_numpy(y[:n_fit])
    x_val, y_val = torch.from_numpy(x[n_fit:]), torch.from_numpy(y[n_fit:])

    model, best_epoch = train_channel(x_fit, y_fit, x_val, y_val, args)

    # Calibration: one-step error in the original units, on the validation windows.
    with torch.no_grad():
        f0 = model(x_val)[:, 0].numpy().astype(np.float64)
    y0 = train[ends[n_fit:] + 1, TARGET_FEATURE].astype(np.float64)  # raw value at t+1
    pred0 = f0 * float(scale[0]) + float(center[0])
    e = np.abs(y0 - pred0)
    err_mean = max(float(e.mean()), ERROR_FLOOR)
    err_std = max(float(e.std()), ERROR_FLOOR)

    model_dir = args.out / f"smap_{ch}"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    onnx_path = model_dir / "1" / "model.onnx"
    export_onnx(model, x_val[:1], onnx_path)
    diff = check_onnx(onnx_path, model, x_val[:64], args.window, train.shape[1], args.horizon)
    (model_dir / "config.pbtxt").write_text(
        config_pbtxt(ch, args, center, scale, err_mean, err_std, train.shape[0], train_drift(train[:, TARGET_FEATURE]))
    )
    if args.fixtures is not None and ch in FIXTURE_CHANNELS:
        write_fixtures(ch, args, center, scale, onnx_path)

    stats = dict(
        ch=ch, rows=train.shape[0], fit=n_fit, val=x.shape[0] - n_fit, epoch=best_epoch,
        train_mse=mse(model, x_fit, y_fit), train_naive=naive_mse(x_fit, y_fit),
        val_mse=mse(model, x_val, y_val), val_naive=naive_mse(x_val, y_val),
        err_mean=err_mean, err_std=err_std, onnx_diff=diff, onnx_bytes=onnx_path.stat().st_size,
    )
    print(
        f"{ch:>4}  rows {stats['rows']:5d}  width {train.shape[1]}  fit/val {stats['fit']:4d}/{stats['val']:3d}  best epoch {best_epoch:2d}  "
        f"train mse {stats['train_mse']:.4g} (naive {stats['train_naive']:.4g})  "
        f"val mse {stats['val_mse']:.4g} (naive {stats['val_naive']:.4g})  "
        f"err mean/std {err_mean:.4g}/{err_std:.4g}  onnx max|diff| {diff:.1e}",
        flush=True,
    )
    return stats


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # harmless on CPU
    if args.channels:
        channels = [c.strip() for c in args.channels.split(",") if c.strip()]
    else:
        channels = sorted(p.stem for p in (args.data / "train").glob("*.npy"))
    if not channels:
        raise SystemExit(f"no channels found in {args.data / 'train'}")
    missing = [c for c in channels if not (args.data / "train" / f"{c}.npy").exists()]
    if missing:
        raise SystemExit(f"no train data for {missing}")
    # Every channel's width is checked before any is trained: a mismatch found late would
    # leave the repository half rewritten.
    widths = {ch: channel_width(ch, args) for ch in channels}
    args.out.mkdir(parents=True, exist_ok=True)
    print(
        f"training {len(channels)} channel(s) of width {'/'.join(str(w) for w in sorted(set(widths.values())))}: window {args.window}, horizon {args.horizon}, hidden {args.hidden}, "
        f"seed {args.seed}, max epochs {args.epochs}; torch {torch.__version__}; MSE in normalised units",
        flush=True,
    )
    t0 = time.time()
    stats = [run_channel(ch, args) for ch in channels]
    better = sum(s["val_mse"] < s["val_naive"] for s in stats)
    print(f"done: {len(stats)} channel(s) in {time.time() - t0:.1f}s; val MSE below naive on {better}/{len(stats)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
