"""The released INF-LLaVA encode path as a benchmark baseline: the same arithmetic as
``DualViewEncoder.inf_llava`` with the release's execution shape, written from its description
(``tests/fixtures/inf_llava/README.md``, "What the reference computes"):

* the input squashed to ``(R*s, C*s)`` and the thumbnail to ``(s, s)``, bicubic, in float32;
* one tower call per crop position over the whole batch (``2*R*C + 1`` calls: 19 at 3x3), each
  on a slice of the squashed image (strided for the global crops);
* the local and global maps pasted together crop by crop into zero-filled maps;
* one attention call per window (global queries) and per strided group (local queries), each an
  explicit ``softmax(Q K^T / sqrt(d / H)) V`` over a materialised attention matrix;
* the fusion over the whole map, then bilinear resampling to ``out_size`` in float32.

It uses a dualview ``DEM``'s weights (the release's names and shapes), so its output can be checked
against ``DualViewEncoder.inf_llava`` (tests/test_bench.py, float32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dualview import DEM
from dualview import grid as G


def released(tower, crop_size: int, grid: G.Grid, dem: DEM):
    """The scheme: (B, 3, H, W) -> list of B (out_h*out_w, D) token tensors."""
    rows, cols = grid
    s = crop_size

    def run(images: torch.Tensor) -> list[torch.Tensor]:
        big = _bicubic(images, (rows * s, cols * s))
        thumb = _bicubic(images, (s, s))
        local = [tower(big[:, :, r * s:(r + 1) * s, c * s:(c + 1) * s]) for r in range(rows) for c in range(cols)]
        glob = [tower(big[:, :, a::rows, b::cols]) for a in range(rows) for b in range(cols)]
        fused = released_dem(dem, local, glob, grid)
        return list((tower(thumb) + fused) / 2)

    return run


def released_dem(dem: DEM, local: list[torch.Tensor], glob: list[torch.Tensor], grid: G.Grid) -> torch.Tensor:
    """DEM as released: lists of ``R*C`` (B, h*w, D) features, row-major -> (B, out_h*out_w, D)."""
    rows, cols = grid
    batch, tokens, dim = local[0].shape
    h = w = math.isqrt(tokens)
    local_map = local[0].new_zeros(batch, rows * h, cols * w, dim)
    global_map = torch.zeros_like(local_map)
    for r in range(rows):
        for c in range(cols):
            local_map[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = local[r * cols + c].view(batch, h, w, dim)
            global_map[:, r::rows, c::cols] = glob[r * cols + c].view(batch, h, w, dim)
    enhanced_global = torch.zeros_like(local_map)  # global queries over contiguous windows
    enhanced_local = torch.zeros_like(local_map)  # local queries over strided groups
    for r in range(rows):
        for c in range(cols):
            window = (slice(None), slice(r * h, (r + 1) * h), slice(c * w, (c + 1) * w))
            enhanced_global[window] = _attention(dem, global_map[window], local_map[window])
            group = (slice(None), slice(r, None, rows), slice(c, None, cols))
            enhanced_local[group] = _attention(dem, local_map[group], global_map[group])
    mixed = torch.cat((dem.ffn_crop(enhanced_local), dem.ffn_stride(enhanced_global)), dim=-1)
    fused = dem.ln_fuse(mixed + enhanced_global + enhanced_local)
    resized = F.interpolate(fused.permute(0, 3, 1, 2).float(), size=dem.out_size, mode="bilinear", align_corners=False)
    return resized.to(fused.dtype).flatten(2).transpose(1, 2)


def _attention(dem: DEM, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """``LayerNorm(W_o(MHA(W_q q, W_k kv, W_v kv)) + q)`` on (B, h, w, D) blocks, softmax written out."""
    batch, h, w, dim = query.shape
    heads = dem.num_heads
    w_q, w_k, w_v, w_o = dem.attention.linears
    q_tokens, kv_tokens = query.reshape(batch, h * w, dim), context.reshape(batch, h * w, dim)

    def split_heads(x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, H, T, D / H)
        return x.view(batch, h * w, heads, dim // heads).transpose(1, 2)

    q, k, v = split_heads(w_q(q_tokens)), split_heads(w_k(kv_tokens)), split_heads(w_v(kv_tokens))
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(dim // heads)
    attended = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).reshape(batch, h * w, dim)
    return dem.attention.ln(w_o(attended) + q_tokens).view(batch, h, w, dim)


def _bicubic(images: torch.Tensor, size: G.Size) -> torch.Tensor:
    return F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False).to(images.dtype)
