"""The tiled engine: dual view for hosts that cut the image into tiles themselves.

A host (LLaVA-NeXT's AnyRes, InternVL, Idefics3, ...) hands its vision tower patches in its own
order: for each image the ``R*C`` tiles of a canvas, row-major, and patches it keeps as they are
(a base image, a thumbnail, an unsplit image). :func:`encode_tiled` gives each image its features
in that same order, the tiles' replaced by the DEM's full map cut back into tile windows:

    tiles --merge_local--> canvas --split_global--> R*C strided global crops
    ONE tower batch (the encoder's chunking): every image's patches in host order, then the global crops
    per grid, ONE DEM call: local map (the tiles) <-> global map (the global crops) -> (R*h, C*w) map
    map --map_to_windows--> R*C windows, put where the tiles were

Precision: the tower's output keeps the tower's precision (pass-through patches reach the host as
the plain host computes them); the DEM's inputs take the DEM's dtype and device; its output takes
the features' back. Under ``init="identity"`` the host's patches run in tower calls of their own
(the plain host's batch: a tower need not give bit-equal features in batches of other sizes) and
the gate blends the tiles' own features with the DEM's, so the gate at 0 gives the host's features.

A tower that keeps its own outputs per crop (the adapters' ``hidden_states`` / ``attentions``) and
has a ``regroup(order)`` method is told the order that gives them back image by image (each image's
patches, then its global crops, :func:`image_order`): a batch's rows then slice like each image's.
The DEM's device is where it computes (:func:`dualview._device.placement`: its hooks' when accelerate
offloaded it).
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from . import grid as G
from ._checks import check_grid
from ._device import placement
from ._zero3 import grid_order, in_lockstep, tie_unused
from . import layout

if TYPE_CHECKING:  # pragma: no cover
    from .encoder import DualViewEncoder


@dataclass(frozen=True)
class TiledImage:
    """One image as its host cut it.

    Args:
        patches: (P, c, s, s), the host's patches of this image in the host's order.
        grid: ``(R, C)`` when ``patches[tiles_at : tiles_at + R*C]`` are the tiles of an ``R*s x C*s``
            canvas, row-major; None: every patch passes through (the tower's own features).
        tiles_at: where the tiles start among the patches (1 after a base image, 0 before a thumbnail).
        masks: (P, s, s) bool pixel masks the tower takes beside the pixels (e.g. Idefics3's padding),
            or None. The global crops' masks are cut from the tiles' as their pixels are.
    """

    patches: torch.Tensor
    grid: Optional[G.Grid] = None
    tiles_at: int = 0
    masks: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        patches = self.patches
        if not isinstance(patches, torch.Tensor) or patches.ndim != 4:
            got = tuple(patches.shape) if isinstance(patches, torch.Tensor) else type(patches).__name__
            raise ValueError(f"TiledImage patches must be (P, c, s, s) crops, got {got}")
        if self.grid is not None:
            rows, cols = check_grid(tuple(self.grid), max_side=None)
            if not (0 <= self.tiles_at and self.tiles_at + rows * cols <= patches.shape[0]):
                raise ValueError(
                    f"TiledImage tiles_at={self.tiles_at} with grid {(rows, cols)} needs {rows * cols} tiles within "
                    f"the {patches.shape[0]} patches"
                )
        if self.masks is not None and tuple(self.masks.shape) != (patches.shape[0], *patches.shape[-2:]):
            raise ValueError(
                f"TiledImage masks must be (P, s, s) = {(patches.shape[0], *patches.shape[-2:])}, got "
                f"{tuple(self.masks.shape)}"
            )

    @property
    def tile_slice(self) -> slice:
        """Where the tiles sit among the patches (empty without a grid)."""
        count = 0 if self.grid is None else self.grid[0] * self.grid[1]
        return slice(self.tiles_at, self.tiles_at + count)


def global_crops(tiles: torch.Tensor, grid: G.Grid) -> torch.Tensor:
    """(R*C, ..., s, s) row-major tiles -> (R*C, ..., s, s) strided crops ``canvas[a::R, b::C]`` of the
    canvas they were cut from, index ``a*C + b`` (pixels (c, s, s) or masks (s, s) alike)."""
    if tiles.ndim == 3:  # masks: a channel of one
        return global_crops(tiles[:, None], grid)[:, 0]
    return layout.split_global(layout.merge_local(tiles[None], *grid), *grid)[0]


def encode_tiled(encoder: "DualViewEncoder", images: Sequence[TiledImage]) -> list[torch.Tensor]:
    """Per image (P_i, h*w, D): its patches' features in the host's order, the tiles' DEM-fused.

    The encoder's DEM must give the full map (``out_size=None``); its tower, DEM, gate and
    ``tower_batch_size`` are used; its DCM only for the crop's token grid."""
    dem = encoder.dem
    if dem.out_size is not None:
        raise ValueError(f"the tiled engine puts the DEM's full map back into the tiles: it needs DEM(out_size=None), "
                         f"got out_size={dem.out_size}")
    images = list(images)
    with_masks = [im.masks is not None for im in images]
    if any(with_masks) and not all(with_masks):
        raise ValueError("TiledImage masks must be given for every image of a call or for none")
    tiled = [i for i, im in enumerate(images) if im.grid is not None]
    counts = [im.patches.shape[0] for im in images]
    host = torch.cat([im.patches for im in images])  # the host's own batch, in its order
    glob = [global_crops(images[i].patches[images[i].tile_slice], images[i].grid) for i in tiled]
    host_masks = torch.cat([im.masks for im in images]) if all(with_masks) and images else None
    glob_masks = ([global_crops(images[i].masks[images[i].tile_slice], images[i].grid) for i in tiled]
                  if host_masks is not None else None)
    feats = _tower_features(encoder, host, glob, host_masks, glob_masks)
    regroup = getattr(encoder.tower, "regroup", None)
    if callable(regroup):  # a tower keeping its own outputs per crop gives them back image by image
        regroup(image_order(counts, {i: g.shape[0] for i, g in zip(tiled, glob)}))
    if feats.shape[-1] != dem.dim:
        raise ValueError(f"the tower returns D={feats.shape[-1]} channels, but the DEM has dim={dem.dim}")
    host_feats, global_feats = feats.split([host.shape[0], feats.shape[0] - host.shape[0]])
    per_image = list(host_feats.split(counts))
    globals_of = dict(zip(tiled, global_feats.split([g.shape[0] for g in glob])))
    h, w = _token_grid(encoder, host.shape[-2:], feats.shape[1])
    # the device the DEM computes on: its weights' or, offloaded by accelerate (weights on "meta"), its hooks'
    device, dtype = placement(dem), next(dem.parameters()).dtype
    by_grid: dict[G.Grid, list[int]] = defaultdict(list)  # images that share a grid form one DEM batch
    for i in tiled:
        by_grid[tuple(images[i].grid)].append(i)
    unused = []
    for grid in grid_order(dem, by_grid):
        members = by_grid.get(grid)
        if members is None:  # ZeRO-3: a grid only other ranks have, run on zeros (batch 1)
            zeros = feats.new_zeros(1, grid[0] * grid[1], h * w, feats.shape[-1])
            unused.append(_fuse_grid(encoder, zeros, zeros, grid, (h, w), device, dtype))
            continue
        local = torch.stack([per_image[i][images[i].tile_slice] for i in members])  # (B, R*C, h*w, D)
        glob_feats = torch.stack([globals_of[i] for i in members])
        windows = _fuse_grid(encoder, local, glob_feats, grid, (h, w), device, dtype)
        for i, tiles in zip(members, windows):
            at = images[i].tile_slice
            per_image[i] = torch.cat((per_image[i][:at.start], tiles, per_image[i][at.stop:]))
    if per_image:
        per_image[0] = tie_unused(per_image[0], unused)
    return per_image


def _fuse_grid(encoder: "DualViewEncoder", local: torch.Tensor, glob_feats: torch.Tensor, grid: G.Grid,
               feat_size: G.Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(B, R*C, h*w, D) twice, the local tiles' and the global crops' features of B images of one grid
    -> (B, R*C, h*w, D) the DEM's map cut into tile windows (gated), in the features' precision."""
    (rows, cols), (h, w) = grid, feat_size
    fused = encoder.dem(local.to(device=device, dtype=dtype), glob_feats.to(device=device, dtype=dtype),
                        (rows, cols), (h, w)).to(local)  # (B, R*h*C*w, D), the canvas map row-major
    windows = layout.map_to_windows(fused.unflatten(1, (rows * h, cols * w)), rows, cols)  # (B, R*C, h*w, D)
    if encoder.gate is not None:  # init="identity": the host's own tile features at g = 0
        windows = encoder.gate(local, windows)
    return windows


def image_order(counts: Sequence[int], globals_of: dict[int, int]) -> list[int]:
    """The rows of the tower batch (every image's ``counts[i]`` patches, then the ``globals_of[i]``
    global crops of each tiled image) image by image: each image's patches, then its global crops."""
    order, glob_at = [], sum(counts)
    for i, (start, count) in enumerate(zip(itertools.accumulate([0, *counts]), counts)):
        order += range(start, start + count)
        order += range(glob_at, glob_at + globals_of.get(i, 0))
        glob_at += globals_of.get(i, 0)
    return order


def _tower_features(
    encoder: "DualViewEncoder", host: torch.Tensor, glob: list[torch.Tensor],
    host_masks: Optional[torch.Tensor], glob_masks: Optional[list[torch.Tensor]],
) -> torch.Tensor:
    """(host patches + global crops, h*w, D): one tower batch, or under ``init="identity"`` the host's
    patches apart (their own calls, the plain host's batch) and then the global crops."""
    if encoder.gate is None:
        pixels = torch.cat([host, *glob])
        masks = None if host_masks is None else torch.cat([host_masks, *glob_masks])
        return encoder.run_tower(pixels, masks)
    parts = [encoder.run_tower(host, host_masks)]
    if glob:
        parts.append(encoder.run_tower(torch.cat(glob), None if glob_masks is None else torch.cat(glob_masks)))
    elif in_lockstep(encoder.tower):  # ZeRO-3: other ranks may make this call; here on dummies only
        parts.append(encoder.run_tower(host[:0], None if host_masks is None else host_masks[:0]))
    return torch.cat(parts)


def _token_grid(encoder: "DualViewEncoder", crop: torch.Size, tokens: int) -> G.Size:
    """``(h, w)`` tokens of one crop of ``crop`` pixels: by the tower's patch size, else a square."""
    patch = encoder.patch_size
    h, w = (crop[0] // patch, crop[1] // patch) if patch else (math.isqrt(tokens),) * 2
    if h * w != tokens:
        raise ValueError(f"the tower gives {tokens} tokens per {tuple(crop)} crop, not the grid {(h, w)} of its patches")
    return h, w
