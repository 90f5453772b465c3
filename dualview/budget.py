"""Token and tower-pass budgets: what one image costs under each tiling scheme, computed, never run.

:class:`Budget` and the per-scheme formulas (dual view, AnyRes, resize, S2) live here, and
:func:`compare` puts them side by side; its dual-view rows come from :func:`dual_view_budget`, the
formula :meth:`DualViewEncoder.budget` itself returns, so this table, the CLI and the encoder can
never disagree (this module imports no encoder: the encoder imports it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

from ._checks import check_size
from .cropping import DCM
from .grid import Grid, GridSpec, Size, crop_tokens, unpad_box


@dataclass(frozen=True)
class Budget:
    """What one image costs: sub-images through the vision tower and tokens handed to the LLM."""

    scheme: str
    grid: Grid
    canvas_size: Size
    tower_passes: int
    tokens: int


def dual_view_budget(
    grid: Grid,
    crop_size: int,
    feat_size: Size | None,
    *,
    out_size: Size | None,
    thumbnail: bool,
    thumbnail_fusion: str,
) -> Budget:
    """Budget of dual view at a known grid: ``2*R*C (+1 thumbnail)`` passes.

    Tokens: ``out_h*out_w`` (DEM resampled) or ``R*h*C*w`` (full map), plus ``h*w`` thumbnail
    tokens with ``thumbnail_fusion="concat"``. ``feat_size`` ``(h, w)`` may be None only when the
    token count does not depend on it.
    """
    rows, cols = grid
    need_feat = out_size is None or thumbnail_fusion == "concat"
    if need_feat and feat_size is None:
        raise ValueError(
            "feat_size (tokens per crop, (h, w)) is needed for this budget: pass patch_size or "
            "feat_size to the encoder, or use a tower with a patch_size attribute"
        )
    if out_size is not None:
        dem_tokens = out_size[0] * out_size[1]
    else:
        dem_tokens = rows * cols * feat_size[0] * feat_size[1]
    thumb_tokens = feat_size[0] * feat_size[1] if thumbnail_fusion == "concat" else 0
    return Budget(
        scheme="dual_view",
        grid=grid,
        canvas_size=(rows * crop_size, cols * crop_size),
        tower_passes=2 * rows * cols + int(thumbnail),
        tokens=dem_tokens + thumb_tokens,
    )


def anyres_budget(image_size: Size, grid: Grid, crop_size: int, feat_size: Size, *,
                  max_patches: int | None = None) -> Budget:
    """Plain AnyRes: base image + ``R*C`` tiles; the tile map (:func:`anyres_map_size`) plus one newline
    per row. ``max_patches``: OneVision's ``anyres_max_N`` (scheme ``"anyres_max"``); None: LLaVA-NeXT's."""
    rows, cols = grid
    h, w = feat_size
    height, width = anyres_map_size(image_size, grid, feat_size, max_patches=max_patches)
    return Budget(
        scheme="anyres" if max_patches is None else "anyres_max",
        grid=grid,
        canvas_size=(rows * crop_size, cols * crop_size),
        tower_passes=1 + rows * cols,
        tokens=h * w + height * (width + 1),
    )


def anyres_map_size(image_size: Size, grid: Grid, feat_size: Size, *, max_patches: int | None = None) -> Size:
    """``(H'', W'')``: the tile tokens AnyRes packs for one image. The ``(R*h, C*w)`` map is unpadded to
    ``(H', W')`` (:func:`~dualview.grid.unpad_box`); with ``max_patches`` (OneVision) a map of
    ``ratio = sqrt(H'*W' / (max_patches*h*w)) > 1.1`` is downscaled to ``(floor(H'/ratio), floor(W'/ratio))``,
    as the host's ``pack_image_features`` does."""
    rows, cols = grid
    h, w = feat_size
    box = unpad_box(image_size, (rows * h, cols * w))
    if max_patches is not None:
        ratio = math.sqrt(box.height * box.width / (max_patches * h * w))
        if ratio > 1.1:
            return int(box.height // ratio), int(box.width // ratio)
    return box.height, box.width


def resize_budget(crop_size: int, feat_size: Size) -> Budget:
    """Plain LLaVA-1.5: the image resized to one crop."""
    return Budget("resize", (1, 1), (crop_size, crop_size), 1, feat_size[0] * feat_size[1])


def s2_budget(crop_size: int, feat_size: Size, scales: Sequence[int] = (1, 2)) -> Budget:
    """S2-style multi-scale: each scale ``k`` is cut into ``k*k`` crops; the maps are pooled back to
    one crop's token grid and concatenated on channels, so the token count stays ``h*w``."""
    top = max(scales)
    return Budget(
        "s2",
        (top, top),
        (top * crop_size, top * crop_size),
        sum(k * k for k in scales),
        feat_size[0] * feat_size[1],
    )


def compare(
    image_size: Size,
    *,
    crop_size: int = 336,
    patch_size: int = 14,
    grid: GridSpec = "auto",
    max_tiles: int = 9,
) -> list[Budget]:
    """Budgets of plain resize, S2 (scales 1, 2), AnyRes, dual view (DEM to one crop's tokens,
    averaged with the thumbnail) and dual view with the full map (+ thumbnail) for one image."""
    size = check_size(tuple(image_size), "image_size")
    feat = crop_tokens(crop_size, patch_size)
    dcm = DCM(crop_size, grid, max_tiles=max_tiles)
    chosen = dcm.grid_for(size)
    return [
        resize_budget(crop_size, feat),
        s2_budget(crop_size, feat),
        anyres_budget(size, chosen, crop_size, feat),
        dual_view_budget(chosen, crop_size, feat, out_size=feat, thumbnail=True, thumbnail_fusion="mean"),
        replace(dual_view_budget(chosen, crop_size, feat, out_size=None, thumbnail=True, thumbnail_fusion="concat"),
                scheme="dual_view_full"),
    ]


def table(budgets: list[Budget]) -> str:
    """A fixed-width text table of budgets."""
    lines = [f"{'scheme':<16}{'grid':>6}{'tower passes':>14}{'LLM tokens':>12}"]
    for b in budgets:
        lines.append(f"{b.scheme:<16}{f'{b.grid[0]}x{b.grid[1]}':>6}{b.tower_passes:>14}{b.tokens:>12}")
    return "\n".join(lines)
