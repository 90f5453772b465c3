"""A synthetic high-resolution task that needs fine detail and the layout of the image, generated
on the fly.

Each image is an ``R*s x C*s`` canvas. Each of the four corner tiles holds one small glyph (a ``3x3``
bit pattern drawn with ``glyph_px`` pixels per bit, the four classes all different) at a random
place. One corner is marked, and the answer is the class of the glyph there. The mark is either

- ``"frame"`` (default): a thick red frame around the marked corner tile: the model must find the
  marked region among four far-apart ones and read the small glyph inside it; or
- ``"arrow"``: a large arrow in the centre tile pointing at the marked corner: the mark and the
  glyph are far apart, a relation between regions (much harder to learn at small scale); or
- ``"context"``: a pointer that only the whole image shows, at full resolution. The central tiles
  (all but the outer ring) are inked as a checkerboard in every ``R x R`` pixel block (``R`` the
  grid side: the stride of the global crops and the thumbnail's shrink factor): the pixels of even
  ``y + x`` inside a large arrow pointing at the marked corner tile, those of odd ``y + x`` outside
  it. Every strided global crop ``canvas[a::R, b::R]`` shows the arrow as a solid shape (even
  ``a + b``) or its negative (odd); the thumbnail (bicubic, sampling each block's centre, so
  mirror-image pixels weigh the same, and with ``R`` even a mirror image swaps the checkerboard's
  colours) shows the same uniform tint whatever the arrow's direction; the glyphs sit in the corner
  tiles, which hold no ink of the pointer. With a tile map pooled tile by tile (``R`` tiles a side,
  ``R`` dividing the tile's token side or a multiple of it), local tiles read without their
  positions carry no information about the answer by construction: the four corners always hold
  the four classes, in an order the pointer alone gives.

Detail: a glyph is ``3*glyph_px`` pixels wide; squashed to one crop (the thumbnail, ``R`` times
smaller) it shrinks to about ``3*glyph_px/R`` pixels, and as all classes have the same number of
ink pixels, blur alone does not tell them apart. Reproducible: the same seed gives the same batch.
Chance level is ``1 / num_classes``.

``make_crops`` draws the tower's pretext task: single crops at full resolution, each with a glyph
(or none) and a mark (none, a frame, or an arrow in one of four directions), labelled with both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Four glyph classes: 3x3 bit patterns with the same number of ink pixels (5), so that blur alone
# (mean intensity) does not give the class away.
GLYPHS = torch.tensor(
    [
        [[1, 0, 1], [0, 1, 0], [1, 0, 1]],  # X
        [[0, 1, 0], [1, 1, 1], [0, 1, 0]],  # +
        [[1, 1, 1], [0, 0, 1], [0, 0, 1]],  # corner
        [[1, 0, 0], [1, 1, 0], [1, 0, 1]],  # hook
    ],
    dtype=torch.float32,
)
NUM_CLASSES = len(GLYPHS)
CORNERS = ((0, 0), (0, -1), (-1, 0), (-1, -1))  # top-left, top-right, bottom-left, bottom-right


@dataclass(frozen=True)
class TaskConfig:
    crop_size: int = 32
    grid: tuple[int, int] = (3, 3)
    glyph_px: int = 2
    mark: str = "frame"  # "frame", "arrow" or "context"
    snap: int = 1  # glyph corners on multiples of this many pixels (the tower's patch size: one glyph, one patch)

    @property
    def canvas(self) -> tuple[int, int]:
        return self.grid[0] * self.crop_size, self.grid[1] * self.crop_size


def _arrow(size: int, corner: int) -> torch.Tensor:
    """A (size, size) mask: a thick diagonal arrow from the tile centre towards ``corner``."""
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    sy = -1.0 if CORNERS[corner][0] == 0 else 1.0
    sx = -1.0 if CORNERS[corner][1] == 0 else 1.0
    # coordinates along (u) and across (v) the arrow's direction, origin at the centre
    cy, cx = (size - 1) / 2, (size - 1) / 2
    u = ((y - cy) * sy + (x - cx) * sx) / 2**0.5
    v = ((y - cy) * sy - (x - cx) * sx) / 2**0.5
    shaft = (u > -0.35 * size) & (u < 0.1 * size) & (v.abs() < 0.08 * size)
    head = (u >= 0.1 * size) & (u < 0.42 * size) & (v.abs() < (0.42 * size - u) * 0.9)
    return (shaft | head).float()


def _border(s: int) -> int:
    return max(s // 8, 2)  # frame width; glyphs stay inside it


MARK_KINDS = ("frame", "arrow", "context")


def _check_context(cfg: TaskConfig) -> tuple[int, int]:
    """(stride R, central side in blocks) of a ``"context"`` task, with one clear error for a grid it cannot use."""
    rows, cols = cfg.grid
    if rows != cols or rows < 4 or rows % 2:
        raise ValueError(f"mark='context' needs a square grid with an even side of at least 4 (a central region "
                         f"inside the corner tiles' ring; blocks whose mirror images swap the checkerboard's "
                         f"colours), got grid={tuple(cfg.grid)}")
    if cfg.crop_size % rows:
        raise ValueError(f"mark='context' needs crop_size divisible by the grid side {rows} (whole blocks per tile), "
                         f"got crop_size={cfg.crop_size}")
    return rows, (rows - 2) * cfg.crop_size // rows


def pointer_dots(cfg: TaskConfig, corner: int) -> torch.Tensor:
    """The ``"context"`` task's ink mask of the central region, ``((R-2)*s, (R-2)*s)``: in every
    ``R x R`` block, a checkerboard: the pixels ``(y, x)`` of even ``y + x`` inside
    ``_arrow(blocks, corner)`` (upsampled ``R`` times), those of odd ``y + x`` outside it."""
    stride, blocks = _check_context(cfg)
    inside = _arrow(blocks, corner).repeat_interleave(stride, 0).repeat_interleave(stride, 1)
    y, x = torch.meshgrid(torch.arange(blocks * stride), torch.arange(blocks * stride), indexing="ij")
    even = ((y + x) % 2 == 0).float()
    return inside * even + (1 - inside) * (1 - even)


def pointer_crop_mask(cfg: TaskConfig, corner: int, negative: bool = False) -> torch.Tensor:
    """(s, s): the pointer as a global crop ``canvas[a::R, b::C]`` shows it (for the tower's pretext):
    the arrow for even ``a + b``, the central square but the arrow (``negative``) for odd ``a + b``."""
    stride, blocks = _check_context(cfg)
    mask = torch.zeros(cfg.crop_size, cfg.crop_size)
    start = cfg.crop_size // stride
    arrow = _arrow(blocks, corner)
    mask[start:start + blocks, start:start + blocks] = 1 - arrow if negative else arrow
    return mask


def pointed_region(cfg: TaskConfig, corner: int, patch_size: int) -> torch.Tensor:
    """((s/p), (s/p)) bool: the tokens of a global crop (patches of ``patch_size``) that lie in the
    corner tile ``corner`` points at (that tile is ``s/R`` pixels of the global crop): the
    per-token target of the context tower's pretext."""
    stride, _ = _check_context(cfg)
    side, span = cfg.crop_size // patch_size, cfg.crop_size // stride
    starts = torch.arange(side) * patch_size
    first = starts + patch_size <= span  # patches inside the first tile row / column
    last = starts >= cfg.crop_size - span
    r, c = CORNERS[corner]
    return (first if r == 0 else last)[:, None] & (first if c == 0 else last)[None, :]


def pretext_marks(cfg: TaskConfig) -> tuple[str, ...]:
    """The pretext's mark labels: ``PRETEXT_MARKS``, and the context task's pointers for its tower."""
    if cfg.mark != "context":
        return PRETEXT_MARKS
    return PRETEXT_MARKS + tuple(m.replace("arrow", "pointer") for m in PRETEXT_MARKS[2:])


def _glyph_spots(cfg: TaskConfig) -> list[int]:
    """Offsets (in a tile) where a glyph's top-left corner may go: inside the frame, on the snap grid."""
    s, g, border = cfg.crop_size, 3 * cfg.glyph_px, _border(cfg.crop_size)
    if g + 2 * border + 2 > s:
        raise ValueError(f"glyph_px={cfg.glyph_px} makes {g}-pixel glyphs, too large for crop_size={s}")
    spots = [p for p in range(border + 1, s - g - border) if p % cfg.snap == 0]
    if not spots:
        raise ValueError(f"no place for a {g}-pixel glyph on multiples of snap={cfg.snap} inside a {s}-pixel tile")
    return spots


def _frame(s: int) -> torch.Tensor:
    """A (s, s) mask: the tile's border, ``_border(s)`` pixels wide."""
    mask = torch.ones(s, s)
    border = _border(s)
    mask[border:-border, border:-border] = 0
    return mask


def _background(batch: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, 3, height, width): a soft random grey and noise, so that the tower must find the glyph."""
    base = torch.rand(batch, 3, 1, 1, generator=generator) * 0.3 + 0.35
    noise = torch.rand(batch, 1, height, width, generator=generator) * 0.1
    return (base + noise).expand(batch, 3, height, width).clone()


def _glyph(cls: int, glyph_px: int) -> torch.Tensor:
    """(3*glyph_px, 3*glyph_px): dark ink (0) on a light square (1)."""
    return 1.0 - GLYPHS[cls].repeat_interleave(glyph_px, 0).repeat_interleave(glyph_px, 1)


def _paint_mark(region: torch.Tensor, mask: torch.Tensor) -> None:
    """Red up, green and blue down where ``mask`` is 1 (``region``: (3, H, W), in place)."""
    region[0] += mask * 0.5
    region[1:] -= mask[None] * 0.3


PRETEXT_MARKS = ("none", "frame", "arrow_top_left", "arrow_top_right", "arrow_bottom_left", "arrow_bottom_right")
NO_GLYPH = NUM_CLASSES  # the pretext's glyph label for a crop without a glyph


def make_crops(cfg: TaskConfig, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tower's pretext task: single ``s x s`` crops drawn like the task's tiles.

    Returns (crops (B, 3, s, s) in [0, 1], glyph (B,) in ``0..NUM_CLASSES`` where ``NO_GLYPH`` means
    none, mark (B,) indexing ``pretext_marks(cfg)``). A glyph is present with probability 3/4; the
    mark is uniform over the kinds (six; ten with a ``"context"`` task's pointers, as its global crop
    ``canvas[0::R, 0::R]`` shows them). The glyph is drawn last, so an arrow never hides it.
    """
    s, g = cfg.crop_size, 3 * cfg.glyph_px
    spots = _glyph_spots(cfg)
    crops = _background(batch, s, s, generator)
    glyph = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    glyph[torch.rand(batch, generator=generator) < 0.25] = NO_GLYPH
    mark = torch.randint(0, len(pretext_marks(cfg)), (batch,), generator=generator)
    masks = [torch.zeros(s, s), _frame(s)] + [_arrow(s, k) for k in range(4)]
    if cfg.mark == "context":  # each pointer in one of the two polarities the global crops show
        negative = torch.rand(4, generator=generator) < 0.5
        masks += [pointer_crop_mask(cfg, k, bool(negative[k])) for k in range(4)]
    place = torch.randint(len(spots), (batch, 2), generator=generator)
    for i in range(batch):
        _paint_mark(crops[i], masks[int(mark[i])])
        if glyph[i] != NO_GLYPH:
            top, left = spots[int(place[i, 0])], spots[int(place[i, 1])]
            crops[i, :, top:top + g, left:left + g] = _glyph(int(glyph[i]), cfg.glyph_px)
    return crops.clamp(0, 1), glyph, mark


def make_batch(cfg: TaskConfig, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (B, 3, R*s, C*s) in [0, 1], labels (B,)) for ``batch`` fresh samples."""
    rows, cols = cfg.grid
    s = cfg.crop_size
    if rows < 2 or cols < 2:
        raise ValueError(f"grid must have at least 2 rows and 2 columns for corner tiles, got {cfg.grid}")
    gp = cfg.glyph_px
    g = 3 * gp  # glyph side in pixels
    spots = _glyph_spots(cfg)
    if cfg.mark not in MARK_KINDS:
        raise ValueError(f"mark must be one of {list(MARK_KINDS)}, got {cfg.mark!r}")
    if cfg.mark == "context":
        _check_context(cfg)
    height, width = cfg.canvas
    images = _background(batch, height, width, generator)
    pointed = torch.randint(0, 4, (batch,), generator=generator)
    labels = torch.empty(batch, dtype=torch.long)
    centre = ((rows // 2) * s, (cols // 2) * s)
    arrows = [_arrow(s, k) for k in range(4)]
    frame = _frame(s)
    for i in range(batch):
        classes = torch.randperm(NUM_CLASSES, generator=generator)  # all four corners differ
        for k, (r, c) in enumerate(CORNERS):
            top = (r % rows) * s + spots[int(torch.randint(len(spots), (1,), generator=generator))]
            left = (c % cols) * s + spots[int(torch.randint(len(spots), (1,), generator=generator))]
            images[i, :, top:top + g, left:left + g] = _glyph(int(classes[k]), gp)
        k = int(pointed[i])
        labels[i] = classes[k]
        if cfg.mark == "context":  # the central tiles, inside the ring of border tiles
            region = (slice(s, (rows - 1) * s), slice(s, (cols - 1) * s))
            mask = pointer_dots(cfg, k)
        elif cfg.mark == "arrow":
            region, mask = (slice(centre[0], centre[0] + s), slice(centre[1], centre[1] + s)), arrows[k]
        else:
            r, c = CORNERS[k]
            region = (slice((r % rows) * s, (r % rows + 1) * s), slice((c % cols) * s, (c % cols + 1) * s))
            mask = frame
        _paint_mark(images[i, :, region[0], region[1]], mask)
    return images.clamp(0, 1), labels
