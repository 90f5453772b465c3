#!/usr/bin/env bash
# The whole GPU run in one script (about 6 minutes on one H100 / H200; the step limits add to 9m05s):
#   bash benchmarks/gpu.sh OUT_DIR [extra args for python -m dualview.bench]
# 1. correctness on the device against the CPU (dualview.bench.device_checks): DCM, DEM, fixtures,
#    the layer-truncated tower == plain hidden states bit for bit, the released-path scheme on the
#    released fixture, DualViewEncoder(compile=True) == eager                    -> OUT_DIR/checks.json
# 2. the benchmark, eager, batch 8, 3x3, with a profile of dual_576             -> OUT_DIR/eager/
#    (issue 13: dual_576 >= 2.0x the released path, peak memory <= 1.5x; dual_full inside the
#    AnyRes latency bound + 3%)
# 3. the same compiled: DualViewEncoder(compile=True), tower chunks + DEM; AnyRes's tower too -> OUT_DIR/compiled/
# 4. eager at batch 1, 3x3 (issue 13: dual_576 >= 8x the released path)       -> OUT_DIR/batch1/
#    and compiled                                                               -> OUT_DIR/batch1_compiled/
# 5. the tower alone (benchmarks/tower_chunks.py): plain forward vs layer-truncated, and the
#    automatic chunks against one call (within 3%?) with their extra memory     -> OUT_DIR/tower/
# 6. eager at batch 8 with ONE tower call (--tower-batch-size all): the automatic chunks' cost
#    inside the whole encode, against step 2                                    -> OUT_DIR/eager_one_call/
# Needs only what a CUDA machine with torch, transformers and the usual scientific packages has
# (torch, einops, transformers, safetensors, matplotlib, tqdm); runs from the source tree, installs nothing.
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu.sh OUT_DIR [bench args]}"
shift
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"

missing="$("$py" -c 'import importlib.util as u; print(" ".join(n for n in ("torch", "einops", "transformers", "safetensors", "matplotlib", "tqdm") if u.find_spec(n) is None))')"
if [ -n "$missing" ]; then
  echo "gpu.sh: missing Python packages: $missing (install them: pip install $missing)" >&2
  exit 3
fi
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu.sh: torch sees no CUDA device; this script is for a GPU machine (CPU: python -m dualview.bench)" >&2
  exit 4
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv || true
mkdir -p "$out"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
step() {  # step NAME SECONDS CMD...: a failed or timed-out step is reported and the next one still runs
  local name="$1" limit="$2"
  shift 2
  echo "== gpu.sh: $name (limit ${limit}s)" >&2
  local start=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "== gpu.sh: $name: exit $rc after $((SECONDS - start))s" >&2
  if [ $rc -ne 0 ]; then status=1; fi
}
step "device checks" 70 "$py" -m dualview.bench.device_checks --out "$out"
# eager first: its results stand even if a later step fails or runs out of time
step "benchmark, eager" 90 "$py" -m dualview.bench --out "$out/eager" --grids 3x3 --profile "$@"
# compiles ViT-L twice (chunk shape 76, AnyRes's 80) and two DEMs: most of this step (105 s on the H200 with three shapes)
step "benchmark, compiled tower + DEM" 150 "$py" -m dualview.bench --out "$out/compiled" --grids 3x3 --compile "$@"
step "benchmark, batch 1" 40 "$py" -m dualview.bench --out "$out/batch1" --batch 1 --grids 3x3 "$@"
step "benchmark, batch 1, compiled" 100 "$py" -m dualview.bench --out "$out/batch1_compiled" --batch 1 --grids 3x3 --compile "$@"
step "tower alone" 45 "$py" "$root/benchmarks/tower_chunks.py" --out "$out/tower"
step "benchmark, eager, one tower call" 50 "$py" -m dualview.bench --out "$out/eager_one_call" --grids 3x3 --tower-batch-size all "$@"
exit $status
