"""Tiny, randomly initialised models and an offline tokenizer for the adapter tests (no downloads).

The builders live in :mod:`dualview.testing` (the examples use them too, without reaching into
``tests/``); this module keeps the tests' import path."""

from __future__ import annotations

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
