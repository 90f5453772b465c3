"""Finished runs on disk: one JSON file per (arm, seed), written atomically, so an interrupted sweep
resumes where it stopped and a rerun never trains a finished (arm, seed) again."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_target(path: Path):
    """Yield a temporary path in ``path``'s folder; when the block succeeds, rename it onto ``path``
    (one atomic step: readers see the old file or the new one, never a partial one). On an error
    the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: Path, text: str) -> None:
    with atomic_target(path) as tmp:
        tmp.write_text(text)


class RunStore:
    """``folder/<arm>/seed<N>.json``; every file records the config digest it was trained under.

    A file of another digest is an error (the folder holds another experiment); a file that cannot
    be parsed (not written by this class, or damaged) counts as not finished and is trained again.
    """

    def __init__(self, folder: Path, digest: str):
        self.folder, self.digest = Path(folder), digest

    def path(self, arm: str, seed: int) -> Path:
        return self.folder / arm.replace("/", "~") / f"seed{seed}.json"

    def load(self, arm: str, seed: int) -> dict | None:
        path = self.path(arm, seed)
        if not path.exists():
            return None
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            print(f"[ablation] {path} is unreadable ({err}); training it again", file=sys.stderr, flush=True)
            return None
        if run.get("config_digest") != self.digest:
            raise ValueError(f"{path} was trained under config {run.get('config_digest')!r}, this sweep is "
                             f"{self.digest!r}: use another --out (or delete that folder) to run a different config")
        return run

    def save(self, run: dict) -> None:
        write_atomic(self.path(run["arm"], run["seed"]), json.dumps(dict(run, config_digest=self.digest)))
