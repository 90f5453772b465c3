"""The one engine of dual view: one tower batch, one DEM call per grid.

Its input is :class:`TiledImage`s: for each image the ``R*C`` tiles of a canvas, row-major, and patches
kept as they are (a base image, a thumbnail, an unsplit image). Two producers make them: a host that
cuts the image itself (LLaVA-NeXT's AnyRes, InternVL, Idefics3, ...), and the DCM of
:meth:`dualview.DualViewEncoder.forward` (each image its tiles, then its thumbnail). :func:`encode_tiled`:

    tiles --merge_local--> canvas --split_global--> R*C strided global crops
    ONE tower batch (the encoder's chunking): every image's patches in host order, then the global crops
    per grid, ONE DEM call: local map (the tiles) <-> global map (the global crops) -> DEM tokens
    identity gate (init="identity"), then either
      the host's layout: the (R*h, C*w) map --map_to_windows--> R*C windows, put where the tiles were, or
      ``dem_map=True`` (the DCM's): the DEM's tokens as it gives them, fused with the thumbnail

Precision: the tower's output keeps the tower's precision (pass-through patches reach the host as
the plain host computes them); the DEM's inputs take the DEM's dtype and device; its windows take
the features' dtype back. Under ``init="identity"`` the patches whose features the output keeps
(:func:`_kept_rows`) run in tower calls of their own (the plain model's batch: a tower need not give
bit-equal features in batches of other sizes) and the gate blends the host's counterpart with the
DEM's tokens (:func:`_blend`), so the gate at 0 gives the plain model's features.

A tower that keeps its own outputs per crop (the adapters' ``hidden_states`` / ``attentions``) and
has a ``regroup(order)`` method is told the order that gives them back image by image (each image's
patches through its tiles, its global crops, then its other patches, :func:`image_order`): a batch's
rows then slice like each image's. The DEM's device is where it computes
(:func:`dualview._device.placement`: its hooks' when accelerate offloaded it).
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import nn

from . import grid as G
from ._checks import check_grid
from ._zero3 import grid_order, in_lockstep, tie_unused
from . import layout


class Encoder(Protocol):
    """What the engine reads of its :class:`~dualview.DualViewEncoder` (declared here: the encoder's
    module imports this one, not this one the encoder's)."""

    tower: Callable[..., torch.Tensor]
    dem: nn.Module
    gate: Optional[nn.Module]
    patch_size: Optional[int]
    thumbnail_fusion: str

    def run_tower(self, pixels: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor: ...

    def run_dem(self, local: torch.Tensor, glob: torch.Tensor, grid: G.Grid, feat_size: G.Size) -> torch.Tensor: ...


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


def encode_tiled(encoder: Encoder, images: Sequence[TiledImage], *, dem_map: bool = False) -> list[torch.Tensor]:
    """The one engine: per image its features, every crop in ONE tower batch, ONE DEM call per grid.

    Steps: the canvas of each tiled image -> its ``R*C`` strided global crops (:func:`global_crops`);
    the tower over every image's patches (host order), then every global crop; per grid, the DEM on
    (B, R*C, h*w, D) local and global features -> (B, tokens, D); under ``init="identity"`` the gate
    blends them with the host's own (:func:`_blend`).

    ``dem_map=False`` (the hosts' tiles): per image (P_i, h*w, D), its patches' features in the host's
    order, the tiles' replaced by the DEM's full map cut back into tile windows (needs
    ``DEM(out_size=None)``). ``dem_map=True`` (the DCM's images, :meth:`DualViewEncoder.forward`): every
    image is its ``R*C`` tiles (``tiles_at=0``), then its thumbnail or nothing; per image (tokens, D),
    the DEM's output as it gives it (the ``out_size`` map or the full map) fused with the thumbnail by
    ``encoder.thumbnail_fusion``."""
    dem = encoder.dem
    images = list(images)
    _check_images(images, dem, dem_map, encoder.thumbnail_fusion)
    tiled = [i for i, im in enumerate(images) if im.grid is not None]
    counts = [im.patches.shape[0] for im in images]
    glob = [global_crops(images[i].patches[images[i].tile_slice], images[i].grid) for i in tiled]
    pixels = torch.cat([im.patches for im in images] + glob)  # the host's own batch, in its order, then global crops
    masks = None
    if images and images[0].masks is not None:
        glob_masks = [global_crops(images[i].masks[images[i].tile_slice], images[i].grid) for i in tiled]
        masks = torch.cat([im.masks for im in images] + glob_masks)
    feats = _tower_features(encoder, pixels, masks, _kept_rows(images, dem, pixels.shape[0]))
    regroup = getattr(encoder.tower, "regroup", None)
    if callable(regroup):  # a tower keeping its own outputs per crop gives them back image by image
        regroup(image_order(images, {i: g.shape[0] for i, g in zip(tiled, glob)}))
    if feats.shape[-1] != dem.dim:
        raise ValueError(f"the tower returns D={feats.shape[-1]} channels, but the DEM has dim={dem.dim}")
    host_count = sum(counts)
    per_image = list(feats[:host_count].split(counts))
    globals_of = dict(zip(tiled, feats[host_count:].split([g.shape[0] for g in glob])))
    feat_size = _token_grid(encoder, pixels.shape[-2:], feats.shape[1])
    by_grid: dict[G.Grid, list[int]] = defaultdict(list)  # images that share a grid form one DEM batch
    for i in tiled:
        by_grid[tuple(images[i].grid)].append(i)
    unused = []
    for grid in grid_order(dem, by_grid):
        members = by_grid.get(grid)
        if members is None:  # ZeRO-3: a grid only other ranks have, run on zeros (batch 1)
            zeros = feats.new_zeros(1, grid[0] * grid[1], *feats.shape[1:])
            thumb = feats.new_zeros(1, *feats.shape[1:]) if dem_map and counts[0] > _tiles(images[0]) else None
            unused.append(_fuse_grid(encoder, zeros, zeros, thumb, grid, feat_size, dem_map))
            continue
        local = torch.stack([per_image[i][images[i].tile_slice] for i in members])  # (B, R*C, h*w, D)
        glob_feats = torch.stack([globals_of[i] for i in members])
        rest = [per_image[i][images[i].tile_slice.stop:] for i in members]  # dem_map: the thumbnails, or nothing
        thumb = torch.cat(rest) if dem_map and rest[0].shape[0] else None  # (B, h*w, D)
        fused = _fuse_grid(encoder, local, glob_feats, thumb, grid, feat_size, dem_map)
        for i, tokens in zip(members, fused):
            at = images[i].tile_slice
            per_image[i] = tokens if dem_map else torch.cat((per_image[i][:at.start], tokens, per_image[i][at.stop:]))
    if per_image:
        per_image[0] = tie_unused(per_image[0], unused)
    return per_image


def _check_images(images: list[TiledImage], dem: nn.Module, dem_map: bool, thumbnail_fusion: str) -> None:
    """What each mode needs of the images and of the DEM, one clear error each."""
    with_masks = [im.masks is not None for im in images]
    if any(with_masks) and not all(with_masks):
        raise ValueError("TiledImage masks must be given for every image of a call or for none")
    if not dem_map:
        if dem.out_size is not None:
            raise ValueError(f"the tiled engine puts the DEM's full map back into the tiles: it needs DEM(out_size=None), "
                             f"got out_size={dem.out_size}")
        return
    thumbnail = thumbnail_fusion != "none" or (images and images[0].patches.shape[0] > _tiles(images[0]))
    for k, im in enumerate(images):
        want = _tiles(im) + int(thumbnail)
        if im.grid is None or im.tiles_at != 0 or im.patches.shape[0] != want:
            raise ValueError(
                f"dem_map=True takes images of R*C tiles (tiles_at=0) then {'one thumbnail' if thumbnail else 'nothing'}"
                f" (thumbnail_fusion={thumbnail_fusion!r}): image {k} has grid={im.grid}, tiles_at={im.tiles_at} and "
                f"{im.patches.shape[0]} patches, want {want}"
            )


def _tiles(image: TiledImage) -> int:
    return image.tile_slice.stop - image.tile_slice.start


def _kept_rows(images: list[TiledImage], dem: nn.Module, rows: int) -> torch.Tensor:
    """The identity rule: (rows,) bool, the tower-batch rows whose features the output keeps at ``g = 0``:
    every host patch, but not the tiles when the DEM resamples (``out_size``: the thumbnail is the host's
    counterpart, ``"mean"``); never a global crop."""
    kept = torch.zeros(rows, dtype=torch.bool)
    start = 0
    for im in images:
        kept[start:start + im.patches.shape[0]] = True
        if dem.out_size is not None:
            at = im.tile_slice
            kept[start + at.start:start + at.stop] = False
        start += im.patches.shape[0]
    return kept


def _fuse_grid(encoder: Encoder, local: torch.Tensor, glob_feats: torch.Tensor, thumb: Optional[torch.Tensor],
               grid: G.Grid, feat_size: G.Size, dem_map: bool) -> torch.Tensor:
    """One DEM call for the B images of one grid: (B, R*C, h*w, D) twice, the local tiles' and the global
    crops' features (and (B, h*w, D) thumbnails or None) -> ``dem_map``: (B, tokens, D), the DEM's tokens
    fused with the thumbnails (in the DEM's dtype, or the wider one); else (B, R*C, h*w, D), the DEM's full
    map cut into tile windows, in the features' dtype."""
    (rows, cols), (h, w) = grid, feat_size
    tokens = encoder.run_dem(local, glob_feats, grid, feat_size).to(local.device)  # (B, tokens, D)
    if not dem_map:
        tokens = tokens.to(local.dtype)
    if dem_map and encoder.thumbnail_fusion == "mean" and thumb.shape != tokens.shape:
        raise ValueError(
            f"thumbnail_fusion='mean' needs thumbnail tokens {tuple(thumb.shape)} and DEM tokens "
            f"{tuple(tokens.shape)} of one shape: set DEM out_size to the tower's (h, w)"
        )
    tokens = _blend(encoder, tokens, local, thumb, grid, feat_size)
    if not dem_map:
        return layout.map_to_windows(tokens.unflatten(1, (rows * h, cols * w)), rows, cols)  # (B, R*C, h*w, D)
    return fuse_thumbnail(encoder.thumbnail_fusion, tokens, thumb, gated=encoder.gate is not None)


def _blend(encoder: Encoder, tokens: torch.Tensor, local: torch.Tensor, thumb: Optional[torch.Tensor],
           grid: G.Grid, feat_size: G.Size) -> torch.Tensor:
    """The one gate rule: under ``init="identity"`` the DEM's (B, tokens, D) become ``host + g * (dem - host)``,
    host = the plain model's counterpart: the thumbnails (B, h*w, D) when the DEM resamples (``out_size``),
    else the local tiles' features (B, R*C, h*w, D) laid out as the full map, row-major over the canvas."""
    if encoder.gate is None:
        return tokens
    if encoder.dem.out_size is not None:
        return encoder.gate(thumb, tokens)
    return encoder.gate(layout.windows_to_map(local, *grid, *feat_size).flatten(1, 2), tokens)


def fuse_thumbnail(fusion: str, dem_tokens: torch.Tensor, thumb: Optional[torch.Tensor], *, gated: bool = False) -> torch.Tensor:
    """(B, tokens, D) DEM tokens and (B, h*w, D) thumbnail tokens -> the encoder's output by
    ``thumbnail_fusion``: ``"none"`` the DEM's; ``"concat"`` the thumbnail's then the DEM's; ``"mean"``
    ``(thumb + dem) / 2`` -- or, ``gated`` (identity), the DEM's as the gate already blended them."""
    if fusion == "none" or (fusion == "mean" and gated):
        return dem_tokens
    dtype = torch.promote_types(thumb.dtype, dem_tokens.dtype)  # in the wider of the tower's and the DEM's dtypes
    if fusion == "concat":
        return torch.cat((thumb.to(dtype), dem_tokens.to(dtype)), dim=1)
    return (thumb + dem_tokens) / 2  # in the wider of the two dtypes (type promotion)


def image_order(images: Sequence[TiledImage], globals_of: dict[int, int]) -> list[int]:
    """The rows of the tower batch (every image's patches, then the ``globals_of[i]`` global crops of
    each tiled image) image by image: each image's patches up to its tiles' end, its global crops, then
    its other patches (LLaVA: tiles, global crops, thumbnail; AnyRes: base, tiles, global crops)."""
    counts = [im.patches.shape[0] for im in images]
    order, glob_at = [], sum(counts)
    for i, (start, im) in enumerate(zip(itertools.accumulate([0, *counts]), images)):
        split = start + (im.tile_slice.stop if im.grid is not None else counts[i])
        order += range(start, split)
        order += range(glob_at, glob_at + globals_of.get(i, 0))
        order += range(split, start + counts[i])
        glob_at += globals_of.get(i, 0)
    return order


def _tower_features(encoder: Encoder, pixels: torch.Tensor, masks: Optional[torch.Tensor],
                    kept: torch.Tensor) -> torch.Tensor:
    """(N, c, s, s) -> (N, h*w, D): one tower batch; under ``init="identity"`` the ``kept`` rows (the host's,
    :func:`_kept_rows`) in calls of their own first, the plain model's batch (a tower need not give a crop
    bit-equal features in batches of other sizes), then the others, each group in batch order."""
    if encoder.gate is None:
        return encoder.run_tower(pixels, masks)
    parts, rows = [], []
    for group in (kept.nonzero()[:, 0], (~kept).nonzero()[:, 0]):
        if group.numel() or in_lockstep(encoder.tower):  # ZeRO-3: other ranks may make this call; here on no crops
            parts.append(encoder.run_tower(pixels[group], None if masks is None else masks[group]))
            rows.append(group)
    return torch.cat(parts).index_select(0, torch.cat(rows).argsort().to(pixels.device))


def _token_grid(encoder: Encoder, crop: torch.Size, tokens: int) -> G.Size:
    """``(h, w)`` tokens of one crop of ``crop`` pixels: by the tower's patch size, else a square."""
    patch = encoder.patch_size
    h, w = (crop[0] // patch, crop[1] // patch) if patch else (math.isqrt(tokens),) * 2
    if h * w != tokens:
        raise ValueError(f"the tower gives {tokens} tokens per {tuple(crop)} crop, not the grid {(h, w)} of its patches")
    return h, w
