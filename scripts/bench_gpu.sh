#!/usr/bin/env bash
# GPU training-step benchmark: this project's models on wgpu next to the same models in PyTorch
# on CUDA, alternating, each run in a fresh process, warm-up (kernel compilation, autotuning)
# timed apart from the steady steps, peak GPU memory of both.
#
#   scripts/bench_gpu.sh [MODEL...]              run it (just bench-gpu)
#   scripts/bench_gpu.sh --bundle [FILE.tar.gz]  make a bundle for a machine with no Rust
#   DRY=1 scripts/bench_gpu.sh                   tiny shapes: check the script anywhere
#
# Models (bench_gpu --list): resnet50 (224x224, batch 64), pyramidnet200_a240 (32x32, batch 64),
# cifar_resnet20 (32x32, batch 128). Rows per model: ours as built by default (WGSL kernels) and,
# when there is one, ours built with `--features vulkan` (SPIR-V kernels: cooperative-matrix
# matmuls where the driver has them); PyTorch fp32 with TF32 off (what the ratio compares with),
# with TF32 on, and AMP bf16 + channels_last (references, one round each).
# ROUNDS (default 2) alternations of ours and PyTorch fp32; WARMUP (3) steps timed one by one;
# REPEATS (3) timed repeats of STEPS (10) steps, each waited for once. BUDGET (seconds, default
# 420) stops starting new runs, so the whole script ends inside 8 minutes; each run is cut at
# RUN_TIMEOUT (180). The last line is
#   train step vs PyTorch CUDA fp32 (median over models): <ratio>x
# where a ratio is PyTorch's step time over ours (1.0 = parity, above = faster).
#
# The bundle (made here, run there): the stripped bench_gpu binaries (gzip: about 27 MB each),
# this script, bench_gpu.py and the PyTorch models it imports, and Debian's Vulkan loader
# (libvulkan.so.1), used only where the machine has none. The machine needs an NVIDIA driver with
# its Vulkan ICD, and python3 with torch and torchvision. Unpack and run:
#   tar xzf bench-gpu.tar.gz && bench-gpu/bench_gpu.sh
# The SPIR-V binary is a second, separate build of Burn (target/spirv): SPIRV=0 leaves it out.
# Run from a checkout instead of a bundle, the script uses target/release/bench_gpu (built if
# needed) and target/spirv/release/bench_gpu when it exists.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"

