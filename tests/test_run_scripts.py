"""The run scripts (run.sh, lanes/) with pip and python stubbed or pointed nowhere: a lane whose index
cannot be reached fails instead of being skipped; ``run.sh test-compat new`` (the newest releases) is
not capped at the local torch and resolves again on a later run."""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _copy_scripts(tmp_path: Path, *names: str) -> Path:
    work = tmp_path / "clone"
    work.mkdir()
    for name in names:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    return work


@pytest.mark.skipif(shutil.which("python3") is None, reason="needs python3 (lanes/setup.sh makes a venv)")
def test_a_lane_whose_index_is_unreachable_fails_instead_of_being_skipped(tmp_path):
    """An index that cannot be reached fails the lane: pip then prints 'Could not find a version' / 'No
    matching distribution' as for a package not served here, but lanes/setup.sh's exit 3 ("cannot be
    installed on this machine", which lanes/run.sh reports as SKIPPED with exit 0) is not for that: a
    network outage must not turn the serving lanes into a green 'SKIPPED'."""
    work = _copy_scripts(tmp_path, "lanes", "pyproject.toml")
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}
    run = subprocess.run(["bash", "lanes/run.sh", "eval"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=300)
    # accelerate==1.16.0 (lanes/eval.txt's first pin) is on PyPI: the lane was not "not served", it was unreachable
    assert run.returncode != 0, f"an unreachable index skipped the lane with exit 0:\n{run.stderr[-600:]}"


_STUB_PYTHON3 = textwrap.dedent("""\
    #!/usr/bin/env bash
    # python3 -m venv DIR: a fake venv whose pip / python only log their arguments
    if [ "$1" = -m ] && [ "$2" = venv ]; then
      mkdir -p "$3/bin"
      printf '#!/usr/bin/env bash\\necho "pip $*" >> "$STUB_LOG"\\n[ "$1" = freeze ] && echo torch==2.14.1\\nexit 0\\n' > "$3/bin/pip"
      printf '#!/usr/bin/env bash\\necho "python $*" >> "$STUB_LOG"\\nexit 0\\n' > "$3/bin/python"
      chmod +x "$3/bin/pip" "$3/bin/python"
      exit 0
    fi
    exit 97
    """)


def _run_compat_new(work: Path, log: Path) -> list[str]:
    stub = work / "stub-bin"
    stub.mkdir(exist_ok=True)
    (stub / "python3").write_text(_STUB_PYTHON3)
    (stub / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{stub}{os.pathsep}{os.environ['PATH']}", "STUB_LOG": str(log)}
    env.pop("DUALVIEW_TORCH", None)
    start = len(log.read_text().splitlines()) if log.exists() else 0
    run = subprocess.run(["bash", "run.sh", "test-compat", "new", "-q"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return log.read_text().splitlines()[start:]


def test_the_newest_releases_lane_is_not_capped_at_the_local_torch(tmp_path):
    """`bash run.sh test-compat new` is 'whatever pip resolves today, no constraints: the first to see a
    new release break us': it installs torch without TORCH_SPEC's default cap ('torch<=2.14.1
    torchvision<=0.29.1'), so a new torch release is seen by the lane meant to see it."""
    work = _copy_scripts(tmp_path, "run.sh", "pyproject.toml")
    calls = _run_compat_new(work, tmp_path / "calls.log")
    torch_install = [c for c in calls if c.startswith("pip install") and " torch" in c]
    assert torch_install and not any("<=" in c for c in torch_install), torch_install


def test_the_newest_releases_lane_resolves_again_on_a_later_run(tmp_path):
    """A second run of the 'newest releases' lane resolves again (pip install -U / --upgrade) although
    the stamp of .venv-compat-new (pyproject.toml and run.sh) is unchanged: a run a week later tests
    that week's releases, not last week's."""
    work = _copy_scripts(tmp_path, "run.sh", "pyproject.toml")
    log = tmp_path / "calls.log"
    _run_compat_new(work, log)
    second = _run_compat_new(work, log)
    assert any(c.startswith("pip install") and ("-U" in c.split() or "--upgrade" in c.split()) for c in second), (
        f"the second run of the newest-releases lane resolved nothing: {second}"
    )
