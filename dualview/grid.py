"""All grid arithmetic of dual view: pure functions on integers, no tensors.

DCM, DEM, the encoder's budget, the adapters, the CLI and the benchmarks ask this one module, so
their numbers never disagree. The budgets built on it live in :mod:`dualview.budget`, the argument
checks (``check_size``, ``check_grid``, ...) in :mod:`dualview._checks`. Sizes are ``(height, width)``
everywhere (the transformers convention; the original ``llava`` package uses ``(width, height)``, its
adapter converts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence, Union

from ._checks import MAX_GRID_SIDE, check_grid, check_pinpoints, check_positive_int

Grid = tuple[int, int]
"""``(rows, cols)`` of sub-images."""
Size = tuple[int, int]
"""``(height, width)`` in pixels or tokens."""
GridSpec = Union[Grid, Literal["auto"]]
Fit = Literal["pad", "squash"]


@dataclass(frozen=True)
class Box:
    """An axis-aligned region ``[top, top+height) x [left, left+width)`` of a canvas or map."""

    top: int
    left: int
    height: int
    width: int

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(rows, cols)`` slices: ``canvas[..., box.slices[0], box.slices[1]]`` is the region."""
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)


def parse_grid(text: str) -> GridSpec:
    """``"auto"`` or ``"RxC"`` (e.g. ``"3x3"``) from a command line, else a ValueError."""
    if text == "auto":
        return "auto"
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"grid must be 'auto' or RxC like '3x3', got {text!r}")
    return check_grid((int(parts[0]), int(parts[1])))


def grid_spec(value: object) -> GridSpec:
    """A grid as a user chooses it: ``"auto"``, ``"RxC"`` text or ``(rows, cols)`` (a tuple back)."""
    return parse_grid(value) if isinstance(value, str) else check_grid(value)


def candidate_grids(max_tiles: int) -> list[Grid]:
    """Every grid with ``rows * cols <= max_tiles``, ordered by tile count, then rows.

    The order matters only to break exact ties in :func:`select_grid` (first wins), where it
    prefers fewer tiles.
    """
    check_positive_int(max_tiles, "max_tiles")
    side = min(max_tiles, MAX_GRID_SIDE)
    grids = [(r, c) for r in range(1, side + 1) for c in range(1, side + 1) if r * c <= max_tiles]
    return sorted(grids, key=lambda g: (g[0] * g[1], g[0]))


def grids_from_pinpoints(pinpoints: Sequence[Sequence[int]], crop_size: int) -> list[Grid]:
    """LLaVA-NeXT ``image_grid_pinpoints`` ((height, width) in pixels) as grids of ``crop_size`` tiles."""
    grids = []
    for point in check_pinpoints(pinpoints):
        height, width = point
        if height % crop_size or width % crop_size:
            raise ValueError(
                f"pinpoints entry {point!r} must be a multiple of crop_size={crop_size} on both sides"
            )
        grids.append(check_grid((height // crop_size, width // crop_size), "pinpoints entry as grid"))
    return grids


def select_grid(image_size: Size, crop_size: int, candidates: Sequence[Grid]) -> Grid:
    """The AnyRes choice of LLaVA-NeXT: the canvas that keeps the most image pixels, then wastes least.

    For each candidate canvas ``(R*s, C*s)`` the image is scaled to fit inside it keeping its
    aspect ratio; the effective resolution is the number of image pixels kept (never more than
    the original has), the waste is the rest of the canvas. Identical to transformers'
    ``select_best_resolution`` on ``[(R*s, C*s) for R, C in candidates]``.
    """
    height, width = image_size
    best, best_effective, best_waste = None, -1, math.inf
    for rows, cols in candidates:
        canvas_h, canvas_w = rows * crop_size, cols * crop_size
        scale = min(canvas_w / width, canvas_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = canvas_h * canvas_w - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (rows, cols), effective, waste
    if best is None:
        raise ValueError("candidates must hold at least one grid")
    return best


def fit_box(image_size: Size, canvas_size: Size, fit: Fit) -> Box:
    """Where the resized image lands on the canvas.

    ``"squash"`` fills the canvas (aspect ratio lost, the released INF-LLaVA behaviour).
    ``"pad"`` keeps the aspect ratio: the long side fills the canvas, the other is
    ``ceil(side * scale)`` (LLaVA-NeXT's ``get_patch_output_size``), centred, the extra pixel of an
    odd margin at the bottom / right (``divmod(margin, 2)``, as LLaVA-NeXT pads).
    """
    canvas_h, canvas_w = canvas_size
    if fit == "squash":
        return Box(0, 0, canvas_h, canvas_w)
    height, width = image_size
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        new_w, new_h = canvas_w, min(math.ceil(height * scale_w), canvas_h)
    else:
        new_h, new_w = canvas_h, min(math.ceil(width * scale_h), canvas_w)
    return Box((canvas_h - new_h) // 2, (canvas_w - new_w) // 2, new_h, new_w)


def unpad_box(image_size: Size, map_size: Size) -> Box:
    """The rows / columns of a padded feature map that LLaVA-NeXT keeps (its ``unpad_image``).

    Works in map units (tokens), with LLaVA-NeXT's own rounding, so a dual-view model packs
    exactly as many tokens as plain AnyRes.
    """
    height, width = image_size
    map_h, map_w = map_size
    if width / height > map_w / map_h:
        new_h = int(round(height * (map_w / width), 7))
        pad = (map_h - new_h) // 2
        return Box(pad, 0, map_h - 2 * pad, map_w)
    new_w = int(round(width * (map_h / height), 7))
    pad = (map_w - new_w) // 2
    return Box(0, pad, map_h, map_w - 2 * pad)


def crop_tokens(crop_size: int, patch_size: int) -> Size:
    """Token grid ``(h, w)`` of one ``crop_size`` crop through a ViT of ``patch_size``."""
    if crop_size % patch_size:
        raise ValueError(f"crop_size={crop_size} must be a multiple of patch_size={patch_size}")
    return crop_size // patch_size, crop_size // patch_size

