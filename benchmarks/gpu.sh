#!/usr/bin/env bash
# The whole GPU benchmark in one script (under 5 minutes on one H100 / H200):
#   bash benchmarks/gpu.sh OUT_DIR [extra args for python -m dualview.bench]
# Needs only what a CUDA machine with torch, transformers and the usual scientific packages has
# (torch, einops, transformers, matplotlib); runs from the source tree, nothing to install.
set -euo pipefail
out="${1:?usage: bash benchmarks/gpu.sh OUT_DIR [bench args]}"
shift
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"

missing="$("$py" -c 'import importlib.util as u; print(" ".join(n for n in ("torch", "einops", "transformers", "matplotlib", "tqdm") if u.find_spec(n) is None))')"
if [ -n "$missing" ]; then
  echo "gpu.sh: missing Python packages: $missing (install them: pip install $missing)" >&2
  exit 3
fi
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu.sh: torch sees no CUDA device; this script is for a GPU machine (CPU: python -m dualview.bench)" >&2
  exit 4
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
mkdir -p "$out"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# eager first: its results stand even if the compiled run fails or runs out of time
timeout 170 "$py" -m dualview.bench --out "$out/eager" "$@"
timeout 120 "$py" -m dualview.bench --out "$out/compiled" --compile "$@" \
  || echo "gpu.sh: the --compile run did not finish; the eager results in $out/eager stand" >&2
