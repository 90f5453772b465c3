"""DEM: INF-LLaVA equivalence, a loop reference for any grid, map alignment, gradients, loading."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from dualview import DCM, DEM
from dualview import layout

from .conftest import FIXTURES


def dem_fixture():
    fx = load_file(FIXTURES / "inf_llava_dem_n3_d32.safetensors")
    state = {k[len("state."):]: v for k, v in fx.items() if k.startswith("state.")}
    return fx, state


def test_from_inf_llava_reproduces_the_released_dem():
    fx, state = dem_fixture()
    dem = DEM.from_inf_llava(state)
    assert (dem.dim, dem.num_heads, dem.out_size) == (32, 8, (24, 24))
    with torch.no_grad():
        out = dem(fx["local_feats"], fx["global_feats"], (3, 3))
    assert out.shape == fx["output"].shape == (1, 576, 32)
    assert (out - fx["output"]).abs().max().item() <= 1e-4


def test_explicit_softmax_path_matches_the_fixture_too():
    fx, state = dem_fixture()
    dem = DEM.from_inf_llava(state, fused_attn=False)
    with torch.no_grad():
        out = dem(fx["local_feats"], fx["global_feats"], (3, 3))
    assert (out - fx["output"]).abs().max().item() <= 1e-4


def reference_dem(dem: DEM, local: torch.Tensor, glob: torch.Tensor, rows: int, cols: int, h: int, w: int):
    """The released algorithm written out with loops, generalised to R x C grids and h x w tokens
    (spec: tests/fixtures/inf_llava/README.md). Shares only the weights with the module."""
    b, _, _, d = local.shape
    heads = dem.num_heads
    wq, wk, wv, wo = dem.attention.linears

    def attend(q, kv):
        def split(x):
            return x.view(b, -1, heads, d // heads).transpose(1, 2)

        qh, kh, vh = split(wq(q)), split(wk(kv)), split(wv(kv))
        att = torch.softmax(qh @ kh.transpose(-2, -1) / math.sqrt(d // heads), -1) @ vh
        return dem.attention.ln(wo(att.transpose(1, 2).reshape(b, -1, d)) + q)

    ml = torch.zeros(b, rows * h, cols * w, d, dtype=local.dtype)
    mg = torch.zeros_like(ml)
    for r in range(rows):
        for c in range(cols):
            ml[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = local[:, r * cols + c].view(b, h, w, d)
            mg[:, r::rows, c::cols] = glob[:, r * cols + c].view(b, h, w, d)
    eg = torch.zeros_like(ml)
    el = torch.zeros_like(ml)
    for r in range(rows):
        for c in range(cols):
            win = (slice(None), slice(r * h, (r + 1) * h), slice(c * w, (c + 1) * w))
            eg[win] = attend(mg[win].reshape(b, h * w, d), ml[win].reshape(b, h * w, d)).view(b, h, w, d)
            grp = (slice(None), slice(r, None, rows), slice(c, None, cols))
            el[grp] = attend(ml[grp].reshape(b, h * w, d), mg[grp].reshape(b, h * w, d)).view(b, h, w, d)
    fused = dem.ln_fuse(torch.cat([dem.ffn_crop(el), dem.ffn_stride(eg)], -1) + eg + el)
    out = F.interpolate(fused.permute(0, 3, 1, 2).float(), size=dem.out_size, mode="bilinear", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(b, -1, d)


@given(
    grid=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    hw=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    batch=st.integers(1, 2),
    out=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    seed=st.integers(0, 999),
    fast=st.booleans(),
)
def test_batched_dem_equals_loop_reference_for_any_grid(grid, hw, batch, out, seed, fast):
    torch.manual_seed(seed)
    rows, cols = grid
    h, w = hw
    dem = DEM(32, num_heads=4, out_size=out, fast=fast).eval()
    local = torch.randn(batch, rows * cols, h * w, 32)
    glob = torch.randn(batch, rows * cols, h * w, 32)
    with torch.no_grad():
        got = dem(local, glob, grid, feat_size=hw)
        want = reference_dem(dem, local, glob, rows, cols, h, w)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# (grid, feat_size, out_size, resample): R != h and h != w, non-square grids, and every resampling:
# bilinear sampled (odd integer factors), bilinear of the whole map (even and non-integer factors),
# avgpool, the full map, resample=None at the map's size
FAST_CASES = [
    ((2, 3), (3, 2), (2, 2), "bilinear"),  # factors 3 and 3: sampled fusion
    ((3, 1), (5, 3), (3, 1), "bilinear"),  # factors 5 and 3: sampled fusion
    ((2, 3), (3, 3), (2, 9), "bilinear"),  # factors 3 and 1: sampled, other strides across rows and columns
    ((2, 3), (3, 2), (2, 3), "bilinear"),  # factors 3 and 2: the whole map (one even factor is enough)
    ((2, 3), (3, 2), (3, 3), "bilinear"),  # factors 2 and 2: the whole map
    ((3, 1), (2, 4), (4, 3), "bilinear"),  # no integer factor
    ((3, 1), (3, 7), (3, 2), "bilinear"),  # 3 on rows, 7 / 2 on columns: the whole map
    ((2, 3), (3, 2), (4, 5), "avgpool"),
    ((3, 1), (2, 3), None, "bilinear"),  # the full map
    ((2, 3), (3, 2), (6, 6), None),  # resample=None at the map's size
    ((1, 1), (2, 3), None, None),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("fusion", ["linear_concat", "add", "conv3x3"])
@pytest.mark.parametrize("directions", ["both", "local_to_global", "global_to_local"])
@pytest.mark.parametrize("grid, feat, out_size, resample", FAST_CASES)
def test_fast_path_equals_the_readable_path_forward_and_backward(grid, feat, out_size, resample, directions, fusion, dtype):
    """``fast=True`` (index plans, one attention call, sampled fusion) computes what ``forward``'s
    readable steps compute: the output, the input gradients and every parameter's gradient."""
    torch.manual_seed(0)
    kwargs = dict(out_size=out_size, directions=directions, fusion=fusion, resample=resample, dtype=dtype)
    fast = DEM(16, num_heads=2, **kwargs)
    readable = DEM(16, num_heads=2, fast=False, **kwargs)
    readable.load_state_dict(fast.state_dict())
    assert fast.fast and not readable.fast and "fast=False" in repr(readable)
    crops, tokens = grid[0] * grid[1], feat[0] * feat[1]
    local = torch.randn(2, crops, tokens, 16, dtype=dtype, requires_grad=True)
    glob = torch.randn(2, crops, tokens, 16, dtype=dtype, requires_grad=True)
    # float32 (measured): 2.4e-7 on the outputs, 5.7e-6 on the gradients (parameter gradients sum many terms)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-5)
    out_tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-6)
    results = []
    for dem in (fast, readable):
        out = dem(local, glob, grid, feat)
        weight = torch.linspace(-1, 1, out.numel(), dtype=dtype).view(out.shape)
        params = [p for _, p in sorted(dem.named_parameters())]
        results.append((out, torch.autograd.grad((out * weight).sum(), [local, glob, *params], allow_unused=True)))
    (out_fast, grads_fast), (out_readable, grads_readable) = results
    torch.testing.assert_close(out_fast, out_readable, **out_tol)
    for name, a, b in zip(["local", "global"] + sorted(n for n, _ in fast.named_parameters()), grads_fast, grads_readable):
        assert (a is None) == (b is None), name  # the same parameters take part
        if a is not None:
            torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")


