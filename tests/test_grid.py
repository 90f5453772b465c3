"""Grid arithmetic against transformers' own LLaVA-NeXT helpers, and the budget formulas."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
import transformers.image_processing_utils as hf_utils
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
from transformers.models.llava_next.modeling_llava_next import unpad_image as hf_unpad_image

from dualview import _checks as checks
from dualview import budget as B
from dualview import grid as G

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
        checks.check_grid(bad)


def test_budgets():
    b = B.dual_view_budget((3, 3), 336, (24, 24), out_size=(24, 24), thumbnail=True, thumbnail_fusion="mean")
    assert (b.tower_passes, b.tokens, b.canvas_size) == (19, 576, (1008, 1008))
    full = B.dual_view_budget((2, 3), 336, (24, 24), out_size=None, thumbnail=True, thumbnail_fusion="concat")
    assert (full.tower_passes, full.tokens) == (13, 576 + 6 * 576)
    with pytest.raises(ValueError, match="feat_size"):
        B.dual_view_budget((2, 2), 336, None, out_size=None, thumbnail=False, thumbnail_fusion="none")
    # AnyRes on a square image: no unpadding, 24*3 rows of 24*3 + 1 tokens plus the base image
    anyres = B.anyres_budget((1008, 1008), (3, 3), 336, (24, 24))
    assert (anyres.tower_passes, anyres.tokens) == (10, 576 + 72 * 73)
    assert B.s2_budget(336, (24, 24)).tower_passes == 5
    assert G.crop_tokens(336, 14) == (24, 24)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        G.crop_tokens(336, 15)
    assert math.prod(G.crop_tokens(384, 16)) == 576


# ---- pinned examples: the ties and rounding edges a random search rarely finds ---------------------


LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@pytest.mark.parametrize("size", [(336, 336), (100, 100), (1, 1), (250, 250)])
def test_exact_ties_go_to_the_first_candidate_as_in_transformers(size):
    """A square image fits (1, 2) and (2, 1) equally well (same pixels kept, same waste): the first
    pinpoint wins, so LLaVA-NeXT's default pinpoints give (1, 2), as transformers picks."""
    grids = G.grids_from_pinpoints(LLAVA_NEXT_PINPOINTS, 336)
    assert G.select_grid(size, 336, grids) == (1, 2)
    assert tuple(hf_utils.select_best_resolution(size, LLAVA_NEXT_PINPOINTS)) == (336, 672)
    assert tuple(get_anyres_image_grid_shape(list(size), LLAVA_NEXT_PINPOINTS, 336)) == (1, 2)


