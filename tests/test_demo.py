"""The README's main job runs and reports consistent numbers."""

from __future__ import annotations

import re

import pytest

from dualview import demo
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
    with pytest.raises(ValueError, match="grid must be 'auto' or RxC"):
        demo.main(["--grid", "3by3"])


def test_demo_image_is_deterministic_and_in_range():
    a, b = demo_image(), demo_image()
    assert a.shape == (3, 1000, 1800) and bool((a == b).all())
    assert 0 <= float(a.min()) and float(a.max()) <= 1
