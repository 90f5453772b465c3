"""Images -> the normalised pixels a vision tower expects, at full resolution (DCM resizes later).

DCM and DualViewEncoder take ``(B, 3, H, W)`` float pixels in the units the tower was trained on:
``(x / 255 - mean) / std`` per channel. Normalising before DCM gives the same crops as
normalising each crop (resizing is a weighted average whose weights sum to one, so it commutes
with a per-channel affine map), and DCM's default ``pad_value=0.0`` then pads with the mean colour,
as LLaVA's ``expand2square`` does.

    pixels = to_pixels(Image.open("photo.jpg"), "clip")   # (3, H, W) float32
    tokens = encoder(pixels.unsqueeze(0))

Or take the numbers from the host's own image processor: ``to_pixels(image, processor)`` reads
its ``image_mean`` / ``image_std`` (and only those: DCM does the resizing).
"""

from __future__ import annotations

import math

from typing import Any, Sequence, Union

import torch

Stats = tuple[tuple[float, float, float], tuple[float, float, float]]

NORMALISATION: dict[str, Stats] = {
    # OpenAI CLIP (LLaVA-1.5 / NeXT towers)
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    # SigLIP / SigLIP 2 (LLaVA-OneVision, Idefics3): [0, 1] -> [-1, 1]
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # ImageNet statistics (most timm ViTs, InternViT)
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
"""Per-channel ``(mean, std)`` of the pixels in [0, 1], by tower family."""

Tower = Union[str, Stats, Any]


def mean_std(tower: Tower) -> Stats:
    """``(mean, std)`` for ``tower``: a name in :data:`NORMALISATION`, a ``(mean, std)`` pair of
    3-sequences, or an image processor with ``image_mean`` / ``image_std`` (transformers), or a
    timm model (``pretrained_cfg`` mean / std)."""
    if isinstance(tower, str):
        if tower not in NORMALISATION:
            raise ValueError(f"tower must be one of {sorted(NORMALISATION)}, a (mean, std) pair or an image processor, got {tower!r}")
        return NORMALISATION[tower]
    if hasattr(tower, "image_mean") and hasattr(tower, "image_std"):
        pair = (tower.image_mean, tower.image_std)
    elif isinstance(getattr(tower, "pretrained_cfg", None), dict) and "mean" in tower.pretrained_cfg:
        pair = (tower.pretrained_cfg["mean"], tower.pretrained_cfg["std"])
    else:
        pair = tower
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_three_numbers(v) for v in pair)):
        raise ValueError(
            f"tower must be one of {sorted(NORMALISATION)}, a (mean, std) pair of 3 numbers each, or an image "
            f"processor with image_mean / image_std, got {tower!r}"
        )
    mean, std = (tuple(float(x) for x in v) for v in pair)
    if not all(math.isfinite(x) for x in mean + std):  # a NaN mean or std makes every pixel NaN
        raise ValueError(f"mean and std must be finite numbers, got mean={mean}, std={std}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {std}")
    return mean, std


def _three_numbers(value: object) -> bool:
    return isinstance(value, Sequence) and len(value) == 3 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in value
    )


