#!/usr/bin/env bash
# CPU training-step benchmark: this project's models on flex next to the same models in PyTorch
# (from PyPI, fp32, 2 threads), alternating the two, each model in a fresh process per side.
#
#   scripts/bench_cpu.sh [MODEL...]          (just bench-cpu)
#
# Models: cifar_resnet20, resnet18_cifar_stem, pyramidnet110_a48_bottleneck (batch 64 at 32x32),
# resnet50 (batch 8 at 224). ROUNDS (default 2) alternations; STEPS (default 3) timed steps after
# WARMUP (default 3: PyTorch's first steps in a fresh process run up to 1.7x its later ones).
# Needs .venv with torch and torchvision (`just interop` creates it).
# Prints the training-step table (median step time, spread, peak resident memory), an evaluation
# table (forward only, running statistics; PyTorch under eval() + no_grad()), the ops, and a last
# line
#   train step vs PyTorch (median over models): <ratio>x
# where a ratio is PyTorch's step time over ours (1.0 = parity, above = faster).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-3}
WARMUP=${WARMUP:-3}
cargo build --release --bin bench_cpu 2>&1 | grep -v "^\s*\(Compiling\|Finished\)" || true
MODELS=("$@")
if [ ${#MODELS[@]} -eq 0 ]; then
  mapfile -t MODELS < <(target/release/bench_cpu --list | cut -d' ' -f1)
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for model in "${MODELS[@]}"; do
  for round in $(seq "$ROUNDS"); do
    echo "$model, round $round/$ROUNDS" >&2
    target/release/bench_cpu --model "$model" --steps "$STEPS" --warmup "$WARMUP" >> "$OUT/rust.jsonl"
    "$PY" scripts/bench_cpu.py --model "$model" --steps "$STEPS" --warmup "$WARMUP" >> "$OUT/torch.jsonl"
    target/release/bench_cpu --model "$model" --eval --steps "$STEPS" --warmup "$WARMUP" >> "$OUT/rust-eval.jsonl"
    "$PY" scripts/bench_cpu.py --model "$model" --eval --steps "$STEPS" --warmup "$WARMUP" >> "$OUT/torch-eval.jsonl"
  done
done
echo "ops" >&2
for round in $(seq "$ROUNDS"); do
  target/release/bench_cpu --ops >> "$OUT/rust-ops.jsonl"
  "$PY" scripts/bench_cpu.py --ops >> "$OUT/torch-ops.jsonl"
done
"$PY" - "$OUT" <<'PYEOF'
import json, os, statistics, sys
out = sys.argv[1]
def load(side):
    rows = {}
    for line in open(os.path.join(out, f"{side}.jsonl")):
        row = json.loads(line)
        rows.setdefault(row["model"], []).append(row)
    return rows
def table(ours, torch, rss):
    """One row per model: median ms (min-max) of ours and PyTorch's, the ratio, and with `rss`
    both peak RSS; returns the ratios."""
    ratios = []
    for model, rows in ours.items():
        a = [t for r in rows for t in r["steps_ms"]]
        b = [t for r in torch[model] for t in r["steps_ms"]]
        ma, mb = statistics.median(a), statistics.median(b)
        ratios.append(mb / ma)
        fa = f"{ma:.0f} ({min(a):.0f}-{max(a):.0f})"
        fb = f"{mb:.0f} ({min(b):.0f}-{max(b):.0f})"
        line = f"{model:<30} {rows[0]['batch']:>5} {fa:>24} {fb:>22} {mb / ma:>6.2f}x"
        if rss:
            rss_a = max(r["peak_rss_mib"] for r in rows)
            rss_b = max(r["peak_rss_mib"] for r in torch[model])
            line += f" {rss_a:>8.0f}M {rss_b:>8.0f}M"
        print(line)
    return ratios
header = f"{'model':<30} {'batch':>5} {'this project (flex)':>24} {'PyTorch':>22} {'ratio':>7}"
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
isa = sorted({r["gemm"] for rows in load("rust").values() for r in rows})
dots = sorted({r.get("rows_dot", "?") for rows in load("rust").values() for r in rows})
print(f"\nCPU: {cpu}, {os.cpu_count()} cores; our matrix kernels ran {', '.join(isa)} (gemm, chosen at run time), "
      f"padded-grid kernels {', '.join(dots)}")
print(f"\ntraining step on the CPU: median ms over all timed steps (min-max), peak RSS")
print(f"{header} {'RSS ours':>9} {'RSS torch':>9}")
ratios = table(load("rust"), load("torch"), rss=True)
print(f"\nevaluation on the CPU: forward only, running statistics (PyTorch: eval() + no_grad()), median ms (min-max)")
print(header)
eval_ratios = table(load("rust-eval"), load("torch-eval"), rss=False)
def load_ops(side):
    rows = {}
    for line in open(os.path.join(out, f"{side}-ops.jsonl")):
        row = json.loads(line)
        rows.setdefault((row["op"], row["shape"]), []).append(row)
    return rows
ops_ours, ops_torch = load_ops("rust"), load_ops("torch")
print(f"\nops: median ms over rounds of each round's median of 7 (after 5 warm-ups), and the least of all runs; ratio = PyTorch / ours")
print(f"{'op':<37} {'shape':<26} {'ours':>7} {'PyTorch':>7} {'ratio':>6} {'least':>7} {'PyTorch':>7} {'ratio':>6}")
for (op, shape), rows in ops_ours.items():
    # `<op>, flex's` rows time flex's own op: compared with the same PyTorch op.
    peer = ops_torch[(op.split(",")[0], shape)]
    a, b = (statistics.median(r["median_ms"] for r in side) for side in (rows, peer))
    la, lb = (min(r["min_ms"] for r in side) for side in (rows, peer))
    print(f"{op:<37} {shape:<26} {a:>7.2f} {b:>7.2f} {b / a:>5.2f}x {la:>7.2f} {lb:>7.2f} {lb / la:>5.2f}x")
print(f"\nevaluation vs PyTorch (median over models): {statistics.median(eval_ratios):.2f}x")
print(f"\ntrain step vs PyTorch (median over models): {statistics.median(ratios):.2f}x")
PYEOF