@given(grid=st.tuples(st.integers(1, 6), st.integers(1, 6)), s=st.integers(1, 6))
def test_local_and_global_maps_put_the_same_canvas_region_at_the_same_position(grid, s):
    """Features that encode their own canvas coordinates (a 1-pixel-patch tower) give two maps
    that are both the canvas; so DEM's window / group pairs see the same region."""
    rows, cols = grid
    height, width = rows * s, cols * s
    yx = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")).float()
    canvas = torch.cat([yx, torch.zeros(1, height, width)]).unsqueeze(0)  # (1, 3, H, W): (y, x, 0)
    crops = DCM(s, grid, thumbnail=False)(canvas)

    def tower(views):  # (B, RC, 3, s, s) -> (B, RC, s*s, 4): one token per pixel, D=4
        tokens = views.flatten(-2).transpose(-1, -2)
        return torch.cat([tokens, torch.ones_like(tokens[..., :1])], -1)

    dem = DEM(4, num_heads=1, fusion="add")
    ml, mg = dem.maps(tower(crops.local_view), tower(crops.global_view), grid)
    coords = canvas[0, :2].permute(1, 2, 0)
    assert torch.equal(ml[0, ..., :2], coords)
    assert torch.equal(mg[0, ..., :2], coords)
    # the pairs DEM attends over: window (r, c) of MG with local tile (r, c); group (a, b) of ML with G[(a, b)]
    assert torch.equal(layout.map_to_windows(mg, rows, cols), tower(crops.local_view))
    assert torch.equal(layout.map_to_groups(ml, rows, cols), tower(crops.global_view))


