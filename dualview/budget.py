"""Per-image cost of the tiling schemes side by side: tower passes and LLM tokens, computed, never run.

The dual-view rows come from :meth:`DualViewEncoder.budget` itself, so this table, the CLI and the
encoder can never disagree.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from . import grid as G
from .cropping import DCM
from .encoder import DualViewEncoder
from .enhance import DEM


def _no_tower(pixels: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("budget encoders never run their tower")


def compare(
    image_size: G.Size,
    *,
    crop_size: int = 336,
    patch_size: int = 14,
    grid: G.GridSpec = "auto",
    max_tiles: int = 9,
) -> list[G.Budget]:
    """Budgets of plain resize, S2 (scales 1, 2), AnyRes, dual view (DEM to one crop's tokens,
    averaged with the thumbnail) and dual view with the full map (+ thumbnail) for one image."""
    size = G.check_size(tuple(image_size), "image_size")
    feat = G.crop_tokens(crop_size, patch_size)
    dcm = DCM(crop_size, grid, max_tiles=max_tiles)
    chosen = dcm.grid_for(size)
    dual = DualViewEncoder(_no_tower, dcm, DEM(8, 8, out_size=feat), patch_size=patch_size)
    full = DualViewEncoder(_no_tower, dcm, DEM(8, 8, out_size=None), thumbnail_fusion="concat", patch_size=patch_size)
    return [
        G.resize_budget(crop_size, feat),
        G.s2_budget(crop_size, feat),
        G.anyres_budget(size, chosen, crop_size, feat),
        dual.budget(size),
        replace(full.budget(size), scheme="dual_view_full"),
    ]


def table(budgets: list[G.Budget]) -> str:
    """A fixed-width text table of budgets."""
    lines = [f"{'scheme':<16}{'grid':>6}{'tower passes':>14}{'LLM tokens':>12}"]
    for b in budgets:
        lines.append(f"{b.scheme:<16}{f'{b.grid[0]}x{b.grid[1]}':>6}{b.tower_passes:>14}{b.tokens:>12}")
    return "\n".join(lines)
