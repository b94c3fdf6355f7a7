#!/usr/bin/env bash
# Kills a training run with SIGKILL at random moments, resumes it with --resume each time, and
# checks that it ends on the same weights as an uninterrupted run, bit for bit (flex, the CPU
# backend), and with the same metrics.
#
#   scripts/kill_resume_check.sh [KILLS] [SEED]
#
# KILLS (default 6) kills at random times over the run; SEED picks them (default: random,
# printed so a failure can be replayed). The run is the quickstart shrunk to a few seconds an
# epoch: ResNet-8, 3 epochs of 256 images, 2 loader threads.
set -euo pipefail
cd "$(dirname "$0")/.."
KILLS=${1:-6}
SEED=${2:-$RANDOM}
echo "kills: $KILLS, seed: $SEED"
cargo build --release --bin train --bin export 2>&1 | grep -v "^\s*\(Compiling\|Finished\)" || true
OUT=$(mktemp -d)
# Kept for a look when the check fails.
trap 'if [ "${ok:-0}" = 1 ]; then rm -rf "$OUT"; else echo "run folders kept in $OUT"; fi' EXIT
ARGS=(--config configs/quickstart.toml
  --set "output_dir=$OUT" --set backend=flex --set model.depth=8 --set train.epochs=3
  --set data.train_limit=256 --set data.val_limit=64 --set train.batch_size=32
  --set train.keep_last=1 --set data.workers=2)
run() { target/release/train "${ARGS[@]}" "$@"; }

start=$(date +%s.%N)
run --set name=reference > "$OUT/reference.log"
seconds=$(python3 -c "print(round($(date +%s.%N) - $start, 2))")
echo "uninterrupted run: ${seconds}s"

RANDOM=$SEED
resume=()
kills=0
while [ "$kills" -lt "$KILLS" ]; do
  # A random moment within the run's length: startup, mid-epoch, evaluation, checkpoint writes.
  delay=$(python3 -c "print(round($seconds * ($RANDOM % 1000) / 1000, 3))")
  # Started directly (not through a function, which would fork a shell): $! is train's pid.
  target/release/train "${ARGS[@]}" --set name=killed "${resume[@]}" > "$OUT/killed-$kills.log" 2>&1 &
  pid=$!
  sleep "$delay"
  if kill -9 "$pid" 2>/dev/null; then
    wait "$pid" 2>/dev/null || true
    kills=$((kills + 1))
    echo "kill $kills at ${delay}s: $(grep -c '^epoch ' "$OUT/killed-$((kills - 1)).log" || true) epoch line(s) printed before it"
  else
    wait "$pid" || { echo "the run failed:"; cat "$OUT/killed-$kills.log"; exit 1; }
    echo "the run finished before the next kill (at ${delay}s)"
    break
  fi
  # Every start after the first continues the folder.
  resume=(--resume)
done
run --set name=killed --resume > "$OUT/final.log" 2>&1 || { echo "the last resume failed:"; cat "$OUT/final.log"; exit 1; }

for name in reference killed; do
  target/release/export --run "$OUT/$name" --which last --out "$OUT/$name.safetensors" > /dev/null
done
# The tensors of two safetensors files, without the metadata (which names each run's folder).
tensors() { python3 -c "import json, struct, sys
data = open(sys.argv[1], 'rb').read()
n = struct.unpack('<Q', data[:8])[0]
header = json.loads(data[8:8 + n]); header.pop('__metadata__', None)
sys.stdout.buffer.write(json.dumps(header, sort_keys=True).encode() + data[8 + n:])" "$1"; }
if cmp -s <(tensors "$OUT/reference.safetensors") <(tensors "$OUT/killed.safetensors"); then
  echo "weights: identical to the uninterrupted run, bit for bit (every tensor of the exported safetensors)"
else
  echo "weights DIFFER from the uninterrupted run"; exit 1
fi
strip() { python3 -c "import json,sys
for l in open(sys.argv[1]):
    m = json.loads(l)
    print({k: v for k, v in m.items() if k not in ('images_per_sec', 'epoch_seconds', 'peak_rss_mib', 'step_seconds', 'loader_wait_seconds', 'eval_seconds', 'checkpoint_seconds')})" "$1"; }
if [ "$(strip "$OUT/reference/metrics.jsonl")" == "$(strip "$OUT/killed/metrics.jsonl")" ]; then
  echo "metrics: identical losses and errors in every epoch"
  ok=1
else
  echo "metrics differ:"; diff <(strip "$OUT/reference/metrics.jsonl") <(strip "$OUT/killed/metrics.jsonl") || true; exit 1
fi
