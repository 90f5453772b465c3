"""Tiny, randomly initialised models and an offline tokenizer for the adapter tests (no downloads).

The model builders live in :mod:`dualview.testing` (the examples use them too, without reaching into
``tests/``); this module keeps the tests' import path. Every tokenizer of the tests and examples
comes from one builder, :func:`dualview.testing.word_tokenizer`."""

from __future__ import annotations

import torch

from dualview.testing import (  # noqa: F401  (re-exported)
    IMAGE_TOKEN_ID,
    PROMPT,
    WORDS,
    clip_config,
    llama_config,
    pil_image,
    seeded,
    tokenizer,
)


def global_crops(tiles: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The global crops from their definition, independent of dualview: the canvas put together from
    the R*C row-major ``tiles`` (R*C, ..., s, s) by concatenation, then ``canvas[..., a::R, b::C]`` for
    every (a, b), row-major. -> (R*C, ..., s, s): pixels, or pixel masks alike."""
    rows, cols = grid
    canvas = torch.cat([torch.cat(list(tiles[r * cols:(r + 1) * cols]), dim=-1) for r in range(rows)], dim=-2)
    return torch.stack([canvas[..., a::rows, b::cols] for a in range(rows) for b in range(cols)])
