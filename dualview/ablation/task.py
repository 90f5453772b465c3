"""A synthetic high-resolution task that needs fine detail and the layout of the image, generated
on the fly.

Each image is an ``R*s x C*s`` canvas. Each of the four corner tiles holds one small glyph (a ``3x3``
bit pattern drawn with ``glyph_px`` pixels per bit, the four classes all different) at a random
place. One corner is marked, and the answer is the class of the glyph there. The mark is either

- ``"frame"`` (default): a thick red frame around the marked corner tile: the model must find the
  marked region among four far-apart ones and read the small glyph inside it; or
- ``"arrow"``: a large arrow in the centre tile pointing at the marked corner: the mark and the
  glyph are far apart, a relation between regions (much harder to learn at small scale).

Detail: a glyph is ``3*glyph_px`` pixels wide; squashed to one crop (the thumbnail, ``R`` times
smaller) it shrinks to about ``3*glyph_px/R`` pixels, and as all classes have the same number of
ink pixels, blur alone does not tell them apart. Reproducible: the same seed gives the same batch.
Chance level is ``1 / num_classes``.
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
    mark: str = "frame"  # "frame" or "arrow"
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


def make_batch(cfg: TaskConfig, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (B, 3, R*s, C*s) in [0, 1], labels (B,)) for ``batch`` fresh samples."""
    rows, cols = cfg.grid
    s = cfg.crop_size
    if rows < 2 or cols < 2:
        raise ValueError(f"grid must have at least 2 rows and 2 columns for corner tiles, got {cfg.grid}")
    gp = cfg.glyph_px
    g = 3 * gp  # glyph side in pixels
    border = max(s // 8, 2)  # frame width; glyphs stay inside it
    if g + 2 * border + 2 > s:
        raise ValueError(f"glyph_px={gp} makes {g}-pixel glyphs, too large for crop_size={s}")
    spots = [p for p in range(border + 1, s - g - border) if p % cfg.snap == 0]
    if not spots:
        raise ValueError(f"no place for a {g}-pixel glyph on multiples of snap={cfg.snap} inside a {s}-pixel tile")
    if cfg.mark not in ("frame", "arrow"):
        raise ValueError(f"mark must be 'frame' or 'arrow', got {cfg.mark!r}")
    height, width = cfg.canvas
    # soft random background: gradients and noise, so that the tower must find the glyph
    base = torch.rand(batch, 3, 1, 1, generator=generator) * 0.3 + 0.35
    noise = torch.rand(batch, 1, height, width, generator=generator) * 0.1
    images = (base + noise).expand(batch, 3, height, width).clone()
    pointed = torch.randint(0, 4, (batch,), generator=generator)
    labels = torch.empty(batch, dtype=torch.long)
    centre = ((rows // 2) * s, (cols // 2) * s)
    arrows = [_arrow(s, k) for k in range(4)]
    for i in range(batch):
        classes = torch.randperm(NUM_CLASSES, generator=generator)  # all four corners differ
        for k, (r, c) in enumerate(CORNERS):
            top = (r % rows) * s + spots[int(torch.randint(len(spots), (1,), generator=generator))]
            left = (c % cols) * s + spots[int(torch.randint(len(spots), (1,), generator=generator))]
            glyph = GLYPHS[classes[k]].repeat_interleave(gp, 0).repeat_interleave(gp, 1)
            images[i, :, top:top + g, left:left + g] = 1.0 - glyph  # dark ink on a light square
        k = int(pointed[i])
        labels[i] = classes[k]
        if cfg.mark == "arrow":
            region, mask = (slice(centre[0], centre[0] + s), slice(centre[1], centre[1] + s)), arrows[k]
        else:
            r, c = CORNERS[k]
            region = (slice((r % rows) * s, (r % rows + 1) * s), slice((c % cols) * s, (c % cols + 1) * s))
            mask = torch.ones(s, s)
            mask[border:-border, border:-border] = 0
        images[i, 0, region[0], region[1]] += mask * 0.5
        images[i, 1:, region[0], region[1]] -= mask[None] * 0.3
    return images.clamp(0, 1), labels
