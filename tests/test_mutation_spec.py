"""The mutation check's table stays runnable: every mutant changes text that occurs exactly once in its
file (code that moved leaves no stale mutant behind), ids are unique, and every test file named exists."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mutants() -> list:
    spec = importlib.util.spec_from_file_location("dualview_mutants", ROOT / "tests" / "mutation" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module.MUTANTS


def test_every_mutant_targets_text_found_once_and_names_existing_tests():
    mutants = _mutants()
    stale = [(m.id, m.path) for m in mutants
             if not (ROOT / m.path).is_file() or (ROOT / m.path).read_text(encoding="utf-8").count(m.old) != 1]
    assert not stale, f"mutants whose text is not found exactly once (the code moved: follow it): {stale}"
    assert all(m.old != m.new for m in mutants)
    assert len({m.id for m in mutants}) == len(mutants)
    missing = sorted({t for m in mutants for t in m.tests if not (ROOT / t).is_file()})
    assert not missing, missing
