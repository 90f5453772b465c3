"""The README's Python blocks run exactly as written.

A block right after the line ``<!-- readme-test: needs-download -->`` needs weights from the Hub: it
is compiled and checked for names used but never defined (the mistake a reader hits first), not run.
A block after ``<!-- readme-test: fragment -->`` continues a context the text describes (``model``
being an adapted model): it is only compiled.
"""

from __future__ import annotations

import ast
import builtins
import importlib
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
def test_readme_block(line, code, marker, tmp_path, monkeypatch, capsys):
    compile(code, f"README.md:{line}", "exec")
    if marker == FRAGMENT:
        return
    assert not undefined_names(code), f"README.md:{line} uses undefined names {sorted(undefined_names(code))}"
    if marker == NEEDS_DOWNLOAD:
        pytest.skip(f"README.md:{line} downloads weights ({NEEDS_DOWNLOAD})")
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out.splitlines()
    for shown in shown_output(code):  # what the README says a print shows is what it prints
        assert shown in printed, f"README.md:{line} shows {shown!r}, but the block printed {printed}"
        printed = printed[printed.index(shown) + 1:]


SHOWN = "# prints: "


def shown_output(code: str) -> list[str]:
    """The lines a block says it prints: each ``# prints: TEXT`` comment line, in order."""
    return [line.strip()[len(SHOWN):] for line in code.splitlines() if line.strip().startswith(SHOWN)]


def test_the_quickstart_shows_what_it_prints():
    runnable = [code for _, code, marker in BLOCKS if marker not in (NEEDS_DOWNLOAD, FRAGMENT)]
    assert any("Budget(scheme='dual_view'" in shown for code in runnable for shown in shown_output(code))


ROOT = README.parent
DOCS = [ROOT / "docs" / "training.md", ROOT / "docs" / "upstream.md", ROOT / "benchmarks" / "README.md"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_docs_python_blocks_compile_and_define_every_name(doc):
    blocks = python_blocks(doc.read_text())
    for line, code, _ in blocks:
        compile(code, f"{doc.name}:{line}", "exec")
        assert not undefined_names(code), f"{doc.name}:{line} uses undefined names {sorted(undefined_names(code))}"


def adapter_rows(text: str) -> list[tuple[str, str]]:
    """(module, image-tokens cell) of each row of the README's adapter table."""
    rows = []
    for row in text.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`dualview\.adapters\.\w+`", cells[1]):
            rows.append((cells[1].strip("`").rsplit(".", 1)[1], cells[3]))
    return rows


def test_the_adapter_table_names_functions_the_adapters_have():
    rows = adapter_rows(README.read_text())
    assert {module for module, _ in rows} >= {"llava15", "hf_llava", "hf_llava_next", "towers"}
    for module, cell in rows:
        source = ROOT / "adapters" / f"{module}.py"
        body = ast.parse(source.read_text()).body
        defined = {node.name for node in body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        # module functions that alias a HostAdapter's methods: `apply, budget = (Adapter.apply, Adapter.budget)`
        targets = [t for node in body if isinstance(node, ast.Assign) for t in node.targets]
        defined |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        # and what it re-exports from its own modules (llava15's processing and checkpoint helpers)
        defined |= {a.asname or a.name for node in body if isinstance(node, ast.ImportFrom) and node.level
                    for a in node.names}
        for name in re.findall(r"\(`(\w+)`\)", cell):  # "576 (`num_image_tokens`)": the function that says it
            assert name in defined, f"README's {module} row names `{name}`, which adapters/{module}.py does not define"


def test_the_benchmark_readme_names_every_package_gpu_sh_needs():
    checked = re.search(r'for n in \((?P<names>[^)]*)\)', (ROOT / "benchmarks" / "gpu.sh").read_text())["names"]
    packages = re.findall(r'"(\w+)"', checked)
    sentence = re.search(r"`gpu.sh` needs only (?P<list>[^(]*)\(", (ROOT / "benchmarks" / "README.md").read_text())["list"]
    assert "safetensors" in packages
    assert sorted(re.findall(r"\w+", sentence.replace(" and ", " "))) == sorted(packages)


NOT_SERVED = re.compile(r"pip install ['\"]?dualview\b")
"""No package index serves dualview: it is installed from a checkout (a path) or a built wheel."""


def test_no_doc_or_message_says_pip_install_dualview_from_an_index():
    files = [README, *DOCS, *sorted((ROOT / "dualview").rglob("*.py")), *sorted((ROOT / "dualview").rglob("*.patch"))]
    for path in files:
        for number, text in enumerate(path.read_text().splitlines(), start=1):
            assert not NOT_SERVED.search(text), f"{path.relative_to(ROOT)}:{number}: {text.strip()}"


def test_the_new_host_recipe_names_hooks_the_base_has_and_an_example_under_100_lines():
    """The README's recipe: every hook and declaration it names is HostAdapter's, and its worked example
    stays an adapter of under 100 lines."""
    from dualview.adapters import interface
    from dualview.adapters.base import HostAdapter

    text = README.read_text(encoding="utf-8")
    recipe = text[text.index("### A new host: the recipe"):text.index("### One entry point")]
    step2 = recipe[recipe.index("2. **The adapter class**"):recipe.index("3. **Tests**")]
    named = set(re.findall(r"`(\w+)(?:\(|`)", step2)) - {"HostAdapter", "apply", "unapply", "encoder_of",
                                                             "from_pretrained"}
    user_api = {"budget", "load", "save_adapter"}
    missing = sorted(n for n in named if not hasattr(HostAdapter, n) and n not in HostAdapter.__annotations__
                     and n not in interface.__all__ and n not in interface.GuardsDualViewModules.__annotations__
                     and n not in user_api)
    assert named and not missing, missing
    step1 = recipe[recipe.index("1. **The dual-view class**"):recipe.index("2. **The adapter class**")]
    for module, name in re.findall(r"`dualview\.adapters\.(\w+)\.(\w+)`", step1) + re.findall(r"`(base)\.(\w+)`", step1):
        assert hasattr(importlib.import_module(f"dualview.adapters.{module}"), name), (module, name)
    from dualview.adapters._hf import ExtraInputHost

    assert "`dualview_input`" in step1 and "dualview_input" in ExtraInputHost.__annotations__
    example = re.search(r"The worked example is `(adapters/\w+\.py)`", recipe).group(1)
    assert len((ROOT / example).read_text(encoding="utf-8").splitlines()) < 100
