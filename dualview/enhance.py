"""DEM, the Dual-perspective Enhancement Module: local and global feature maps attend to each other.

Weight names are those of the released INF-LLaVA ``SpatialEmbed`` (``attention.linears.{0..3}``,
``attention.ln``, ``ffn_crop``, ``ffn_stride``, ``ln_fuse``), so a released checkpoint loads with
``load_state_dict`` unchanged (see :meth:`DEM.from_inf_llava`).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Final, Literal, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import grid as G
from ._checks import check_grid, check_positive_int, check_size
from . import layout
from ._checks import check_bool, check_choice, check_float_tensor, check_number, check_out_size, check_same_shape
from ._device import placement

if TYPE_CHECKING:
    from os import PathLike

Directions = Literal["both", "local_to_global", "global_to_local"]
Fusion = Literal["linear_concat", "add", "conv3x3"]
Resample = Optional[Literal["bilinear", "avgpool"]]
DIRECTIONS = ("both", "local_to_global", "global_to_local")
FUSIONS = ("linear_concat", "add", "conv3x3")
RESAMPLES = ("bilinear", "avgpool", None)


class CrossAttention(nn.Module):
    """``A(q, kv) = LayerNorm(W_o(MHA(W_q q, W_k kv, W_v kv)) + q)``, the block INF-LLaVA shares
    between both directions. Runs as one ``scaled_dot_product_attention`` over all sequences.

    Shapes: q (N, T, D), kv (N, S, D) -> (N, T, D).
    """

    fused_attn: Final[bool]

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        eps: float = 1e-5,
        fused_attn: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
        self.num_heads = num_heads
        self.fused_attn = fused_attn
        # W_q, W_k, W_v, W_o in one ModuleList: the released checkpoint's layout.
        self.linears = nn.ModuleList(nn.Linear(dim, dim, device=device, dtype=dtype) for _ in range(4))
        self.ln = nn.LayerNorm(dim, eps=eps, device=device, dtype=dtype)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        w_q, w_k, w_v, w_o = self.linears
        heads = "n t (h d) -> n h t d"
        query = rearrange(w_q(q), heads, h=self.num_heads)
        if _bare_linear(w_k) and _bare_linear(w_v):
            # K and V read the same tokens: one (D -> 2D) matmul instead of two
            kv_proj = F.linear(kv, torch.cat((w_k.weight, w_v.weight)), torch.cat((w_k.bias, w_v.bias)))
        else:  # wrapped layers (LoRA, hooks) run their own forward
            kv_proj = torch.cat((w_k(kv), w_v(kv)), dim=-1)
        key, value = rearrange(kv_proj, "n t (two h d) -> two n h t d", two=2, h=self.num_heads)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(query, key, value)
        else:  # the reference formula, for debugging and comparison
            scores = query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1])
            out = scores.softmax(dim=-1) @ value
        return self.ln(w_o(rearrange(out, "n h t d -> n t (h d)")) + q)


def _bare_linear(layer: nn.Module) -> bool:
    """``layer`` is an ``nn.Linear`` whose own forward is all that runs on a call: no forward hooks and
    no forward replaced on the instance (accelerate's offloading hooks load the weights there)."""
    return (type(layer) is nn.Linear and "forward" not in vars(layer)
            and not (layer._forward_hooks or layer._forward_pre_hooks))


# The readable path cuts a map into its parts with one pattern each; the sub-images go into the
# batch, so that one attention call runs over all of them: (B, R*h, C*w, D) -> (B*R*C, h*w, D).
_WINDOWS = "b (R h) (C w) d -> (b R C) (h w) d"  # window (r, c) = map[r*h:(r+1)*h, c*w:(c+1)*w]
_GROUPS = "b (h R) (w C) d -> (b R C) (h w) d"  # strided group (a, b) = map[a::R, b::C]


class _IndexPlan(NamedTuple):
    """The fast path's index tensors for one input shape (see ``_build_index_plan``)."""

    g2w: torch.Tensor  # window order <- group order
    w2g: torch.Tensor  # group order <- window order
    q_rows: Optional[torch.Tensor]  # rows of cat(local, global) that are the queries ("both")
    keep: Optional[torch.Tensor]  # window-order positions the resampling samples, or None
    g2w_kept: torch.Tensor  # g2w at `keep`


_MAX_PLANS = 32  # plans remembered, all DEMs of the process together; more shapes rebuild past that


def _build_index_plan(
    rows: int, cols: int, h: int, w: int, batch: int, device: torch.device,
    both: bool, strides: Optional[tuple[int, int]],
) -> _IndexPlan:
    """The fast path's index tensors: the two token permutations, for ``both`` the query rows of
    both directions, for sampling ``strides`` (``DEM._sample_strides``) the sampled positions."""
    g2w, w2g = layout.token_permutations(rows, cols, h, w, device)
    q_rows = None
    if both:
        # the queries of both directions as rows of kv = cat(local, global): the windows of MG
        # (global tokens in window order) for the first B, the groups of ML (local tokens in
        # group order) for the rest
        n = rows * cols * h * w
        first = torch.arange(batch, device=device).unsqueeze(1) * n
        q_rows = torch.cat(((first + batch * n) + g2w, first + w2g)).flatten()
    keep = None
    if strides is not None:  # window-order positions of the sampled tokens, row-major over the output
        ky, kx = strides
        keep = layout.map_positions_in_window_order(rows, cols, h, w, device)[ky // 2::ky, kx // 2::kx].flatten()
    return _IndexPlan(g2w, w2g, q_rows, keep, g2w if keep is None else g2w[keep])


@functools.lru_cache(maxsize=_MAX_PLANS)
def _cached_index_plan(
    rows: int, cols: int, h: int, w: int, batch: int, device: torch.device,
    both: bool, strides: Optional[tuple[int, int]],
) -> _IndexPlan:
    """``_build_index_plan``, remembered: a pure function of its arguments, the device among them
    (index tensors do not depend on the features' dtype). The tensors are shared by every call
    with the same arguments: only read them (``index_select``), never write into them."""
    # normal tensors even under inference_mode: the plan outlives this call and may be used by a
    # later call that autograd records (inference tensors cannot be saved for backward)
    with torch.inference_mode(False):
        return _build_index_plan(rows, cols, h, w, batch, device, both, strides)


def _index_plan(
    rows: int, cols: int, h: int, w: int, batch: int, like: torch.Tensor,
    both: bool, strides: Optional[tuple[int, int]],
) -> _IndexPlan:
    """The plan for features ``like``: cached for plain tensors of concrete shape (in eager mode
    rebuilding it costs a dozen tiny kernel launches per call, which dominates at batch 1); built
    in place, every call, under torch.compile, fake or symbolic tracing (make_fx, export) and on
    the meta device, where nothing may be kept."""
    device = like.device
    if torch.compiler.is_compiling() or type(like) is not torch.Tensor or not isinstance(batch, int) or device.type == "meta":
        return _build_index_plan(rows, cols, h, w, batch, device, both, strides)
    return _cached_index_plan(rows, cols, h, w, batch, device, both, strides)


def _autocast_accepts(x: torch.Tensor, local_dtype: torch.dtype) -> bool:
    """Whether features of ``x.dtype`` may meet weights of another dtype: under ``torch.autocast``
    for ``x``'s device, features in the autocast dtype are accepted (local and global alike), as
    torch modules accept them: the matmuls then run in the autocast dtype."""
    device_type = x.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError, RuntimeError):  # torch < 2.4, or a device autocast does not know
        return False
    return bool(enabled) and x.dtype == dtype and local_dtype == dtype


def _cls_hint(tokens: int) -> Optional[str]:
    """For ``tokens = n*n + 1``: the extra token is almost surely a ViT's CLS token."""
    side = math.isqrt(tokens - 1)
    if tokens > 1 and side * side == tokens - 1:
        return (
            f"{tokens} = {side}x{side} patches + 1, likely the vision tower's CLS token: drop it "
            "(feats[:, :, 1:], or select='patch' in dualview.adapters.towers.vision_tower)"
        )
    return None


def _ffn(dim: int, hidden: int, out: int, device, dtype) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, hidden, device=device, dtype=dtype),
        nn.GELU(),
        nn.Linear(hidden, out, device=device, dtype=dtype),
    )


