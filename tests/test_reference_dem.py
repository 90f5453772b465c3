"""DEM against its definition, for every direction, fusion and resampling, on non-square grids and
non-square token maps (``R != C``, ``h != w``, ``R != h``: where window order and group order differ).

Both paths of the module, ``fast=True`` and the readable ``fast=False``, are checked. The
reference below is written from the definition (DEM's docstring and
tests/fixtures/inf_llava/README.md, generalised to ``R x C`` grids and ``h x w`` tokens) with
explicit loops over windows and groups and the layers' raw weights (``F.linear``, ``F.layer_norm``,
``F.conv2d``); it shares nothing with the module but the weights. Everything runs in float64, so
the tolerance is tight enough that any wrong token or permutation shows.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from dualview import DEM

DIRECTIONS = ["both", "local_to_global", "global_to_local"]
FUSIONS = ["linear_concat", "add", "conv3x3"]
TOL = dict(atol=1e-10, rtol=1e-10)


def _linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


def _layer_norm(layer: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, layer.normalized_shape, layer.weight, layer.bias, layer.eps)


def _attend(dem: DEM, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """``LayerNorm(W_o(MHA(W_q q, W_k kv, W_v kv)) + q)`` for one sequence pair: q (T, D), kv (S, D)."""
    wq, wk, wv, wo = dem.attention.linears
    heads = dem.num_heads
    d = q.shape[-1] // heads
    out = torch.empty_like(q)
    for head in range(heads):
        cols = slice(head * d, (head + 1) * d)
        query = _linear(wq, q)[:, cols]
        key = _linear(wk, kv)[:, cols]
        value = _linear(wv, kv)[:, cols]
        out[:, cols] = torch.softmax(query @ key.T / math.sqrt(d), dim=-1) @ value
    return _layer_norm(dem.attention.ln, _linear(wo, out) + q)


def _ffn(seq: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    first, _, second = seq
    return _linear(second, F.gelu(_linear(first, x)))


def reference_dem(dem: DEM, local: torch.Tensor, glob: torch.Tensor, grid, feat) -> torch.Tensor:
    """(B, R*C, h*w, D) twice -> (B, tokens, D), written out from the definition."""
    rows, cols = grid
    h, w = feat
    batch, _, _, dim = local.shape
    out = []
    for b in range(batch):
        # ML: tile (r, c) at [r*h:(r+1)*h, c*w:(c+1)*w]; MG: G[(a, b)] at [a::R, b::C]
        ml = torch.empty(rows * h, cols * w, dim, dtype=local.dtype)
        mg = torch.empty_like(ml)
        for r in range(rows):
            for c in range(cols):
                ml[r * h:(r + 1) * h, c * w:(c + 1) * w] = local[b, r * cols + c].reshape(h, w, dim)
                mg[r::rows, c::cols] = glob[b, r * cols + c].reshape(h, w, dim)  # MG[y*R + r, x*C + c]
        el, eg = ml.clone(), mg.clone()  # a direction left out keeps its raw map
        for r in range(rows):
            for c in range(cols):
                if dem.directions in ("both", "local_to_global"):  # window of MG queries window of ML
                    win = (slice(r * h, (r + 1) * h), slice(c * w, (c + 1) * w))
                    eg[win] = _attend(dem, mg[win].reshape(h * w, dim), ml[win].reshape(h * w, dim)).reshape(h, w, dim)
                if dem.directions in ("both", "global_to_local"):  # group of ML queries group of MG
                    grp = (slice(r, None, rows), slice(c, None, cols))
                    el[grp] = _attend(dem, ml[grp].reshape(h * w, dim), mg[grp].reshape(h * w, dim)).reshape(h, w, dim)
        if dem.fusion == "add":
            fused = _layer_norm(dem.ln_fuse, el + eg)
        elif dem.fusion == "linear_concat":  # FFN_crop(EL) first, FFN_stride(EG) second
            mixed = torch.cat((_ffn(dem.ffn_crop, el), _ffn(dem.ffn_stride, eg)), dim=-1)
            fused = _layer_norm(dem.ln_fuse, mixed + eg + el)
        else:  # Conv3x3(concat(EL, EG)), zero padding 1
            pair = torch.cat((el, eg), dim=-1).permute(2, 0, 1).unsqueeze(0)
            conv = F.conv2d(pair, dem.fuse_conv.weight, dem.fuse_conv.bias, padding=1)[0].permute(1, 2, 0)
            fused = _layer_norm(dem.ln_fuse, conv + eg + el)
        map_size = (rows * h, cols * w)
        if dem.out_size is None or (dem.resample is None and tuple(dem.out_size) == map_size):
            out.append(fused.reshape(-1, dim))
            continue
        chans = fused.permute(2, 0, 1).unsqueeze(0)
        if dem.resample == "bilinear":
            small = F.interpolate(chans, size=tuple(dem.out_size), mode="bilinear", align_corners=False)
        else:
            small = F.adaptive_avg_pool2d(chans, tuple(dem.out_size))
        out.append(small[0].permute(1, 2, 0).reshape(-1, dim))
    return torch.stack(out)


def run_both(grid, feat, out_size, directions, fusion, resample="bilinear", batch=2, seed=0, dim=8, heads=2, fast=True):
    torch.manual_seed(seed)
    dem = DEM(dim, heads, out_size=out_size, directions=directions, fusion=fusion, resample=resample,
              dtype=torch.float64, fast=fast).eval()
    crops, tokens = grid[0] * grid[1], feat[0] * feat[1]
    local = torch.randn(batch, crops, tokens, dim, dtype=torch.float64)
    glob = torch.randn(batch, crops, tokens, dim, dtype=torch.float64)
    with torch.no_grad():
        return dem, dem(local, glob, grid, feat), reference_dem(dem, local, glob, grid, feat)


@st.composite
def dem_cases(draw):
    rows, cols = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    resample = draw(st.sampled_from(["bilinear", "avgpool", None]))
    map_h, map_w = rows * h, cols * w
    if resample is None:
        out = draw(st.sampled_from([None, (map_h, map_w)]))
    else:
        kind = draw(st.sampled_from(["odd factor", "any", "full"]))
        if kind == "full":
            out = None
        elif kind == "odd factor":  # where bilinear reads single tokens (the sampled-fusion path)
            ky = draw(st.sampled_from([k for k in range(1, map_h + 1, 2) if map_h % k == 0]))
            kx = draw(st.sampled_from([k for k in range(1, map_w + 1, 2) if map_w % k == 0]))
            out = (map_h // ky, map_w // kx)
        else:
            out = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    return dict(grid=(rows, cols), feat=(h, w), out_size=out, resample=resample,
                directions=draw(st.sampled_from(DIRECTIONS)), fusion=draw(st.sampled_from(FUSIONS)),
                batch=draw(st.integers(1, 2)), seed=draw(st.integers(0, 99)), fast=draw(st.booleans()))


@given(case=dem_cases())
def test_every_direction_fusion_and_resampling_equals_the_definition(case):
    _, got, want = run_both(**case)
    torch.testing.assert_close(got, want, **TOL)


# Pinned examples, so that no random search has to find them: grids with R != C and R != h, token
# maps with h != w, batch 2 (the batch offsets of the gathers), and the full map.
PINNED_SHAPES = [((2, 3), (3, 2)), ((3, 1), (2, 4)), ((2, 2), (3, 3)), ((1, 4), (3, 1))]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "readable"])
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("directions", DIRECTIONS)
@pytest.mark.parametrize("grid, feat", PINNED_SHAPES)
def test_full_map_equals_the_definition_on_non_square_grids_and_maps(grid, feat, directions, fusion, fast):
    _, got, want = run_both(grid, feat, None, directions, fusion, fast=fast)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "readable"])
def test_local_to_global_on_2x2_of_3x3_tokens(fast):
    """The case where gathering the global queries in group order instead of window order is off by
    up to 3.4: with R != h the two orders differ."""
    _, got, want = run_both((2, 2), (3, 3), None, "local_to_global", "linear_concat", batch=1, fast=fast)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "readable"])
@pytest.mark.parametrize("directions", DIRECTIONS)
@pytest.mark.parametrize("fusion", ["linear_concat", "add"])
@pytest.mark.parametrize(
    "grid, feat, out_size",
    [
        ((2, 3), (3, 3), (2, 9)),  # bilinear by 3 on rows, 1 on columns: sampled fusion, ky != kx
        ((2, 3), (3, 3), (6, 3)),  # 1 on rows, 3 on columns
        ((3, 2), (5, 3), (3, 2)),  # 5 and 3
        ((2, 3), (3, 2), (2, 3)),  # 3 on rows, 2 on columns: even, the whole map is fused
        ((2, 1), (3, 7), (2, 2)),  # 3 on rows, 7 / 2 on columns: not an integer factor
    ],
)
def test_resampled_output_equals_the_definition(grid, feat, out_size, directions, fusion, fast):
    dem, got, want = run_both(grid, feat, out_size, directions, fusion, fast=fast)
    torch.testing.assert_close(got, want, **TOL)
    assert got.shape == (2, out_size[0] * out_size[1], 8)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "readable"])
@pytest.mark.parametrize("resample", ["bilinear", "avgpool"])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_both_resamplings_with_every_fusion(resample, fusion, fast):
    _, got, want = run_both((3, 2), (2, 3), (4, 5), "both", fusion, resample=resample, fast=fast)
    torch.testing.assert_close(got, want, **TOL)


def test_fused_token_count_is_what_the_sampled_path_fuses():
    """fused_tokens reports the work the fusion does: the output tokens where bilinear reads single
    tokens, else the whole map."""
    dem = DEM(8, 2, out_size=(2, 9))
    assert dem.fused_tokens((2, 3), (3, 3)) == 18
    dem = DEM(8, 2, out_size=(2, 3))
    assert dem.fused_tokens((2, 3), (3, 2)) == 36  # even factor on columns
    dem = DEM(8, 2, out_size=(2, 2))
    assert dem.fused_tokens((2, 1), (3, 7)) == 42  # 7 / 2 is no integer factor
    assert DEM(8, 2, out_size=(2, 9), fast=False).fused_tokens((2, 3), (3, 3)) == 54  # the readable path fuses the map
