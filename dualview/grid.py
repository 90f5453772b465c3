"""All grid arithmetic of dual view: pure functions on integers, no tensors.

DCM, DEM, the encoder's budget, the adapters, the CLI and the benchmarks ask this one module, so
their numbers never disagree. Sizes are ``(height, width)`` everywhere (the transformers
convention; the original ``llava`` package uses ``(width, height)``, its adapter converts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

Grid = tuple[int, int]
"""``(rows, cols)`` of sub-images."""
Size = tuple[int, int]
"""``(height, width)`` in pixels or tokens."""
GridSpec = Union[Grid, Literal["auto"]]
Fit = Literal["pad", "squash"]

MAX_GRID_SIDE = 32
"""Largest number of rows or columns accepted (1024 sub-images; far past any real budget)."""


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


def check_size(value: object, name: str) -> Size:
    """``value`` as a ``(height, width)`` pair of positive ints, or a ValueError naming ``name``."""
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"{name} must be a (height, width) pair of positive ints, got {value!r}")
    return int(value[0]), int(value[1])


def check_grid(grid: object, name: str = "grid", *, max_side: Optional[int] = MAX_GRID_SIDE) -> Grid:
    """``grid`` as ``(rows, cols)`` with ``1 <= rows, cols <= max_side``, or a ValueError.

    ``max_side``: the sanity limit on a grid someone chooses (DCM, the command line); None for a
    grid that an image was already cut into (a host's processor, the DEM's input): any positive size."""
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in grid)
        or not all(1 <= v <= (max_side or v) for v in grid)
    ):
        allowed = f"ints in 1..{max_side}" if max_side is not None else "positive ints"
        raise ValueError(f"{name} must be (rows, cols) with {allowed} or 'auto', got {grid!r}")
    return int(grid[0]), int(grid[1])


def parse_grid(text: str) -> GridSpec:
    """``"auto"`` or ``"RxC"`` (e.g. ``"3x3"``) from a command line, else a ValueError."""
    if text == "auto":
        return "auto"
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"grid must be 'auto' or RxC like '3x3', got {text!r}")
    return check_grid((int(parts[0]), int(parts[1])))


def check_positive_int(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


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
    if not isinstance(pinpoints, (list, tuple)) or not pinpoints:
        raise ValueError(f"pinpoints must be a non-empty list of (height, width), got {pinpoints!r}")
    grids = []
    for point in pinpoints:
        height, width = check_size(tuple(point) if isinstance(point, list) else point, "pinpoints entry")
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


@dataclass(frozen=True)
class Budget:
    """What one image costs: sub-images through the vision tower and tokens handed to the LLM."""

    scheme: str
    grid: Grid
    canvas_size: Size
    tower_passes: int
    tokens: int


def dual_view_budget(
    grid: Grid,
    crop_size: int,
    feat_size: Size | None,
    *,
    out_size: Size | None,
    thumbnail: bool,
    thumbnail_fusion: str,
) -> Budget:
    """Budget of dual view at a known grid: ``2*R*C (+1 thumbnail)`` passes.

    Tokens: ``out_h*out_w`` (DEM resampled) or ``R*h*C*w`` (full map), plus ``h*w`` thumbnail
    tokens with ``thumbnail_fusion="concat"``. ``feat_size`` ``(h, w)`` may be None only when the
    token count does not depend on it.
    """
    rows, cols = grid
    need_feat = out_size is None or thumbnail_fusion == "concat"
    if need_feat and feat_size is None:
        raise ValueError(
            "feat_size (tokens per crop, (h, w)) is needed for this budget: pass patch_size or "
            "feat_size to the encoder, or use a tower with a patch_size attribute"
        )
    if out_size is not None:
        dem_tokens = out_size[0] * out_size[1]
    else:
        dem_tokens = rows * cols * feat_size[0] * feat_size[1]
    thumb_tokens = feat_size[0] * feat_size[1] if thumbnail_fusion == "concat" else 0
    return Budget(
        scheme="dual_view",
        grid=grid,
        canvas_size=(rows * crop_size, cols * crop_size),
        tower_passes=2 * rows * cols + int(thumbnail),
        tokens=dem_tokens + thumb_tokens,
    )


def anyres_budget(image_size: Size, grid: Grid, crop_size: int, feat_size: Size) -> Budget:
    """Plain LLaVA-NeXT AnyRes: base image + ``R*C`` tiles; unpadded map plus one newline per row."""
    rows, cols = grid
    h, w = feat_size
    box = unpad_box(image_size, (rows * h, cols * w))
    return Budget(
        scheme="anyres",
        grid=grid,
        canvas_size=(rows * crop_size, cols * crop_size),
        tower_passes=1 + rows * cols,
        tokens=h * w + box.height * (box.width + 1),
    )


def resize_budget(crop_size: int, feat_size: Size) -> Budget:
    """Plain LLaVA-1.5: the image resized to one crop."""
    return Budget("resize", (1, 1), (crop_size, crop_size), 1, feat_size[0] * feat_size[1])


def s2_budget(crop_size: int, feat_size: Size, scales: Sequence[int] = (1, 2)) -> Budget:
    """S2-style multi-scale: each scale ``k`` is cut into ``k*k`` crops; the maps are pooled back to
    one crop's token grid and concatenated on channels, so the token count stays ``h*w``."""
    top = max(scales)
    return Budget(
        "s2",
        (top, top),
        (top * crop_size, top * crop_size),
        sum(k * k for k in scales),
        feat_size[0] * feat_size[1],
    )