@pytest.mark.parametrize("fusion", ["linear_concat", "add", "conv3x3"])
@pytest.mark.parametrize("directions", ["both", "local_to_global", "global_to_local"])
def test_gradcheck_and_every_parameter_gets_a_gradient(fusion, directions):
    torch.manual_seed(0)
    dem = DEM(16, num_heads=2, out_size=(3, 5), fusion=fusion, directions=directions, dtype=torch.float64)
    local = torch.randn(1, 6, 4, 16, dtype=torch.float64, requires_grad=True)
    glob = torch.randn(1, 6, 4, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: dem(a, b, (2, 3)), (local, glob), eps=1e-6, atol=1e-5)
    dem(local, glob, (2, 3)).square().sum().backward()
    for name, p in dem.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_directions_change_what_is_enhanced():
    torch.manual_seed(0)
    local, glob = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    outs = {}
    for directions in ("both", "local_to_global", "global_to_local"):
        torch.manual_seed(1)
        dem = DEM(16, num_heads=2, out_size=None, directions=directions)
        outs[directions] = dem(local, glob, (2, 2))
    assert not torch.allclose(outs["both"], outs["local_to_global"])
    assert not torch.allclose(outs["both"], outs["global_to_local"])
    # one direction only: the other map is the raw one
    torch.manual_seed(1)
    dem = DEM(16, num_heads=2, out_size=None, directions="global_to_local", fusion="add")
    ml, mg = dem.maps(local, glob, (2, 2))
    el = layout.groups_to_map(
        dem.attention(layout.map_to_groups(ml, 2, 2).flatten(0, 1), glob.flatten(0, 1)).unflatten(0, (2, 4)), 2, 2, 3, 3
    )
    torch.testing.assert_close(dem(local, glob, (2, 2)), dem.ln_fuse(el + mg).flatten(1, 2))


def test_output_sizes_and_resampling_modes():
    local, glob = torch.randn(1, 6, 16, 8), torch.randn(1, 6, 16, 8)
    full = DEM(8, num_heads=2, out_size=None)
    assert full(local, glob, (2, 3)).shape == (1, 8 * 12, 8)
    same = DEM(8, num_heads=2, out_size=(8, 12), resample=None)
    same.load_state_dict(full.state_dict())
    assert torch.equal(same(local, glob, (2, 3)), full(local, glob, (2, 3)))
    with pytest.raises(ValueError, match="resample=None keeps the fused map"):
        same(local, glob, (3, 2))
    pooled = DEM(8, num_heads=2, out_size=(4, 6), resample="avgpool")
    pooled.load_state_dict(full.state_dict())
    fmap = full(local, glob, (2, 3)).view(1, 8, 12, 8)
    expected = F.avg_pool2d(fmap.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1).reshape(1, 24, 8)
    torch.testing.assert_close(pooled(local, glob, (2, 3)), expected)
    assert DEM(8, num_heads=2).output_tokens((3, 3), (24, 24)) == 576
    assert full.output_tokens((2, 3), (4, 4)) == 96


