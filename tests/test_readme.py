"""The README's Python blocks run exactly as written.

A block right after the line ``<!-- readme-test: needs-download -->`` needs weights from the Hub: it
is compiled and checked for names used but never defined (the mistake a reader hits first), not run.
A block after ``<!-- readme-test: fragment -->`` continues a context the text describes (``model``
being an adapted model): it is only compiled.
"""

from __future__ import annotations

import builtins
import re
import symtable
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
NEEDS_DOWNLOAD = "<!-- readme-test: needs-download -->"
FRAGMENT = "<!-- readme-test: fragment -->"
FENCE = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.S)


def python_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line number, code, the marker line before it) of each ```python block."""
    return [(text[: m.start("code")].count("\n") + 1, m["code"], m["before"].strip()) for m in FENCE.finditer(text)]


BLOCKS = python_blocks(README.read_text())


def undefined_names(code: str) -> set[str]:
    """Names a module-level block reads but neither assigns, imports nor gets from builtins."""
    table = symtable.symtable(code, "README", "exec")
    defined = {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()}
    used = set()

    def walk(t):
        used.update(s.get_name() for s in t.get_symbols() if s.is_referenced() and (s.is_global() or t is table))
        for child in t.get_children():
            walk(child)

    walk(table)
    return used - defined - set(dir(builtins))


def test_the_readme_has_a_runnable_quickstart():
    assert any(marker not in (NEEDS_DOWNLOAD, FRAGMENT) for _, _, marker in BLOCKS), "the quickstart must run offline"
    assert "from dualview" in BLOCKS[0][1]


def test_undefined_names_are_found():
    assert undefined_names("x = 1\ntokens = encoder(pixels)\n") == {"encoder", "pixels"}
    assert undefined_names("import torch\nf = lambda a: torch.zeros(a)\nprint(f(2))\n") == set()


@pytest.mark.parametrize("line, code, marker", BLOCKS, ids=[f"line{line}" for line, _, _ in BLOCKS])
def test_readme_block(line, code, marker, tmp_path, monkeypatch):
    compile(code, f"README.md:{line}", "exec")
    if marker == FRAGMENT:
        return
    assert not undefined_names(code), f"README.md:{line} uses undefined names {sorted(undefined_names(code))}"
    if marker == NEEDS_DOWNLOAD:
        pytest.skip(f"README.md:{line} downloads weights ({NEEDS_DOWNLOAD})")
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
