"""Grid arithmetic against transformers' own LLaVA-NeXT helpers, and the budget formulas."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dualview import grid as G

hf_utils = pytest.importorskip("transformers.image_processing_utils")
from transformers.models.llava_next.modeling_llava_next import unpad_image as hf_unpad_image  # noqa: E402

sizes = st.tuples(st.integers(8, 4000), st.integers(8, 4000))


@given(size=sizes, crop=st.sampled_from([14, 224, 336, 384]), max_tiles=st.integers(1, 12))
def test_select_grid_is_transformers_select_best_resolution(size, crop, max_tiles):
    grids = G.candidate_grids(max_tiles)
    expected = hf_utils.select_best_resolution(size, [(r * crop, c * crop) for r, c in grids])
    rows, cols = G.select_grid(size, crop, grids)
    assert (rows * crop, cols * crop) == tuple(expected)


def test_llava_next_default_pinpoints():
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    grids = G.grids_from_pinpoints(pinpoints, 336)
    assert grids == [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)]
    assert G.select_grid((300, 1000), 336, grids) == (1, 3)
    assert G.select_grid((800, 800), 336, grids) == (2, 2)
    with pytest.raises(ValueError, match="multiple of crop_size=336"):
        G.grids_from_pinpoints([[300, 672]], 336)


@given(size=sizes, canvas=st.tuples(st.integers(1, 6), st.integers(1, 6)), crop=st.sampled_from([14, 336]))
def test_pad_box_is_llava_next_patch_output_size_centred(size, canvas, crop):
    canvas_size = (canvas[0] * crop, canvas[1] * crop)
    box = G.fit_box(size, canvas_size, "pad")
    image = torch.empty(3, *size)
    assert (box.height, box.width) == hf_utils.get_patch_output_size(image, canvas_size, "channels_first")
    # centred, odd margin's extra pixel at the bottom / right, inside the canvas
    assert box.top == (canvas_size[0] - box.height) // 2 and box.left == (canvas_size[1] - box.width) // 2
    assert box.top + box.height <= canvas_size[0] and box.left + box.width <= canvas_size[1]
    # one side fills the canvas; the aspect ratio is kept up to the rounding of one pixel
    assert box.height == canvas_size[0] or box.width == canvas_size[1]
    scale = min(canvas_size[0] / size[0], canvas_size[1] / size[1])
    assert abs(box.height - size[0] * scale) < 1 and abs(box.width - size[1] * scale) < 1


def test_squash_box_is_whole_canvas():
    assert G.fit_box((100, 900), (336, 672), "squash") == G.Box(0, 0, 336, 672)


@given(size=sizes, grid=st.tuples(st.integers(1, 6), st.integers(1, 6)), feat=st.sampled_from([2, 24, 27]))
def test_unpad_box_is_transformers_unpad_image(size, grid, feat):
    fmap = torch.zeros(1, grid[0] * feat, grid[1] * feat)
    expected = hf_unpad_image(fmap, size).shape[1:]
    box = G.unpad_box(size, fmap.shape[1:])
    assert (box.height, box.width) == tuple(expected)


def test_candidate_grids_cover_every_grid_under_the_limit():
    grids = G.candidate_grids(6)
    assert set(grids) == {(r, c) for r in range(1, 7) for c in range(1, 7) if r * c <= 6}
    assert grids[0] == (1, 1)
    assert [r * c for r, c in grids] == sorted(r * c for r, c in grids)


@pytest.mark.parametrize("bad", [(0, 3), (3, -1), (3,), (G.MAX_GRID_SIDE + 1, 1), (2.0, 2), "3x3", (True, 2)])
def test_check_grid_rejects(bad):
    with pytest.raises(ValueError, match="grid must be"):
        G.check_grid(bad)


def test_budgets():
    b = G.dual_view_budget((3, 3), 336, (24, 24), out_size=(24, 24), thumbnail=True, thumbnail_fusion="mean")
    assert (b.tower_passes, b.tokens, b.canvas_size) == (19, 576, (1008, 1008))
    full = G.dual_view_budget((2, 3), 336, (24, 24), out_size=None, thumbnail=True, thumbnail_fusion="concat")
    assert (full.tower_passes, full.tokens) == (13, 576 + 6 * 576)
    with pytest.raises(ValueError, match="feat_size"):
        G.dual_view_budget((2, 2), 336, None, out_size=None, thumbnail=False, thumbnail_fusion="none")
    # AnyRes on a square image: no unpadding, 24*3 rows of 24*3 + 1 tokens plus the base image
    anyres = G.anyres_budget((1008, 1008), (3, 3), 336, (24, 24))
    assert (anyres.tower_passes, anyres.tokens) == (10, 576 + 72 * 73)
    assert G.s2_budget(336, (24, 24)).tower_passes == 5
    assert G.crop_tokens(336, 14) == (24, 24)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        G.crop_tokens(336, 15)
    assert math.prod(G.crop_tokens(384, 16)) == 576