class DEM(nn.Module):
    """Dual-perspective Enhancement Module.

    The local sub-images' tokens are laid side by side into the local map ``ML`` and the global
    sub-images' tokens interleaved into the global map ``MG``; both are ``(R*h, C*w)`` maps in
    which the same position holds the same canvas region. Then, with one shared attention block:

    * global <- local (``"local_to_global"``): each contiguous ``h x w`` window of ``MG`` queries
      the same window of ``ML`` (local detail enhances global context), giving ``EG``;
    * local <- global (``"global_to_local"``): each strided group ``map[a::R, b::C]`` of ``ML``
      queries the same group of ``MG`` (whole-image context enhances each local token), giving
      ``EL``.

    ``directions`` names the flow of information ``source_to_target``; a direction left out keeps
    its raw map (``EL = ML`` or ``EG = MG``).
    Fusion (released ``"linear_concat"``):
    ``LN(concat(FFN_crop(EL), FFN_stride(EG)) + EG + EL)``; ``"add"``: ``LN(EL + EG)``;
    ``"conv3x3"``: ``LN(Conv3x3(concat(EL, EG)) + EG + EL)``. Finally the fused map is resampled
    to ``out_size`` in float32 (``"bilinear"`` as released, align_corners=False; ``"avgpool"``:
    adaptive average pooling; ``None``: no resampling, ``out_size`` must then equal the map size).
    ``forward`` computes these steps as written, each over all windows or groups at once. The fast
    path (``fast=True``, the default) gives the same output faster: index plans cached per input
    shape, both directions in ONE attention call, and, where bilinear resampling by an odd integer
    factor reads single tokens (the released 72 -> 24 at 3x3), a token-wise fusion of those tokens
    only (1/9 of the fusion work). tests/test_enhance.py checks the two paths agree on every option.

    Args:
        dim: ``D``, channels of the vision tower's tokens.
        num_heads: attention heads (8 in the release).
        out_size: ``(out_h, out_w)`` of the output map (an int ``n`` means ``(n, n)``), or None
            for the full fused map.
        directions: ``"both"``, ``"local_to_global"`` or ``"global_to_local"``.
        fusion: ``"linear_concat"``, ``"add"`` or ``"conv3x3"``.
        resample: ``"bilinear"``, ``"avgpool"`` or None.
        ffn_hidden: hidden width of the fusion FFNs (released: ``dim // 16``).
        eps: LayerNorm epsilon.
        fused_attn: use ``scaled_dot_product_attention`` (else the explicit softmax formula).
        fast: run the fast path (see above); False runs the paper's steps as written. Not a
            weight: a checkpoint loads into either.

    Shapes:
        forward(local_feats (B, R*C, h*w, D), global_feats (B, R*C, h*w, D), grid=(R, C))
        -> (B, out_h*out_w, D), or (B, R*h*C*w, D) row-major over the canvas with out_size=None.
        Both inputs must have the module's dtype and device; the output has them too.

    Numerics (measured, tests/test_reliability.py): the same weights in bfloat16 stay within 0.06
    max abs error of float32 (0.011 measured at dim 64, 0.033 at dim 256, on LayerNorm-scaled
    outputs), float16 within 0.01 (0.0015 / 0.005). The resampling runs in float32 (float64 stays
    float64), as released. Zero, constant and large (|x| <= 1e4) inputs give finite outputs.
    """

    fast: Final[bool]

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        out_size: Union[G.Size, int, None] = (24, 24),
        directions: Directions = "both",
        fusion: Fusion = "linear_concat",
        resample: Resample = "bilinear",
        ffn_hidden: Optional[int] = None,
        eps: float = 1e-5,
        fused_attn: bool = True,
        fast: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive_int(dim, "dim")
        check_positive_int(num_heads, "num_heads")
        check_choice(directions, "directions", DIRECTIONS)
        check_choice(fusion, "fusion", FUSIONS)
        check_choice(resample, "resample", RESAMPLES)
        check_positive_int(ffn_hidden, "ffn_hidden", allow_none=True)  # with any fusion, not only where it is read
        eps = check_number(eps, "eps", positive=True)
        check_bool(fused_attn, "fused_attn")
        self.dim = dim
        self.out_size = check_out_size(out_size)  # an int n is a square map (n, n), as a command line means
        self.directions = directions
        self.fusion = fusion
        self.resample = resample
        self.fast = check_bool(fast, "fast")
        self.attention = CrossAttention(dim, num_heads, eps=eps, fused_attn=fused_attn, device=device, dtype=dtype)
        if fusion == "linear_concat":
            if dim % 2:
                raise ValueError(f"fusion='linear_concat' concatenates two dim//2 halves: dim must be even, got {dim}")
            hidden = check_positive_int(ffn_hidden if ffn_hidden is not None else max(dim // 16, 1), "ffn_hidden")
            self.ffn_crop = _ffn(dim, hidden, dim // 2, device, dtype)
            self.ffn_stride = _ffn(dim, hidden, dim // 2, device, dtype)
        elif fusion == "conv3x3":
            self.fuse_conv = nn.Conv2d(2 * dim, dim, kernel_size=3, padding=1, device=device, dtype=dtype)
        self.ln_fuse = nn.LayerNorm(dim, eps=eps, device=device, dtype=dtype)

    @property
    def num_heads(self) -> int:
        return self.attention.num_heads

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, out_size={self.out_size}, "
            f"directions={self.directions!r}, fusion={self.fusion!r}, resample={self.resample!r}, fast={self.fast}"
        )

    def output_tokens(self, grid: G.Grid, feat_size: G.Size) -> int:
        """Tokens per image for a grid and a per-crop token grid ``(h, w)``."""
        if self.out_size is None:
            return grid[0] * grid[1] * feat_size[0] * feat_size[1]
        return self.out_size[0] * self.out_size[1]

    def forward(
        self,
        local_feats: torch.Tensor,
        global_feats: torch.Tensor,
        grid: G.Grid,
        feat_size: Optional[G.Size] = None,
    ) -> torch.Tensor:
        """(B, R*C, h*w, D) twice -> (B, out_h*out_w, D): the paper's steps, each over all windows or
        groups at once. ``fast`` (the default) computes the same with ``_forward_fast``."""
        rows, cols = check_grid(grid, max_side=None)  # any grid an image was cut into
        h, w = self._check_inputs(local_feats, global_feats, rows * cols, feat_size)
        if self.fast:
            return self._forward_fast(local_feats, global_feats, rows, cols, h, w)
        # 1. the maps, (B, R*h, C*w, D): ML has the local tiles side by side, MG the global samples interleaved
        ml, mg = self._maps(local_feats, global_feats, rows, cols, h, w)
        el, eg = ml, mg  # a direction left out keeps its raw map
        # 2. global <- local: each h x w window of MG queries the same window of ML -> EG
        if self.directions != "global_to_local":
            eg = self._attend_parts(mg, ml, _WINDOWS, R=rows, C=cols, h=h, w=w)
        # 3. local <- global: each strided group map[a::R, b::C] of ML queries the same group of MG -> EL
        if self.directions != "local_to_global":
            el = self._attend_parts(ml, mg, _GROUPS, R=rows, C=cols, h=h, w=w)
        # 4. fuse EL and EG, token by token (conv3x3: over 3x3 neighbourhoods of the map)
        fused = self._fuse(el, eg)
        # 5. resample the fused map to out_size, in float32 as released, and flatten it row-major
        return self._resample(fused)

    def _attend_parts(self, q_map: torch.Tensor, kv_map: torch.Tensor, parts: str, **sizes: int) -> torch.Tensor:
        """The shared attention block between matching parts of two (B, R*h, C*w, D) maps: ``parts``
        cuts a map into R*C sequences of h*w tokens (``_WINDOWS`` or ``_GROUPS``); the result is
        put back in place."""
        out = self.attention(rearrange(q_map, parts, **sizes), rearrange(kv_map, parts, **sizes))
        return rearrange(out, layout._inverse(parts), b=q_map.shape[0], **sizes)  # each part back in place

    def _forward_fast(
        self, local_feats: torch.Tensor, global_feats: torch.Tensor, rows: int, cols: int, h: int, w: int
    ) -> torch.Tensor:
        """``forward``'s result, computed faster: cached index plans, both directions in ONE
        attention call, and, where the resampling reads single tokens, the fusion at those tokens only."""
        crops = rows * cols
        batch, n = local_feats.shape[0], crops * h * w
        # Work in the local (window) token order: local_feats already is it, and a window of the
        # global map is a gather of global_feats; token-wise steps do not care about the order.
        strides = self._sample_strides((rows * h, cols * w))
        plan = _index_plan(rows, cols, h, w, batch, local_feats, self.directions == "both", strides)
        local_tok, global_tok = local_feats.flatten(1, 2), global_feats.flatten(1, 2)  # (B, R*C*h*w, D)
        if self.directions == "both":  # one attention call for both directions
            kv = torch.cat((local_feats, global_feats))  # (2B, R*C, h*w, D): keys of MG windows, then of ML groups
            q = kv.flatten(0, 2).index_select(0, plan.q_rows).view(2 * batch * crops, h * w, -1)
            e_global, e_local = self.attention(q, kv.flatten(0, 1)).view(2, batch, n, -1).unbind(0)
        elif self.directions == "local_to_global":
            e_global = self._attend(global_tok.index_select(1, plan.g2w), local_feats)
        else:
            e_local = self._attend(local_tok.index_select(1, plan.w2g), global_feats)
        # EG and EL in window order, at the positions `keep` only where the resampling samples tokens
        keep = plan.keep
        if self.directions == "global_to_local":
            eg = global_tok.index_select(1, plan.g2w_kept)
        else:
            eg = e_global if keep is None else e_global.index_select(1, keep)
        if self.directions == "local_to_global":
            el = local_tok if keep is None else local_tok.index_select(1, keep)
        else:
            el = e_local.index_select(1, plan.g2w_kept)
        if keep is not None:  # already the output tokens, row-major over the output map
            return self._fuse(el, eg)
        # (B, R*C*h*w, D) window order -> (B, R*h, C*w, D) map
        to_map = lambda t: layout.windows_to_map(t.unflatten(1, (crops, h * w)), rows, cols, h, w)  # noqa: E731
        if self.fusion == "conv3x3":
            fused = self._fuse(to_map(el), to_map(eg))
        else:
            fused = to_map(self._fuse(el, eg))
        return self._resample(fused)

    def _attend(self, q_tok: torch.Tensor, kv_feats: torch.Tensor) -> torch.Tensor:
        """Fast path, one direction: q (B, R*C*h*w, D) in sub-image order over kv (B, R*C, h*w, D) -> (B, R*C*h*w, D)."""
        batch, crops = kv_feats.shape[:2]
        out = self.attention(q_tok.unflatten(1, (crops, -1)).flatten(0, 1), kv_feats.flatten(0, 1))
        return out.unflatten(0, (batch, crops)).flatten(1, 2)

    def _sample_strides(self, map_size: G.Size) -> Optional[tuple[int, int]]:
        """``(ky, kx)`` where the resampling of a ``map_size`` map reads single tokens, else None.

        Bilinear resampling (align_corners=False) by an odd integer factor ``k`` samples at
        ``k*i + k//2``, a token centre, with weight exactly 1: the released 72 -> 24 at 3x3 keeps
        1 token in 9. With a token-wise fusion, fusing only those tokens gives the same output
        (for finite values) and skips 8/9 of the fusion and the float32 round trip of the map."""
        if self.out_size is None or self.resample != "bilinear" or self.fusion == "conv3x3":
            return None
        (map_h, map_w), (out_h, out_w) = map_size, self.out_size
        if map_h % out_h or map_w % out_w or (map_h // out_h) % 2 == 0 or (map_w // out_w) % 2 == 0:
            return None
        return map_h // out_h, map_w // out_w

    def fused_tokens(self, grid: G.Grid, feat_size: G.Size) -> int:
        """Tokens per image that go through the fusion: all ``R*C*h*w``, or, on the fast path, only
        the ones the resampling samples (see ``_sample_strides``)."""
        rows, cols = check_grid(grid, max_side=None)  # any grid an image was cut into
        h, w = check_size(tuple(feat_size), "feat_size")
        if not self.fast or self._sample_strides((rows * h, cols * w)) is None:
            return rows * cols * h * w
        return self.out_size[0] * self.out_size[1]

    def maps(
        self,
        local_feats: torch.Tensor,
        global_feats: torch.Tensor,
        grid: G.Grid,
        feat_size: Optional[G.Size] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The local map ``ML`` and the global map ``MG``, both (B, R*h, C*w, D); position
        ``(y, x)`` of either holds the features of the same canvas region."""
        rows, cols = check_grid(grid, max_side=None)  # any grid an image was cut into
        h, w = self._check_inputs(local_feats, global_feats, rows * cols, feat_size)
        return self._maps(local_feats, global_feats, rows, cols, h, w)

    @staticmethod
    def _maps(
        local_feats: torch.Tensor, global_feats: torch.Tensor, rows: int, cols: int, h: int, w: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # ML's windows are the local tiles, MG's strided groups the global samples
        return layout.windows_to_map(local_feats, rows, cols, h, w), layout.groups_to_map(global_feats, rows, cols, h, w)

    def _check_inputs(
        self, local_feats: torch.Tensor, global_feats: torch.Tensor, num_crops: int, feat_size: Optional[G.Size]
    ) -> G.Size:
        check_float_tensor(local_feats, "local_feats", 4, "(B, R*C, h*w, D)")
        check_float_tensor(global_feats, "global_feats", 4, "(B, R*C, h*w, D)")
        check_same_shape(local_feats, "local_feats", global_feats, "global_feats")
        batch, crops, tokens, dim = local_feats.shape
        if batch == 0:
            raise ValueError("local_feats must hold at least one image, got batch size 0")
        if dim != self.dim:
            raise ValueError(f"local_feats must have D={self.dim} channels (last dim), got shape {tuple(local_feats.shape)}")
        dtype, device = self.ln_fuse.weight.dtype, placement(self)  # offloaded by accelerate: its hooks' device
        for name, x in (("local_feats", local_feats), ("global_feats", global_feats)):
            if x.device != device or (x.dtype != dtype and not _autocast_accepts(x, local_feats.dtype)):
                raise TypeError(
                    f"{name} must have the DEM's dtype and device ({dtype}, {device}), "
                    f"got ({x.dtype}, {x.device}): move one of them with .to()"
                    + ("" if x.device != device else "; under torch.autocast, the autocast dtype is accepted too")
                )
        if local_feats.dtype != global_feats.dtype:
            raise TypeError(
                f"local_feats and global_feats must have one dtype, got {local_feats.dtype} and {global_feats.dtype}"
            )
        if crops != num_crops:
            raise ValueError(
                f"local_feats dim 1 must be R*C={num_crops} sub-images for the given grid, got shape {tuple(local_feats.shape)}"
            )
        if tokens == 0:
            raise ValueError(
                f"local_feats must hold at least one token per sub-image (dim 2, h*w), got shape {tuple(local_feats.shape)}"
            )
        if feat_size is None:
            side = math.isqrt(tokens)
            if side * side != tokens:
                raise ValueError(
                    f"local_feats has {tokens} tokens per sub-image, not a square h*w: "
                    + (_cls_hint(tokens) or "pass feat_size=(h, w) for a non-square token grid")
                )
            return side, side
        h, w = check_size(tuple(feat_size), "feat_size")
        if h * w != tokens:
            raise ValueError(
                f"feat_size={feat_size} gives h*w={h * w} tokens, but local_feats has {tokens} per sub-image"
                + (f": {_cls_hint(tokens)}" if tokens == h * w + 1 else "")
            )
        return h, w

    def _fuse(self, el: torch.Tensor, eg: torch.Tensor) -> torch.Tensor:
        """(B, ..., D) twice -> (B, ..., D): token-wise, except conv3x3, which needs (B, R*h, C*w, D) maps."""
        if self.fusion == "add":
            return self.ln_fuse(el + eg)
        if self.fusion == "linear_concat":  # concat order as released: crop (local) half first
            mixed = torch.cat((self.ffn_crop(el), self.ffn_stride(eg)), dim=-1)
        else:
            pair = rearrange(torch.cat((el, eg), dim=-1), "b y x d -> b d y x")
            mixed = rearrange(self.fuse_conv(pair), "b d y x -> b y x d")
        return self.ln_fuse(mixed + eg + el)

    def _resample(self, fused: torch.Tensor) -> torch.Tensor:
        """(B, R*h, C*w, D) -> (B, out_h*out_w, D), resampling in float32 as released."""
        map_size = tuple(fused.shape[1:3])
        if self.out_size is None or (self.resample is None and self.out_size == map_size):
            return fused.flatten(1, 2)
        if self.resample is None:
            raise ValueError(
                f"resample=None keeps the fused map of {map_size}, which differs from out_size={self.out_size}: "
                "choose resample='bilinear' or 'avgpool', or out_size=None"
            )
        # at least float32, as released (float64 stays float64)
        chans_first = rearrange(fused, "b y x d -> b d y x").to(torch.promote_types(fused.dtype, torch.float32))
        if self.resample == "bilinear":
            out = F.interpolate(chans_first, size=self.out_size, mode="bilinear", align_corners=False)
        else:
            out = F.adaptive_avg_pool2d(chans_first, self.out_size)
        return rearrange(out.to(fused.dtype), "b d y x -> b (y x) d")

    @classmethod
    def from_inf_llava(
        cls, state_dict_or_path: Union[dict, str, "PathLike[str]"], **overrides
    ) -> "DEM":
        """A DEM holding a released INF-LLaVA checkpoint's ``spatial_embed`` weights.

        ``state_dict_or_path``: a state dict (bare keys, or keys with any prefix ending in
        ``spatial_embed.``, e.g. ``model.spatial_embed.``) or a path to a ``.safetensors`` /
        ``.bin`` file or a (sharded) checkpoint folder. ``dim`` is inferred; ``overrides`` go to
        the constructor (e.g. ``out_size=None``). Loads strictly: a missing or unexpected key, a
        weight that is not floating point (ints, bools, float8: never cast) or of another shape is a
        ValueError that names the file and the key.
        """
        from .checkpoints import check_dem_state, dem_dim, dem_state_and_origin

        state, origin = dem_state_and_origin(state_dict_or_path)
        if "dim" in overrides:
            raise ValueError("dim is inferred from the checkpoint; do not pass it to from_inf_llava")
        dim = dem_dim(state, origin)
        dem = cls(dim, **overrides)
        # keys, dtypes (floating point only: never cast from ints or float8) and shapes, each
        # failure naming the file and the key
        model = "DEM(" + ", ".join([f"dim={dim}"] + [f"{k}={v!r}" for k, v in overrides.items()]) + ")"
        check_dem_state(state, dem, origin=origin, model=model)
        dem.load_state_dict(state)
        return dem