def to_unit_range(image: Any) -> torch.Tensor:
    """``image`` as float32 ``(3, H, W)`` in [0, 1] (``(..., 3, H, W)`` for a batched tensor).

    ``image``: a PIL image (any mode, converted to RGB; 16-bit greyscale, modes ``I;16*`` and
    ``I`` as PIL opens 16-bit PNG / TIFF files, is scaled from [0, 65535], not clipped at 255; 32-bit
    float greyscale, mode ``F``, must hold values in [0, 1], as a float tensor), a
    uint8 array ``(H, W, 3)`` (numpy, as PIL and OpenCV lay them out), a uint8 tensor
    ``(..., 3, H, W)`` (as torchvision reads them), or a float tensor ``(..., 3, H, W)`` already in
    [0, 1]. An image without pixels (zero width or height), or with NaN or infinite values, is a ValueError."""
    if hasattr(image, "convert") and hasattr(image, "size") and hasattr(image, "mode"):  # PIL, without importing it
        width, height = image.size
        if width == 0 or height == 0:
            raise ValueError(f"image must have at least one pixel, got a PIL image of (H, W)=({height}, {width})")
        if image.mode == "I" or image.mode.startswith("I;16"):
            return _sixteen_bit(image)
        if image.mode == "F":
            return _float_image(image)
        rgb = image.convert("RGB")
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).float().div_(255)
    if type(image).__module__ == "numpy" and hasattr(image, "dtype"):
        if str(image.dtype) != "uint8" or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(
                f"a numpy image must be uint8 (H, W, 3), got {image.dtype} of shape {tuple(image.shape)}"
            )
        _check_has_pixels(image.shape[:2], "a numpy image (H, W, 3)")
        return torch.from_numpy(image.copy()).permute(2, 0, 1).float().div_(255)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a PIL image, a uint8 numpy array or a tensor, got {type(image).__name__}")
    if image.ndim < 3 or image.shape[-3] != 3:
        raise ValueError(f"an image tensor must be (..., 3, H, W), got shape {tuple(image.shape)}")
    _check_has_pixels(image.shape[-2:], "an image tensor (..., 3, H, W)")
    if image.numel() == 0:  # a batch dimension of 0
        raise ValueError(f"an image tensor must hold at least one image, got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.float().div_(255)
    if not image.is_floating_point():
        raise TypeError(f"an image tensor must be uint8 or floating point in [0, 1], got dtype {image.dtype}")
    _check_unit_range(image, "a float image tensor", "already normalised? pass it to the encoder as it is")
    return image.float()


def _check_has_pixels(size: Sequence[int], what: str) -> None:
    """A ValueError naming ``what`` when its (H, W) is empty."""
    if 0 in tuple(size):
        raise ValueError(f"{what} must have at least one pixel, got (H, W)={tuple(int(s) for s in size)}")


def _check_unit_range(values: torch.Tensor, what: str, hint: str) -> None:
    """A ValueError naming ``what`` unless every value is a number in [0, 1] (NaN compares false
    with both bounds: counted apart)."""
    nonfinite = int((~torch.isfinite(values)).sum())
    if nonfinite:
        raise ValueError(f"{what} must hold values in [0, 1], got {nonfinite} NaN or infinite value(s)")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 1:
        raise ValueError(f"{what} must hold values in [0, 1], got [{low:.3g}, {high:.3g}]: {hint}")


def _float_image(image: Any) -> torch.Tensor:
    """A 32-bit float greyscale PIL image (mode ``F``) -> (3, H, W) float32, its values taken as
    they are, in [0, 1] as a float tensor's. PIL's own ``convert("RGB")`` reads them on [0, 255]:
    an image in [0, 1] would come out black."""
    data = torch.frombuffer(bytearray(image.tobytes("raw", "F")), dtype=torch.float32).view(image.height, image.width)
    _check_unit_range(data, "a PIL image of mode 'F'", "scale it to [0, 1] (or convert it to 8 bits) first")
    return data.expand(3, -1, -1).contiguous()


SIXTEEN_BIT_MAX = 65535


def _sixteen_bit(image: Any) -> torch.Tensor:
    """A 16-bit greyscale PIL image (``I;16``, ``I;16B``, ...; or ``I``, 32-bit ints, which is how
    PIL opens 16-bit PNGs and TIFFs) -> (3, H, W) float32 in [0, 1], value / 65535.
    PIL's own ``convert("RGB")`` clips these at 255: a 16-bit image would come out nearly white."""
    ints = image if image.mode == "I" else image.convert("I")  # native-endian int32, exact for 16-bit values
    data = torch.frombuffer(bytearray(ints.tobytes()), dtype=torch.int32).view(ints.height, ints.width)
    low, high = int(data.min()), int(data.max())
    if low < 0 or high > SIXTEEN_BIT_MAX:
        raise ValueError(
            f"a PIL image of mode {image.mode!r} must hold 16-bit values in [0, {SIXTEEN_BIT_MAX}], got [{low}, {high}]: "
            "scale it to 8 or 16 bits first"
        )
    return (data.float() / SIXTEEN_BIT_MAX).expand(3, -1, -1).contiguous()


def to_pixels(image: Any, tower: Tower = "clip", *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``image`` (see :func:`to_unit_range`) normalised for ``tower`` (see :func:`mean_std`):
    ``(x - mean) / std`` per channel, ``(3, H, W)`` (``(..., 3, H, W)`` for a batch) in ``dtype``.
    Resizing is left to DCM. ``dtype`` must be a floating-point dtype (normalised pixels are
    negative and fractional: an integer dtype would wrap or truncate them)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    mean, std = mean_std(tower)
    pixels = to_unit_range(image)
    shape = (3, 1, 1)
    pixels = (pixels - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)
    return pixels.to(dtype)
