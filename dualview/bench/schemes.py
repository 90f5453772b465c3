"""The tiling schemes the benchmark compares, each a callable (B, 3, H, W) -> list of B token tensors.

* ``anyres``: plain LLaVA-NeXT AnyRes: base image + ``R*C`` tiles in one tower call, tile map
  unpadded, one newline token per row.
* ``dual_576``: dual view as INF-LLaVA: DEM resampled to the tower's token grid, averaged with the
  thumbnail (as many tokens as LLaVA-1.5).
* ``dual_full``: dual view with DEM's full map, unpadded and newline-packed like AnyRes (exactly
  AnyRes's token count; what the LLaVA-NeXT adapter does).
* ``released``: the released INF-LLaVA encode path's execution shape (``released.py``): 19 tower
  calls of the batch at 3x3, one explicit-softmax attention call per window and per group, loops to
  cut and paste, float32 resampling. It replaces the earlier ``naive`` loop, which used dualview's
  batched DEM and so understated the released cost.

The dual schemes take ``DualViewEncoder`` options (``tower_batch_size``, ``compile``) and return
the encoder too, so that the benchmark can time its tower calls alone.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dualview import DCM, DEM, DualViewEncoder, layout
from dualview import grid as G
from dualview.cropping import resize

from .released import released  # noqa: F401  (a scheme like the others)

Scheme = Callable[[torch.Tensor], list[torch.Tensor]]


def pack_anyres(base: torch.Tensor, tile_map: torch.Tensor, image_size: G.Size, newline: torch.Tensor) -> list[torch.Tensor]:
    """LLaVA-NeXT packing: base (B, h*w, D) + unpadded tile map (B, R*h, C*w, D) with a newline
    token after every row -> B tensors of ``anyres_budget(...).tokens`` tokens."""
    box = G.unpad_box(image_size, tuple(tile_map.shape[1:3]))
    rows, cols = box.slices
    kept = tile_map[:, rows, cols]
    nl = newline.to(kept.dtype).expand(*kept.shape[:2], 1, -1)
    packed = torch.cat((kept, nl), dim=2).flatten(1, 2)
    return list(torch.cat((base, packed), dim=1))


def anyres(tower: nn.Module, crop_size: int, grid: G.Grid, newline: torch.Tensor) -> Scheme:
    dcm = DCM(crop_size, grid, fit="pad", thumbnail=True)

    def run(images: torch.Tensor) -> list[torch.Tensor]:
        canvas, _ = dcm.make_canvas(images, grid)
        tiles = layout.split_local(canvas, *grid).flatten(0, 1)
        base = resize(images, (crop_size, crop_size), dcm.interpolation, dcm.antialias)
        feats = tower(torch.cat((base, tiles)))
        b = images.shape[0]
        h = w = int(feats.shape[1] ** 0.5)
        tile_map = layout.windows_to_map(feats[b:].unflatten(0, (b, -1)), *grid, h, w)
        return pack_anyres(feats[:b], tile_map, tuple(images.shape[-2:]), newline)

    return run


def dual_576(tower: nn.Module, crop_size: int, grid: G.Grid, dem: DEM, **options) -> tuple[Scheme, DualViewEncoder]:
    encoder = DualViewEncoder(tower, DCM(crop_size, grid, fit="pad"), dem, thumbnail_fusion="mean", **options)
    return (lambda images: list(encoder(images))), encoder


def dual_full(tower: nn.Module, crop_size: int, grid: G.Grid, dem_full: DEM, newline: torch.Tensor,
              **options) -> tuple[Scheme, DualViewEncoder]:
    encoder = DualViewEncoder(tower, DCM(crop_size, grid, fit="pad"), dem_full, thumbnail_fusion="concat", **options)

    def run(images: torch.Tensor) -> list[torch.Tensor]:
        tokens = encoder(images)
        thumb_tokens = tokens.shape[1] // (grid[0] * grid[1] + 1)
        h = w = int(thumb_tokens ** 0.5)
        fused = tokens[:, thumb_tokens:].unflatten(1, (grid[0] * h, grid[1] * w))
        return pack_anyres(tokens[:, :thumb_tokens], fused, tuple(images.shape[-2:]), newline)

    return run, encoder