def test_batch_equals_one_image_at_a_time():
    torch.manual_seed(0)
    dem = DEM(32, num_heads=8, out_size=(7, 5)).eval()
    local, glob = torch.randn(3, 6, 16, 32), torch.randn(3, 6, 16, 32)
    with torch.no_grad():
        batched = dem(local, glob, (3, 2))
        single = torch.cat([dem(local[i:i + 1], glob[i:i + 1], (3, 2)) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_output_dtype_and_device_follow_the_input(dtype):
    dem = DEM(16, num_heads=2, out_size=(5, 5), dtype=dtype)
    local = torch.randn(1, 4, 9, 16, dtype=dtype)
    out = dem(local, local.clone(), (2, 2))
    assert out.dtype == dtype and out.device == local.device
    assert bool(torch.isfinite(out).all())


def test_from_inf_llava_accepts_prefixes_files_and_folders(tmp_path):
    fx, state = dem_fixture()
    expected = DEM.from_inf_llava(state)(fx["local_feats"], fx["global_feats"], (3, 3))
    prefixed = {f"model.spatial_embed.{k}": v for k, v in state.items()}
    prefixed["model.mm_projector.0.weight"] = torch.randn(4, 32)
    prefixed["model.layers.0.self_attn.q_proj.weight"] = torch.randn(4, 4)
    save_file(prefixed, tmp_path / "ckpt.safetensors")
    torch.save(prefixed, tmp_path / "mm_projector.bin")
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    keys = sorted(prefixed)
    save_file({k: prefixed[k] for k in keys[::2]}, shard_dir / "model-00001-of-00002.safetensors")
    save_file({k: prefixed[k] for k in keys[1::2]}, shard_dir / "model-00002-of-00002.safetensors")
    for source in (prefixed, tmp_path / "ckpt.safetensors", str(tmp_path / "mm_projector.bin"), shard_dir):
        dem = DEM.from_inf_llava(source)
        torch.testing.assert_close(dem(fx["local_feats"], fx["global_feats"], (3, 3)), expected, atol=0, rtol=0)
    full = DEM.from_inf_llava(prefixed, out_size=None)
    assert full(fx["local_feats"], fx["global_feats"], (3, 3)).shape == (1, 72 * 72, 32)


def test_from_inf_llava_errors_name_the_keys(tmp_path):
    _, state = dem_fixture()
    broken = dict(state)
    del broken["ln_fuse.bias"]
    broken["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['ln_fuse.bias'\], unexpected keys \['extra.weight'\]"):
        DEM.from_inf_llava(broken)
    with pytest.raises(ValueError, match="missing keys.*fuse_conv"):
        DEM.from_inf_llava(state, fusion="conv3x3")
    with pytest.raises(ValueError, match="no INF-LLaVA DEM weights"):
        DEM.from_inf_llava({"model.mm_projector.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="several 'spatial_embed.' prefixes"):
        DEM.from_inf_llava({**{f"a.spatial_embed.{k}": v for k, v in state.items()}, "b.spatial_embed.x": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DEM.from_inf_llava(tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        DEM.from_inf_llava(tmp_path / "bad.safetensors")
    (tmp_path / "evil.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="weights_only=True"):
        DEM.from_inf_llava(tmp_path / "evil.bin")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=30, num_heads=8), "dim must be divisible by num_heads"),
        (dict(dim=32, directions="global"), "directions must be one of"),
        (dict(dim=32, fusion="mul"), "fusion must be one of"),
        (dict(dim=32, resample="nearest"), "resample must be one of"),
        (dict(dim=32, out_size=(0, 4)), "out_size must be"),
        (dict(dim=18, num_heads=2, fusion="linear_concat", ffn_hidden=0), "ffn_hidden must be a positive int"),
        (dict(dim=0), "dim must be a positive int"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DEM(**kwargs)


def test_forward_errors_name_the_argument():
    dem = DEM(16, num_heads=2)
    good = torch.randn(1, 4, 9, 16)
    with pytest.raises(ValueError, match=r"local_feats must be 4-D"):
        dem(good[0], good[0], (2, 2))
    with pytest.raises(ValueError, match=r"same shape, got \(1, 4, 9, 16\) and \(1, 4, 4, 16\)"):
        dem(good, torch.randn(1, 4, 4, 16), (2, 2))
    with pytest.raises(ValueError, match=r"R\*C=6 sub-images"):
        dem(good, good, (2, 3))
    with pytest.raises(ValueError, match="D=16 channels"):
        dem(torch.randn(1, 4, 9, 8), torch.randn(1, 4, 9, 8), (2, 2))
    with pytest.raises(ValueError, match="not a square h\\*w: pass feat_size"):
        dem(torch.randn(1, 4, 6, 16), torch.randn(1, 4, 6, 16), (2, 2))
    with pytest.raises(ValueError, match="feat_size=\\(2, 2\\) gives h\\*w=4"):
        dem(good, good, (2, 2), feat_size=(2, 2))
    with pytest.raises(ValueError, match="grid must be"):
        dem(good, good, (4, 0))
    with pytest.raises(TypeError, match="floating-point"):
        dem(good.long(), good.long(), (2, 2))


def test_gradcheck_with_respect_to_every_parameter():
    torch.manual_seed(0)
    dem = DEM(16, num_heads=2, out_size=(3, 3), dtype=torch.float64)
    local, glob = torch.randn(1, 4, 4, 16, dtype=torch.float64), torch.randn(1, 4, 4, 16, dtype=torch.float64)
    names = [n for n, _ in dem.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in dem.parameters())

    def run(*flat):
        return torch.func.functional_call(dem, dict(zip(names, flat)), (local, glob, (2, 2)))

    assert torch.autograd.gradcheck(run, params, eps=1e-6, atol=1e-5, fast_mode=True)


def test_from_inf_llava_reads_a_file_with_bare_keys(tmp_path):
    fx, state = dem_fixture()
    save_file(state, tmp_path / "bare.safetensors")
    dem = DEM.from_inf_llava(tmp_path / "bare.safetensors")
    with torch.no_grad():
        out = dem(fx["local_feats"], fx["global_feats"], (3, 3))
    assert (out - fx["output"]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("fusion", ["linear_concat", "add"])
@pytest.mark.parametrize("directions", ["both", "local_to_global", "global_to_local"])
@pytest.mark.parametrize("grid, hw, out", [((3, 3), (6, 6), (6, 6)), ((1, 3), (5, 3), (1, 3)), ((2, 2), (3, 3), (6, 6)),
                                           ((3, 1), (5, 5), (3, 1))])
def test_sampled_fusion_equals_fusing_the_whole_map_then_resampling(fusion, directions, grid, hw, out):
    """Bilinear by an odd integer factor (3, 5 or 1 here) reads single tokens: fusing only those
    gives what fusing the whole map and resampling gives, forward and backward."""
    torch.manual_seed(0)
    dem = DEM(16, num_heads=2, out_size=out, fusion=fusion, directions=directions, dtype=torch.float64)
    rows, cols = grid
    assert dem._sample_strides((rows * hw[0], cols * hw[1])) is not None
    assert dem.fused_tokens(grid, hw) == out[0] * out[1]
    whole = DEM(16, num_heads=2, out_size=out, fusion=fusion, directions=directions, dtype=torch.float64)
    whole.load_state_dict(dem.state_dict())
    whole._sample_strides = lambda *args: None  # the fast path without sampling: fuse the map, then F.interpolate
    local = torch.randn(2, rows * cols, hw[0] * hw[1], 16, dtype=torch.float64, requires_grad=True)
    glob = torch.randn(2, rows * cols, hw[0] * hw[1], 16, dtype=torch.float64, requires_grad=True)
    got, want = dem(local, glob, grid, hw), whole(local, glob, grid, hw)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    weight = torch.randn_like(got)
    g_got = torch.autograd.grad((got * weight).sum(), (local, glob))
    g_want = torch.autograd.grad((want * weight).sum(), (local, glob))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kwargs, grid, hw", [
    (dict(out_size=(4, 4)), (2, 2), (4, 4)),  # factor 2: samples between tokens
    (dict(out_size=(5, 5)), (3, 3), (4, 4)),  # 12 -> 5: not an integer factor
    (dict(out_size=(4, 4), resample="avgpool"), (3, 3), (4, 4)),
    (dict(out_size=(4, 4), fusion="conv3x3"), (3, 3), (4, 4)),  # not token-wise
    (dict(out_size=None), (3, 3), (4, 4)),
])
def test_whole_map_is_fused_where_the_resampling_reads_more_than_single_tokens(kwargs, grid, hw):
    dem = DEM(16, num_heads=2, **kwargs)
    assert dem._sample_strides((grid[0] * hw[0], grid[1] * hw[1])) is None
    assert dem.fused_tokens(grid, hw) == grid[0] * grid[1] * hw[0] * hw[1]


def test_index_plans_are_built_once_per_shape():
    from dualview.enhance import _cached_index_plan

    _cached_index_plan.cache_clear()
    dem = DEM(16, num_heads=2, out_size=(3, 3)).eval()
    local = torch.randn(2, 9, 9, 16)
    with torch.no_grad():
        first = dem(local, local, (3, 3))
        assert _cached_index_plan.cache_info()[:2] == (0, 1)  # (hits, misses): one miss ...
        second = dem(local, local, (3, 3))
        assert _cached_index_plan.cache_info()[:2] == (1, 1)  # ... then a hit
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        dem(local[:1], local[:1], (3, 3))  # another batch size: another plan
        assert _cached_index_plan.cache_info().currsize == 2
        twin = DEM(16, num_heads=2, out_size=(3, 3)).eval()
        twin(local, local, (3, 3))  # a plan is a function of the shape and settings: shared by DEMs
        assert _cached_index_plan.cache_info().currsize == 2
    assert not any("plan" in name for name in dem.state_dict()) and not any("plan" in k for k in vars(dem))


def test_plan_tensors_are_never_written_and_are_the_devices_own():
    """The cached index tensors are shared by every call of the same shape: no call may write into
    them, and a plan built for one device is never served for another."""
    from dualview.enhance import _cached_index_plan

    _cached_index_plan.cache_clear()
    dem = DEM(16, num_heads=2, out_size=(3, 3), dtype=torch.float64)
    x = torch.randn(2, 9, 9, 16, dtype=torch.float64, requires_grad=True)
    dem(x, x, (3, 3)).sum().backward()  # "both", sampled: every index tensor of the plan in use
    plan = _cached_index_plan(3, 3, 3, 3, 2, torch.device("cpu"), True, (3, 3))
    assert _cached_index_plan.cache_info().hits == 1
    versions = [t._version for t in plan]
    for dtype in (torch.float64, torch.float32):
        dem = dem.to(dtype)
        y = x.detach().to(dtype).requires_grad_()
        dem(y, y, (3, 3)).sum().backward()
        with torch.inference_mode():
            dem(y, y, (3, 3))
    assert _cached_index_plan.cache_info().currsize == 1  # index tensors do not depend on the dtype
    assert [t._version for t in plan] == versions and all(t.dtype == torch.long and not t.is_inference() for t in plan)
    meta = _cached_index_plan(3, 3, 3, 3, 2, torch.device("meta"), True, (3, 3))
    assert all(t.device.type == "meta" for t in meta)
    assert _cached_index_plan(3, 3, 3, 3, 2, torch.device("cpu"), True, (3, 3)) is plan


def test_a_plan_built_under_inference_mode_serves_a_later_training_step():
    dem = DEM(16, num_heads=2, out_size=(3, 3))
    local = torch.randn(1, 9, 9, 16)
    with torch.inference_mode():
        dem(local, local, (3, 3))
    x = local.clone().requires_grad_()
    dem(x, x, (3, 3)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_changing_a_setting_after_a_call_does_not_reuse_the_old_plan():
    torch.manual_seed(0)
    dem = DEM(16, num_heads=2, out_size=(3, 3)).eval()
    local, glob = torch.randn(1, 9, 9, 16), torch.randn(1, 9, 9, 16)
    with torch.no_grad():
        dem(local, glob, (3, 3))
        dem.out_size = None  # the full map now
        full = dem(local, glob, (3, 3))
        fresh = DEM(16, num_heads=2, out_size=None).eval()
        fresh.load_state_dict(dem.state_dict())
        torch.testing.assert_close(full, fresh(local, glob, (3, 3)), rtol=0, atol=0)


def test_plans_survive_fake_and_symbolic_tracing_and_the_module_pickles_and_copies():
    import copy
    import io

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from dualview.enhance import _cached_index_plan

    torch.manual_seed(0)
    dem = DEM(16, num_heads=2, out_size=(2, 3)).eval()
    x = torch.randn(2, 6, 9, 16)
    with torch.no_grad():
        ref = dem(x, x, (2, 3))
        _cached_index_plan.cache_clear()
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            dem(mode.from_tensor(x), mode.from_tensor(x), (2, 3))  # a fake call must not fill the cache
        assert _cached_index_plan.cache_info().currsize == 0
        torch.testing.assert_close(dem(x, x, (2, 3)), ref, rtol=0, atol=0)
    params = dict(dem.named_parameters())
    graph = make_fx(lambda p, a: torch.func.functional_call(dem, p, (a, a, (2, 3))), tracing_mode="symbolic")(params, x)
    torch.testing.assert_close(graph(params, x), ref)
    assert "__getstate__" not in vars(DEM)  # nothing of a call is kept on the module
    buf = io.BytesIO()
    torch.save(dem, buf)
    buf.seek(0)
    for twin in (torch.load(buf, weights_only=False), copy.deepcopy(dem), copy.deepcopy(DEM(16, 2, out_size=(2, 3), fast=False))):
        twin.load_state_dict(dem.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(twin(x, x, (2, 3)), ref, rtol=1e-6, atol=1e-6)
    assert copy.deepcopy(DEM(16, 2, fast=False)).fast is False
    dem.out_size = [2, 3]  # a list works as well as a tuple
    with torch.no_grad():
        torch.testing.assert_close(dem(x, x, (2, 3)), ref, rtol=0, atol=0)


def test_linear_concat_needs_an_even_dim_and_an_empty_batch_is_refused():
    with pytest.raises(ValueError, match="dim must be even, got 15"):
        DEM(15, num_heads=3)
    DEM(15, num_heads=3, fusion="add")  # no halves: any dim divisible by the heads
    dem = DEM(16, num_heads=2)
    with pytest.raises(ValueError, match="batch size 0"):
        dem(torch.randn(0, 4, 9, 16), torch.randn(0, 4, 9, 16), (2, 2))


def test_from_inf_llava_refuses_an_unexpected_key_alone():
    _, state = dem_fixture()
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['extra.weight'\]"):
        DEM.from_inf_llava({**state, "extra.weight": torch.zeros(1)})


def test_the_plan_cache_never_holds_more_than_its_bound():
    from dualview.enhance import _MAX_PLANS, _cached_index_plan

    dem = DEM(8, num_heads=2, out_size=(3, 3)).eval()
    with torch.no_grad():
        for b in range(1, 2 * _MAX_PLANS + 3):
            dem(torch.randn(b, 1, 9, 8), torch.randn(b, 1, 9, 8), (1, 1))
            assert 1 <= _cached_index_plan.cache_info().currsize <= _MAX_PLANS
    assert _cached_index_plan.cache_info().maxsize == _MAX_PLANS


def test_a_conv3x3_dem_saved_with_bare_keys_loads_from_a_file(tmp_path):
    torch.manual_seed(0)
    dem = DEM(16, num_heads=2, fusion="conv3x3", out_size=(3, 3))
    save_file(dem.state_dict(), tmp_path / "conv.safetensors")
    loaded = DEM.from_inf_llava(tmp_path / "conv.safetensors", num_heads=2, fusion="conv3x3", out_size=(3, 3))
    local = torch.randn(1, 4, 9, 16)
    torch.testing.assert_close(loaded(local, local, (2, 2)), dem(local, local, (2, 2)), rtol=0, atol=0)


def test_a_torch_file_must_hold_a_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.bin")
    with pytest.raises(ValueError, match="must hold a dict of tensors, got list"):
        DEM.from_inf_llava(tmp_path / "list.bin")


def test_a_sharded_folder_is_read_through_its_index(tmp_path):
    """The index wins: the shards it names are read, not a stale single-file checkpoint beside it."""
    import json

    fx, state = dem_fixture()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({f"model.spatial_embed.{k}": state[k] for k in part}, tmp_path / name)
    index = {"weight_map": {f"model.spatial_embed.{k}": name for name, part in shards.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({f"model.spatial_embed.{k}": torch.zeros_like(v) for k, v in state.items()}, tmp_path / "model.safetensors")
    dem = DEM.from_inf_llava(tmp_path)
    with torch.no_grad():
        out = dem(fx["local_feats"], fx["global_feats"], (3, 3))
    assert (out - fx["output"]).abs().max().item() <= 1e-4


def test_zero_token_feature_maps_are_one_clear_error():
    dem = DEM(16, num_heads=2, out_size=(2, 2))
    empty = torch.zeros(1, 4, 0, 16)
    with pytest.raises(ValueError, match=r"local_feats must hold at least one token per sub-image \(dim 2, h\*w\), "
                                         r"got shape \(1, 4, 0, 16\)"):
        dem(empty, empty, (2, 2))
    with pytest.raises(ValueError, match="at least one token"):
        dem.maps(empty, empty, (2, 2))


@pytest.mark.parametrize("fusion", ["linear_concat", "add", "conv3x3"])
@pytest.mark.parametrize("out_size", [(6, 6), (4, 4), None])
def test_dem_follows_cpu_autocast_like_torch_modules(fusion, out_size):
    torch.manual_seed(0)
    dem = DEM(32, num_heads=4, out_size=out_size, fusion=fusion).eval()  # float32 weights
    local, glob = torch.randn(2, 9, 4, 32), torch.randn(2, 9, 4, 32)
    with torch.no_grad():
        reference = dem(local, glob, (3, 3))
    seen = []
    hook = dem.attention.linears[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        half = dem(local.bfloat16(), glob.bfloat16(), (3, 3))  # bfloat16 features, float32 weights
        full = dem(local, glob, (3, 3))  # float32 features: the matmuls run in bfloat16 all the same
    hook.remove()
    assert seen == [torch.bfloat16, torch.bfloat16]  # the projections ran in the autocast dtype
    assert half.dtype == torch.bfloat16 and half.shape == reference.shape
    # within the bfloat16 tolerance documented for DEM (0.06), and not the float32 result itself
    assert (half.float() - reference).abs().max().item() <= 0.06
    assert (full.float() - reference).abs().max().item() <= 0.06
    assert not torch.equal(full, reference)


def test_outside_autocast_a_dtype_mismatch_is_still_refused():
    dem = DEM(16, num_heads=2, out_size=(2, 2))
    feats = torch.randn(1, 4, 4, 16)
    with pytest.raises(TypeError, match=r"local_feats must have the DEM's dtype and device \(torch.float32, cpu\), "
                                        r"got \(torch.bfloat16, cpu\)"):
        dem(feats.bfloat16(), feats.bfloat16(), (2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match=r"local_feats must have the DEM's dtype .* got \(torch.float16, cpu\)"):
            dem(feats.half(), feats.half(), (2, 2))  # not the autocast dtype
        with pytest.raises(TypeError, match="local_feats and global_feats must have one dtype"):
            dem(feats.bfloat16(), feats, (2, 2))
        with pytest.raises(TypeError, match=r"global_feats must have the DEM's dtype"):
            dem(feats, feats.bfloat16(), (2, 2))


@pytest.mark.parametrize("fused_attn", [True, False])
def test_readable_path_reproduces_the_released_dem(fused_attn):
    fx, state = dem_fixture()
    dem = DEM.from_inf_llava(state, fast=False, fused_attn=fused_attn)
    assert not dem.fast and dem.fused_tokens((3, 3), (24, 24)) == 9 * 576  # no sampled fusion
    with torch.no_grad():
        out = dem(fx["local_feats"], fx["global_feats"], (3, 3))
    assert (out - fx["output"]).abs().max().item() <= 1e-4
