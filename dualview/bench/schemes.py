"""The tiling schemes the benchmark compares, each a callable (B, 3, H, W) -> list of B token tensors.

* ``anyres``: plain LLaVA-NeXT AnyRes: base image + ``R*C`` tiles in one tower call, tile map
  unpadded, one newline token per row.
* ``dual_576``: dual view as INF-LLaVA: DEM resampled to the tower's token grid, averaged with the
  thumbnail (as many tokens as LLaVA-1.5).
* ``dual_full``: dual view with DEM's full map, unpadded and newline-packed like AnyRes (exactly
  AnyRes's token count; what the LLaVA-NeXT adapter does).
* ``naive``: the released code's control flow, written here from the algorithm: one tower call
  per crop, one attention call per window and per group, Python loops to cut and paste.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dualview import DCM, DEM, DualViewEncoder, layout
from dualview import grid as G
from dualview.cropping import resize

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


def dual_576(tower: nn.Module, crop_size: int, grid: G.Grid, dem: DEM) -> Scheme:
    encoder = DualViewEncoder(tower, DCM(crop_size, grid, fit="pad"), dem, thumbnail_fusion="mean")
    return lambda images: list(encoder(images))


def dual_full(tower: nn.Module, crop_size: int, grid: G.Grid, dem_full: DEM, newline: torch.Tensor) -> Scheme:
    encoder = DualViewEncoder(tower, DCM(crop_size, grid, fit="pad"), dem_full, thumbnail_fusion="concat")

    def run(images: torch.Tensor) -> list[torch.Tensor]:
        tokens = encoder(images)
        thumb_tokens = tokens.shape[1] // (grid[0] * grid[1] + 1)
        h = w = int(thumb_tokens ** 0.5)
        fused = tokens[:, thumb_tokens:].unflatten(1, (grid[0] * h, grid[1] * w))
        return pack_anyres(tokens[:, :thumb_tokens], fused, tuple(images.shape[-2:]), newline)

    return run


def naive(tower: nn.Module, crop_size: int, grid: G.Grid, dem: DEM) -> Scheme:
    """The released control flow (loops), with dualview's weights so that the output is comparable."""
    dcm = DCM(crop_size, grid, fit="pad")
    rows, cols = grid
    s = crop_size

    def attend_loop(maps_q: torch.Tensor, maps_kv: torch.Tensor, h: int, w: int, strided: bool) -> torch.Tensor:
        out = torch.empty_like(maps_q)
        for a in range(rows):
            for c in range(cols):
                if strided:
                    idx = (slice(None), slice(a, None, rows), slice(c, None, cols))
                else:
                    idx = (slice(None), slice(a * h, (a + 1) * h), slice(c * w, (c + 1) * w))
                q = maps_q[idx].reshape(maps_q.shape[0], h * w, -1)
                kv = maps_kv[idx].reshape(maps_q.shape[0], h * w, -1)
                out[idx] = dem.attention(q, kv).view(maps_q.shape[0], h, w, -1)
        return out

    def run(images: torch.Tensor) -> list[torch.Tensor]:
        canvas, _ = dcm.make_canvas(images, grid)
        local = [canvas[..., r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(rows) for c in range(cols)]
        glob = [canvas[..., a::rows, b::cols] for a in range(rows) for b in range(cols)]
        thumb = resize(images, (s, s), dcm.interpolation, dcm.antialias)
        lf = [tower(x) for x in local]
        gf = [tower(x) for x in glob]
        tf = tower(thumb)
        b, t, d = lf[0].shape
        h = w = int(t ** 0.5)
        ml = torch.zeros(b, rows * h, cols * w, d, dtype=lf[0].dtype, device=lf[0].device)
        mg = torch.zeros_like(ml)
        for r in range(rows):
            for c in range(cols):
                ml[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = lf[r * cols + c].view(b, h, w, d)
                mg[:, r::rows, c::cols] = gf[r * cols + c].view(b, h, w, d)
        eg = attend_loop(mg, ml, h, w, strided=False)
        el = attend_loop(ml, mg, h, w, strided=True)
        out = dem._resample(dem._fuse(el, eg))
        return list((tf + out) / 2)

    return run
