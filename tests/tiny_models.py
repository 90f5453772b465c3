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

from .word_tokenizer import word_tokenizer


def tokenizer():
    """A word-level tokenizer over :data:`WORDS` with an ``<image>`` token (right padding)."""
    return word_tokenizer(WORDS, extra_special_tokens={"image_token": "<image>"})
