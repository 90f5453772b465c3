"""docs/training.md's Python blocks run as written (the warm-start recipe on an HF Trainer, end to end
on a tiny model); a block after ``<!-- readme-test: fragment -->`` (a GPU recipe with ``...``) is only
compiled. The rules are the README's (tests/test_readme.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_readme import FRAGMENT, python_blocks, undefined_names

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"
BLOCKS = python_blocks(DOC.read_text())


def test_the_warm_start_recipe_is_a_block_that_runs():
    runs = [code for _, code, marker in BLOCKS if marker != FRAGMENT]
    assert runs and any('init="identity"' in code and "Trainer(" in code and "dualview.load(" in code for code in runs)


@pytest.mark.parametrize("line, code, marker", BLOCKS, ids=[f"line{line}" for line, _, _ in BLOCKS])
def test_training_doc_block(line, code, marker, tmp_path, monkeypatch):
    compile(code, f"docs/training.md:{line}", "exec")
    if marker == FRAGMENT:
        return
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    assert not undefined_names(code), f"docs/training.md:{line} uses undefined names {sorted(undefined_names(code))}"
    monkeypatch.chdir(tmp_path)  # the recipe writes its checkpoint and Trainer folder here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(code, f"docs/training.md:{line}", "exec"), {"__name__": "__training_doc__"})