bundle() {
  local out=${1:-bench-gpu.tar.gz}
  local repo
  repo="$(cd "$HERE/.." && pwd)"
  local stage
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' RETURN
  mkdir -p "$stage/bench-gpu/bin" "$stage/bench-gpu/lib"
  (cd "$repo" && cargo build --release --bin bench_gpu)
  cp "${CARGO_TARGET_DIR:-$repo/target}/release/bench_gpu" "$stage/bench-gpu/bin/bench_gpu"
  if [ "${SPIRV:-1}" = 1 ]; then
    local spirv_target="${CARGO_TARGET_DIR:-$repo/target}/spirv"
    (cd "$repo" && cargo build --release --features cutmix-train/vulkan --bin bench_gpu --target-dir "$spirv_target")
    cp "$spirv_target/release/bench_gpu" "$stage/bench-gpu/bin/bench_gpu_spirv"
  fi
  strip "$stage"/bench-gpu/bin/*
  cp "$HERE/bench_gpu.sh" "$HERE/bench_gpu.py" "$HERE/check_torch_interop.py" "$stage/bench-gpu/"
  local loader
  loader=$(ldconfig -p | awk '/libvulkan.so.1 .*x86-64/ {print $NF; exit}')
  if [ -n "$loader" ]; then
    cp -L "$loader" "$stage/bench-gpu/lib/libvulkan.so.1"
  else
    echo "no libvulkan.so.1 here (apt-get install libvulkan1): the bundle relies on the target's" >&2
  fi
  tar -C "$stage" -czf "$out" bench-gpu
  echo "wrote $out ($(du -h "$out" | cut -f1)): copy it over, then: tar xzf $(basename "$out") && bench-gpu/bench_gpu.sh"
}

if [ "${1:-}" = "--bundle" ]; then
  shift
  bundle "$@"
  exit 0
fi

# The binaries: a bundle's, else this checkout's (built if cargo is here).
if [ -x "$HERE/bin/bench_gpu" ]; then
  BIN="$HERE/bin/bench_gpu"
  SPIRV_BIN="$HERE/bin/bench_gpu_spirv"
  LIB="$HERE/lib"
else
  REPO="$(cd "$HERE/.." && pwd)"
  (cd "$REPO" && cargo build --release --bin bench_gpu 2>&1 | grep -v "^\s*\(Compiling\|Finished\)" || true)
  BIN="${CARGO_TARGET_DIR:-$REPO/target}/release/bench_gpu"
  SPIRV_BIN="${CARGO_TARGET_DIR:-$REPO/target}/spirv/release/bench_gpu"
  LIB=""
fi
if ! ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1 '; then
  [ -n "$LIB" ] && [ -f "$LIB/libvulkan.so.1" ] && export LD_LIBRARY_PATH="$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# NVIDIA's Vulkan driver where containers mount it (the loader only looks in /usr and /etc).
if [ -z "${VK_DRIVER_FILES:-}${VK_ICD_FILENAMES:-}" ]; then
  for icd in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /usr/share/vulkan/icd.d/nvidia_icd.json /etc/vulkan/icd.d/nvidia_icd.json; do
    if [ -f "$icd" ]; then export VK_DRIVER_FILES="$icd"; break; fi
  done
fi
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
if [ -z "${PYTHON:-}" ]; then
  for candidate in "$HERE/../.venv/bin/python" python3; do
    if "$candidate" -c "import torch, torchvision" 2>/dev/null; then PYTHON=$candidate; break; fi
  done
fi
: "${PYTHON:?no python with torch and torchvision found: set PYTHON}"

ROUNDS=${ROUNDS:-2}
WARMUP=${WARMUP:-3}
STEPS=${STEPS:-10}
REPEATS=${REPEATS:-3}
BUDGET=${BUDGET:-420}
RUN_TIMEOUT=${RUN_TIMEOUT:-180}
SHAPE=()
TORCH_DEVICE=cuda
if [ "${DRY:-0}" = 1 ]; then
  # Tiny shapes through every path of the script, on whatever device there is.
  ROUNDS=1 WARMUP=1 STEPS=2 REPEATS=1
  SHAPE=(--batch 4 --side 32)
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || TORCH_DEVICE=cpu
fi
MODELS=("$@")
if [ ${#MODELS[@]} -eq 0 ] && [ "${DRY:-0}" = 1 ]; then
  # A software adapter compiles kernels slowly (minutes for PyramidNet-200's): one small model.
  MODELS=(cifar_resnet20)
elif [ ${#MODELS[@]} -eq 0 ]; then
  mapfile -t MODELS < <("$BIN" --list | cut -d' ' -f1)
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
START=$SECONDS
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /' >&2 || true

# run LABEL COMMAND...: one benchmark process, its JSON line tagged with LABEL, unless the
# budget is spent or the run fails (said on stderr, the table goes on without it).
run() {
  local label=$1
  shift
  if (( SECONDS - START > BUDGET )); then
    echo "budget of ${BUDGET}s spent: skipping $label" >&2
    return
  fi
  local line
  if line=$(timeout "$RUN_TIMEOUT" "$@" 2>"$OUT/last.err" | tail -n 1) && [ -n "$line" ]; then
    echo "{\"label\": \"$label\", \"result\": $line}" >> "$OUT/results.jsonl"
  else
    echo "$label failed or timed out: $(tail -n 3 "$OUT/last.err" | tr '\n' ' ')" >&2
  fi
}

# Does an f16 convolution on this GPU accumulate in f32? (Mixed precision needs it; see
# BENCHMARKS.md: on lavapipe's WGSL it does not, so train.precision stays f32-only.)
for bin in "$BIN" "$SPIRV_BIN"; do
  if [ -x "$bin" ]; then
    timeout "$RUN_TIMEOUT" "$bin" --f16-check 2>/dev/null | tail -n 1 >> "$OUT/f16.jsonl" || echo "$bin --f16-check failed" >&2
  fi
done
COMMON=(--warmup "$WARMUP" --steps "$STEPS" --repeats "$REPEATS")
for round in $(seq "$ROUNDS"); do
  for model in "${MODELS[@]}"; do
    echo "$model, round $round/$ROUNDS ($((SECONDS - START)) s)" >&2
    run ours "$BIN" --model "$model" "${COMMON[@]}" "${SHAPE[@]}"
    if [ -x "$SPIRV_BIN" ]; then run ours_spirv "$SPIRV_BIN" --model "$model" "${COMMON[@]}" "${SHAPE[@]}"; fi
    run torch_fp32 "$PYTHON" "$HERE/bench_gpu.py" --model "$model" --mode fp32 --device "$TORCH_DEVICE" "${COMMON[@]}" "${SHAPE[@]}"
  done
done
for model in "${MODELS[@]}"; do
  for mode in tf32 amp_bf16; do
    run "torch_$mode" "$PYTHON" "$HERE/bench_gpu.py" --model "$model" --mode "$mode" --device "$TORCH_DEVICE" "${COMMON[@]}" "${SHAPE[@]}"
  done
done
touch "$OUT/results.jsonl" "$OUT/f16.jsonl"
"$PYTHON" - "$OUT/results.jsonl" "$((SECONDS - START))" "$OUT/f16.jsonl" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for line in open(sys.argv[3]):
    check = json.loads(line)
    if check.get("f16_supported"):
        acc, rounding = check["accumulation_error"], check["output_rounding_error"]
        verdict = "f32 accumulation" if acc <= 3 * rounding else f"f16 accumulation: {acc / rounding:.0f}x the rounding"
        print(f"f16 convolution ({check['compiler']}): error {acc:.1e} against f32 accumulation of the same "
              f"inputs, rounding the output to f16 alone {rounding:.1e} ({verdict})")
    else:
        print(f"f16 convolution ({check['compiler']}): the adapter has no f16")
by = {}
for row in rows:
    by.setdefault((row["result"]["model"], row["label"]), []).append(row["result"])
labels = [("ours", "ours, WGSL"), ("ours_spirv", "ours, SPIR-V"), ("torch_fp32", "PyTorch fp32"),
          ("torch_tf32", "PyTorch TF32"), ("torch_amp_bf16", "PyTorch AMP bf16")]
adapter = next((r["result"].get("adapter") for r in rows if r["label"] == "ours"), "?")
device = next((r["result"].get("device") for r in rows if r["label"].startswith("torch")), "?")
torch_version = next((r["result"].get("torch") for r in rows if r["label"].startswith("torch")), "?")
print(f"\ntraining step on {device} (ours: {adapter}; torch {torch_version}), {sys.argv[2]} s in all")
print("median ms over all timed repeats (min-max); warm-up: the first step's seconds; peak GPU memory reserved")
print(f"{'model':<20} {'batch':>5} {'run':<18} {'step ms':>22} {'first step':>10} {'peak GPU':>9} {'vs fp32':>8}")
ratios, spirv_vs_wgsl = [], []
models = sorted({model for model, _ in by}, key=lambda m: [r["result"]["model"] for r in rows].index(m))
for model in models:
    base = by.get((model, "torch_fp32"))
    base_ms = statistics.median([t for r in base for t in r["step_ms"]]) if base else None
    medians = {}
    for label, name in labels:
        runs = by.get((model, label))
        if not runs:
            continue
        times = [t for r in runs for t in r["step_ms"]]
        ms = statistics.median(times)
        medians[label] = ms
        first = max(r["warmup_s"][0] for r in runs) if runs[0]["warmup_s"] else float("nan")
        peak = max((r["peak_gpu_mib"] or 0) for r in runs)
        ratio = f"{base_ms / ms:.2f}x" if base_ms else "-"
        step = f"{ms:.1f} ({min(times):.1f}-{max(times):.1f})"
        print(f"{model:<20} {runs[0]['batch']:>5} {name:<18} {step:>22} {first:>9.1f}s {peak:>8.0f}M {ratio:>8}")
    if base_ms and "ours" in medians:
        ratios.append(base_ms / medians["ours"])
    if "ours" in medians and "ours_spirv" in medians:
        spirv_vs_wgsl.append(medians["ours"] / medians["ours_spirv"])
if spirv_vs_wgsl:
    print(f"\nSPIR-V vs WGSL step time (median over models): {statistics.median(spirv_vs_wgsl):.2f}x (above 1: SPIR-V faster)")
if ratios:
    print(f"\ntrain step vs PyTorch CUDA fp32 (median over models): {statistics.median(ratios):.2f}x")
else:
    print("\ntrain step vs PyTorch CUDA fp32 (median over models): not measured (see the errors above)")
PYEOF
