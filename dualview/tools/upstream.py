"""``dualview upstream``: put dual view into a checkout of a LLaVA fork, with git.

The patches are package data (``dualview/tools/upstream_patches/*.patch``, made with ``git diff`` against
the commits named in :data:`FORKS`); ``docs/upstream.md`` explains every hunk. Applying one:

1. the folder must be the root of a git checkout of that fork, every file the patch touches must be
   there, and the architecture file must be the fork's own (LLaVA-NeXT's ``llava_arch.py`` has
   ``get_2dPool``, LLaVA-1.5's has not) and not already patched;
2. the working tree must be clean (tracked files), so the change can be reviewed and undone with git;
3. ``git apply --check``; where the fork has drifted from the pinned commit, a 3-way merge instead,
   done in a temporary index (the working tree is not touched until it merged without conflict);
4. the (merged) patch is applied to the working tree, unstaged: ``git diff`` shows it.

Every refusal is an :class:`UpstreamError` with a one-line message.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

PATCH_DIR = Path(__file__).resolve().parent / "upstream_patches"
ARCH_FILE = "llava/model/llava_arch.py"
ALREADY_PATCHED_MARK = "def init_dual_view"
NEXT_MARK = "def get_2dPool"  # LLaVA-NeXT's llava_arch.py has it (video pooling), LLaVA-1.5's has not


INSTALL_FROM = "/path/to/dualview"
"""What the fork's environment installs: dualview from its checkout (or a wheel built from it,
``pip wheel --no-deps /path/to/dualview``); no package index serves it."""


class UpstreamError(ValueError):
    """A fork checkout that the patch cannot be applied to; the message is one line (the command
    prints it, without a traceback, and exits 1)."""


@dataclass(frozen=True)
class Fork:
    """One LLaVA fork the package has a patch for."""

    key: str
    repository: str
    commit: str
    patch_file: str
    is_next: bool
    train_flags: tuple[str, ...]

    @property
    def patch_path(self) -> Path:
        return PATCH_DIR / self.patch_file


FORKS = {
    "llava": Fork(
        key="llava",
        repository="haotian-liu/LLaVA",
        commit="c121f0432da27facab705978f83c4ada465e46fd",
        patch_file="llava.patch",
        is_next=False,
        train_flags=(
            "stage 1 (projector + DEM): --tune_mm_mlp_adapter True --dual_view '{}' --image_aspect_ratio pad",
            "stage 2 (+ LLM): --pretrain_mm_mlp_adapter STAGE1/mm_projector.bin --dual_view '{}' --image_aspect_ratio pad",
        ),
    ),
    "llava-next": Fork(
        key="llava-next",
        repository="LLaVA-VL/LLaVA-NeXT",
        commit="df179663ae8b83207df100a1f7af24caec633ff9",
        patch_file="llava-next.patch",
        is_next=True,
        train_flags=(
            "stage 1 (projector + DEM): --mm_tunable_parts mm_mlp_adapter,mm_spatial_embed --dual_view '{}'",
            "stage 2 (+ LLM): --pretrain_mm_mlp_adapter STAGE1/mm_projector.bin --dual_view '{}' "
            "--mm_tunable_parts mm_mlp_adapter,mm_spatial_embed,mm_language_model",
        ),
    ),
}


@dataclass(frozen=True)
class Outcome:
    """What :func:`apply_patch` did (or, with ``check``, would do)."""

    fork: Fork
    root: Path
    three_way: bool  # the fork had drifted: merged with git apply --3way
    applied: bool  # False with check=True
    changes: tuple[tuple[str, int, int], ...]  # (path, lines added, lines removed)

    def report(self) -> str:
        how = f"with a 3-way merge (the fork has drifted from {self.fork.commit[:12]})" if self.three_way else "cleanly"
        head = f"{'patched' if self.applied else 'would patch'} {self.fork.repository} checkout {self.root} {how}:"
        lines = [head] + [f"  {path}  +{added} -{removed}" for path, added, removed in self.changes]
        if not self.applied:
            lines.append(f"nothing changed (--check); run without --check to apply: dualview upstream {self.fork.key} {self.root}")
            return "\n".join(lines)
        lines += [
            "next:",
            f"  pip install {INSTALL_FROM}   # in the fork's environment (a dualview checkout or a built wheel; "
            "no package index serves dualview): the patched files import it",
            f"  git -C {self.root} diff   # review; git -C {self.root} checkout -- llava undoes it",
            *(f"  {flags}" for flags in self.fork.train_flags),
            "  (dualview's docs/upstream.md explains each hunk, the flags and the checkpoint keys)",
        ]
        return "\n".join(lines)


def fork_named(key: str) -> Fork:
    if key not in FORKS:
        raise UpstreamError(f"fork must be one of {sorted(FORKS)}, got {key!r}")
    return FORKS[key]


def patch_text(key: str) -> str:
    """The shipped patch of a fork (``llava`` or ``llava-next``), as ``git apply`` reads it."""
    return fork_named(key).patch_path.read_text()


def touched_files(patch: str) -> list[str]:
    """Paths a ``git diff`` patch changes, in order."""
    return re.findall(r"^diff --git a/(\S+) b/", patch, flags=re.M)


def _git(root: Path, *args: str, stdin: Optional[str] = None, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            ["git", *args], cwd=root, input=stdin, text=True, capture_output=True, env=env, check=False
        )
    except FileNotFoundError as e:
        raise UpstreamError("the `git` program is needed and was not found on PATH") from e


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


def _checkout_root(folder: Path) -> Path:
    if not folder.is_dir():
        raise UpstreamError(f"FORK_DIR must be a folder (a git checkout of the fork), got {str(folder)!r}")
    top = _git(folder, "rev-parse", "--show-toplevel")
    if top.returncode != 0:
        raise UpstreamError(f"{folder} is not a git checkout: clone the fork with git (the patch is applied, and undone, with git)")
    root = Path(top.stdout.strip()).resolve()
    if root != folder.resolve():
        raise UpstreamError(f"FORK_DIR must be the root of the fork's checkout (the folder holding llava/), got {folder}, inside {root}")
    return root


def _recognise(fork: Fork, root: Path, files: list[str]) -> None:
    """Refuse a checkout that is not ``fork``'s, or already patched."""
    missing = [path for path in files if not (root / path).is_file()]
    if missing:
        raise UpstreamError(f"{root} is not a {fork.repository} checkout: {', '.join(missing)} missing")
    arch = (root / ARCH_FILE).read_text(errors="replace")
    if ALREADY_PATCHED_MARK in arch:
        raise UpstreamError(f"{root} already has dual view ({ARCH_FILE} defines init_dual_view): nothing to do")
    if "class LlavaMetaModel" not in arch or (NEXT_MARK in arch) != fork.is_next:
        other = next(f for f in FORKS.values() if f.is_next != fork.is_next)
        guess = f"; it looks like {other.repository}: dualview upstream {other.key}" if "class LlavaMetaModel" in arch else ""
        raise UpstreamError(f"{ARCH_FILE} in {root} is not {fork.repository}'s{guess}")


