#!/usr/bin/env bash
# Runs the serving / evaluation / DeepSpeed lanes, each in its own venv (made by lanes/setup.sh on first use):
#   bash lanes/run.sh vllm [pytest args]       # tests/integrations/test_vllm_lane.py in .venv-vllm
#   bash lanes/run.sh eval [pytest args]       # tests/integrations/test_lmms_eval_lane.py in .venv-eval
#   bash lanes/run.sh all                      # the two serving lanes, one after the other; non-zero if either failed
#   bash lanes/run.sh deepspeed [pytest args]  # tests/integrations/test_deepspeed_lane.py in .venv-deepspeed
# A lane whose local-only pin is not served here (lanes/setup.sh exit 3) is skipped (exit 0) with the line
#   [lanes] <name>: SKIPPED: <reason>
# on stderr; any other install failure fails the lane.
set -uo pipefail
cd "$(dirname "$0")/.."
lane="${1:?usage: bash lanes/run.sh vllm|eval|all|deepspeed [pytest args]}"
shift || true
declare -A TESTS=([vllm]=tests/integrations/test_vllm_lane.py [eval]=tests/integrations/test_lmms_eval_lane.py
                 [deepspeed]=tests/integrations/test_deepspeed_lane.py)

run_lane() {
  local name="$1"; shift
  local start=$SECONDS status=0
  bash lanes/setup.sh "$name" || status=$?
  if [ "$status" = 3 ]; then
    echo "[lanes] $name: SKIPPED: $(cat ".venv-$name/.skipped" 2>/dev/null || echo "cannot be installed on this machine, see above")" >&2
    return 0
  elif [ "$status" != 0 ]; then
    return "$status"
  fi
  VLLM_ENABLE_V1_MULTIPROCESSING=0 ".venv-$name/bin/python" -m pytest -p no:cacheprovider "${TESTS[$name]}" "$@" || status=$?
  echo "[lanes] $name: exit $status in $((SECONDS - start)) s (install, when one was needed, included)" >&2
  return "$status"
}

case "$lane" in
  vllm|eval|deepspeed) run_lane "$lane" "$@" ;;
  all)
    failed=0
    for name in vllm eval; do run_lane "$name" "$@" || failed=1; done
    exit "$failed" ;;
  *) echo "usage: bash lanes/run.sh vllm|eval|all|deepspeed [pytest args]" >&2; exit 2 ;;
esac
