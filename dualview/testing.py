"""Tiny stand-ins for tests, examples and device checks: no weights, no downloads.

:class:`PatchTower` needs only torch. The builders below (a word-level tokenizer with an
``<image>`` token, small CLIP / Llama configs, a random PIL image) need the ``hf`` extra; they make
the randomly initialised LLaVA-style models the examples and the adapter tests run offline.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

WORDS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "USER:", "ASSISTANT:", "what", "is", "small", "here?", "a", "dot"]
"""The tiny tokenizer's whole vocabulary."""
IMAGE_TOKEN_ID = WORDS.index("<image>")
PROMPT = "USER: <image> what is small here? ASSISTANT:"


class PatchTower(torch.nn.Module):
    """A ViT-style patch embedding as a tower: (N, 3, s, s) -> (N, (s/p)^2, D). Counts its calls
    and the crops it saw, so a test can check how the encoder batches its tower calls."""

    def __init__(self, dim: int = 16, patch_size: int = 14, channels: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.out_dim = dim
        self.proj = torch.nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)
        self.calls = 0
        self.crops = 0

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.crops += pixels.shape[0]
        return self.proj(pixels).flatten(2).transpose(1, 2)


def tokenizer():
    """A word-level fast tokenizer over :data:`WORDS` with an ``<image>`` token, built in memory."""
    return word_tokenizer(WORDS, extra_special_tokens={"image_token": "<image>"})


def word_tokenizer(words: Sequence[str], *, split: str = "spaces", pad_token: str = "<pad>", bos_token: str = "<s>",
                   eos_token: str = "</s>", **special: Any):
    """A ``PreTrainedTokenizerFast`` over ``words`` (a word's id is its position; unknown words are
    "<unk>", which ``words`` must hold). ``split``: "spaces" (words are what whitespace separates),
    "punctuation" (punctuation apart from the words too) or "lines" (spaces separate words and every
    newline is a token of its own, "\\n\\n" two, as in the tiny vocabularies of hosts whose prompts hold
    newlines). ``special`` goes to ``PreTrainedTokenizerFast`` as is: the host's further special tokens
    (``extra_special_tokens``, ...), ``padding_side``, ``chat_template``."""
    import transformers
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    splits = {
        "spaces": pre_tokenizers.WhitespaceSplit,
        "punctuation": pre_tokenizers.Whitespace,
        "lines": lambda: pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split("\n", behavior="isolated"),
        ]),
    }
    vocabulary = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    vocabulary.pre_tokenizer = splits[split]()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=vocabulary, unk_token="<unk>", pad_token=pad_token,
                                                bos_token=bos_token, eos_token=eos_token, **special)


def clip_config(image_size: int = 28, hidden: int = 32):
    """A 2-layer CLIP vision config, patch 14."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=image_size, patch_size=14, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=4,
    )


def llama_config(hidden: int = 32):
    """A 2-layer Llama config over :data:`WORDS`."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
    )


def pil_image(height: int, width: int, seed: int = 0):
    """A random RGB PIL image of ``height`` x ``width`` pixels (numpy's generator, seeded)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)
