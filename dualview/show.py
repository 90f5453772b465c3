"""The picture of what dual view does to an image: the grid on the image, the local crops, the
global (strided) crops, and the budget table. Used by ``dualview show``."""

from __future__ import annotations

from pathlib import Path

import torch

from . import grid as G
from .budget import compare
from .cropping import DCM

FIGSIZE = (16, 9)
DPI = 100
"""The PNG is ``FIGSIZE * DPI`` = 1600 x 900 pixels, whatever the image."""


def load_image(path: Path) -> torch.Tensor:
    """An image file as (3, H, W) floats in [0, 1], EXIF orientation applied."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
            return data.view(img.height, img.width, 3).permute(2, 0, 1).float() / 255
    except UnidentifiedImageError:
        raise ValueError(f"{str(path)!r} is not an image PIL can read") from None
    except OSError as e:
        raise ValueError(f"image {str(path)!r} could not be read: {e}") from None


def mosaic(crops: torch.Tensor, rows: int, cols: int, gap: int) -> torch.Tensor:
    """(R*C, 3, s, s) -> (3, R*s + (R-1)*gap, C*s + (C-1)*gap) with white gaps between crops."""
    s = crops.shape[-1]
    out = torch.ones(3, rows * s + (rows - 1) * gap, cols * s + (cols - 1) * gap)
    for i, crop in enumerate(crops):
        r, c = divmod(i, cols)
        out[:, r * (s + gap):r * (s + gap) + s, c * (s + gap):c * (s + gap) + s] = crop
    return out


def render(image: torch.Tensor, out: Path, *, crop_size: int, grid: G.GridSpec, max_tiles: int, title: str) -> tuple[int, int]:
    """Write the figure for a (3, H, W) image in [0, 1]; returns the PNG's (width, height)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dcm = DCM(crop_size, grid, max_tiles=max_tiles, pad_value=0.0)
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
    for i, (pixels, name) in enumerate(panels):
        ax = fig.add_subplot(places[i])
        ax.imshow(pixels.clamp(0, 1).permute(1, 2, 0).numpy())
        ax.set_title(name, fontsize=10)
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
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return FIGSIZE[0] * DPI, FIGSIZE[1] * DPI
