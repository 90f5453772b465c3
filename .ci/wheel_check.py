"""CI: build the wheel, install it into a clean virtual environment with the ``hf`` extra's packages
only, run every entry point, every example and the training recipe there.

    python .ci/wheel_check.py            # with the project's venv python (.ci/run does this)

The editable install of the development venv hides packaging mistakes (a package folder or a data
file left out of the wheel still imports from the checkout), and its packages hide a missing
requirement (the dev extra installs what the ``hf`` extra may lack). So:

1. the wheel is built offline (``pip wheel --no-deps --no-build-isolation``: setuptools comes from
   the running venv) from a copy of the working tree;
2. its file list must hold every file of ``dualview/`` and ``adapters/`` (as ``dualview/adapters/``:
   the symlink ``dualview/adapters -> ../adapters`` is built into real files), plus LICENSE and
   py.typed;
3. it is installed with ``--no-deps`` into a new venv (no ``--system-site-packages``). What
   ``pip install "dualview[hf]"`` would add is resolved from the wheel's own metadata (its
   ``Requires-Dist`` for the ``hf`` extra, then each requirement's, markers evaluated) against the
   development venv's installed distributions: each must be there at a version the requirement
   allows, else the check fails naming it. Only those distributions' files (their ``RECORD``) are
   linked into a folder that a ``.pth`` line appends to the clean venv's path, so an import of a
   package the extra does not pull in fails as it would for a user. ``llava-torch`` is linked too,
   without its requirements: the README installs it with ``pip install --no-deps`` (the llava15
   adapter and example need it). The clean venv's own site-packages comes first, so ``dualview``
   comes from the wheel only, which is checked;
4. from a folder outside the checkout, every entry point runs: ``dualview --help``, ``--version``
   and each subcommand's ``--help``, ``python -m`` of dualview, dualview.ablation, dualview.bench
   and dualview.tools.demo with ``--help``, and an import of every module of the package, every
   adapter found in ``adapters/`` included;
5. there too, offline and with an empty Hugging Face cache: every ``examples/*.py`` with its tiny
   default model, ``examples/distributed/train_tiny_llava.py`` on 2 processes (DDP, gloo, 1 step),
   and the runnable Python blocks of ``docs/training.md`` (the warm-start recipe on an HF Trainer).
   An example that needs another extra (EXAMPLE_EXTRAS: the towers example's timm ViT) runs in a
   second clean venv made the same way with those extras.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from email.parser import Parser
from importlib.metadata import Distribution, distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
RUNNABLE = ["dualview", "dualview.ablation", "dualview.bench", "dualview.tools.demo"]
# the README's package install: pip install ".[hf]"
EXTRAS = ("hf",)
# installed with `pip install --no-deps` (README): the llava15 adapter's host, its requirements not followed
NO_DEPS = ("llava-torch",)
# examples that need more than EXTRAS (each says so in its docstring); they run in a venv of their own
EXAMPLE_EXTRAS = {"towers_example.py": ("hf", "timm")}


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


def wheel_requirements(wheel: Path) -> list[str]:
    """The ``Requires-Dist`` lines of the wheel's METADATA."""
    with zipfile.ZipFile(wheel) as zf:
        info = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(zf.read(info).decode()).get_all("Requires-Dist") or []


def requirement_closure(requirements: list[str], extras: tuple[str, ...],
                        installed: dict[str, Distribution]) -> dict[str, Distribution]:
    """The distributions that dualview's ``requirements`` (its Requires-Dist) pull in with ``extras``,
    followed through their own requirements and taken from ``installed`` (canonical name ->
    distribution); a requirement missing there, or at a version it excludes, fails."""
    found: dict[str, Distribution] = {}
    todo = [(Requirement(line), extra, "dualview") for line in requirements for extra in ("", *extras)]
    seen = set()
    while todo:
        req, extra, by = todo.pop()
        if str(req) in seen or (req.marker and not req.marker.evaluate({"extra": extra})):
            continue
        seen.add(str(req))
        name = canonicalize_name(req.name)
        dist = installed.get(name)
        if dist is None:
            raise SystemExit(f"wheel check: {by} requires {req}, which the development venv does not have")
        if not req.specifier.contains(dist.version, prereleases=True):
            raise SystemExit(f"wheel check: {by} requires {req}, but the development venv has {dist.version}")
        if name not in found:
            found[name] = dist
        # the requirement's own requirements, with the extras it asks for (cuda-toolkit[cublas,...])
        todo += [(Requirement(line), e, name) for line in dist.requires or [] for e in ("", *req.extras)]
    return found


def record_paths(dist: Distribution) -> list[tuple[str, ...]]:
    """The files a distribution installed into site-packages (its RECORD), as path parts."""
    if dist.files is None:
        raise SystemExit(f"wheel check: {dist.metadata['Name']} has no RECORD: its files cannot be linked")
    return [f.parts for f in dist.files if f.parts[0] != ".." and "__pycache__" not in f.parts]


