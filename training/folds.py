#!/usr/bin/env python3
"""Out-of-fold detection figures: choose `[detect]` settings on some channels, report them on others.

    python3 training/folds.py --pipeline pipelines/smap.toml --data data/smap [--grid training/grid.toml]

The channels are split into fixed folds (sorted by id, dealt round-robin, so every fold
holds channels of several subsystems). For each fold, every candidate setting in the grid
is scored on the *other* folds' channels and the best is kept; that choice is then scored
on the held-out fold. The held-out counts of all folds, pooled, are the out-of-fold
figures: what the choosing procedure gives on channels it never saw. Beside them: the
candidate that is best on all channels at once (the in-fold figure, and the setting to
ship), and the pipeline file's own settings.

Each candidate is one `satwatch eval --json --detect KEY=VALUE ...` run over all channels
(well under a second each); nothing here re-implements detection or its metrics: the
pooled figures are sums of the counts `satwatch eval` prints per channel.

A candidate's objective is the mean of event F1, Fc1 and point-wise F1 over the pooled
counts, less 0.2 for flagging more than 1.5 samples per labelled sample and 0.2 for each
channel whose events cover over half its stream while its labels cover under a tenth
(the issue's targets, as penalties rather than hard limits so that every fold has a
choice).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import os
import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"event_f1": 0.90, "fc1": 0.70, "point_f1": 0.60, "coverage": 1.5}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", type=Path, default=ROOT / "pipelines/smap.toml")
    p.add_argument("--data", type=Path, default=ROOT / "data/smap")
    p.add_argument("--grid", type=Path, default=ROOT / "training/grid.toml",
                   help="TOML laid out as [detect]: one list of values per key (e.g. [burst] window = [0, 1000]); "
                        "the candidates are their product")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--by-subsystem", action="store_true",
                   help="one fold per subsystem (a channel id's letter) instead: choose on the other subsystems")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="evaluations run at once")
    p.add_argument("--satwatch", type=Path, default=ROOT / "target/release/satwatch")
    p.add_argument("--json", type=Path, default=None, help="also write every figure here")
    p.add_argument("--runs", type=Path, default=None,
                   help="keep every candidate's per-channel figures in this file and reuse those already there "
                        "(the same binary, pipeline and models are assumed)")
    return p.parse_args(argv)


def evaluate(args, settings: dict) -> dict[str, dict]:
    """Per-channel figures of one `satwatch eval` run with `settings` replacing [detect] keys."""
    cmd = [str(args.satwatch), "eval", "--pipeline", str(args.pipeline), "--data", str(args.data), "--json"]
    for key, value in settings.items():
        cmd += ["--detect", f"{key}={json.dumps(value)}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return {c["channel"]: c for c in json.loads(done.stdout)["channels"]}


def flatten(table: dict, prefix: str = "") -> dict[str, list]:
    """`{"burst": {"window": [...]}}` as `{"burst.window": [...]}`: the keys `--detect` takes."""
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def pooled(figures: dict[str, dict], channels: list[str]) -> dict:
    """Pooled figures over `channels` from their counts."""
    ev = {k: sum(figures[c]["events"][k] for c in channels) for k in ("tp", "fp", "fn")}
    pt = {k: sum(figures[c]["points"][k] for c in channels) for k in ("tp", "fp", "fn")}

    def ratio(a, b):
        return a / b if b else 0.0

    def f1(p, r):
        return 2 * p * r / (p + r) if p + r else 0.0

    event_p, event_r = ratio(ev["tp"], ev["tp"] + ev["fp"]), ratio(ev["tp"], ev["tp"] + ev["fn"])
    point_p, point_r = ratio(pt["tp"], pt["tp"] + pt["fp"]), ratio(pt["tp"], pt["tp"] + pt["fn"])
    wide = [c for c in channels
            if figures[c]["flagged_fraction"] > 0.5 and figures[c]["labelled_samples"] < figures[c]["rows"] / 10]
    return {
        "event_precision": event_p, "event_recall": event_r, "event_f1": f1(event_p, event_r),
        "fc1": f1(point_p, event_r), "point_f1": f1(point_p, point_r),
        "coverage": ratio(pt["tp"] + pt["fp"], pt["tp"] + pt["fn"]),
        "wide_unlabelled": wide, "events": ev,
    }


def objective(figures: dict) -> float:
    score = (figures["event_f1"] + figures["fc1"] + figures["point_f1"]) / 3
    score -= 0.2 * (figures["coverage"] > TARGETS["coverage"])
    score -= 0.2 * len(figures["wide_unlabelled"])
    return score


def row(name: str, f: dict) -> str:
    wide = ", ".join(f["wide_unlabelled"]) or "none"
    e = f["events"]
    return (f"| {name} | {e['tp']}/{e['fp']}/{e['fn']} | {f['event_precision']:.3f} | {f['event_recall']:.3f} "
            f"| {f['event_f1']:.3f} | {f['fc1']:.3f} | {f['point_f1']:.3f} | {f['coverage']:.2f} | {wide} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    grid = flatten(tomllib.loads(args.grid.read_text()))
    keys = sorted(grid)
    candidates = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    print(f"{len(candidates)} candidates over {', '.join(keys)}", file=sys.stderr)

    kept = json.loads(args.runs.read_text()) if args.runs and args.runs.exists() else {}
    key = lambda settings: json.dumps(settings, sort_keys=True)
    missing = [s for s in candidates if key(s) not in kept]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        pending = [pool.submit(evaluate, args, settings) for settings in missing]
        step = max(1, len(pending) // 20)
        for i, (settings, future) in enumerate(zip(missing, pending), 1):
            kept[key(settings)] = future.result()
            if i % step == 0 or i == len(pending):
                print(f"{i}/{len(missing)} evaluated", file=sys.stderr, flush=True)
    if args.runs:
        args.runs.write_text(json.dumps(kept))
    runs = [kept[key(s)] for s in candidates]
    shipped = evaluate(args, {})

    channels = sorted(shipped)
    if args.by_subsystem:
        letters = sorted({c.split("-")[0] for c in channels})
        folds = [[c for c in channels if c.split("-")[0] == letter] for letter in letters]
    else:
        folds = [channels[k::args.folds] for k in range(args.folds)]
    held_out: dict[str, dict] = {}
    choices = []
    for k, fold in enumerate(folds):
        others = [c for c in channels if c not in fold]
        best = max(range(len(candidates)), key=lambda i: objective(pooled(runs[i], others)))
        choices.append((k, fold, candidates[best], pooled(runs[best], others), pooled(runs[best], fold)))
        held_out.update({c: runs[best][c] for c in fold})
    best_all = max(range(len(candidates)), key=lambda i: objective(pooled(runs[i], channels)))

    out_of_fold = pooled(held_out, channels)
    in_fold = pooled(runs[best_all], channels)
    as_shipped = pooled(shipped, channels)

    print("| figures | events TP/FP/FN | event P | event R | event F1 | Fc1 | point F1 | flagged / labelled | "
          "flagged over half, labelled under a tenth |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    scheme = "one fold per subsystem" if args.by_subsystem else f"{args.folds} folds"
    print(row(f"**out of fold** ({scheme})", out_of_fold))
    print(row("in fold (best on all channels)", in_fold))
    print(row(f"the pipeline file as it is ({args.pipeline.name})", as_shipped))
    print(row("target", {"events": {"tp": "-", "fp": "-", "fn": "-"}, "event_precision": float("nan"),
                         "event_recall": float("nan"), "event_f1": TARGETS["event_f1"], "fc1": TARGETS["fc1"],
                         "point_f1": TARGETS["point_f1"], "coverage": TARGETS["coverage"], "wide_unlabelled": []})
          .replace("nan", "-"))
    print()
    print("| held-out fold | its channels | chosen on the other folds (where it differs from the in-fold choice) "
          "| objective there | event F1 held out | Fc1 held out | point F1 held out |")
    print("|---|---|---|---:|---:|---:|---:|")
    for k, fold, settings, train, test in choices:
        chosen = ", ".join(f"{key} = {value}" for key, value in settings.items()
                           if value != candidates[best_all][key]) or "(the in-fold choice)"
        print(f"| {k + 1} | {', '.join(fold)} | {chosen} | {objective(train):.3f} | {test['event_f1']:.3f} "
              f"| {test['fc1']:.3f} | {test['point_f1']:.3f} |")
    print()
    print("Best on all channels (ship this): "
          + ", ".join(f"{key} = {value}" for key, value in candidates[best_all].items()))
    if args.json:
        args.json.write_text(json.dumps({
            "candidates": candidates, "folds": folds,
            "choices": [{"fold": k, "settings": s, "held_out": t} for k, _, s, _, t in choices],
            "out_of_fold": out_of_fold, "in_fold": in_fold, "in_fold_settings": candidates[best_all],
            "as_shipped": as_shipped,
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
