"""The embedded demo image: a generated high-resolution scene, so nothing is downloaded.

Fine detail (a field of small marks) and global layout (large shapes far apart) on a
1000 x 1800 canvas: the kind of image a single 336-pixel crop cannot resolve.
"""

from __future__ import annotations

import torch


def demo_image(height: int = 1000, width: int = 1800, seed: int = 0) -> torch.Tensor:
    """A deterministic RGB image in [0, 1], shape (3, height, width)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height).view(-1, 1)
    x = torch.linspace(0, 1, width).view(1, -1)
    # sky-to-ground gradient
    image = torch.stack([0.55 + 0.35 * y + 0 * x, 0.65 + 0.1 * x - 0.3 * y, 0.95 - 0.6 * y + 0 * x])
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    # three large discs far apart: the global layout
    for cy, cx, r, colour in ((0.3, 0.15, 0.18, (0.9, 0.2, 0.2)), (0.7, 0.5, 0.22, (0.2, 0.7, 0.3)), (0.35, 0.85, 0.15, (0.2, 0.3, 0.9))):
        inside = (yy - cy * height) ** 2 + (xx - cx * width) ** 2 < (r * min(height, width)) ** 2
        image[:, inside] = torch.tensor(colour).view(3, 1)
    # a lattice of 6-pixel marks with random 3x3 bit patterns: detail below one crop's resolution
    cell = 24
    for top in range(cell // 2, height - cell, cell * 2):
        for left in range(cell // 2, width - cell, cell * 2):
            bits = torch.rand(3, 3, generator=gen) > 0.5
            mark = bits.repeat_interleave(2, 0).repeat_interleave(2, 1).float()
            image[:, top : top + 6, left : left + 6] = mark * 0.05 + (1 - mark) * 0.95
    return image.clamp(0, 1)