@given(
    size=st.one_of(
        st.tuples(st.integers(1, 400), st.integers(1, 400)),  # upscaled: every canvas keeps all pixels
        st.integers(1, 12).map(lambda k: (k * 168, k * 168)),  # square: many exact ties
        sizes,
    ),
    order=st.permutations(range(len(LLAVA_NEXT_PINPOINTS))),
)
def test_select_grid_equals_transformers_for_any_pinpoint_order(size, order):
    """Ties are frequent with small or square images; whatever the order of the pinpoints, the
    choice is transformers' (the first of the tied candidates)."""
    pinpoints = [LLAVA_NEXT_PINPOINTS[i] for i in order]
    best = hf_utils.select_best_resolution(size, pinpoints)
    assert G.select_grid(size, 336, G.grids_from_pinpoints(pinpoints, 336)) == (best[0] // 336, best[1] // 336)


def test_effective_pixels_round_each_side_down_as_transformers():
    # int(w*s) * int(h*s), not int(w*s*h*s): the latter picks (3, 2) here
    grids = G.candidate_grids(6)
    assert G.select_grid((325, 318), 14, grids) == (2, 2)
    assert tuple(hf_utils.select_best_resolution((325, 318), [(r * 14, c * 14) for r, c in grids])) == (28, 28)


def test_candidate_grids_order_fewer_tiles_then_fewer_rows():
    assert G.candidate_grids(4) == [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (2, 2), (4, 1)]
    assert G.candidate_grids(1) == [(1, 1)]
    # square image, no (1, 1) among ties of equal area: the wide grid comes first
    assert G.select_grid((100, 100), 336, G.candidate_grids(4)[1:3]) == (1, 2)


def test_candidate_grids_reach_the_maximum_side():
    grids = G.candidate_grids(G.MAX_GRID_SIDE + 8)
    assert (1, G.MAX_GRID_SIDE) in grids and (G.MAX_GRID_SIDE, 1) in grids
    assert all(max(g) <= G.MAX_GRID_SIDE for g in grids)
    with pytest.raises(ValueError, match="max_tiles must be a positive int, got 0"):
        G.candidate_grids(0)


@pytest.mark.parametrize(
    "size, map_size, box",
    [
        # 375 * 72 / 1000 = 26.999999999999996 in floating point: LLaVA-NeXT's round(., 7) makes it 27,
        # so 22 padding tokens go on each side and 28 of 72 columns (rows) stay; without it 26 would
        ((1000, 375), (72, 72), G.Box(0, 22, 72, 28)),
        ((375, 1000), (72, 72), G.Box(22, 0, 28, 72)),
        # odd padding (24 - 21 = 3): one token off each side, 22 rows stay (not new_h = 21)
        ((300, 1000), (24, 72), G.Box(1, 0, 22, 72)),
        ((1000, 300), (72, 24), G.Box(0, 1, 72, 22)),
        # the map's own aspect ratio: nothing removed
        ((600, 300), (48, 24), G.Box(0, 0, 48, 24)),
    ],
)
def test_unpad_rounding_edges_equal_transformers(size, map_size, box):
    assert G.unpad_box(size, map_size) == box
    assert tuple(hf_unpad_image(torch.zeros(1, *map_size), size).shape[1:]) == (box.height, box.width)


@pytest.mark.parametrize(
    "size, canvas, box",
    [
        # 300 * 1008 / 1000 = 302.4 -> ceil 303; odd margin 33: 16 above, 17 below
        ((300, 1000), (336, 1008), G.Box(16, 0, 303, 1008)),
        ((1000, 300), (1008, 336), G.Box(0, 16, 1008, 303)),
        ((10, 10), (336, 672), G.Box(0, 168, 336, 336)),
    ],
)
def test_pad_box_rounding_edges_equal_transformers(size, canvas, box):
    assert G.fit_box(size, canvas, "pad") == box
    image = torch.empty(3, *size)
    assert hf_utils.get_patch_output_size(image, canvas, "channels_first") == (box.height, box.width)


def test_squash_box_on_a_non_square_canvas():
    assert G.fit_box((900, 100), (672, 336), "squash") == G.Box(0, 0, 672, 336)


# ---- both ends of every documented range -------------------------------------------------------------


@pytest.mark.parametrize("good", [(1, 1), (1, G.MAX_GRID_SIDE), (G.MAX_GRID_SIDE, 1), (32, 32), [2, 3]])
def test_check_grid_accepts_both_ends(good):
    assert G.MAX_GRID_SIDE == 32
    assert checks.check_grid(good) == tuple(good)


@pytest.mark.parametrize(
    "text, grid", [("auto", "auto"), ("3x3", (3, 3)), ("2X5", (2, 5)), ("1x32", (1, 32)), ("32x1", (32, 1))]
)
def test_parse_grid(text, grid):
    assert G.parse_grid(text) == grid


@pytest.mark.parametrize("text", ["33x1", "0x2", "2x3x4", "x3", "3x", "3", "3x-1", "AUTO", "2.0x3"])
def test_parse_grid_rejects(text):
    with pytest.raises(ValueError, match="grid must be"):
        G.parse_grid(text)


@pytest.mark.parametrize("bad", [(0, 5), (5, 0), (-1, 5), (5,), (2.0, 3), (True, 3), None])
def test_check_size_rejects(bad):
    with pytest.raises(ValueError, match="out_size must be a \\(height, width\\) pair of positive ints"):
        checks.check_size(bad, "out_size")


def test_check_size_accepts_the_smallest():
    assert checks.check_size((1, 1), "x") == (1, 1) and checks.check_size([3, 2], "x") == (3, 2)


def test_pinpoints_must_be_multiples_of_the_crop_on_both_sides():
    with pytest.raises(ValueError, match="multiple of crop_size=336"):
        G.grids_from_pinpoints([[336, 500]], 336)
    with pytest.raises(ValueError, match="non-empty"):
        G.grids_from_pinpoints([], 336)
    assert G.grids_from_pinpoints([[336 * 32, 336]], 336) == [(32, 1)]
    with pytest.raises(ValueError, match="pinpoints entry as grid"):
        G.grids_from_pinpoints([[336 * 33, 336]], 336)
