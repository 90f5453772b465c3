"""Tiny stand-ins for tests and device checks (no weights, no downloads)."""

from __future__ import annotations

import torch


class PatchTower(torch.nn.Module):
    """A ViT-style patch embedding as a tower: (N, 3, s, s) -> (N, (s/p)^2, D). Counts its calls
    and the crops it saw, so a test can check how the encoder batches its tower calls."""

    def __init__(self, dim: int = 16, patch_size: int = 14, channels: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = torch.nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)
        self.calls = 0
        self.crops = 0

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.crops += pixels.shape[0]
        return self.proj(pixels).flatten(2).transpose(1, 2)
