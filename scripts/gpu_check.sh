#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one command (docs/backends.md):
#   1. the parity tests (tests/gpu.rs): the CUDA backend against the native one
#      on all 27 shipped models (FP32), and ONNX Runtime's TensorRT/CUDA
#      providers where they register (they print SKIPPED, with the reason,
#      where they do not);
#   2. the backend micro-benchmark (one model, batch sizes 1 to 4,096) on
#      cuda, onnx-tensorrt, onnx and native;
#   3. the whole pipeline in process (`satwatch bench pipeline`, 27, 270 and 2,700
#      channels) on cuda, onnx-tensorrt and onnx, and `satwatch eval` with
#      every model on cuda, to compare with the CPU figures.
# A backend that cannot run here (no GPU, a CPU-only ONNX Runtime) is
# reported in one line and skipped; the rest still run.
#
#   scripts/gpu_check.sh [OUT_DIR]        (default .local/gpu-results)
#
# Needs a build with `--features cuda,onnx-gpu`: by default it builds one
# (cargo). Where cargo is not installed (a GPU machine that only runs what was
# built elsewhere), point SATWATCH_BIN at a built `satwatch` and
# SATWATCH_GPU_TEST_BIN at the built tests/gpu.rs binary
# (`cargo test --release --features cuda,onnx-gpu --test gpu --no-run` prints
# its path). The CUDA backend loads libcuda, libcublas and libnvrtc at run
# time; ONNX Runtime comes from ORT_DYLIB_PATH as everywhere else.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
OUT=${1:-.local/gpu-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

if [[ -z "${SATWATCH_BIN:-}" || -z "${SATWATCH_GPU_TEST_BIN:-}" ]]; then
    cargo build --release --features cuda,onnx-gpu
    SATWATCH_GPU_TEST_BIN=$(cargo test --release --features cuda,onnx-gpu --test gpu --no-run 2>&1 |
        sed -n 's/.*Executable tests\/gpu.rs (\(.*\))/\1/p')
    SATWATCH_BIN=target/release/satwatch
fi

step() { printf '\n== %s\n' "$*" | tee -a "$OUT/summary.txt"; }

# The cuda backend (cudarc, built against CUDA 12.8) asks the loader for
# libcublas.so / libcublas.so.12 and libnvrtc.so / libnvrtc.so.12. A CUDA 13
# runtime without the toolkit's development links (e.g. the nvidia-cublas and
# nvidia-cuda-nvrtc pip wheels) has only .so.13 names: for this run, put the
# directory that has a usable name on LD_LIBRARY_PATH, or link one.
on_path() { export LD_LIBRARY_PATH="$1${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; }
for lib in cublas nvrtc; do
    ldconfig -p 2>/dev/null | grep -qE "lib$lib\.so(\.12)? " && continue
    found=""
    search=${LD_LIBRARY_PATH:-}
    for dir in ${search//:/ } /usr/local/cuda/lib64 \
        $(python3 -c 'import nvidia; print(*nvidia.__path__)' 2>/dev/null); do
        [[ -d "$dir" ]] || continue
        if [[ -e "$dir/lib$lib.so" || -e "$dir/lib$lib.so.12" ]]; then
            [[ ":${LD_LIBRARY_PATH:-}:" == *":$dir:"* ]] || on_path "$dir"
            found="$dir"
            break
        fi
        candidate=$(find "$dir" -maxdepth 3 -name "lib$lib.so.13" 2>/dev/null | head -1 || true)
        if [[ -n "$candidate" ]]; then
            mkdir -p "$OUT/cuda-links"
            ln -sf "$candidate" "$OUT/cuda-links/lib$lib.so"
            on_path "$(dirname "$candidate")"
            on_path "$OUT/cuda-links"
            found="$candidate (CUDA 13 name, linked as lib$lib.so for this run)"
            break
        fi
    done
    echo "lib$lib.so: ${found:-not found: the cuda backend will report no GPU}"
done

step "device"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi failed"; } |
    tee "$OUT/device.txt" | tee -a "$OUT/summary.txt"

step "parity tests (tests/gpu.rs)"
"$SATWATCH_GPU_TEST_BIN" --test-threads 1 --nocapture 2>&1 | tee "$OUT/parity.txt" |
    grep -E "SKIPPED|worst|test result|^test |panicked" | tee -a "$OUT/summary.txt"

DATA=(--pipeline pipelines/smap.toml --data data/smap)
for backend in cuda onnx-tensorrt onnx native; do
    step "backend micro-benchmark: $backend"
    "$SATWATCH_BIN" bench backend "${DATA[@]}" --backend "$backend" \
        --batch-sizes 1,4,16,64,256,1024,4096 --min-time-ms "${SATWATCH_GPU_MIN_TIME_MS:-1000}" --json \
        >"$OUT/micro-$backend.json" 2>"$OUT/micro-$backend.log" ||
        { echo "failed: $(tail -1 "$OUT/micro-$backend.log")" | tee -a "$OUT/summary.txt"; continue; }
    python3 - "$OUT/micro-$backend.json" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
for f in json.load(open(sys.argv[1]))["batches"]:
    print(f"batch {f['batch_size']:>5}: {f['p50_windows_per_s']:>12,.0f} windows/s at p50, p50 {f['p50_ms']:.3f} ms, p99 {f['p99_ms']:.3f} ms")
EOF
done

for backend in cuda onnx-tensorrt onnx; do
    step "pipeline in process: $backend"
    "$SATWATCH_BIN" bench pipeline "${DATA[@]}" --backend "$backend" --replicas "${SATWATCH_GPU_REPLICAS:-1,10,100}" --json \
        >"$OUT/pipeline-$backend.json" 2>"$OUT/pipeline-$backend.log" ||
        { echo "failed: $(tail -1 "$OUT/pipeline-$backend.log")" | tee -a "$OUT/summary.txt"; continue; }
    python3 - "$OUT/pipeline-$backend.json" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
for r in json.load(open(sys.argv[1]))["runs"]:
    print(f"{r['channels']:>5} channels: {r['samples_per_s']:>10,.0f} samples/s, ceiling {r['ceiling_windows_per_s']:>10,.0f} windows/s, "
          f"ratio {r['ratio_to_ceiling']:.3f}, mean batch {r['mean_batch_size']:.0f}")
EOF
done

step "eval with every model on cuda, and on onnx"
# gpu_fallback = "refuse": a machine without a usable GPU must not report CPU figures as cuda's.
smap_pipeline_copy "$OUT/smap-cuda.toml" model_repository
sed -i 's|^\[engine\]|[engine]\nbackend = "cuda"\ngpu_fallback = "refuse"|' "$OUT/smap-cuda.toml"
for backend in cuda onnx; do
    pipeline=pipelines/smap.toml
    [[ $backend == cuda ]] && pipeline="$OUT/smap-cuda.toml"
    "$SATWATCH_BIN" eval --pipeline "$pipeline" --data data/smap --json >"$OUT/eval-$backend.json" \
        2>"$OUT/eval-$backend.log" ||
        { echo "$backend failed: $(tail -1 "$OUT/eval-$backend.log")" | tee -a "$OUT/summary.txt"; continue; }
    python3 - "$OUT/eval-$backend.json" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
t = json.load(open(sys.argv[1]))["totals"]
e, s = t["events"], t["event_scores"]
print(f"{sys.argv[1].rsplit('/', 1)[-1]}: TP {e['tp']} FP {e['fp']} FN {e['fn']}, P {s['precision']:.3f} R {s['recall']:.3f}, "
      f"point F1 {t['point_scores']['f1']:.3f}, {t['samples']:,} samples in {t['elapsed_s']:.2f} s")
EOF
done
