"""Tiny, randomly initialised models and an offline tokenizer for the adapter tests (no downloads)."""

from __future__ import annotations

import numpy as np
import torch

WORDS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "USER:", "ASSISTANT:", "what", "is", "small", "here?", "a", "dot"]
IMAGE_TOKEN_ID = WORDS.index("<image>")
PROMPT = "USER: <image> what is small here? ASSISTANT:"


def tokenizer():
    """A word-level fast tokenizer with an ``<image>`` token, built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def clip_config(image_size: int = 28, hidden: int = 32):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=image_size, patch_size=14, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=4,
    )


def llama_config(hidden: int = 32):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
    )


def pil_image(height: int, width: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)
