"""Tiny, randomly initialised models and an offline tokenizer for the adapter tests (no downloads).

The model builders live in :mod:`dualview.testing` (the examples use them too, without reaching into
``tests/``); this module keeps the tests' import path. The tokenizer is the tests' one builder's
(:func:`tests.word_tokenizer.word_tokenizer`) over the same vocabulary and special tokens as
:func:`dualview.testing.tokenizer`."""

from __future__ import annotations

from dualview.testing import (  # noqa: F401  (re-exported)
    IMAGE_TOKEN_ID,
    PROMPT,
    WORDS,
    clip_config,
    llama_config,
    pil_image,
    seeded,
)

import torch

from .word_tokenizer import word_tokenizer


def tokenizer():
    """A word-level tokenizer over :data:`WORDS` with an ``<image>`` token (right padding)."""
    return word_tokenizer(WORDS, extra_special_tokens={"image_token": "<image>"})


def global_crops(tiles: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The global crops from their definition, independent of dualview: the canvas put together from
    the R*C row-major ``tiles`` (R*C, ..., s, s) by concatenation, then ``canvas[..., a::R, b::C]`` for
    every (a, b), row-major. -> (R*C, ..., s, s): pixels, or pixel masks alike."""
    rows, cols = grid
    canvas = torch.cat([torch.cat(list(tiles[r * cols:(r + 1) * cols]), dim=-1) for r in range(rows)], dim=-2)
    return torch.stack([canvas[..., a::rows, b::cols] for a in range(rows) for b in range(cols)])
