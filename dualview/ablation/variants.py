"""The ablation variants, the arms of a sweep, and the trainable model they share.

Every variant hands the same number of tokens to the "LLM side" (projector + a small head): one
crop's ``h*w``. They differ only in what the vision side does with the frozen tower's tokens (the
paper's Tables 4-6 and the usual baselines):

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
| s2 (S2-style scales) | local tiles | tile map resampled, channel-concatenated with the thumbnail's | concat |

"yes" thumbnail: the resampled tokens are averaged with the thumbnail's (INF-LLaVA's mean). "concat":
each token carries both scales side by side (``2D`` channels; the projector maps them to ``D``), as
S2 (Shi et al., "When Do We Not Need Larger Vision Models?") concatenates the scales' pooled maps.

An *arm* of a sweep is a variant on a task with a resampling rule, written
``variant[/resample][@mark]``: ``dem_both`` (avgpool, frame mark), ``dem_both/bilinear`` (the
released resampling), ``anyres@arrow`` (the layout-heavy arrow mark).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dualview import DEM, layout

from .features import ViewFeatures


@dataclass(frozen=True)
class Variant:
    name: str
    views: str  # "thumbnail", "local", "global" or "both"
    combine: str = "none"  # "none", "add", "dem" or "scales" (channel concat with the thumbnail)
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
        Variant("s2", "local", "scales"),
    )
}


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




BASE_RESAMPLE = "avgpool"
BASE_MARK = "frame"
RESAMPLES = ("avgpool", "bilinear")
MARKS = ("frame", "arrow", "context")


@dataclass(frozen=True)
class Arm:
    """One column of a sweep: a variant, the rule that brings its map to ``h x w``, the task's mark."""

    variant: str
    resample: str = BASE_RESAMPLE
    mark: str = BASE_MARK

    @property
    def name(self) -> str:
        return (self.variant + ("" if self.resample == BASE_RESAMPLE else f"/{self.resample}")
                + ("" if self.mark == BASE_MARK else f"@{self.mark}"))

    @classmethod
    def parse(cls, text: str) -> "Arm":
        """``"variant[/resample][@mark]"`` -> Arm, with one clear error for each bad part."""
        rest, _, mark = text.partition("@")
        variant, _, resample = rest.partition("/")
        if variant not in VARIANTS:
            raise ValueError(f"arm {text!r}: variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        resample = resample or BASE_RESAMPLE
        if resample not in RESAMPLES:
            raise ValueError(f"arm {text!r}: resample (after '/') must be one of {list(RESAMPLES)}, got {resample!r}")
        mark = mark or BASE_MARK
        if mark not in MARKS:
            raise ValueError(f"arm {text!r}: mark (after '@') must be one of {list(MARKS)}, got {mark!r}")
        return cls(variant, resample, mark)

    def reference(self, variant: str) -> "Arm":
        """The arm of ``variant`` on the same task with the base resampling: what this arm is compared with."""
        return Arm(variant, BASE_RESAMPLE, self.mark)


def make_dem(variant: Variant, *, dim: int, tokens_side: int, resample: str) -> DEM:
    """The DEM of a ``combine="dem"`` variant, as every arm builds it (4 heads, output ``h x w``)."""
    return DEM(dim, num_heads=4, out_size=(tokens_side, tokens_side), directions=variant.directions,
               fusion=variant.fusion, resample=resample, ffn_hidden=max(dim // 16, 4))


class VariantModel(nn.Module):
    """The trainable part of one variant: frozen-tower tokens -> combine -> (h*w) tokens -> projector -> head.

    The projector (LLaVA's two-layer MLP, per token) and the head are built first, so under the same
    ``torch.manual_seed`` every variant starts from the same projector and head; the DEM comes after.
    """

    def __init__(self, variant: Variant, *, resample: str, grid: tuple[int, int], tokens_side: int, dim: int,
                 head: str, head_layers: int, classes: int):
        super().__init__()
        if resample not in RESAMPLES:
            raise ValueError(f"resample must be one of {list(RESAMPLES)}, got {resample!r}")
        self.variant, self.resample, self.grid = variant, resample, tuple(grid)
        self.h = self.w = tokens_side
        width = 2 * dim if variant.combine == "scales" else dim  # S2: both scales' channels side by side
        self.projector = nn.Sequential(nn.Linear(width, dim), nn.GELU(), nn.Linear(dim, dim))
        self.head = Head(self.h * self.w, dim, head_layers, classes, kind=head)
        self.dem = make_dem(variant, dim=dim, tokens_side=tokens_side, resample=resample) if variant.combine == "dem" else None

    def tokens(self, feats: ViewFeatures) -> torch.Tensor:
        """The tower's tokens of all views -> (B, h*w, D): the image tokens the projector sees."""
        if self.variant.views == "thumbnail":
            return feats.thumbnail
        out = self.combined(feats)
        if self.variant.combine == "scales":
            return torch.cat((feats.thumbnail, out), dim=-1)
        return (feats.thumbnail + out) / 2 if self.variant.thumbnail else out

    def combined(self, feats: ViewFeatures) -> torch.Tensor:
        """(B, h*w, D): the variant's views combined and brought to ``h x w``, before the thumbnail mean."""
        v, (rows, cols) = self.variant, self.grid
        if v.views == "thumbnail":
            raise ValueError(f"variant {v.name!r} has no views to combine: its tokens are the thumbnail's")
        local = feats.local if v.views in ("local", "both") else None
        glob = feats.glob if v.views in ("global", "both") else None
        if v.combine == "dem":
            out = self.dem(local, glob, self.grid)
        else:
            maps = []
            if local is not None:
                maps.append(layout.windows_to_map(local, rows, cols, self.h, self.w))
            if glob is not None:
                maps.append(layout.groups_to_map(glob, rows, cols, self.h, self.w))
            fmap = rearrange(sum(maps), "b y x d -> b d y x")
            if self.resample == "bilinear":  # as the released DEM resamples: the same rule for every variant
                out = F.interpolate(fmap, size=(self.h, self.w), mode="bilinear", align_corners=False)
            else:
                out = F.adaptive_avg_pool2d(fmap, (self.h, self.w))
            out = rearrange(out, "b d y x -> b (y x) d")
        return out

    def forward(self, feats: ViewFeatures) -> torch.Tensor:
        return self.head(self.projector(self.tokens(feats)))

    def tower_passes(self) -> int:
        """Crops per image that the variant sends through the tower."""
        n = self.grid[0] * self.grid[1]
        views = {"thumbnail": 0, "local": n, "global": n, "both": 2 * n}[self.variant.views]
        return views + int(self.variant.thumbnail or self.variant.views == "thumbnail")
