#!/usr/bin/env bash
# The two set-up commands of the README:
#   bash run.sh demo   # the main job: DCM -> tower -> DEM on the embedded demo image
#   bash run.sh test   # the test suite
# Both create .venv on first use and install everything the project needs into it, at the exact
# versions of constraints.txt (what the suite last passed with; about 2.5 min on this machine, where
# pip serves torch from local disk). Extra arguments go to the demo / pytest.
# Maintenance lanes, each in its own venv:
#   bash run.sh test-compat low|new [pytest args]  # the suite at the declared lower bounds
#                                                  # (compat/low.txt) or at the newest releases
#   bash run.sh lock                               # refresh constraints.txt from the newest releases
#   bash run.sh test-vllm|test-eval|test-serving   # the vLLM / lmms-eval lanes (docs/serving.md)
#   bash run.sh test-deepspeed                     # the DeepSpeed ZeRO-2/3 lane (docs/training.md)
set -euo pipefail
cd "$(dirname "$0")"

# The serving / evaluation / DeepSpeed lanes have venvs of their own (lanes/run.sh): not .venv.
case "${1:-}" in
  test-vllm) shift; exec bash lanes/run.sh vllm "$@" ;;
  test-deepspeed) shift; exec bash lanes/run.sh deepspeed "$@" ;;
  test-eval) shift; exec bash lanes/run.sh eval "$@" ;;
  test-serving) shift; exec bash lanes/run.sh all "$@" ;;
esac

# torch<=2.14.1 / torchvision<=0.29.1 are served from local disk here; elsewhere pip takes them
# from PyPI (a CUDA build on Linux x86_64). Override with DUALVIEW_TORCH="torch==X torchvision==Y".
TORCH_SPEC="${DUALVIEW_TORCH:-torch<=2.14.1 torchvision<=0.29.1}"

# install VENV CONSTRAINTS... : create VENV (once per change of this script, pyproject.toml, the
# constraints or the torch spec) and install the project with its hf, timm and dev extras.
# CONSTRAINTS are pip -c files; none means the newest releases pip resolves, and then every call
# resolves again (--upgrade, eager): a venv made last week must not stand in for today's releases.
install() {
  local venv="$1"
  shift
  local stamp="$venv/.dualview-installed" want upgrade=()
  want="$( { cat pyproject.toml run.sh "$@"; echo "$TORCH_SPEC"; } | sha256sum | cut -c1-16)"
  if [ $# -eq 0 ]; then
    upgrade=(--upgrade --upgrade-strategy eager)
  elif [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  echo "[run.sh] installing into $venv ${*:+(constraints: $*)} ..." >&2
  python3 -m venv "$venv"
  local log="$venv/install.log" cons=() f
  for f in "$@"; do cons+=(-c "$f"); done
  # shellcheck disable=SC2086
  # setuptools>=77 named: the wheel check builds without isolation, with this venv's setuptools, and
  # pyproject.toml's SPDX license needs 77 (python -m venv brings 65; torch happens to pull it today).
  # llava-torch (the original LLaVA code, module `llava`) pins torch 2.0-era releases: installed
  # without its dependencies, beside the modern stack (dualview.adapters.llava15 needs nothing more).
  if ! { "$venv/bin/pip" install "${upgrade[@]}" "${cons[@]}" $TORCH_SPEC \
         && "$venv/bin/pip" install "${upgrade[@]}" "${cons[@]}" -e ".[hf,timm,dev]" "setuptools>=77" \
         && "$venv/bin/pip" install "${cons[@]}" --no-deps "llava-torch==1.2.2.post1"; } > "$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "[run.sh] install failed; full log: $log" >&2
    exit 1
  fi
  "$venv/bin/pip" freeze --all --exclude-editable | grep -v -E "^(pip|wheel)==" > "$venv/freeze.txt"
  echo "$want" > "$stamp"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  demo|test)
    VENV="${DUALVIEW_VENV:-.venv}"
    install "$VENV" constraints.txt
    if [ "$cmd" = demo ]; then exec "$VENV/bin/python" -m dualview.tools.demo "$@"; fi
    exec "$VENV/bin/python" -m pytest "$@" ;;
  test-compat)
    end="${1:-}"
    shift || true
    case "$end" in
      # the lower bounds of pyproject.toml's ranges (torch, transformers, ...): compat/low.txt
      low) TORCH_SPEC="torch torchvision"; install .venv-compat-low compat/low.txt ;;
      # whatever pip resolves today, no constraints: the first to see a new release break us
      # (torch uncapped too: only this machine's own pip configuration caps it)
      new) TORCH_SPEC="torch torchvision"; install .venv-compat-new ;;
      *) echo "usage: bash run.sh test-compat low|new [pytest args...]" >&2; exit 2 ;;
    esac
    venv=".venv-compat-$end"
    echo "[run.sh] test-compat $end: $(grep -i -E '^(torch|transformers|accelerate|timm)==' "$venv/freeze.txt" | tr '\n' ' ')" >&2
    exec "$venv/bin/python" -m pytest "$@" ;;
  lock)
    # the newest releases in a scratch venv; the suite must pass there before constraints.txt changes
    rm -rf .venv-lock
    TORCH_SPEC="torch torchvision"
    install .venv-lock
    .venv-lock/bin/python -m pytest -q -p no:cacheprovider "$@"
    { sed -n '1,3p' constraints.txt; cat .venv-lock/freeze.txt; } > constraints.txt.new
    mv constraints.txt.new constraints.txt
    echo "[run.sh] constraints.txt refreshed from .venv-lock (suite passed); review with git diff" >&2 ;;
  *) echo "usage: bash run.sh demo|test|test-compat low|new|lock|test-vllm|test-eval|test-serving|test-deepspeed [args...]" >&2; exit 2 ;;
esac
