"""The context task (a pointer that only the whole image shows, at full resolution), the S2-style
scales arm, and the pre-registered decision rules (Bonferroni-corrected paired intervals)."""

from __future__ import annotations

import pytest
import torch

from dualview.ablation import report, runner
from dualview.ablation.features import ViewFeatures, view_dcm
from dualview.ablation.report import decide, decision_verdict, encode_correct, parse_decision
from dualview.ablation.stats import Interval
from dualview.ablation.task import (CORNERS, GLYPHS, NO_GLYPH, NUM_CLASSES, TaskConfig, _arrow, _paint_mark, make_batch, make_crops,
                                    pointed_region, pointer_crop_mask, pointer_dots, pretext_marks)
from dualview.ablation.tower import TowerConfig, _pointed_targets, pretrain
from dualview.ablation.variants import VARIANTS, VariantModel

CONTEXT = TaskConfig(24, (4, 4), 1, "context", 6)


def _direction(mask: torch.Tensor) -> int:
    """Which corner an arrow mask points to: the quadrant holding most of it (its head)."""
    s = mask.shape[-1]
    ys, xs = mask.nonzero(as_tuple=True)
    dy, dx = ys.float() - (s - 1) / 2, xs.float() - (s - 1) / 2
    counts = [int(((dy * (1 if r else -1) > 0) & (dx * (1 if c else -1) > 0)).sum()) for r, c in ((0, 0), (0, 1), (1, 0), (1, 1))]
    return max(range(4), key=counts.__getitem__)


def _glyph(tile: torch.Tensor) -> int | None:
    """The class of the glyph in a full-resolution tile (3, s, s): exact 1.0 around exact 0.0 ink."""
    ys, xs = ((tile == 1.0).all(0) | (tile == 0.0).all(0)).nonzero(as_tuple=True)
    if len(ys) == 0:
        return None
    top, left = int(ys.min()), int(xs.min())
    ink = (tile[0, top:top + 3, left:left + 3] == 0.0).float()
    return next(k for k in range(NUM_CLASSES) if torch.equal(GLYPHS[k], ink))


