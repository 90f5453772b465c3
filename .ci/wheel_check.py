"""CI: build the wheel, install it into a clean virtual environment, run every entry point.

    python .ci/wheel_check.py            # with the project's venv python (.ci/run does this)

The editable install of the development venv hides packaging mistakes (a package folder or a data
file left out of the wheel still imports from the checkout). So:

1. the wheel is built offline (``pip wheel --no-deps --no-build-isolation``: setuptools comes from
   the running venv) from a copy of the working tree;
2. its file list must hold every file of ``dualview/`` and ``adapters/`` (as ``dualview/adapters/``:
   the symlink ``dualview/adapters -> ../adapters`` is built into real files), plus LICENSE and
   py.typed;
3. it is installed with ``--no-deps`` into a new venv (no ``--system-site-packages``), then a
   ``.pth`` line puts the development venv's site-packages on that venv's path for the heavy
   dependencies (torch, transformers, ...). A directory named in a ``.pth`` file is only appended
   to ``sys.path``: the ``.pth`` files inside it, among them the editable install's finder
   (``__editable__.dualview-*.pth``), are not executed, so ``dualview`` can come from the wheel
   only (the clean venv's own site-packages is searched first), which is checked;
4. from a folder outside the checkout, every entry point runs: ``dualview --help``, ``--version``
   and each subcommand's ``--help``, ``python -m`` of dualview, dualview.ablation, dualview.bench
   and dualview.tools.demo with ``--help``, and an import of every module of the package, every
   adapter found in ``adapters/`` included.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNNABLE = ["dualview", "dualview.ablation", "dualview.bench", "dualview.tools.demo"]


def source_files(root: Path = ROOT) -> set[str]:
    """Paths every wheel must hold, as they are named inside it."""
    def files(folder: Path, prefix: str) -> set[str]:
        # rglob does not descend into the symlink dualview/adapters: adapters/ is listed once, below
        return {
            prefix + p.relative_to(folder).as_posix()
            for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        }

    return files(root / "dualview", "dualview/") | files(root / "adapters", "dualview/adapters/")


def modules(root: Path = ROOT) -> list[str]:
    """Every importable module of the package (``__main__`` modules excluded: they run)."""
    names = []
    for path in sorted(source_files(root)):
        if path.endswith(".py") and not path.endswith("__main__.py"):
            name = path[: -len(".py")].replace("/", ".")
            names.append(name[: -len(".__init__")] if name.endswith(".__init__") else name)
    return names


def copy_tree(dest: Path, root: Path = ROOT) -> Path:
    """What the build needs, copied (no build/ left over from an earlier build, no .venv)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(root / name, dest / name)
    for name in ("dualview", "adapters"):
        shutil.copytree(root / name, dest / name, ignore=ignore, symlinks=True)
    return dest


def build_wheel(work: Path, root: Path = ROOT) -> Path:
    (work / "src").mkdir(parents=True)
    src = copy_tree(work / "src", root)
    dist = work / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
        check=True,
    )
    (wheel,) = dist.glob("dualview-*.whl")
    return wheel


def check_contents(wheel: Path, root: Path = ROOT) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    missing = sorted(source_files(root) - names)
    if missing:
        raise SystemExit(f"wheel check: {wheel.name} lacks {missing}")
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
        raise SystemExit(f"wheel check: {wheel.name} has no LICENSE")


def clean_venv(wheel: Path, where: Path) -> Path:
    """A venv with the wheel installed and the current venv's packages (not its .pth files) on its path."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    python = where / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    clean_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    # after the install: pip must not see (and try to replace) the development venv's dualview
    Path(clean_site, "dualview_ci_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def run(command: list[str], cwd: Path) -> str:
    # a PYTHONPATH pointing at a checkout would hide what the wheel itself installs
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    if result.returncode != 0:
        raise SystemExit(f"wheel check: `{' '.join(command)}` failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


def entry_points(python: Path, cwd: Path, root: Path = ROOT) -> list[str]:
    """Run every entry point from the installed wheel; returns what ran."""
    bin_dir = python.parent
    located = run([str(python), "-c", "import dualview, dualview.adapters as a; print(dualview.__file__); print(a.__file__)"], cwd)
    venv = python.parent.parent.resolve()
    if not all(Path(line).resolve().is_relative_to(venv) for line in located.split()):
        raise SystemExit(f"wheel check: dualview was not imported from the clean venv {venv}: {located}")
    ran = []
    commands = [[str(bin_dir / "dualview"), "--help"], [str(bin_dir / "dualview"), "--version"]]
    subcommands = run([str(python), "-c", "from dualview.tools.cli import build_parser; p = build_parser(); "
                       "print(' '.join(p._subparsers._group_actions[0].choices))"], cwd).split()
    commands += [[str(bin_dir / "dualview"), sub, "--help"] for sub in subcommands]
    commands += [[str(python), "-m", module, "--help"] for module in RUNNABLE]
    for command in commands:
        run(command, cwd)
        ran.append(" ".join([Path(command[0]).name, *command[1:]]))
    names = modules(root)
    run([str(python), "-c", f"import importlib\nfor m in {names!r}: importlib.import_module(m)"], cwd)
    ran.append(f"import {len(names)} modules ({', '.join(n for n in names if n.startswith('dualview.adapters.'))} ...)")
    return ran


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="dualview-wheel-") as tmp:
        work = Path(tmp)
        wheel = build_wheel(work)
        check_contents(wheel)
        python = clean_venv(wheel, work / "venv")
        outside = work / "elsewhere"
        outside.mkdir()
        for line in entry_points(python, outside):
            print(f"[wheel] ok: {line}")
        print(f"[wheel] {wheel.name}: contents, clean install and entry points ok")


if __name__ == "__main__":
    main()
