"""DCM, the Dual-perspective Cropping Module: every sub-image twice, as a local tile and as a
strided global sample of the same canvas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import grid as G
from . import layout
from ._checks import check_bool, check_choice, check_float_tensor, check_number, check_positive_int, check_size

INTERPOLATIONS = ("bicubic", "bilinear", "nearest-exact", "area")
FITS = ("pad", "squash")


def resize(images: torch.Tensor, size: G.Size, mode: str, antialias: bool) -> torch.Tensor:
    """Resize (B, c, H, W) to ``size`` in at least float32 (as the released code does), back in the
    input dtype.

    The same size returns the input itself: an image that already fits is never resampled.
    """
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    smooth = mode in ("bicubic", "bilinear")
    out = F.interpolate(
        images.to(torch.promote_types(images.dtype, torch.float32)),
        size=size,
        mode=mode,
        align_corners=False if smooth else None,
        antialias=antialias if smooth else False,
    )
    return out.to(images.dtype)


@dataclass
class DualCrops:
    """The output of :class:`DCM` for a batch that shares one grid.

    Attributes:
        local_view: (B, R*C, c, s, s) contiguous tiles of the canvas, row-major (index ``r*C + c``).
        global_view: (B, R*C, c, s, s) strided samples, index ``a*C + b`` is ``canvas[..., a::R, b::C]``.
        thumbnail: (B, c, s, s) the whole image squashed to one crop, or None.
        grid: ``(R, C)``.
        content_box: where the image lies on the ``(R*s, C*s)`` canvas (the rest is padding).
        image_size: ``(H, W)`` of the input image(s).
    """

    local_view: torch.Tensor
    global_view: torch.Tensor
    thumbnail: Optional[torch.Tensor]
    grid: G.Grid
    content_box: G.Box
    image_size: G.Size

    @property
    def crop_size(self) -> int:
        return self.local_view.shape[-1]

    @property
    def canvas_size(self) -> G.Size:
        rows, cols = self.grid
        return rows * self.crop_size, cols * self.crop_size

    def local_canvas(self) -> torch.Tensor:
        """The canvas reassembled from the local tiles. (B, c, R*s, C*s)."""
        return layout.merge_local(self.local_view, *self.grid)

    def global_canvas(self) -> torch.Tensor:
        """The canvas reassembled from the global samples. (B, c, R*s, C*s)."""
        return layout.merge_global(self.global_view, *self.grid)

    def content(self, canvas: torch.Tensor) -> torch.Tensor:
        """The image region of a canvas-sized tensor ``(..., R*s, C*s)``, padding removed."""
        rows, cols = self.content_box.slices
        return canvas[..., rows, cols]


class DCM(nn.Module):
    """Dual-perspective Cropping Module.

    The image is resized onto a canvas of ``R x C`` crops of ``crop_size`` pixels, then cut twice:
    into contiguous tiles (local view: detail) and into strided samples ``canvas[a::R, b::C]``
    (global view: each one spans the whole image). Both are single einops rearranges of the
    canvas; no loop over tiles.

    Args:
        crop_size: ``s``, the vision tower's input size (336 for CLIP ViT-L/14-336).
        grid: ``(rows, cols)`` (or ``"RxC"``, e.g. ``"3x3"``), or ``"auto"`` for LLaVA-NeXT's AnyRes choice among ``pinpoints``
            (``(height, width)`` pixel canvases, multiples of ``crop_size``) or, without pinpoints,
            among all grids of at most ``max_tiles`` tiles.
        fit: ``"pad"`` keeps the aspect ratio and pads (centred) with ``pad_value``;
            ``"squash"`` stretches the image onto the canvas (released INF-LLaVA).
        thumbnail: also return the whole image squashed to one crop.
        max_tiles: largest ``R*C`` considered by ``grid="auto"`` without pinpoints.
        pinpoints: candidate canvases for ``grid="auto"``, LLaVA-NeXT's ``image_grid_pinpoints``.
        interpolation: ``torch.nn.functional.interpolate`` mode, computed in float32.
        antialias: antialias when shrinking (off in the released code).
        pad_value: value of the padding pixels, in the units of the input.
        channels: expected channel count ``c`` of the input.
        allow_small: accept (and upscale) an image smaller than one crop on both sides; by default
            that is a ValueError, since tiling it only multiplies interpolated pixels.
        check_finite: raise a ValueError for NaN or Inf pixels (one extra reduction per call).

    Shapes:
        forward((B, c, H, W)) -> DualCrops with views (B, R*C, c, s, s) (one grid for the batch);
        forward([(c, H_i, W_i), ...]) -> [DualCrops, ...] (batch 1 each, own grid under "auto").
    """

    def __init__(
        self,
        crop_size: int = 336,
        grid: G.GridSpec = (3, 3),
        *,
        fit: G.Fit = "pad",
        thumbnail: bool = True,
        max_tiles: int = 9,
        pinpoints: Optional[Sequence[Sequence[int]]] = None,
        interpolation: str = "bicubic",
        antialias: bool = False,
        pad_value: float = 0.0,
        channels: int = 3,
        allow_small: bool = False,
        check_finite: bool = False,
    ) -> None:
        super().__init__()
        self.crop_size = check_positive_int(crop_size, "crop_size")
        check_choice(fit, "fit", FITS)
        check_choice(interpolation, "interpolation", INTERPOLATIONS)
        self.channels = check_positive_int(channels, "channels")
        self.fit = fit
        self.thumbnail = check_bool(thumbnail, "thumbnail")
        self.interpolation = interpolation
        self.antialias = check_bool(antialias, "antialias")
        self.pad_value = check_number(pad_value, "pad_value")
        self.allow_small = check_bool(allow_small, "allow_small")
        self.check_finite = check_bool(check_finite, "check_finite")
        check_positive_int(max_tiles, "max_tiles")  # checked with any grid, not only "auto" (where it is read)
        grid = G.grid_spec(grid)  # "auto", "RxC" (the command line's) or (rows, cols)
        if grid == "auto":
            self.grid: G.GridSpec = "auto"
            self.candidates = (
                G.grids_from_pinpoints(pinpoints, crop_size)
                if pinpoints is not None
                else G.candidate_grids(max_tiles)
            )
        else:
            if pinpoints is not None:
                raise ValueError(f"pinpoints need grid='auto', got grid={grid!r}")
            self.grid = grid
            self.candidates = [self.grid]

    def extra_repr(self) -> str:
        return f"crop_size={self.crop_size}, grid={self.grid!r}, fit={self.fit!r}, thumbnail={self.thumbnail}"

    def grid_for(self, image_size: G.Size) -> G.Grid:
        """The grid an image of ``(H, W)`` pixels gets."""
        if self.grid != "auto":
            return self.grid
        return G.select_grid(check_size(tuple(image_size), "image_size"), self.crop_size, self.candidates)

    def make_canvas(self, images: torch.Tensor, grid: G.Grid) -> tuple[torch.Tensor, G.Box]:
        """Resize (and pad) (B, c, H, W) onto the (B, c, R*s, C*s) canvas; returns the content box too."""
        canvas_size = (grid[0] * self.crop_size, grid[1] * self.crop_size)
        box = G.fit_box(tuple(images.shape[-2:]), canvas_size, self.fit)
        content = resize(images, (box.height, box.width), self.interpolation, self.antialias)
        if (box.height, box.width) == canvas_size:
            return content, box
        canvas = content.new_full((*images.shape[:2], *canvas_size), self.pad_value)
        rows, cols = box.slices
        canvas[..., rows, cols] = content
        return canvas, box

    def forward(
        self, images: Union[torch.Tensor, Sequence[torch.Tensor]]
    ) -> Union[DualCrops, list[DualCrops]]:
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("images must hold at least one image, got an empty list")
            return [
                self._crop(check_float_tensor(img, f"images[{i}]", 3, "(c, H, W)").unsqueeze(0))
                for i, img in enumerate(images)
            ]
        check_float_tensor(images, "images", 4, "(B, c, H, W)")
        if images.shape[0] == 0:
            raise ValueError("images must hold at least one image, got batch size 0")
        return self._crop(images)

    def _crop(self, images: torch.Tensor) -> DualCrops:
        if images.shape[1] != self.channels:
            raise ValueError(
                f"images must have {self.channels} channels (dim 1 of (B, c, H, W)), got shape {tuple(images.shape)}"
            )
        image_size = (images.shape[-2], images.shape[-1])
        if min(image_size) == 0:
            raise ValueError(f"images must have at least one pixel, got (H, W)={image_size} (shape {tuple(images.shape)})")
        if not self.allow_small and max(image_size) < self.crop_size:
            raise ValueError(
                f"images must be at least crop_size={self.crop_size} pixels on one side, got (H, W)={image_size}: "
                "resize them first, or pass DCM(allow_small=True) to upscale"
            )
        if self.check_finite and not bool(torch.isfinite(images).all()):
            raise ValueError("images hold NaN or Inf pixels (DCM(check_finite=True))")
        grid = self.grid_for(image_size)
        canvas, box = self.make_canvas(images, grid)
        thumb = None
        if self.thumbnail:
            thumb = resize(images, (self.crop_size, self.crop_size), self.interpolation, self.antialias)
        return DualCrops(
            local_view=layout.split_local(canvas, *grid),
            global_view=layout.split_global(canvas, *grid),
            thumbnail=thumb,
            grid=grid,
            content_box=box,
            image_size=image_size,
        )
