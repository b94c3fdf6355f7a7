#!/usr/bin/env bash
# Loader benchmark: this project's decode + transforms next to torchvision's ImageFolder +
# transforms with PIL, one core each, on the same files, alternating, then the loader's peak
# memory on a folder and on a folder ten times larger.
#
#   scripts/bench_loader.sh [IMAGE_FOLDER_ROOT]
#
# IMAGE_FOLDER_ROOT holds train/<class>/*; without it the script builds one in $BENCH_DIR
# (default /tmp/cutmix-bench-images): 2,000 ImageNet-sized JPEGs made of real CIFAR-10 photos
# (scripts/make_bench_images.py) from ../shared/data/cifar10-train-jpg.tar.gz (or $CIFAR_JPG_TAR).
# Needs .venv with torch and torchvision (`just interop` creates it). ROUNDS (default 2) runs
# of each side alternate; LIMIT (default 1000) images per pipeline; medians are reported.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ROUNDS=${ROUNDS:-2}
LIMIT=${LIMIT:-1000}
BENCH_DIR=${BENCH_DIR:-/tmp/cutmix-bench-images}
ROOT=${1:-}
if [ -z "$ROOT" ]; then
  ROOT=$BENCH_DIR
  if [ ! -d "$ROOT/train" ]; then
    TAR=${CIFAR_JPG_TAR:-../shared/data/cifar10-train-jpg.tar.gz}
    SRC=$(mktemp -d)
    echo "building $ROOT from $TAR ..."
    tar xzf "$TAR" -C "$SRC"
    "$PY" scripts/make_bench_images.py "$SRC/train" "$ROOT"
    rm -rf "$SRC"
  fi
fi
CIFAR_ARGS=()
if [ -f "$ROOT/cifar/data_batch_1.bin" ]; then CIFAR_ARGS=(--cifar "$ROOT/cifar"); fi
cargo build --release --bin bench_loader
OUT=$(mktemp -d)
for round in $(seq "$ROUNDS"); do
  echo "round $round/$ROUNDS: rust"
  taskset -c 0 target/release/bench_loader --folder "$ROOT/train" --limit "$LIMIT" "${CIFAR_ARGS[@]}" > "$OUT/rust-$round.jsonl"
  echo "round $round/$ROUNDS: torchvision"
  taskset -c 0 "$PY" scripts/bench_loader.py --folder "$ROOT/train" --limit "$LIMIT" "${CIFAR_ARGS[@]}" > "$OUT/torch-$round.jsonl"
done

# Peak memory of the loader (2 workers) on the folder and on one ten times larger (hard links).
BIG="$OUT/big/train"
for class_dir in "$ROOT"/train/*/; do
  class=$(basename "$class_dir")
  mkdir -p "$BIG/$class"
  for copy in $(seq 10); do
    for f in "$class_dir"*; do ln "$f" "$BIG/$class/${copy}_$(basename "$f")" 2>/dev/null || cp "$f" "$BIG/$class/${copy}_$(basename "$f")"; done
  done
done
# The same 25 batches from each, so only what grows with the folder differs.
target/release/bench_loader --folder "$ROOT/train" --epoch --workers 2 --batches 25 > "$OUT/epoch-small.jsonl"
target/release/bench_loader --folder "$BIG" --epoch --workers 2 --batches 25 > "$OUT/epoch-big.jsonl"

"$PY" - "$OUT" "$ROUNDS" <<'PYEOF'
import json, statistics, sys, os, platform
out, rounds = sys.argv[1], int(sys.argv[2])
def load(side):
    rates = {}
    for r in range(1, rounds + 1):
        for line in open(os.path.join(out, f"{side}-{r}.jsonl")):
            row = json.loads(line)
            rates.setdefault(row["pipeline"], []).append(row["img_per_s"])
    return rates
rust, torch = load("rust"), load("torch")
pairs = {"decode zune-jpeg (image crate)": "decode", "imagenet-train": "imagenet-train",
         "imagenet-train-plain": "imagenet-train-plain", "imagenet-val": "imagenet-val", "cifar-train": "cifar-train"}
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine()) if os.path.exists("/proc/cpuinfo") else platform.machine()
print(f"\nimages per second on one core ({cpu}), median of {rounds} rounds (min-max)")
print(f"{'pipeline':<34} {'this project':>20} {'torchvision + PIL':>20} {'ratio':>7}")
def fmt(v):
    return f"{statistics.median(v):8.1f} ({min(v):.0f}-{max(v):.0f})"
for name, values in rust.items():
    peer = torch.get(pairs.get(name, ""), [])
    ratio = f"{statistics.median(values) / statistics.median(peer):6.2f}x" if peer else ""
    print(f"{name:<34} {fmt(values):>20} {fmt(peer) if peer else '':>20} {ratio:>7}")
for name in ("epoch-small", "epoch-big"):
    row = json.loads(open(os.path.join(out, f"{name}.jsonl")).read())
    print(f"loader, {row['workers']} workers, {row['images']} images from a folder of {row['folder_images']:>6}: {row['img_per_s']:.1f} img/s, peak RSS {row['peak_rss_mib']:.1f} MiB")
PYEOF
rm -rf "$OUT"
