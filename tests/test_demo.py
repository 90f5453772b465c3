"""The README's main job runs and reports consistent numbers."""

from __future__ import annotations

import re
import sys

import pytest

from dualview.tools import demo
from dualview.sample import demo_image

pytest.importorskip("transformers")


def test_demo_prints_grid_crops_passes_and_tokens(capsys):
    demo.main([])
    out = capsys.readouterr().out
    assert "grid             2x4 (auto)" in out
    assert "both reassemble the same canvas bit-exactly: True" in out
    assert re.search(r"tower\s+17 crops in 1 call\(s\)", out)
    assert "output           (1, 576, 64)" in out
    assert re.search(r"dual_view\s+2x4\s+17\s+576", out)


def test_demo_fixed_grid_and_bad_grid(capsys):
    demo.main(["--grid", "1x2", "--crop-size", "112"])
    assert "grid             1x2 (1x2)" in capsys.readouterr().out
    for bad in ("3by3", "0x3", "3x"):  # a malformed command line: argparse's usage error, exit 2
        with pytest.raises(SystemExit) as exit_info:
            demo.main(["--grid", bad])
        assert exit_info.value.code == 2
        assert f"argument --grid: must be 'auto' or RxC with R and C in 1..32, like 3x3, got {bad!r}" in capsys.readouterr().err


def test_demo_without_transformers_is_one_line_naming_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if dualview[hf] were not installed
    with pytest.raises(SystemExit) as exit_info:
        demo.main([])
    message = str(exit_info.value.code)
    assert message.startswith("python -m dualview.tools.demo: error:") and "\n" not in message
    assert "needs transformers" in message and "dualview[hf]" in message
    assert not capsys.readouterr().out  # nothing was computed


def test_demo_image_is_deterministic_and_in_range():
    a, b = demo_image(), demo_image()
    assert a.shape == (3, 1000, 1800) and bool((a == b).all())
    assert 0 <= float(a.min()) and float(a.max()) <= 1