def link_distributions(dists: list[Distribution], others: list[Distribution], site: Path, dest: Path) -> None:
    """Symlink into ``dest`` the files of ``dists``, each through its topmost folder that holds no
    file of ``others`` (``nvidia/`` is shared by many distributions: its subfolders are linked)."""
    foreign = {parts[:i] for d in others for parts in record_paths(d) for i in range(1, len(parts) + 1)}
    linked: set[tuple[str, ...]] = set()
    for dist in dists:
        for parts in record_paths(dist):
            for i in range(1, len(parts) + 1):
                head = parts[:i]
                if head in linked:
                    break
                if head not in foreign:
                    target = dest.joinpath(*head)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.symlink_to(site.joinpath(*head))
                    linked.add(head)
                    break


def clean_venv(wheel: Path, where: Path, extras: tuple[str, ...] = EXTRAS) -> Path:
    """A venv with the wheel installed and, on its path, the current venv's distributions that
    ``dualview[<extras>]`` requires (plus NO_DEPS), nothing else of it."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    python = where / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    site = Path(sysconfig.get_paths()["purelib"])
    installed = {canonicalize_name(d.metadata["Name"]): d for d in distributions(path=[str(site)])}
    needed = requirement_closure(wheel_requirements(wheel), extras, installed)
    for name in NO_DEPS:
        if name not in installed:
            raise SystemExit(f"wheel check: the development venv lacks {name} (pip install --no-deps, see README)")
        needed[name] = installed[name]
    deps = where / "dependencies"
    link_distributions(list(needed.values()), [d for n, d in installed.items() if n not in needed], site, deps)
    clean_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    # after the install: pip must not see (and try to replace) the development venv's dualview
    Path(clean_site, "dualview_ci_dependencies.pth").write_text(f"{deps}\n")
    return python


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    # a PYTHONPATH pointing at a checkout would hide what the wheel itself installs
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **(env or {})}
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


def offline_env(home: Path) -> dict[str, str]:
    """No download, and an empty Hugging Face cache: the examples must not need the development one."""
    return {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(home), "OMP_NUM_THREADS": "1"}


def training_recipe(root: Path = ROOT) -> str:
    """docs/training.md's runnable Python blocks (not the fragments), as one script."""
    spec = importlib.util.spec_from_file_location("readme_rules", root / "tests" / "test_readme.py")
    rules = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rules)
    blocks = rules.python_blocks((root / "docs" / "training.md").read_text())
    return "\n\n".join(code for _, code, marker in blocks if marker not in (rules.FRAGMENT, rules.NEEDS_DOWNLOAD))


def examples_and_recipe(wheel: Path, work: Path, root: Path = ROOT) -> list[str]:
    """Run every example and the training recipe, each in a clean venv with the extras it needs
    (EXTRAS, or EXAMPLE_EXTRAS), from copies outside the checkout."""
    cwd = work / "examples-run"
    shutil.copytree(root / "examples", cwd / "examples", ignore=shutil.ignore_patterns("__pycache__", "results*"))
    env = offline_env(cwd / "hf-home")
    venvs = {EXTRAS: work / "venv" / "bin" / "python"}  # main()'s

    def python(extras: tuple[str, ...]) -> str:
        if extras not in venvs:
            venvs[extras] = clean_venv(wheel, work / f"venv-{'-'.join(extras)}", extras)
        return str(venvs[extras])

    ran = []
    for script in sorted((cwd / "examples").glob("*.py")):
        extras = EXAMPLE_EXTRAS.get(script.name, EXTRAS)
        ran.append(timed(f"examples/{script.name} [{','.join(extras)}]", run, [python(extras), str(script)], cwd, env))
    distributed = cwd / "examples" / "distributed" / "train_tiny_llava.py"
    command = [python(EXTRAS), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(distributed),
               "--engine", "ddp", "--steps", "1", "--out", str(cwd / "ddp")]
    ran.append(timed("examples/distributed/train_tiny_llava.py (torchrun, 2 processes, ddp)", run, command, cwd, env))
    recipe = cwd / "training_recipe.py"
    recipe.write_text(training_recipe(root))
    ran.append(timed("docs/training.md's recipe", run, [python(EXTRAS), str(recipe)], cwd, env))
    return ran


def timed(what: str, fn, *args) -> str:
    start = time.perf_counter()
    fn(*args)
    line = f"{what} ({time.perf_counter() - start:.0f} s)"
    print(f"[wheel] ok: {line}", flush=True)
    return line


def main() -> None:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dualview-wheel-") as tmp:
        work = Path(tmp)
        wheel = build_wheel(work)
        check_contents(wheel)
        python = clean_venv(wheel, work / "venv")
        outside = work / "elsewhere"
        outside.mkdir()
        for line in entry_points(python, outside):
            print(f"[wheel] ok: {line}", flush=True)
        examples_and_recipe(wheel, work)
        print(f"[wheel] {wheel.name}: contents, clean install with [{','.join(EXTRAS)}], entry points, examples and "
              f"docs/training.md's recipe ok in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
