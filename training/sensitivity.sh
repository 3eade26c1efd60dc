#!/usr/bin/env bash
# Sensitivity of the detection figures to the [detect] settings, through the real
# Rust path: for each variant, a copy of pipelines/smap.toml with some [detect]
# keys replaced is evaluated with `satwatch eval --json` on the test split (event
# TP/FP/FN, precision, recall, point-wise F1) and on the train split (events
# raised there are false alarms: the train split holds no labelled anomalies).
#
#   training/sensitivity.sh [path/to/satwatch]   (default target/release/satwatch)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
bin=${1:-target/release/satwatch}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
variant() { # name, then key=value pairs for [detect]
  local name=$1; shift
  local file="$tmp/pipeline.toml"
  smap_pipeline_copy "$file" model_repository
  for kv in "$@"; do
    sed -i "/^\[detect\]/,/^\[/ s|^${kv%%=*} = .*|${kv%%=*} = ${kv#*=}|" "$file"
  done
  local test train
  test=$("$bin" eval --pipeline "$file" --data data/smap --json 2>/dev/null)
  train=$("$bin" eval --pipeline "$file" --data data/smap --split train --json 2>/dev/null)
  python3 - "$name" "$test" "$train" <<'PY'
import json, sys
name, test, train = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
t = test["totals"]; e = t["events"]; s = t["event_scores"]
f = lambda v: "-" if v is None else f"{v:.3f}"
print(f"| {name} | {train['totals']['detected_events']} | {e['tp']} / {e['fp']} / {e['fn']} | "
      f"{f(s['precision'])} | {f(s['recall'])} | {f(t['point_scores']['f1'])} |")
PY
}
echo "| variant | train events | test TP / FP / FN | event P | event R | point F1 |"
echo "|---|---:|---|---:|---:|---:|"
variant "shipped (risk 1e-3, min_threshold 2.5, stuck run 2x / 50, excursions 128 / 0.01)"
variant "excursion score off (before)" excursion_samples=0
variant "excursion and stuck scores off" excursion_samples=0 stuck_run_factor=0
variant "excursion and stuck scores off, fixed threshold 10 only" excursion_samples=0 stuck_run_factor=0 calibration_samples=0
for margin in 0 0.02 0.05 0.1; do variant "excursion_margin $margin" excursion_margin=$margin; done
for samples in 64 100 200 320; do variant "excursion_samples $samples" excursion_samples=$samples; done
for factor in 1.5 3.0; do variant "stuck_run_factor $factor" stuck_run_factor=$factor; done
for run in 20 40 60 100; do variant "min_stuck_run $run" min_stuck_run=$run; done
for floor in 2.0 3.0; do variant "min_threshold $floor" min_threshold=$floor; done
for risk in 1e-2 1e-4; do variant "risk $risk" risk=$risk; done
for floor in 2.0 3.0; do for risk in 1e-2 1e-4; do
  variant "min_threshold $floor, risk $risk" min_threshold=$floor risk=$risk
done; done
variant "initial_quantile 0.95" initial_quantile=0.95
variant "initial_quantile 0.99" initial_quantile=0.99
variant "calibration_samples 320" calibration_samples=320
variant "calibration_samples 1280" calibration_samples=1280
variant "min_peaks 20" min_peaks=20
variant "ewma_alpha 0.05" ewma_alpha=0.05
variant "ewma_alpha 0.2" ewma_alpha=0.2
variant "min_event_gap 25" min_event_gap=25
variant "min_event_gap 100" min_event_gap=100
