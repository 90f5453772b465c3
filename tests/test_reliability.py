"""Bad input, numerics, determinism, checkpoint safety, and fuzzing of the public API.

Fuzzing: every generated case must end in a correct result or in the documented ValueError /
TypeError naming the argument; anything else (an error from inside torch) fails the test. Cases
per run: 3 fuzz tests x ``max_examples`` of the hypothesis profile (100 in CI, 500 with
HYPOTHESIS_PROFILE=thorough).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from safetensors.torch import save_file

from dualview import DCM, DEM, DualViewEncoder

from .conftest import PatchTower

ARGUMENT_NAMES = (
    "images", "grid", "crop_size", "local_feats", "global_feats", "feat_size", "dim", "num_heads", "out_size",
    "max_tiles", "resample", "fusion", "directions", "channels", "tower", "thumbnail_fusion", "fit",
    "tower_batch_size", "interpolation", "pinpoints",
)


def assert_documented(error: Exception) -> None:
    assert isinstance(error, (ValueError, TypeError)), f"undocumented {type(error).__name__}: {error}"
    assert any(name in str(error) for name in ARGUMENT_NAMES), f"error names no argument: {error}"
    event(f"documented {type(error).__name__}")


# ---- bad input -------------------------------------------------------------------------------


def test_image_smaller_than_one_crop_is_refused_unless_allowed():
    with pytest.raises(ValueError, match=r"at least crop_size=336 pixels on one side, got \(H, W\)=\(100, 200\)"):
        DCM(336)(torch.rand(1, 3, 100, 200))
    crops = DCM(336, (1, 1), allow_small=True)(torch.rand(1, 3, 100, 200))
    assert crops.local_view.shape == (1, 1, 3, 336, 336)
    assert DCM(336, (1, 2))(torch.rand(1, 3, 100, 400)).grid == (1, 2)  # one side long enough


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_pixels_are_refused_when_asked(bad):
    images = torch.rand(2, 3, 40, 40)
    images[1, 2, 5, 7] = bad
    with pytest.raises(ValueError, match="images hold NaN or Inf"):
        DCM(20, (2, 2), check_finite=True)(images)
    DCM(20, (2, 2))(images)  # unchecked by default: one reduction less per call


def test_dem_refuses_features_of_another_dtype_or_device():
    dem = DEM(16, num_heads=2)
    feats = torch.randn(1, 4, 9, 16)
    with pytest.raises(TypeError, match=r"local_feats must have the DEM's dtype and device \(torch.float32, cpu\), got \(torch.float64, cpu\)"):
        dem(feats.double(), feats.double(), (2, 2))
    with pytest.raises(TypeError, match="global_feats must have the DEM's dtype"):
        dem(feats, feats.half(), (2, 2))


def test_encoder_hands_the_dem_its_own_dtype():
    tower = PatchTower(dim=16).to(torch.bfloat16)
    encoder = DualViewEncoder(lambda x: tower(x.to(torch.bfloat16)), DCM(28, (2, 2)), DEM(16, num_heads=2, out_size=(2, 2)))
    out = encoder(torch.rand(1, 3, 56, 56))
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())


# ---- numerics --------------------------------------------------------------------------------

# Measured on random N(0, 1) features, dim 64, grid 3x3, 8x8 tokens (and at dim 256, 24x24 tokens:
# bfloat16 0.033, float16 0.005); the bounds below are the ones DEM's docstring states.
HALF_TOLERANCE = {torch.bfloat16: 0.06, torch.float16: 0.01}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_within_the_stated_tolerance_of_float32(dtype):
    torch.manual_seed(0)
    dem = DEM(64, num_heads=8, out_size=(12, 12)).eval()
    half = DEM(64, num_heads=8, out_size=(12, 12), dtype=dtype).eval()
    half.load_state_dict(dem.state_dict())
    local, glob = torch.randn(2, 9, 64, 64), torch.randn(2, 9, 64, 64)
    with torch.no_grad():
        ref = dem(local, glob, (3, 3))
        out = half(local.to(dtype), glob.to(dtype), (3, 3))
    assert out.dtype == dtype
    err = (out.float() - ref).abs().max().item()
    print(f"{dtype}: max abs error {err:.4f}")
    assert err <= HALF_TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_constant_zero_and_large_inputs_give_finite_outputs(dtype):
    torch.manual_seed(0)
    encoder = DualViewEncoder(PatchTower(dim=16).to(dtype), DCM(28, (2, 2)), DEM(16, num_heads=2, out_size=(2, 2), dtype=dtype))
    with torch.no_grad():
        for images in (torch.full((1, 3, 56, 56), 0.5), torch.zeros(1, 3, 56, 56), torch.full((1, 3, 56, 56), 1e3)):
            assert bool(torch.isfinite(encoder(images.to(dtype))).all())
        dem = encoder.dem
        zeros = torch.zeros(1, 4, 4, 16, dtype=dtype)
        assert bool(torch.isfinite(dem(zeros, zeros, (2, 2))).all())
        big = torch.randn(1, 4, 4, 16, dtype=torch.float32).mul(1e4).to(dtype)  # inside float16's range
        assert bool(torch.isfinite(dem(big, -big, (2, 2))).all())


def test_deterministic_algorithms_give_bitwise_equal_runs():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        results = []
        for _ in range(2):
            torch.manual_seed(0)
            encoder = DualViewEncoder(PatchTower(dim=16), DCM(28, "auto", max_tiles=4), DEM(16, num_heads=2, out_size=(2, 2)))
            out = encoder(torch.rand(2, 3, 60, 90, generator=torch.Generator().manual_seed(1)))
            out.square().sum().backward()
            results.append((out.detach(), [p.grad.clone() for p in encoder.dem.parameters()]))
        assert torch.equal(results[0][0], results[1][0])
        assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    finally:
        torch.use_deterministic_algorithms(previous)


# ---- checkpoint safety -----------------------------------------------------------------------


def test_truncated_or_corrupted_checkpoints_give_a_clear_error(tmp_path):
    state = DEM(16, num_heads=2).state_dict()
    save_file(state, tmp_path / "full.safetensors")
    torch.save(state, tmp_path / "full.bin")
    for name in ("full.safetensors", "full.bin"):
        data = (tmp_path / name).read_bytes()
        cut = tmp_path / f"cut{(tmp_path / name).suffix}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match="checkpoint .*cut"):
            DEM.from_inf_llava(cut)
        flipped = bytearray(data)
        flipped[: 16] = b"\xff" * 16
        bad = tmp_path / f"bad{(tmp_path / name).suffix}"
        bad.write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match="checkpoint .*bad"):
            DEM.from_inf_llava(bad)


def test_a_pickled_object_is_never_executed(tmp_path):
    import os
    import pickle

    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil.bin").write_bytes(pickle.dumps({"attention.linears.0.weight": Exploit()}))
    with pytest.raises(ValueError, match="weights_only=True"):
        DEM.from_inf_llava(tmp_path / "evil.bin")
    assert not marker.exists()


# ---- fuzzing ---------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
BAD_DTYPES = [torch.int64, torch.uint8, torch.bool]
# Each fuzz case is a valid call with, half the time, one thing broken.
faults = st.sampled_from(["none"] * 9 + ["ndim", "batch", "channels", "dtype", "crop", "grid", "fit", "list3d"])
bad_grids = st.sampled_from(["3x3", (2,), (1, 2, 3), None, (2.0, 2), (0, 2), (2, -1), (99, 1), "auto!"])


@given(
    fault=faults, batch=st.integers(1, 2), size=st.tuples(st.integers(1, 64), st.integers(1, 64)),
    dtype=st.sampled_from(DTYPES), crop=st.integers(1, 12), grid=st.one_of(st.just("auto"), st.tuples(st.integers(1, 6), st.integers(1, 6))),
    fit=st.sampled_from(["pad", "squash"]), as_list=st.booleans(), bad_grid=bad_grids, bad_dtype=st.sampled_from(BAD_DTYPES),
)
def test_fuzz_dcm(fault, batch, size, dtype, crop, grid, fit, as_list, bad_grid, bad_dtype):
    shape = {"ndim": (3,) + size, "batch": (0, 3) + size, "channels": (batch, 4) + size}.get(fault, (batch, 3) + size)
    images = torch.rand(shape).to(bad_dtype if fault == "dtype" else dtype)
    args = dict(crop_size={"crop": 0}.get(fault, crop), grid=bad_grid if fault == "grid" else grid,
                fit="crop" if fault == "fit" else fit, allow_small=True)
    try:
        dcm = DCM(**args)
        if fault == "list3d":
            out = dcm([images[0], images])
        else:
            out = dcm(list(images) if as_list else images)
    except Exception as e:  # noqa: BLE001 - the point: only documented errors may come out
        assert_documented(e)
        assert fault != "none", f"a valid call failed: {e}"
        return
    assert fault == "none", f"fault {fault!r} was not caught"
    event("correct result")
    for crops in out if isinstance(out, list) else [out]:
        rows, cols = crops.grid
        _, n, c, s1, s2 = crops.local_view.shape
        assert (n, c, s1, s2) == (rows * cols, 3, crop, crop) and crops.local_view.dtype == dtype
        assert torch.equal(crops.local_canvas(), crops.global_canvas())


dem_faults = st.sampled_from(["none"] * 9 + ["heads", "odd_dim", "batch", "crops", "tokens", "shape", "channels",
                                             "dtype", "module_dtype", "grid", "feat_size", "out_size", "ndim"])


@given(
    fault=dem_faults, heads=st.sampled_from([1, 2, 4, 8]), batch=st.integers(1, 2), grid=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    hw=st.tuples(st.integers(1, 4), st.integers(1, 4)), dtype=st.sampled_from(DTYPES), bad_grid=bad_grids,
    fusion=st.sampled_from(["linear_concat", "add", "conv3x3"]), directions=st.sampled_from(["both", "local_to_global", "global_to_local"]),
    out_size=st.sampled_from([(3, 3), None, (1, 5)]), give_feat=st.booleans(),
)
def test_fuzz_dem(fault, heads, batch, grid, hw, dtype, bad_grid, fusion, directions, out_size, give_feat):
    dim = {"heads": 12, "odd_dim": 9}.get(fault, 16)
    heads = 8 if fault in ("heads", "odd_dim") else heads
    rows, cols = grid
    h, w = hw
    shape = (0 if fault == "batch" else batch, rows * cols + (fault == "crops"), h * w + (fault == "tokens"),
             8 if fault == "channels" else dim)
    local = torch.randn(shape[1:] if fault == "ndim" else shape).to(dtype)
    glob = torch.randn(local.shape[:-2] + (local.shape[-2] + 1, local.shape[-1])) if fault == "shape" else torch.randn(local.shape)
    other = torch.float32 if dtype == torch.float64 else torch.float64
    glob = glob.to(other if fault == "dtype" else dtype)
    feat_size = {"feat_size": (h + 1, w)}.get(fault, (h, w) if give_feat or h != w else None)
    try:
        dem = DEM(dim, heads, fusion=fusion, directions=directions, out_size=(0, 2) if fault == "out_size" else out_size,
                  dtype=(torch.float64 if dtype != torch.float64 else torch.float32) if fault == "module_dtype" else dtype)
        with torch.no_grad():
            out = dem(local, glob, bad_grid if fault == "grid" else grid, feat_size)
    except Exception as e:  # noqa: BLE001
        assert_documented(e)
        assert fault != "none", f"a valid call failed: {e}"
        return
    assert fault == "none", f"fault {fault!r} was not caught"
    event("correct result")
    expected = rows * h * cols * w if out_size is None else out_size[0] * out_size[1]
    assert out.shape == (batch, expected, dim) and out.dtype == dtype and bool(torch.isfinite(out).all())


@given(
    size=st.tuples(st.integers(28, 120), st.integers(1, 120)), grid=st.one_of(st.just("auto"), st.tuples(st.integers(1, 3), st.integers(1, 3))),
    batch=st.integers(1, 2), fusion=st.sampled_from(["mean", "concat", "none", "mean", "max"]),
    out=st.sampled_from([(2, 2), (2, 2), (3, 3), None]), tower_dim=st.sampled_from([16, 16, 16, 8]),
    chunk=st.sampled_from([None, None, 3, 0]),
)
def test_fuzz_encoder(size, grid, batch, fusion, out, tower_dim, chunk):
    torch.manual_seed(0)
    try:
        encoder = DualViewEncoder(
            PatchTower(dim=tower_dim), DCM(28, grid), DEM(16, num_heads=2, out_size=out),
            thumbnail_fusion=fusion, tower_batch_size=chunk,
        )
        with torch.no_grad():
            tokens = encoder(torch.rand(batch, 3, *size))
    except Exception as e:  # noqa: BLE001
        assert_documented(e)
        return
    event("correct result")
    assert tokens.shape == (batch, encoder.budget(size).tokens, 16) and bool(torch.isfinite(tokens).all())


# ---- the API takes what the command line takes; hints point at the fix --------------------------


def test_dcm_takes_the_command_lines_grid_text():
    assert DCM(336, grid="3x3").grid == (3, 3) and DCM(336, grid="2X4").grid == (2, 4)
    images = torch.rand(1, 3, 60, 90)
    assert torch.equal(DCM(28, grid="2x3")(images).local_view, DCM(28, grid=(2, 3))(images).local_view)
    with pytest.raises(ValueError, match=r"grid must be 'auto' or RxC like '3x3', got '3by3'"):
        DCM(336, grid="3by3")
    with pytest.raises(ValueError, match=r"grid must be \(rows, cols\)"):
        DCM(336, grid="0x3")


def test_dem_takes_an_int_out_size_as_a_square():
    assert DEM(64, out_size=24).out_size == (24, 24)
    torch.manual_seed(0)
    square, pair = DEM(16, num_heads=2, out_size=3), DEM(16, num_heads=2, out_size=(3, 3))
    pair.load_state_dict(square.state_dict())
    feats = torch.randn(1, 4, 9, 16)
    assert torch.equal(square(feats, feats, (2, 2)), pair(feats, feats, (2, 2)))
    for bad in ("24", 0, -2, True, 2.5):
        with pytest.raises(ValueError, match="out_size must be"):
            DEM(64, out_size=bad)


def test_a_cls_token_gets_the_hint_to_drop_it():
    dem = DEM(16, num_heads=2, out_size=4)
    with_cls = torch.randn(1, 4, 17, 16)  # CLS + 4x4 patches
    for feat_size in (None, (4, 4)):
        with pytest.raises(ValueError, match=r"17 = 4x4 patches \+ 1, likely the vision tower's CLS token: drop it") as error:
            dem(with_cls, with_cls, (2, 2), feat_size)
        assert "feat_size=(h, w) for" not in str(error.value)
    odd = torch.randn(1, 4, 15, 16)  # not CLS + a square: the non-square grid is the likely case
    with pytest.raises(ValueError, match=r"pass feat_size=\(h, w\) for a non-square token grid"):
        dem(odd, odd, (2, 2))
    dem(odd, odd, (2, 2), feat_size=(3, 5))  # and passing it works