def test_the_pointer_is_read_off_the_global_crop_and_the_glyph_off_its_corner_tile():
    images, labels = make_batch(CONTEXT, 32, torch.Generator().manual_seed(3))
    crops = view_dcm(CONTEXT)(images)
    rows = CONTEXT.grid[0]
    for i in range(len(images)):
        marked = (crops.global_view[i, 0, 0] - crops.global_view[i, 0, 1]) > 0.5  # canvas[0::4, 0::4]
        corner = _direction(marked)
        assert torch.equal(marked.float(), pointer_crop_mask(CONTEXT, corner))  # exactly the pretext's pointer
        r, c = CORNERS[corner]
        tile = crops.local_view[i, (r % rows) * rows + (c % rows)]
        assert _glyph(tile) == int(labels[i])
        # the four corner tiles hold the four classes, and no dot; no glyph elsewhere
        classes = {_glyph(crops.local_view[i, (r % rows) * rows + (c % rows)]) for r, c in CORNERS}
        assert classes == set(range(NUM_CLASSES))
        ring = [crops.local_view[i, k] for k in range(rows * rows) if k // rows in (0, rows - 1) or k % rows in (0, rows - 1)]
        assert all(not ((t[0] - t[1]) > 0.5).any() for t in ring)
    # the label is uniform over the corners' classes: all four seen in a batch of 32
    assert set(labels.tolist()) == set(range(NUM_CLASSES))


def test_a_checkerboard_per_block_so_the_thumbnail_does_not_show_the_pointer():
    thumbs, globals_ = [], []
    for corner in range(4):
        ink = pointer_dots(CONTEXT, corner)
        assert ink.shape == (48, 48) and torch.equal(ink.reshape(12, 4, 12, 4).sum((1, 3)), torch.full((12, 12), 8.0))
        for a in range(4):  # every global crop shows the arrow (even a + b) or its negative (odd)
            for b in range(4):
                arrow = _arrow(12, corner)
                assert torch.equal(ink[a::4, b::4], arrow if (a + b) % 2 == 0 else 1 - arrow)
        image = torch.full((1, 3, 96, 96), 0.4)  # no noise, no clamping: the thumbnail is exact up to rounding
        _paint_mark(image[0, :, 24:72, 24:72], ink)
        views = view_dcm(CONTEXT)(image)
        thumbs.append(views.thumbnail)
        globals_.append(views.global_view)
    for k in range(1, 4):
        assert torch.allclose(thumbs[k], thumbs[0], atol=1e-6)  # the same thumbnail for every direction
        assert (globals_[k] - globals_[0]).abs().amax((0, 2, 3, 4)).min() > 0.4  # each global crop shows it


def test_the_context_towers_pretext_names_the_pointers():
    assert pretext_marks(CONTEXT)[6:] == ("pointer_top_left", "pointer_top_right", "pointer_bottom_left",
                                          "pointer_bottom_right")
    assert pretext_marks(TaskConfig(24, (3, 3), 1, snap=6)) == pretext_marks(TaskConfig(24, (3, 3), 1, "arrow", 6))
    crops, glyphs, marks = make_crops(CONTEXT, 200, torch.Generator().manual_seed(0))
    assert set(marks.tolist()) == set(range(10))
    for crop, glyph, mark in zip(crops, glyphs.tolist(), marks.tolist()):
        if mark >= 6 and glyph == NO_GLYPH:  # (a glyph, drawn last, may cover part of the pointer)
            marked = ((crop[0] - crop[1]) > 0.5).float()
            assert any(torch.equal(marked, pointer_crop_mask(CONTEXT, mark - 6, negative)) for negative in (False, True))
    negative = pointer_crop_mask(CONTEXT, 0, True)
    assert torch.equal(negative[6:18, 6:18], 1 - _arrow(12, 0)) and negative.sum() == 144 - _arrow(12, 0).sum()


def test_the_context_tower_learns_which_tokens_are_pointed_at():
    expected = {0: (0, 0), 1: (0, 3), 2: (3, 0), 3: (3, 3)}  # the corner tile is one 6-px patch of the global crop
    for corner, (r, c) in expected.items():
        region = pointed_region(CONTEXT, corner, 6)
        assert region.shape == (4, 4) and region.sum() == 1 and bool(region[r, c])
    marks = torch.tensor([0, 1, 5, 6, 7, 8, 9])  # none, frame, an arrow, then the four pointers
    targets = _pointed_targets(CONTEXT, marks, 6)
    assert targets[:3].sum() == 0
    assert [int(t.nonzero()) for t in targets[3:]] == [0, 3, 12, 15]
    cfg = TowerConfig(crop_size=24, patch_size=6, dim=16, layers=1, glyph_px=1, snap=6, steps=2, batch=8, lr=1e-3,
                      seed=0, held_out=32, pointer_grid=(4, 4))
    _, info = pretrain(cfg)
    assert 0 <= info["pointed_accuracy"] <= 1
    plain = TowerConfig(**dict(cfg.__dict__, pointer_grid=None))
    assert "pointed_accuracy" not in pretrain(plain)[1] and plain.digest() != cfg.digest()


@pytest.mark.parametrize("grid, crop, message", [
    ((4, 3), 24, r"needs a square grid with an even side of at least 4 .* got grid=\(4, 3\)"),
    ((2, 2), 24, r"got grid=\(2, 2\)"),
    ((5, 5), 25, r"got grid=\(5, 5\)"),
    ((6, 6), 32, "needs crop_size divisible by the grid side 6 .* got crop_size=32"),
])
def test_a_grid_the_context_task_cannot_use_is_refused(grid, crop, message):
    with pytest.raises(ValueError, match=message):
        make_batch(TaskConfig(crop, grid, 1, "context", 6), 1, torch.Generator())


def test_s2_concatenates_the_thumbnail_and_the_pooled_tiles_channel_wise():
    side, dim, grid = 3, 8, (2, 2)
    g = torch.Generator().manual_seed(0)
    feats = ViewFeatures(local=torch.randn(2, 4, side * side, dim, generator=g),
                         glob=torch.randn(2, 4, side * side, dim, generator=g), thumbnail=torch.randn(2, side * side, dim, generator=g))
    model = VariantModel(VARIANTS["s2"], resample="avgpool", grid=grid, tokens_side=side, dim=dim, head="mean",
                         head_layers=1, classes=4)
    local_only = VariantModel(VARIANTS["local_only"], resample="avgpool", grid=grid, tokens_side=side, dim=dim,
                              head="mean", head_layers=1, classes=4)
    tokens = model.tokens(feats)
    assert tokens.shape == (2, side * side, 2 * dim)
    assert torch.equal(tokens[..., :dim], feats.thumbnail) and torch.equal(tokens[..., dim:], local_only.tokens(feats))
    assert model.projector[0].in_features == 2 * dim and model(feats).shape == (2, 4)
    assert model.tower_passes() == 5


def _runs(arm: str, rows: list[list[int]]) -> dict[int, dict]:
    return {s: dict(arm=arm, seed=s, correct=encode_correct(torch.tensor(r) > 0)) for s, r in enumerate(rows)}


def test_decisions_read_bonferroni_corrected_intervals():
    n = 400
    half = [[(i + s) % 2 for i in range(n)] for s in range(4)]
    runs = {"dem_both": _runs("dem_both", [[1] * n] * 4), "anyres": _runs("anyres", half),
            "local_only": _runs("local_only", half),
            "s2": _runs("s2", [[(i // 3 + s) % 2 for i in range(n)] for s in range(4)])}
    rules = ("dem_both - anyres", "local_only - anyres", "anyres - dem_both", "s2 - anyres")
    out = decide(runs, rules, resamples=2000, alpha=0.05, margin=0.02)
    assert out["level"] == pytest.approx(1 - 0.05 / 4) and out["correction"] == "bonferroni"
    verdicts = {r["decision"]: r["verdict"] for r in out["rules"]}
    assert verdicts == {"dem_both - anyres": "gain", "local_only - anyres": "no gain", "anyres - dem_both": "loss",
                        "s2 - anyres": "undecided"}
    # the corrected interval is wider than the uncorrected one of the same difference
    one = decide(runs, ("s2 - anyres",), resamples=2000, alpha=0.05, margin=0.02)["rules"][0]["difference"]
    four = next(r for r in out["rules"] if r["decision"] == "s2 - anyres")["difference"]
    assert four["low"] < one["low"] and four["high"] > one["high"]
    assert decide(runs, ("resize - anyres",), resamples=10, alpha=0.05, margin=0.02)["rules"][0]["verdict"] == "missing"


def test_verdicts_at_their_boundaries():
    assert decision_verdict(Interval(0.01, 0.001, 0.03), 0.02) == "gain"
    assert decision_verdict(Interval(-0.01, -0.03, -0.001), 0.02) == "loss"
    assert decision_verdict(Interval(0.0, -0.01, 0.0199), 0.02) == "no gain"
    assert decision_verdict(Interval(0.0, -0.01, 0.02), 0.02) == "undecided"
    assert decision_verdict(Interval(0.0, 0.0, 0.0), 0.02) == "no gain"


def test_bad_decisions_are_refused_with_one_clear_line(capsys):
    with pytest.raises(ValueError, match=r"a decision must read 'ARM - REFERENCE' \(spaces around '-'\), got 'a-b'"):
        parse_decision("a-b")
    with pytest.raises(ValueError, match="both arms must be on one task"):
        parse_decision("dem_both@context - anyres")
    with pytest.raises(ValueError, match="alpha must be in"):
        decide({}, ("dem_both - anyres",), resamples=10, alpha=1.5, margin=0.02)
    with pytest.raises(SystemExit):
        runner.parse_args(["--quick", "--config", str(_config({"arms": ["anyres", "resize"],
                                                               "decisions": ["dem_both - anyres"]}))])
    assert "decision 'dem_both - anyres' names arms that are not in the sweep: ['dem_both']" in capsys.readouterr().err
    # --arms may run a part of the config's arms: the decisions it leaves out read "missing" in the report
    cfg, _ = runner.parse_args(["--quick", "--arms", "anyres", "--config", str(_config(
        {"arms": ["anyres", "dem_both"], "decisions": ["dem_both - anyres"]}))])
    assert cfg.arms == ("anyres",) and cfg.decisions == ("dem_both - anyres",)


def _config(fields: dict):
    import json
    import tempfile
    path = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump(fields, path)
    path.close()
    return path.name


def test_the_decisions_go_into_the_report(tmp_path):
    config = _config({"grid": [4, 4], "pretext_pointer": True, "tower_seeds": [0, 1],
                      "arms": ["anyres@context", "dem_both@context"], "decisions": ["dem_both@context - anyres@context"]})
    result = runner.main(["--config", config, "--quick", "--seeds", "0", "--no-tqdm", "--no-plot",
                          "--out", str(tmp_path / "out"), "--tower-cache", str(tmp_path / "towers")])
    rule = result["decisions"]["rules"][0]
    assert rule["decision"] == "dem_both@context - anyres@context" and rule["seeds"] == [0]
    assert result["decisions"]["level"] == pytest.approx(0.95)
    table = (tmp_path / "out" / "ablation.md").read_text()
    assert "Pre-registered decisions: 1 paired differences, Bonferroni-corrected (95.00% intervals" in table
    assert "| dem_both@context - anyres@context | 1 | " in table and f"**{rule['verdict']}** |" in table
    assert report.parse_decision(rule["decision"]) == ("dem_both@context", "anyres@context")
