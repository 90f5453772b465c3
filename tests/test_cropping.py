"""DCM: the two views partition the canvas, put every pixel at its place, and undo exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from dualview import DCM, DualCrops
from dualview import grid as G
from dualview._checks import MAX_GRID_SIDE

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
grids = st.tuples(st.integers(1, 6), st.integers(1, 6))
crop_sizes = st.integers(1, 9)
batches = st.integers(1, 3)
dtypes = st.sampled_from(DTYPES)


def coordinate_canvas(batch: int, rows: int, cols: int, s: int, dtype) -> torch.Tensor:
    """(B, 3, R*s, C*s) whose channels are (row, col, batch index): every pixel names itself.

    Exact in float16 / bfloat16 too: coordinates stay below 2**8."""
    height, width = rows * s, cols * s
    y = torch.arange(height).view(1, height, 1).expand(batch, height, width)
    x = torch.arange(width).view(1, 1, width).expand(batch, height, width)
    b = torch.arange(batch).view(batch, 1, 1).expand(batch, height, width)
    return torch.stack([y, x, b], dim=1).to(dtype)


def assert_partition(views: torch.Tensor, batch: int, height: int, width: int) -> None:
    """Every canvas pixel (batch, row, col) appears exactly once over all crops of ``views``."""
    codes = views.long()
    flat = (codes[:, :, 2] * height + codes[:, :, 0]) * width + codes[:, :, 1]
    assert torch.equal(flat.flatten().sort().values, torch.arange(batch * height * width))


@given(grid=grids, s=crop_sizes, batch=batches, dtype=dtypes)
def test_local_crops_partition_the_canvas_in_place(grid, s, batch, dtype):
    rows, cols = grid
    canvas = coordinate_canvas(batch, rows, cols, s, dtype)
    crops = DCM(s, grid, thumbnail=False)(canvas)
    assert crops.local_view.shape == (batch, rows * cols, 3, s, s)
    i = torch.arange(s).view(s, 1)
    j = torch.arange(s).view(1, s)
    for r in range(rows):
        for c in range(cols):
            tile = crops.local_view[:, r * cols + c].long()
            assert torch.equal(tile[:, 0], (r * s + i).expand(batch, s, s))
            assert torch.equal(tile[:, 1], (c * s + j).expand(batch, s, s))
    assert_partition(crops.local_view, batch, rows * s, cols * s)


@given(grid=grids, s=crop_sizes, batch=batches, dtype=dtypes)
def test_global_crop_pixel_ij_is_canvas_pixel_iR_plus_a_jC_plus_b(grid, s, batch, dtype):
    rows, cols = grid
    canvas = coordinate_canvas(batch, rows, cols, s, dtype)
    crops = DCM(s, grid, thumbnail=False)(canvas)
    i = torch.arange(s).view(s, 1)
    j = torch.arange(s).view(1, s)
    for a in range(rows):
        for b in range(cols):
            sample = crops.global_view[:, a * cols + b].long()
            assert torch.equal(sample[:, 0], (i * rows + a).expand(batch, s, s))
            assert torch.equal(sample[:, 1], (j * cols + b).expand(batch, s, s))
            assert torch.equal(crops.global_view[:, a * cols + b], canvas[:, :, a::rows, b::cols])
    assert_partition(crops.global_view, batch, rows * s, cols * s)


@given(grid=grids, s=crop_sizes, batch=batches, dtype=dtypes, seed=st.integers(0, 2**16))
def test_reassembly_gives_the_canvas_back_bit_exactly(grid, s, batch, dtype, seed):
    rows, cols = grid
    gen = torch.Generator().manual_seed(seed)
    canvas = torch.randn(batch, 3, rows * s, cols * s, generator=gen).to(dtype)
    crops = DCM(s, grid)(canvas)
    # an image already of canvas size is not resampled: its crops are its own pixels
    assert torch.equal(crops.local_canvas(), canvas)
    assert torch.equal(crops.global_canvas(), canvas)
    assert crops.local_view.dtype == crops.global_view.dtype == crops.thumbnail.dtype == dtype
    assert crops.content_box == G.Box(0, 0, rows * s, cols * s)


aspect_sizes = st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(4, 60)).map(
    lambda t: (t[0] * t[2], t[1] * t[2])  # aspect ratios from 1:8 to 8:1
)


@given(size=aspect_sizes, s=st.integers(4, 16), max_tiles=st.integers(1, 9), dtype=dtypes, seed=st.integers(0, 999))
def test_auto_grid_padding_bookkeeping_returns_exactly_the_content(size, s, max_tiles, dtype, seed):
    pad = -7.0  # no image pixel has this value: the padding is identifiable
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, *size, generator=gen).to(dtype)
    dcm = DCM(s, "auto", max_tiles=max_tiles, pad_value=pad, interpolation="bilinear", allow_small=True)
    crops = dcm(image)
    rows, cols = crops.grid
    assert crops.grid == G.select_grid(size, s, G.candidate_grids(max_tiles))
    assert rows * cols <= max_tiles
    canvas = crops.local_canvas()
    assert canvas.shape == (2, 3, rows * s, cols * s)
    box = crops.content_box
    assert box == G.fit_box(size, (rows * s, cols * s), "pad")
    # the content region is the resized image, and nothing else is image
    resized = F.interpolate(image.float(), (box.height, box.width), mode="bilinear", align_corners=False)
    expected = image if (box.height, box.width) == size else resized.to(dtype)
    assert torch.equal(crops.content(canvas), expected)
    is_pad = canvas == pad
    is_pad[..., box.slices[0], box.slices[1]] = ~is_pad[..., box.slices[0], box.slices[1]]
    assert bool(is_pad.all())
    # bilinear output stays inside the input's range, so pad really was the only -7
    assert bool((expected >= 0).all())


@given(sizes=st.lists(st.tuples(st.integers(10, 120), st.integers(10, 120)), min_size=1, max_size=4))
def test_list_input_gives_each_image_its_own_grid(sizes):
    images = [torch.rand(3, h, w) for h, w in sizes]
    dcm = DCM(8, "auto", max_tiles=6)
    out = dcm(images)
    assert isinstance(out, list) and len(out) == len(images)
    for crops, img in zip(out, images):
        assert isinstance(crops, DualCrops)
        assert crops.grid == dcm.grid_for(img.shape[1:])
        assert crops.image_size == tuple(img.shape[1:])
        single = dcm(img.unsqueeze(0))
        assert torch.equal(single.local_view, crops.local_view)


def test_squash_and_thumbnail_match_the_released_resize():
    image = torch.rand(2, 3, 50, 70)
    crops = DCM(12, (3, 3), fit="squash")(image)
    canvas = F.interpolate(image, (36, 36), mode="bicubic", align_corners=False)
    assert torch.equal(crops.local_canvas(), canvas)
    assert torch.equal(crops.thumbnail, F.interpolate(image, (12, 12), mode="bicubic", align_corners=False))
    assert crops.content_box == G.Box(0, 0, 36, 36)


def test_float16_resizes_in_float32():
    image = torch.rand(1, 3, 40, 40)
    crops = DCM(10, (2, 2), fit="squash")(image.half())
    ref = F.interpolate(image.half().float(), (20, 20), mode="bicubic", align_corners=False).half()
    assert torch.equal(crops.local_canvas(), ref)


def test_fixed_grid_ignores_image_aspect_but_pads():
    crops = DCM(10, (1, 2))(torch.rand(1, 3, 10, 10))
    assert crops.grid == (1, 2)
    assert crops.content_box == G.Box(0, 5, 10, 10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(grid=(0, 2)), "grid must be"),
        (dict(grid="3by3"), "grid must be"),
        (dict(grid="3x33"), "grid must be"),
        (dict(fit="crop"), "fit must be one of"),
        (dict(interpolation="lanczos"), "interpolation must be one of"),
        (dict(crop_size=0), "crop_size must be a positive int"),
        (dict(grid=(2, 2), pinpoints=[[20, 20]]), "pinpoints need grid='auto'"),
        (dict(grid="auto", pinpoints=[[21, 20]]), "multiple of crop_size"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, match):
    args = dict(crop_size=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        DCM(**args)


def test_forward_errors_name_the_argument():
    dcm = DCM(10, (2, 2))
    with pytest.raises(ValueError, match=r"images must be 4-D \(B, c, H, W\), got shape \(3, 20, 20\)"):
        dcm(torch.rand(3, 20, 20))
    with pytest.raises(ValueError, match="images must have 3 channels"):
        dcm(torch.rand(1, 4, 20, 20))
    with pytest.raises(TypeError, match="floating-point"):
        dcm(torch.zeros(1, 3, 20, 20, dtype=torch.uint8))
    with pytest.raises(ValueError, match="batch size 0"):
        dcm(torch.rand(0, 3, 20, 20))
    with pytest.raises(ValueError, match="empty list"):
        dcm([])
    with pytest.raises(ValueError, match=r"images\[1\] must be 3-D"):
        dcm([torch.rand(3, 20, 20), torch.rand(1, 3, 20, 20)])


def test_an_image_of_the_target_size_is_returned_itself_not_resampled():
    from dualview.cropping import resize

    image = torch.rand(2, 3, 9, 14)
    for mode in ("bicubic", "bilinear", "nearest-exact", "area"):
        assert resize(image, (9, 14), mode, antialias=True) is image
    assert resize(image, (14, 9), "bicubic", antialias=False).shape == (2, 3, 14, 9)


@pytest.mark.parametrize("grid", [(1, 3), (3, 1), (2, 5)])
@pytest.mark.parametrize("fit", ["pad", "squash"])
def test_canvas_size_and_content_on_non_square_grids(grid, fit):
    rows, cols = grid
    image = torch.rand(1, 3, 37, 23)
    crops = DCM(8, grid, fit=fit, interpolation="bilinear")(image)
    assert crops.canvas_size == (rows * 8, cols * 8) == tuple(crops.local_canvas().shape[-2:])
    box = crops.content_box
    assert box == G.fit_box((37, 23), (rows * 8, cols * 8), fit)
    expected = F.interpolate(image, (box.height, box.width), mode="bilinear", align_corners=False)
    assert torch.equal(crops.content(crops.local_canvas()), expected)
    assert torch.equal(crops.global_canvas(), crops.local_canvas())


@pytest.mark.parametrize("grid", [(MAX_GRID_SIDE, 1), (1, MAX_GRID_SIDE), (1, 1)])
def test_both_ends_of_the_grid_range(grid):
    rows, cols = grid
    canvas = coordinate_canvas(1, rows, cols, 2, torch.float32)
    crops = DCM(2, grid, thumbnail=False)(canvas)
    assert crops.local_view.shape == (1, rows * cols, 3, 2, 2)
    assert torch.equal(crops.global_view[0, rows * cols - 1], canvas[0, :, rows - 1::rows, cols - 1::cols])
    with pytest.raises(ValueError, match="grid must be"):
        DCM(2, (rows + MAX_GRID_SIDE, cols))


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_images_are_resized_in_float32(antialias, dtype):
    """Computed in float32 and rounded once, as released: bicubic in float16 itself rounds
    differently (up to 1e-3 here), and antialiased bicubic has no half-precision CPU kernel."""
    torch.manual_seed(0)
    image = torch.rand(2, 3, 50, 70).to(dtype)
    crops = DCM(12, (3, 3), fit="squash", antialias=antialias)(image)
    resize = dict(mode="bicubic", align_corners=False, antialias=antialias)
    assert torch.equal(crops.local_canvas(), F.interpolate(image.float(), (36, 36), **resize).to(dtype))
    assert torch.equal(crops.thumbnail, F.interpolate(image.float(), (12, 12), **resize).to(dtype))


@pytest.mark.parametrize("size", [(0, 400), (400, 0), (0, 0)])
@pytest.mark.parametrize("grid", [(2, 2), "auto"])
def test_an_image_without_pixels_is_one_clear_error(size, grid):
    for dcm in (DCM(10, grid), DCM(10, grid, allow_small=True)):
        with pytest.raises(ValueError, match=rf"images must have at least one pixel, got \(H, W\)=\({size[0]}, {size[1]}\)"):
            dcm(torch.rand(1, 3, *size))
        with pytest.raises(ValueError, match="at least one pixel"):
            dcm([torch.rand(3, 20, 20), torch.rand(3, *size)])
