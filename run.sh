#!/usr/bin/env bash
# The two set-up commands of the README:
#   bash run.sh demo   # the main job: DCM -> tower -> DEM on the embedded demo image
#   bash run.sh test   # the test suite
# Both create .venv on first use and install everything the project needs into it (about 2.5 min
# on this machine, where pip serves torch from local disk). Extra arguments go to the demo / pytest.
set -euo pipefail
cd "$(dirname "$0")"

# The serving / evaluation lanes have venvs of their own (lanes/run.sh, docs/serving.md): not .venv.
case "${1:-}" in
  test-vllm) shift; exec bash lanes/run.sh vllm "$@" ;;
  test-eval) shift; exec bash lanes/run.sh eval "$@" ;;
  test-serving) shift; exec bash lanes/run.sh all "$@" ;;
esac

VENV="${DUALVIEW_VENV:-.venv}"
# torch<=2.14.1 / torchvision<=0.29.1 are served from local disk here; elsewhere pip takes them
# from PyPI (a CUDA build on Linux x86_64). Override with DUALVIEW_TORCH="torch==X torchvision==Y".
TORCH_SPEC="${DUALVIEW_TORCH:-torch<=2.14.1 torchvision<=0.29.1}"
STAMP="$VENV/.dualview-installed"
WANT="$(cat pyproject.toml run.sh | sha256sum | cut -c1-16)"

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[run.sh] installing into $VENV ..." >&2
  python3 -m venv "$VENV"
  log="$VENV/install.log"
  # shellcheck disable=SC2086
  # llava-torch (the original LLaVA code, module `llava`) pins torch 2.0-era releases: installed
  # without its dependencies, beside the modern stack (dualview.adapters.llava15 needs nothing more).
  if ! { "$VENV/bin/pip" install $TORCH_SPEC \
         && "$VENV/bin/pip" install -e ".[hf,timm,dev]" \
         && "$VENV/bin/pip" install --no-deps "llava-torch==1.2.2.post1"; } > "$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "[run.sh] install failed; full log: $log" >&2
    exit 1
  fi
  echo "$WANT" > "$STAMP"
fi

cmd="${1:-}"
shift || true
case "$cmd" in
  demo) exec "$VENV/bin/python" -m dualview.demo "$@" ;;
  test) exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: bash run.sh demo|test|test-vllm|test-eval|test-serving [args...]" >&2; exit 2 ;;
esac
