#!/usr/bin/env bash
# The CPU kernels' tests on the AVX2 path of an AVX-512 machine (just test-avx2-path).
#
# One binary runs on both kinds of x86 machine: `gemm` (the matrix products) and `rows_dot`
# (the padded-grid convolutions) choose their AVX-512 or AVX2 + FMA kernels at run time. On a
# CPU with AVX-512 the test suite runs the AVX-512 GEMMs; this runs the kernels' tests (their
# own unit tests against f64, and tests/flex_equivalence.rs against flex's ops) once more under
# valgrind, whose virtual CPU has no AVX-512, so every GEMM and grid kernel runs its AVX2 + FMA
# version and is checked against the same definitions to the same tolerances. Needs valgrind
# (`apt-get install valgrind`); about 30 s. On a CPU without AVX-512 the suite already ran the
# AVX2 path and this says so.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! grep -qw avx512f /proc/cpuinfo; then
  echo "this CPU has no AVX-512: cargo test --release already ran the AVX2 + FMA kernels"
  exit 0
fi
if ! command -v valgrind >/dev/null 2>&1; then
  echo "error: valgrind not found (apt-get install valgrind); it runs the tests on a CPU without AVX-512" >&2
  exit 1
fi
# The test executables of cutmix-kernels (its unit tests and its integration test), by name
# from cargo's build messages (built already by `cargo test --release`).
mapfile -t BINS < <(cargo test --release --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("cutmix_kernels", "flex_equivalence"):
        print(m["executable"])
')
if [ ${#BINS[@]} -ne 2 ]; then
  echo "error: expected the two test executables of cutmix-kernels, found ${#BINS[@]}" >&2
  exit 1
fi
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
for bin in "${BINS[@]}"; do
  echo "$(basename "$bin") under valgrind (no AVX-512):"
  status=0
  valgrind --tool=none -q --error-exitcode=1 "$bin" --nocapture >"$LOG" 2>&1 || status=$?
  grep -E "gemm runs|kernels on this CPU|test result|FAILED" "$LOG" || true
  if [ "$status" -ne 0 ]; then
    cat "$LOG" >&2
    echo "error: $(basename "$bin") failed on the AVX2 path (exit $status)" >&2
    exit 1
  fi
done
