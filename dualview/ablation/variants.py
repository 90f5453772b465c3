"""The ablation variants and the small model they share.

Every variant hands the same number of tokens to the "LLM side" (a small transformer head): one
crop's ``h*w``. They differ only in what the vision side does (the paper's Tables 4-6 and the usual
baselines):

| name | views through the tower | combined by | thumbnail |
|---|---|---|---|
| resize | thumbnail only | - | yes |
| anyres | local tiles | tile map resampled | yes |
| local_only | local tiles | tile map resampled | no |
| global_only | global crops | interleaved map resampled | no |
| local_plus_global | both | ML + MG, resampled | yes |
| dem_both (INF-LLaVA) | both | DEM, both directions, linear-concat fusion | yes |
| dem_local_to_global / dem_global_to_local | both | DEM, one direction | yes |
| dem_add / dem_conv3x3 | both | DEM, both directions, add / conv3x3 fusion | yes |

"yes" thumbnail: the resampled tokens are averaged with the thumbnail's (INF-LLaVA's mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dualview import DCM, DEM, layout


@dataclass(frozen=True)
class Variant:
    name: str
    views: str  # "thumbnail", "local", "global" or "both"
    combine: str = "none"  # "none", "add" or "dem"
    thumbnail: bool = True
    directions: str = "both"
    fusion: str = "linear_concat"


VARIANTS = {
    v.name: v
    for v in (
        Variant("resize", "thumbnail"),
        Variant("anyres", "local"),
        Variant("local_only", "local", thumbnail=False),
        Variant("global_only", "global", thumbnail=False),
        Variant("local_plus_global", "both", "add"),
        Variant("dem_both", "both", "dem"),
        Variant("dem_local_to_global", "both", "dem", directions="local_to_global"),
        Variant("dem_global_to_local", "both", "dem", directions="global_to_local"),
        Variant("dem_add", "both", "dem", fusion="add"),
        Variant("dem_conv3x3", "both", "dem", fusion="conv3x3"),
    )
}


class SmallViT(nn.Module):
    """Patch embedding + a few transformer layers: (N, 3, s, s) -> (N, (s/p)^2, D)."""

    def __init__(self, crop_size: int, patch_size: int, dim: int, layers: int, heads: int = 4):
        super().__init__()
        self.patch_size = patch_size
        tokens = (crop_size // patch_size) ** 2
        self.embed = nn.Conv2d(3, dim, patch_size, patch_size)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.embed(pixels).flatten(2).transpose(1, 2) + self.pos)


class Head(nn.Module):
    """The stand-in for the LLM: image tokens -> class logits.

    ``"mean"`` (default): LayerNorm, mean over the tokens, a two-layer MLP. ``"transformer"``: a CLS
    token and transformer layers over the tokens (closer to an LLM, but at this scale it did not
    leave chance level within 1000 steps in our calibration, see examples/ablation/README.md).
    """

    def __init__(self, tokens: int, dim: int, layers: int, classes: int, kind: str = "mean", heads: int = 4):
        super().__init__()
        if kind not in ("mean", "transformer"):
            raise ValueError(f"head must be 'mean' or 'transformer', got {kind!r}")
        self.kind = kind
        self.norm = nn.LayerNorm(dim)
        if kind == "transformer":
            self.cls = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
            layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, classes))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.kind == "mean":
            return self.out(self.norm(tokens).mean(1))
        x = torch.cat((self.cls.expand(tokens.shape[0], -1, -1), tokens), dim=1) + self.pos
        return self.out(self.norm(self.blocks(x)[:, 0]))


class AblationModel(nn.Module):
    """DCM -> tower (one call over the crops the variant uses) -> combine -> (h*w) tokens -> head."""

    def __init__(self, variant: Variant, *, crop_size: int, grid: tuple[int, int], patch_size: int, dim: int,
                 tower_layers: int, head_layers: int, classes: int, resample: str = "bilinear", head: str = "mean"):
        super().__init__()
        self.variant = variant
        self.resample = resample
        self.grid = grid
        self.h = self.w = crop_size // patch_size
        self.dcm = DCM(crop_size, grid, fit="squash", thumbnail=variant.thumbnail or variant.views == "thumbnail")
        self.tower = SmallViT(crop_size, patch_size, dim, tower_layers)
        self.dem = None
        if variant.combine == "dem":
            self.dem = DEM(dim, num_heads=4, out_size=(self.h, self.w), directions=variant.directions,
                           fusion=variant.fusion, resample=resample, ffn_hidden=max(dim // 16, 4))
        self.head = Head(self.h * self.w, dim, head_layers, classes, kind=head)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, R*s, C*s) -> (B, h*w, D): the image tokens the head sees."""
        v, (rows, cols) = self.variant, self.grid
        crops = self.dcm(images)
        batch, n = images.shape[0], rows * cols
        parts = []
        if v.views in ("local", "both"):
            parts.append(crops.local_view.flatten(0, 1))
        if v.views in ("global", "both"):
            parts.append(crops.global_view.flatten(0, 1))
        if crops.thumbnail is not None:
            parts.append(crops.thumbnail)
        feats = self.tower(torch.cat(parts)).split([p.shape[0] for p in parts])
        thumb = feats[-1] if crops.thumbnail is not None else None
        if v.views == "thumbnail":
            return thumb
        local = feats[0].unflatten(0, (batch, n)) if v.views in ("local", "both") else None
        glob = feats[-2 if thumb is not None else -1].unflatten(0, (batch, n)) if v.views in ("global", "both") else None
        if v.combine == "dem":
            out = self.dem(local, glob, self.grid)
        else:
            maps = []
            if local is not None:
                maps.append(layout.windows_to_map(local, rows, cols, self.h, self.w))
            if glob is not None:
                maps.append(layout.groups_to_map(glob, rows, cols, self.h, self.w))
            fmap = maps[0] if len(maps) == 1 else maps[0] + maps[1]
            chans_first = fmap.permute(0, 3, 1, 2)
            if self.resample == "bilinear":  # as DEM resamples: the same rule for every variant
                out = F.interpolate(chans_first, size=(self.h, self.w), mode="bilinear", align_corners=False)
            else:
                out = F.adaptive_avg_pool2d(chans_first, (self.h, self.w))
            out = out.permute(0, 2, 3, 1).flatten(1, 2)
        return out if thumb is None or not v.thumbnail else (thumb + out) / 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.tokens(images))

    def tower_passes(self) -> int:
        n = self.grid[0] * self.grid[1]
        views = {"thumbnail": 0, "local": n, "global": n, "both": 2 * n}[self.variant.views]
        return views + int(self.dcm.thumbnail)
