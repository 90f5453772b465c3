"""Images -> normalised pixels for a tower: the formula, every input kind, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualview import DCM
from dualview.preprocess import NORMALISATION, mean_std, to_pixels, to_unit_range

from PIL import Image


def reference(pixels_hw3: np.ndarray, mean, std) -> torch.Tensor:
    """``(x / 255 - mean) / std`` written out per channel in float64."""
    out = np.empty((3, *pixels_hw3.shape[:2]))
    for c in range(3):
        out[c] = (pixels_hw3[..., c] / 255.0 - mean[c]) / std[c]
    return torch.from_numpy(out)


def test_every_input_kind_gives_the_reference_normalisation():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)  # non-square
    for tower in ("clip", "siglip", "imagenet"):
        expected = reference(array, *NORMALISATION[tower])
        inputs = [Image.fromarray(array), array, torch.from_numpy(array).permute(2, 0, 1).contiguous(),
                  torch.from_numpy(array).permute(2, 0, 1).double() / 255]
        for image in inputs:
            got = to_pixels(image, tower)
            assert got.shape == (3, 37, 53) and got.dtype == torch.float32
            torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    assert NORMALISATION["siglip"] == ((0.5,) * 3, (0.5,) * 3)
    torch.testing.assert_close(to_pixels(np.full((2, 2, 3), 255, np.uint8), "siglip"), torch.ones(3, 2, 2))


def test_pil_modes_batches_and_dtypes():
    gray = Image.fromarray(np.full((4, 6), 128, np.uint8), mode="L")
    rgba = Image.fromarray(np.full((4, 6, 4), 128, np.uint8), mode="RGBA")
    assert torch.equal(to_unit_range(gray), to_unit_range(rgba))
    batch = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    out = to_pixels(batch, "clip", dtype=torch.bfloat16)
    assert out.shape == (2, 3, 5, 7) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out[1].float(), to_pixels(batch[1], "clip"), atol=2e-2, rtol=0)


def test_the_host_processors_numbers_are_used():
    class Processor:  # what transformers' image processors carry
        image_mean = [0.1, 0.2, 0.3]
        image_std = [0.5, 0.25, 0.125]

    assert mean_std(Processor()) == ((0.1, 0.2, 0.3), (0.5, 0.25, 0.125))
    assert mean_std(((0, 0, 0), (1, 1, 1))) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    clip = pytest.importorskip("transformers").CLIPImageProcessor()
    assert mean_std(clip) == NORMALISATION["clip"]


def test_normalising_before_dcm_equals_normalising_each_crop_and_pads_with_the_mean():
    image = torch.rand(3, 50, 80, dtype=torch.float64)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in NORMALISATION["clip"])
    dcm = DCM(28, (2, 2), fit="pad", interpolation="bilinear")
    before = dcm(((image - mean) / std).unsqueeze(0))
    after = dcm(image.unsqueeze(0))
    box = after.content_box
    rows, cols = box.slices
    torch.testing.assert_close(before.local_canvas()[0][:, rows, cols], ((after.local_canvas()[0] - mean) / std)[:, rows, cols])
    assert box.height < 56 and float(before.local_canvas()[0][:, 0, 0].abs().max()) == 0.0  # padding: 0 = the mean colour


@pytest.mark.parametrize(
    "image, tower, error, message",
    [
        (torch.rand(3, 4, 4) * 2 - 1, "clip", ValueError, r"in \[0, 1\], got \[-"),
        (torch.zeros(4, 4, 3), "clip", ValueError, r"must be \(\.\.\., 3, H, W\)"),
        (torch.zeros(3, 4, 4, dtype=torch.int32), "clip", TypeError, "uint8 or floating point"),
        (np.zeros((4, 4, 3), np.float32), "clip", ValueError, "uint8 \\(H, W, 3\\)"),
        ([[0, 0, 0]], "clip", TypeError, "PIL image, a uint8 numpy array or a tensor"),
        (torch.zeros(3, 4, 4), "openclip", ValueError, "tower must be one of"),
        (torch.zeros(3, 4, 4), ((0, 0), (1, 1)), ValueError, "3 numbers each"),
        (torch.zeros(3, 4, 4), ((0, 0, 0), (1, 0, 1)), ValueError, "std must be positive"),
    ],
)
def test_bad_inputs_name_what_was_expected(image, tower, error, message):
    with pytest.raises(error, match=message):
        to_pixels(image, tower)


def test_16_bit_greyscale_is_scaled_from_its_full_range_not_clipped(tmp_path):
    ramp = (np.arange(256, dtype=np.float64) / 255 * 65535).round().astype(np.uint16)
    gradient = np.tile(ramp, (8, 1))  # 8 x 256, black to white
    path = tmp_path / "g16.png"
    Image.fromarray(gradient).save(path)
    expected = torch.from_numpy(gradient / 65535.0).float()
    with Image.open(path) as img:
        assert img.mode in ("I;16", "I")  # what PIL makes of a 16-bit PNG
        unit = to_unit_range(img)
    assert unit.shape == (3, 8, 256) and unit.dtype == torch.float32
    for c in range(3):
        torch.testing.assert_close(unit[c], expected, atol=1e-6, rtol=0)
    mean, std = NORMALISATION["clip"]
    torch.testing.assert_close(to_pixels(Image.open(path), "clip")[1], (expected - mean[1]) / std[1], atol=1e-5, rtol=0)
    # PIL's mode "I" (32-bit ints holding 16-bit values) and the big-endian "I;16B" too
    as_int = Image.fromarray(gradient.astype(np.int32))
    assert as_int.mode == "I"
    torch.testing.assert_close(to_unit_range(as_int)[0], expected, atol=1e-6, rtol=0)
    big_endian = Image.frombytes("I;16B", (256, 8), gradient.astype(">u2").tobytes())
    torch.testing.assert_close(to_unit_range(big_endian)[2], expected, atol=1e-6, rtol=0)


def test_32_bit_values_beyond_16_bits_are_refused_not_clipped():
    with pytest.raises(ValueError, match=r"mode 'I' must hold 16-bit values in \[0, 65535\], got \[-1, 70000\]"):
        to_unit_range(Image.fromarray(np.array([[-1, 70000]], dtype=np.int32)))


def test_a_pil_image_without_pixels_is_refused():
    with pytest.raises(ValueError, match=r"image must have at least one pixel, got a PIL image of \(H, W\)=\(0, 5\)"):
        to_unit_range(Image.new("RGB", (5, 0)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_infinite_pixels_are_refused(bad):
    image = torch.rand(2, 3, 4, 5)
    image[1, 2, 3, 4] = bad
    with pytest.raises(ValueError, match=r"a float image tensor must hold values in \[0, 1\], got 1 NaN or infinite"):
        to_pixels(image)
    greyscale = np.random.default_rng(0).random((4, 5), dtype=np.float32)
    greyscale[0, 1] = bad
    with pytest.raises(ValueError, match=r"a PIL image of mode 'F' must hold values in \[0, 1\], got 1 NaN or infinite"):
        to_pixels(Image.fromarray(greyscale, mode="F"))


def test_a_float_pil_image_in_the_unit_range_keeps_its_values():
    values = np.random.default_rng(0).random((4, 5), dtype=np.float32)  # a 32-bit float greyscale image
    image = Image.fromarray(values, mode="F")
    assert image.mode == "F"
    expected = torch.from_numpy(values).expand(3, -1, -1)
    torch.testing.assert_close(to_unit_range(image), expected, atol=0, rtol=0)
    mean, std = NORMALISATION["clip"]
    torch.testing.assert_close(to_pixels(image), (expected - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))
    with pytest.raises(ValueError, match=r"mode 'F' must hold values in \[0, 1\], got \[0, 200\]: scale it"):
        to_unit_range(Image.fromarray(np.array([[0, 200]], np.float32), mode="F"))  # on [0, 255]: refused


@pytest.mark.parametrize("image", [torch.rand(3, 0, 4), torch.rand(0, 3, 4, 4), torch.zeros(3, 4, 0, dtype=torch.uint8),
                                   np.zeros((0, 4, 3), np.uint8), np.zeros((4, 0, 3), np.uint8)],
                         ids=["float-no-rows", "empty-batch", "uint8-no-cols", "numpy-no-rows", "numpy-no-cols"])
def test_an_image_without_pixels_is_refused_whatever_its_kind(image):
    with pytest.raises(ValueError, match="at least one"):
        to_pixels(image)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool, "float32"])
def test_the_output_dtype_must_be_floating_point(dtype):
    # normalised pixels are negative and fractional: uint8 wrapped -1.73 to 255, int64 truncated, bool gave True
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        to_pixels(torch.rand(3, 4, 4), dtype=dtype)
    assert to_pixels(torch.rand(3, 4, 4), dtype=torch.float16).dtype == torch.float16


@pytest.mark.parametrize("pair", [((0.5, 0.5, float("nan")), (1, 1, 1)), ((0.5, 0.5, 0.5), (1, 1, float("nan"))),
                                  ((0.5, 0.5, 0.5), (1, 1, float("inf"))), ((True, 0.5, 0.5), (1, 1, 1))],
                         ids=["nan-mean", "nan-std", "inf-std", "bool-mean"])
def test_mean_and_std_must_be_finite_numbers(pair):
    with pytest.raises(ValueError, match="mean|std|tower"):
        mean_std(pair)
