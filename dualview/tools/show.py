"""The picture of what dual view does to an image: the grid on the image, the local crops, the
global (strided) crops, and the budget table. Used by ``dualview show``: it writes what the
output's suffix says (:data:`FORMATS`), ``.png`` when there is none, ``crops.png`` into a folder."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .. import grid as G
from .._output import write_atomically
from ..budget import compare
from ..cropping import DCM
from ..preprocess import to_unit_range

FIGSIZE = (16, 9)
DPI = 100
"""A raster figure is ``FIGSIZE * DPI`` = 1600 x 900 pixels, whatever the image."""

FORMATS = {
    ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF",
    ".pdf": "PDF", ".svg": "SVG",
}
"""What ``dualview show -o`` writes, by the output's suffix; a name without suffix gets ``.png``."""
RASTER = ("PNG", "JPEG", "WEBP", "TIFF")
DEFAULT_NAME = "crops.png"
"""The file written into a folder given as the output."""
MAX_CANVAS_PIXELS = 4096 * 4096
"""The largest canvas (``R*s x C*s``) the picture is drawn from: checked before anything is
allocated (the figure is 1600x900 pixels, a larger canvas adds nothing to it)."""


def output_format(path: Path) -> str:
    """The format named by ``path``'s suffix (:data:`FORMATS`), or a ValueError naming the choices."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        choices = ", ".join(FORMATS)
        raise ValueError(
            f"must end in one of {choices} (or have no suffix: .png is added, or be a folder: {DEFAULT_NAME} "
            f"is written in it), got {str(path)!r}"
        )
    return FORMATS[suffix]


def resolve_output(text: str) -> tuple[Path, str]:
    """What ``-o TEXT`` writes: ``(path, format)``. An existing folder (or a name ending in ``/``)
    gets :data:`DEFAULT_NAME` in it; a name without suffix gets ``.png``; otherwise the suffix
    says the format (:data:`FORMATS`), else a ValueError."""
    path = Path(text)
    if path.is_dir() or text.endswith(("/", os.sep)):
        path = path / DEFAULT_NAME
    elif not path.suffix:
        path = path.with_name(path.name + ".png")
    return path, output_format(path)


def describe(fmt: str) -> str:
    """``1600x900 PNG`` for a raster format, ``PDF, 16x9 in`` for a vector one."""
    if fmt in RASTER:
        return f"{FIGSIZE[0] * DPI}x{FIGSIZE[1] * DPI} {fmt}"
    return f"{fmt}, {FIGSIZE[0]}x{FIGSIZE[1]} in"


def load_image(path: Path) -> torch.Tensor:
    """An image file as (3, H, W) floats in [0, 1], EXIF orientation applied (16-bit images
    scaled from their full range, see :func:`dualview.preprocess.to_unit_range`). An image over
    PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) is refused before it is decoded."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    if path.is_dir():
        raise ValueError(f"image {str(path)!r} is a folder: give an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():
            # PIL warns (then decodes anyway) from MAX_IMAGE_PIXELS and refuses from twice that
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return to_unit_range(ImageOps.exif_transpose(img))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(_bomb_message(path, Image.MAX_IMAGE_PIXELS)) from None
    except UnidentifiedImageError:
        raise ValueError(f"{str(path)!r} is not an image PIL can read") from None
    except ValueError as e:  # pixels to_unit_range refuses (a float image off [0, 1], NaN, ...)
        raise ValueError(f"image {str(path)!r}: {e}") from None
    except OSError as e:
        raise ValueError(f"image {str(path)!r} could not be read: {e}") from None


def _bomb_message(path: Path, limit: int) -> str:
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    try:  # the size, from the header only (no decompression check: nothing is decoded)
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(path) as img:
            width, height = img.size
        size = f"is {width}x{height} = {width * height:,} pixels"
    except Exception:
        size = "has too many pixels"
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    return (
        f"image {str(path)!r} {size}, over PIL's decompression-bomb limit of {limit:,} pixels "
        "(PIL.Image.MAX_IMAGE_PIXELS): refused; downscale it first"
    )


def check_canvas(grid: G.Grid, crop_size: int, *, grid_text: str = "auto") -> None:
    """A ValueError naming ``--grid`` (as the user gave it: ``grid_text``) and ``--crop-size``
    when the canvas is over :data:`MAX_CANVAS_PIXELS`."""
    height, width = grid[0] * crop_size, grid[1] * crop_size
    if height * width > MAX_CANVAS_PIXELS:
        chosen = f" (the grid {grid[0]}x{grid[1]} for this image)" if grid_text == "auto" else ""
        raise ValueError(
            f"--grid {grid_text}{chosen} at --crop-size {crop_size} makes a {height}x{width} canvas "
            f"({height * width:,} pixels), more than the {MAX_CANVAS_PIXELS:,} ({math.isqrt(MAX_CANVAS_PIXELS)}"
            f"x{math.isqrt(MAX_CANVAS_PIXELS)}) the picture is drawn from: choose a smaller --grid or --crop-size"
        )


def mosaic(crops: torch.Tensor, rows: int, cols: int, gap: int) -> torch.Tensor:
    """(R*C, 3, s, s) -> (3, R*s + (R-1)*gap, C*s + (C-1)*gap) with white gaps between crops."""
    s = crops.shape[-1]
    out = torch.ones(3, rows * s + (rows - 1) * gap, cols * s + (cols - 1) * gap)
    for i, crop in enumerate(crops):
        r, c = divmod(i, cols)
        out[:, r * (s + gap):r * (s + gap) + s, c * (s + gap):c * (s + gap) + s] = crop
    return out


def render(
    image: torch.Tensor,
    out: Path,
    *,
    crop_size: int,
    grid: G.GridSpec,
    max_tiles: int,
    title: str,
    fmt: str = "PNG",
    name: str = "output",
) -> tuple[int, int]:
    """Write the figure for a (3, H, W) image in [0, 1] to ``out`` in ``fmt`` (a value of
    :data:`FORMATS`), atomically; returns the figure's (width, height) in pixels at :data:`DPI`.
    The canvas size is checked (:func:`check_canvas`) before anything is allocated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dcm = DCM(crop_size, grid, max_tiles=max_tiles, pad_value=0.0)
    check_canvas(dcm.grid_for(tuple(image.shape[1:])), crop_size)
    crops = dcm(image.unsqueeze(0))
    rows, cols = crops.grid
    canvas = crops.local_canvas()[0]
    gap = max(2, crop_size // 40)
    fig = plt.figure(figsize=FIGSIZE, dpi=DPI)
    spec = fig.add_gridspec(3, 2, height_ratios=[1.3, 1.3, 0.55], left=0.02, right=0.98, top=0.93, bottom=0.02,
                            hspace=0.15, wspace=0.05)
    places = [spec[0, :], spec[1, 0], spec[1, 1]]
    panels = [
        (canvas, f"canvas {canvas.shape[1]}x{canvas.shape[2]}: image {tuple(image.shape[1:])} on a {rows}x{cols} grid"),
        (mosaic(crops.local_view[0], rows, cols, gap), f"local view: {rows * cols} contiguous tiles (detail)"),
        (mosaic(crops.global_view[0], rows, cols, gap), f"global view: {rows * cols} strided samples canvas[a::{rows}, b::{cols}]"),
    ]
    for i, (pixels, panel_title) in enumerate(panels):
        ax = fig.add_subplot(places[i])
        ax.imshow(pixels.clamp(0, 1).permute(1, 2, 0).numpy())
        ax.set_title(panel_title, fontsize=10)
        ax.axis("off")
        if i == 0:  # the tile borders on the canvas, and the content box
            for r in range(1, rows):
                ax.axhline(r * crop_size - 0.5, color="yellow", lw=1.5)
            for c in range(1, cols):
                ax.axvline(c * crop_size - 0.5, color="yellow", lw=1.5)
            box = crops.content_box
            ax.add_patch(plt.Rectangle((box.left - 0.5, box.top - 0.5), box.width, box.height, fill=False, ec="red", lw=1))
    budgets = compare(tuple(image.shape[1:]), crop_size=crop_size, grid=grid, max_tiles=max_tiles)
    ax = fig.add_subplot(spec[2, :])
    ax.axis("off")
    cells = [[b.scheme, f"{b.grid[0]}x{b.grid[1]}", str(b.tower_passes), str(b.tokens)] for b in budgets]
    tab = ax.table(cellText=cells, colLabels=["scheme (per image)", "grid", "vision-tower passes", "LLM tokens"],
                   loc="center", cellLoc="center")
    tab.scale(1, 1.3)
    fig.suptitle(title, fontsize=12)
    try:
        write_atomically(out, lambda tmp: fig.savefig(tmp, dpi=DPI, format=fmt.lower()), name=name)
    finally:
        plt.close(fig)
    return FIGSIZE[0] * DPI, FIGSIZE[1] * DPI