def _require_clean(root: Path) -> None:
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    dirty = [line[3:] for line in status.stdout.splitlines() if line.strip()]
    if dirty:
        shown = ", ".join(dirty[:3]) + (f" and {len(dirty) - 3} more" if len(dirty) > 3 else "")
        raise UpstreamError(f"{root} has uncommitted changes ({shown}): commit or stash them first")


def _three_way_merge(root: Path, patch: str, patch_path: Path) -> str:
    """The patch merged with the fork's drifted files, as a diff against HEAD. Done in a temporary
    index: the working tree and the real index are not touched."""
    with tempfile.TemporaryDirectory(prefix="dualview-upstream-") as tmp:
        env = dict(os.environ, GIT_INDEX_FILE=str(Path(tmp) / "index"))
        read = _git(root, "read-tree", "HEAD", env=env)
        if read.returncode != 0:
            raise UpstreamError(f"git read-tree HEAD failed in {root}: {_first_line(read.stderr)}")
        merged = _git(root, "apply", "--cached", "--3way", "-", stdin=patch, env=env)
        if merged.returncode != 0:
            conflicts = sorted(set(line.split("\t", 1)[1] for line in _git(root, "ls-files", "-u", env=env).stdout.splitlines()))
            if conflicts:
                raise UpstreamError(
                    f"the patch conflicts with the fork's own changes in {', '.join(conflicts)}: nothing was changed; "
                    f"to resolve by hand: git -C {root} apply --3way {patch_path}"
                )
            raise UpstreamError(f"the patch does not apply to {root}, even 3-way: {_first_line(merged.stderr)}")
        return _git(root, "diff", "--cached", "HEAD", env=env).stdout


def _numstat(root: Path, patch: str) -> tuple[tuple[str, int, int], ...]:
    stat = _git(root, "apply", "--numstat", "-", stdin=patch)
    rows = (line.split("\t") for line in stat.stdout.splitlines() if line.strip())
    return tuple((path, int(added), int(removed)) for added, removed, path in rows)


def apply_patch(key: str, fork_dir: Path, *, check: bool = False) -> Outcome:
    """Apply the dual-view patch of fork ``key`` (``llava`` or ``llava-next``) to the git checkout at
    ``fork_dir``; with ``check``, only tell whether (and how) it would apply."""
    fork = fork_named(key)
    patch = patch_text(key)
    root = _checkout_root(Path(fork_dir))
    _recognise(fork, root, touched_files(patch))
    _require_clean(root)
    clean = _git(root, "apply", "--check", "-", stdin=patch)
    three_way = clean.returncode != 0
    if three_way:
        patch = _three_way_merge(root, patch, fork.patch_path)
    if not check:
        done = _git(root, "apply", "-", stdin=patch)
        if done.returncode != 0:
            raise UpstreamError(f"git apply failed in {root}: {_first_line(done.stderr)}")
    return Outcome(fork, root, three_way, not check, _numstat(root, patch))


def add_subcommand(subparsers) -> None:
    """``dualview upstream {llava,llava-next} FORK_DIR [--check]`` on the command's subparsers."""
    parser = subparsers.add_parser(
        "upstream", help="apply the dual-view patch to a checkout of a LLaVA fork (git apply, 3-way where it drifted)"
    )
    parser.add_argument(
        "fork", choices=sorted(FORKS), help="; ".join(f"{f.key}: {f.repository}" for f in FORKS.values())
    )
    parser.add_argument("fork_dir", metavar="FORK_DIR", type=Path, help="root of the fork's git checkout (clean tree)")
    parser.add_argument("--check", action="store_true", help="only tell whether and how it applies; change nothing")
    parser.set_defaults(run=_run_command)


def _run_command(args) -> None:
    print(apply_patch(args.fork, args.fork_dir, check=args.check).report())
