#!/usr/bin/env bash
# Forecaster size study: how the window length and the hidden width of train.py's
# residual MLP change the detection figures, through the real Rust path. Each
# variant is trained from scratch into a temp repository (train.py, seed as given),
# then evaluated with `satwatch eval --json` on the test split (event TP/FP/FN,
# precision, recall, point-wise F1) and on the train split (events raised there are
# false alarms: the train split holds no labelled anomalies). "val / naive" is the
# label-free figure: the geometric mean over channels of the validation MSE (last
# 20 % of each train split) over the naive last-value forecast's.
#
#   training/size_study.sh [WINDOWxHIDDENsSEED ...]   (default: the set in README.md)
#
# Env: PYTHON (default ~/.cache/satwatch/train-venv/bin/python), SATWATCH_BIN
# (default target/release/satwatch). Two variants train at once; about 8 minutes
# for the default set on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
python=${PYTHON:-$HOME/.cache/satwatch/train-venv/bin/python}
bin=${SATWATCH_BIN:-target/release/satwatch}
[[ -x $python ]] || { echo "size_study: no training python at $python (see training/README.md, Retrain)" >&2; exit 1; }
[[ -x $bin ]] || { echo "size_study: no $bin (cargo build --release)" >&2; exit 1; }
variants=("$@")
((${#variants[@]})) || variants=(64x32s0 64x32s1 64x32s2 128x32s0 128x32s1 128x32s2 128x64s0 128x64s1 128x64s2 250x80s0)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

train() { # variant
  local w=${1%%x*} rest=${1#*x}
  local h=${rest%%s*} s=${rest#*s}
  "$python" training/train.py --data data/smap --out "$tmp/$1" --window "$w" --hidden "$h" --seed "$s" \
    >"$tmp/$1.log" 2>&1 || { echo "size_study: training $1 failed:" >&2; tail -n 20 "$tmp/$1.log" >&2; return 1; }
}

# Train two at a time (train.py uses one thread).
for ((i = 0; i < ${#variants[@]}; i += 2)); do
  pids=()
  for v in "${variants[@]:i:2}"; do
    echo "size_study: training $v" >&2
    train "$v" & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
done

echo "| window | hidden | seed | val / naive (geo-mean) | train events | test TP / FP / FN | event P | event R | point F1 |"
echo "|---:|---:|---:|---:|---:|---|---:|---:|---:|"
for v in "${variants[@]}"; do
  smap_pipeline_copy "$tmp/$v.toml" "$tmp/$v"
  test=$("$bin" eval --pipeline "$tmp/$v.toml" --data data/smap --json 2>/dev/null)
  train=$("$bin" eval --pipeline "$tmp/$v.toml" --data data/smap --split train --json 2>/dev/null)
  python3 - "$v" "$tmp/$v.log" "$test" "$train" <<'PY'
import json, math, re, sys
v, log, test, train = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
w, rest = v.split("x"); h, s = rest.split("s")
ratios = []
for line in open(log):
    m = re.search(r"val mse (\S+) \(naive (\S+)\)", line)
    if m and float(m[2]) > 0:  # a constant channel has no error to compare
        ratios.append(max(float(m[1]) / float(m[2]), 1e-9))
geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
t = test["totals"]; e = t["events"]; sc = t["event_scores"]
f = lambda x: "-" if x is None else f"{x:.3f}"
print(f"| {w} | {h} | {s} | {geo:.4f} | {train['totals']['detected_events']} | {e['tp']} / {e['fp']} / {e['fn']} | "
      f"{f(sc['precision'])} | {f(sc['recall'])} | {f(t['point_scores']['f1'])} |")
PY
done
