"""Finished runs on disk: one JSON file per (arm, seed), written atomically, so an interrupted sweep
resumes where it stopped and a rerun never trains a finished (arm, seed) again."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
