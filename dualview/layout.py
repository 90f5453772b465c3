"""The two dual-view layouts, as einops patterns, for pixels and for features.

Vocabulary: a canvas (or feature map) of ``R x C`` sub-images of ``s x s`` pixels (``h x w`` tokens).

* local layout: sub-image ``(r, c)`` is the contiguous tile ``canvas[r*s:(r+1)*s, c*s:(c+1)*s]``,
  index ``r*C + c``.
* global layout: sub-image ``(a, b)`` is the strided sample ``canvas[a::R, b::C]``, index ``a*C + b``;
  pixel ``(i, j)`` of it is canvas pixel ``(i*R + a, j*C + b)``.

The only difference between the two is the order of the factors of each canvas axis:
``(R s)`` (tile-major) for local, ``(s R)`` (pixel-major) for global. Every split and every merge in
the package goes through these eight functions, so DCM (pixels) and DEM (features) agree by
construction on where each canvas region lives.
"""

from __future__ import annotations

import torch
from einops import rearrange

# Pixels are channel-first: canvas (B, c, R*s, C*s) <-> sub-images (B, R*C, c, s, s).
_PIX_LOCAL = "b c (R s1) (C s2) -> b (R C) c s1 s2"
_PIX_GLOBAL = "b c (s1 R) (s2 C) -> b (R C) c s1 s2"
# Features are channel-last tokens: map (B, R*h, C*w, D) <-> sub-images (B, R*C, h*w, D).
_FEAT_LOCAL = "b (R h) (C w) d -> b (R C) (h w) d"
_FEAT_GLOBAL = "b (h R) (w C) d -> b (R C) (h w) d"


def _inverse(pattern: str) -> str:
    left, right = pattern.split("->")
    return f"{right.strip()} -> {left.strip()}"


def split_local(canvas: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Contiguous tiles of a canvas. (B, c, R*s, C*s) -> (B, R*C, c, s, s)."""
    return rearrange(canvas, _PIX_LOCAL, R=rows, C=cols)


def split_global(canvas: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Strided samples ``canvas[..., a::R, b::C]``. (B, c, R*s, C*s) -> (B, R*C, c, s, s)."""
    return rearrange(canvas, _PIX_GLOBAL, R=rows, C=cols)


def merge_local(crops: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`split_local`. (B, R*C, c, s, s) -> (B, c, R*s, C*s)."""
    return rearrange(crops, _inverse(_PIX_LOCAL), R=rows, C=cols)


def merge_global(crops: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`split_global`. (B, R*C, c, s, s) -> (B, c, R*s, C*s)."""
    return rearrange(crops, _inverse(_PIX_GLOBAL), R=rows, C=cols)


def map_to_windows(fmap: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Contiguous ``h x w`` windows of a feature map. (B, R*h, C*w, D) -> (B, R*C, h*w, D)."""
    return rearrange(fmap, _FEAT_LOCAL, R=rows, C=cols)


def map_to_groups(fmap: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Strided groups ``fmap[a::R, b::C]``. (B, R*h, C*w, D) -> (B, R*C, h*w, D)."""
    return rearrange(fmap, _FEAT_GLOBAL, R=rows, C=cols)


def windows_to_map(tokens: torch.Tensor, rows: int, cols: int, h: int, w: int) -> torch.Tensor:
    """Tiles side by side (local map). (B, R*C, h*w, D) -> (B, R*h, C*w, D)."""
    return rearrange(tokens, _inverse(_FEAT_LOCAL), R=rows, C=cols, h=h, w=w)


def groups_to_map(tokens: torch.Tensor, rows: int, cols: int, h: int, w: int) -> torch.Tensor:
    """Groups interleaved (global map). (B, R*C, h*w, D) -> (B, R*h, C*w, D)."""
    return rearrange(tokens, _inverse(_FEAT_GLOBAL), R=rows, C=cols, h=h, w=w)


def token_permutations(rows: int, cols: int, h: int, w: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors that move tokens between the two sub-image orders of one ``(R*h, C*w)`` map.

    ``g2w[p]``: the position, in global (group) order, of the token at position ``p`` in local
    (window) order; ``w2g`` the other way. ``global_tok[:, g2w]`` are the windows of the global
    map; ``local_tok[:, w2g]`` the strided groups of the local map. Built from the patterns above,
    so they agree with them by construction.
    """
    n = rows * cols * h * w
    ids = torch.arange(n, device=device).view(1, rows * cols, h * w, 1)
    g2w = map_to_windows(groups_to_map(ids, rows, cols, h, w), rows, cols).reshape(n)
    w2g = map_to_groups(windows_to_map(ids, rows, cols, h, w), rows, cols).reshape(n)
    return g2w, w2g


def map_positions_in_window_order(rows: int, cols: int, h: int, w: int, device=None) -> torch.Tensor:
    """(R*h, C*w) long tensor: at map position ``(y, x)``, the position of that token in window
    (local) order, i.e. in ``local_tokens.flatten(1, 2)``."""
    ids = torch.arange(rows * cols * h * w, device=device).view(1, rows * cols, h * w, 1)
    return windows_to_map(ids, rows, cols, h, w)[0, ..., 0]
