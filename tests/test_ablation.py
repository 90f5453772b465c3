"""The ablation toolkit: a two-step run of every variant, and a task whose labels an oracle can read."""

from __future__ import annotations

import json

import torch

from dualview.ablation import runner
from dualview.ablation.task import CORNERS, GLYPHS, TaskConfig, make_batch
from dualview.ablation.variants import VARIANTS


def oracle(image: torch.Tensor, cfg: TaskConfig) -> int:
    """Read the answer off the full-resolution image: the arrow's head (the larger half of its
    pixels) marks a corner; the ink of the glyph there names the class."""
    s, (rows, cols) = cfg.crop_size, cfg.grid
    marked = (image[0] - image[1]) > 0.5  # the mark: red up, green down

    def tile(r, c):
        return (slice((r % rows) * s, (r % rows + 1) * s), slice((c % cols) * s, (c % cols + 1) * s))

    if cfg.mark == "arrow":
        ys, xs = marked[tile(rows // 2, cols // 2)].nonzero(as_tuple=True)
        dy, dx = ys.float() - (s - 1) / 2, xs.float() - (s - 1) / 2
        counts = [int(((dy * (1 if r else -1) > 0) & (dx * (1 if c else -1) > 0)).sum()) for r, c in ((0, 0), (0, 1), (1, 0), (1, 1))]
    else:
        counts = [int(marked[tile(r, c)].sum()) for r, c in CORNERS]
    r, c = CORNERS[max(range(4), key=counts.__getitem__)]
    region = image[(slice(None),) + tile(r, c)]
    white = (region == 1.0).all(0)  # the glyph's square: exact 1.0 around exact 0.0 ink
    ys, xs = (white | (region == 0.0).all(0)).nonzero(as_tuple=True)
    g = 3 * cfg.glyph_px
    top, left = int(ys.min()), int(xs.min())
    ink = (region[0, top:top + g:cfg.glyph_px, left:left + g:cfg.glyph_px] == 0.0).float()
    return next(k for k in range(len(GLYPHS)) if torch.equal(GLYPHS[k], ink))


def test_task_is_reproducible_and_its_labels_are_readable_at_full_resolution():
    for cfg in (TaskConfig(24, (3, 3), 1), TaskConfig(32, (3, 3), 2, "arrow"), TaskConfig(24, (3, 3), 2)):
        a, la = make_batch(cfg, 16, torch.Generator().manual_seed(3))
        b, lb = make_batch(cfg, 16, torch.Generator().manual_seed(3))
        assert torch.equal(a, b) and torch.equal(la, lb)
        assert a.shape == (16, 3, 3 * cfg.crop_size, 3 * cfg.crop_size)
        assert [oracle(img, cfg) for img in a] == la.tolist()


def test_two_steps_of_every_variant(tmp_path):
    result = runner.main(["--steps", "2", "--seeds", "0,1", "--eval-samples", "8", "--batch", "4", "--out", str(tmp_path)])
    names = [r["variant"] for r in result["summary"]]
    assert names == list(VARIANTS)
    for row in result["summary"]:
        assert len(row["accuracies"]) == 2 and all(0 <= a <= 1 for a in row["accuracies"])
        assert row["tokens"] == result["summary"][0]["tokens"]  # one token budget for all
    passes = {r["variant"]: r["tower_passes"] for r in result["summary"]}
    assert passes["resize"] == 1 and passes["anyres"] == 10 and passes["local_only"] == 9 and passes["dem_both"] == 19
    data = json.loads((tmp_path / "ablation.json").read_text())
    assert data["command"].startswith("python -m dualview.ablation --steps 2")
    assert "| dem_both |" in (tmp_path / "ablation.md").read_text()
    assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG"


def test_runs_data_parallel_under_torchrun(tmp_path):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dualview.ablation",
           "--steps", "2", "--seeds", "0", "--eval-samples", "8", "--batch", "4", "--variants", "dem_both,anyres",
           "--out", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "ablation.json").read_text())
    assert data["world_size"] == 2 and data["command"].startswith("torchrun --nproc_per_node=2 -m dualview.ablation")
    assert [r["variant"] for r in data["summary"]] == ["dem_both", "anyres"]
