"""Budgets are what actually happens: the encoder's ``budget()`` against the tokens it returns and
the crops its tower sees, for every scheme and option; ``anyres_budget`` against transformers'
LLaVA-NeXT processor (the count its prompts get) and its unpad; every budget on non-square grids
and non-square token maps."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
import transformers

from dualview import DCM, DEM, DualViewEncoder
from dualview import budget as B
from dualview import grid as G
from dualview.testing import PatchTower

from transformers.models.llava_next.modeling_llava_next import unpad_image as hf_unpad_image

from .tiny_models import IMAGE_TOKEN_ID, pil_image, tokenizer

CROP, PATCH = 28, 14  # 2x2 tokens per crop: small enough to run the encoder for every case
DIM = 8
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


# ---- the encoder's budget is what the encoder does -------------------------------------------------


@st.composite
def encoder_options(draw):
    grid = draw(st.one_of(st.just("auto"), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    thumbnail = draw(st.booleans())
    fusion = draw(st.sampled_from(["mean", "concat", "none"] if thumbnail else ["none"]))
    feat = (CROP // PATCH, CROP // PATCH)
    if fusion == "mean":
        out_size = feat  # averaged with the thumbnail's h x w tokens
    else:
        out_size = draw(st.sampled_from([None, feat, (1, 3), (3, 2)]))
    return dict(
        grid=grid, thumbnail=thumbnail, fusion=fusion, out_size=out_size,
        fit=draw(st.sampled_from(["pad", "squash"])), max_tiles=draw(st.integers(1, 6)),
        size=(draw(st.integers(CROP, 130)), draw(st.integers(8, 130))),
        batch=draw(st.integers(1, 2)),
    )


def build(grid, thumbnail, fusion, out_size, fit, max_tiles, **_):
    torch.manual_seed(0)
    tower = PatchTower(dim=DIM, patch_size=PATCH)
    dcm = DCM(CROP, grid, fit=fit, thumbnail=thumbnail, max_tiles=max_tiles) if grid == "auto" else \
        DCM(CROP, grid, fit=fit, thumbnail=thumbnail)
    dem = DEM(DIM, 2, out_size=out_size)
    return DualViewEncoder(tower, dcm, dem, thumbnail_fusion=fusion), tower


@given(options=encoder_options())
def test_budget_is_what_the_encoder_returns_and_runs_for_every_option(options):
    encoder, tower = build(**options)
    size, batch = options["size"], options["batch"]
    budget = encoder.budget(size)
    with torch.no_grad():
        out = encoder(torch.rand(batch, 3, *size))
        crops = encoder.dcm(torch.rand(1, 3, *size))
    assert out.shape == (batch, budget.tokens, DIM)
    assert tower.calls == 1 and tower.crops == batch * budget.tower_passes
    assert budget.grid == crops.grid
    assert budget.canvas_size == crops.canvas_size == tuple(crops.local_canvas().shape[-2:])


@pytest.mark.parametrize("grid", [(1, 3), (3, 1), (2, 3)])
def test_no_thumbnail_means_no_thumbnail_pass(grid):
    encoder, tower = build(grid, thumbnail=False, fusion="none", out_size=None, fit="pad", max_tiles=9)
    rows, cols = grid
    budget = encoder.budget((60, 70))
    assert (budget.tower_passes, budget.tokens) == (2 * rows * cols, rows * cols * 4)
    assert budget.canvas_size == (rows * CROP, cols * CROP)
    with torch.no_grad():
        assert encoder(torch.rand(1, 3, 60, 70)).shape == (1, budget.tokens, DIM)
    assert tower.crops == 2 * rows * cols


def test_budget_without_a_known_patch_size_asks_for_it_when_the_count_needs_it():
    no_patch = DualViewEncoder(lambda x: x, DCM(CROP), DEM(DIM, 2, out_size=(2, 2)), thumbnail_fusion="concat")
    with pytest.raises(ValueError, match="feat_size"):
        no_patch.budget((100, 100))
    # DEM resampled and no thumbnail tokens: the count does not depend on the tower
    resampled = DualViewEncoder(lambda x: x, DCM(CROP, (2, 3)), DEM(DIM, 2, out_size=(3, 5)), thumbnail_fusion="none")
    assert (resampled.budget((100, 100)).tokens, resampled.budget((100, 100)).tower_passes) == (15, 13)


# ---- AnyRes: anyres_budget is what LLaVA-NeXT's processor counts --------------------------------------


def llava_next_processor(crop=336, patch=14, pinpoints=LLAVA_NEXT_PINPOINTS):
    image_processor = transformers.LlavaNextImageProcessor(
        size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}, image_grid_pinpoints=pinpoints,
    )
    # "full" and no extra token: the count is exactly the image features (base + unpadded map + newlines)
    return transformers.LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer(), patch_size=patch,
        vision_feature_select_strategy="full", num_additional_image_tokens=0,
    )


def test_300x600_on_a_1x2_grid_is_1752_tokens_as_the_processor_counts():
    processor = llava_next_processor()
    inputs = processor(images=[pil_image(300, 600)], text=["USER: <image> what"], return_tensors="pt")
    in_prompt = int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())
    grid = G.select_grid((300, 600), 336, G.grids_from_pinpoints(LLAVA_NEXT_PINPOINTS, 336))
    assert grid == (1, 2)
    assert inputs["pixel_values"].shape[1] == 1 + 2  # base image + 2 tiles
    budget = B.anyres_budget((300, 600), grid, 336, (24, 24))
    # 576 base + 24 rows of 48 tokens + 24 newlines (one per row, not one per column: 1776)
    assert budget.tokens == in_prompt == 576 + 24 * 48 + 24 == 1752
    assert (budget.tower_passes, budget.canvas_size) == (3, (336, 672))


@given(size=st.tuples(st.integers(1, 3000), st.integers(1, 3000)))
def test_anyres_budget_is_the_processors_count_for_any_size(size):
    processor = llava_next_processor()
    expected = processor._get_number_of_features(size[0], size[1], 336, 336)
    grid = G.select_grid(size, 336, G.grids_from_pinpoints(LLAVA_NEXT_PINPOINTS, 336))
    assert B.anyres_budget(size, grid, 336, (24, 24)).tokens == expected


@given(
    size=st.tuples(st.integers(1, 2000), st.integers(1, 2000)),
    grid=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    feat=st.tuples(st.integers(1, 30), st.integers(1, 30)),
)
def test_anyres_budget_on_non_square_token_maps_is_base_plus_unpadded_rows_with_a_newline(size, grid, feat):
    rows, cols = grid
    h, w = feat
    kept = hf_unpad_image(torch.zeros(1, rows * h, cols * w), size).shape[1:]
    budget = B.anyres_budget(size, grid, 336, feat)
    assert budget.tokens == h * w + kept[0] * (kept[1] + 1)
    assert (budget.tower_passes, budget.canvas_size) == (1 + rows * cols, (rows * 336, cols * 336))


# ---- the other schemes, on non-square token maps ---------------------------------------------------------


@pytest.mark.parametrize("feat", [(24, 24), (2, 3), (5, 1)])
def test_resize_and_s2_budgets(feat):
    h, w = feat
    resize = B.resize_budget(336, feat)
    assert (resize.grid, resize.canvas_size, resize.tower_passes, resize.tokens) == ((1, 1), (336, 336), 1, h * w)
    s2 = B.s2_budget(336, feat, scales=(1, 2, 3))
    assert (s2.grid, s2.canvas_size, s2.tower_passes, s2.tokens) == ((3, 3), (1008, 1008), 1 + 4 + 9, h * w)


def test_compare_defaults_to_the_dcms_tile_cap():
    """``compare`` without ``max_tiles`` chooses among the grids a default ``DCM`` considers (9 tiles):
    a 1:12 strip gets a 1x9 grid, not 1x12."""
    size = (336, 12 * 336)
    assert DCM(336, "auto").grid_for(size) == (1, 9)
    rows = {b.scheme: b for b in B.compare(size)}
    assert [rows[s].grid for s in ("anyres", "dual_view", "dual_view_full")] == [(1, 9)] * 3
    assert rows["dual_view"].tower_passes == 2 * 9 + 1


@pytest.mark.parametrize("grid", [(2, 3), (3, 1), (1, 32), (32, 32)])
@pytest.mark.parametrize("feat", [(24, 24), (2, 3)])
def test_dual_view_budget_on_non_square_grids_and_maps(grid, feat):
    rows, cols = grid
    h, w = feat
    full = B.dual_view_budget(grid, 14, feat, out_size=None, thumbnail=True, thumbnail_fusion="concat")
    assert (full.canvas_size, full.tower_passes, full.tokens) == (
        (rows * 14, cols * 14), 2 * rows * cols + 1, rows * cols * h * w + h * w)
    resampled = B.dual_view_budget(grid, 14, feat, out_size=(3, 5), thumbnail=False, thumbnail_fusion="none")
    assert (resampled.tower_passes, resampled.tokens) == (2 * rows * cols, 15)
    mean = B.dual_view_budget(grid, 14, None, out_size=feat, thumbnail=True, thumbnail_fusion="mean")
    assert (mean.tower_passes, mean.tokens) == (2 * rows * cols + 1, h * w)
    with pytest.raises(ValueError, match="feat_size"):
        B.dual_view_budget(grid, 14, None, out_size=(3, 5), thumbnail=True, thumbnail_fusion="concat")
