"""The tiny LLaVA-NeXT host of the tests: a random ``LlavaNextForConditionalGeneration`` (CLIP or SigLIP
tower, crop 28, patch 14: 2x2 tokens per crop), its unchanged processor over a word-level tokenizer,
and the processor's inputs for images of given sizes (nothing downloaded)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from dualview.testing import word_tokenizer

S, PATCH = 28, 14  # crop size and patch size: 2x2 tokens per crop
H = W = S // PATCH
PINPOINTS = [[S, 2 * S], [2 * S, S], [2 * S, 2 * S], [3 * S, S], [S, 3 * S]]
WORDS = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "user", "assistant", "what", "is", "in", "the", "picture",
         "a", "cat", "dog", ":", "?", "."]
IMAGE_TOKEN_ID = WORDS.index("<image>")


def tiny_model(vision_feature_layer=-2, tower="clip", strategy="default", seed=0):
    """Random weights under ``seed``, eval mode; ``tower``: "clip" or "siglip"."""
    vision = dict(image_size=S, patch_size=PATCH, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2)
    vision_config = (transformers.CLIPVisionConfig if tower == "clip" else transformers.SiglipVisionConfig)(**vision)
    text_config = transformers.LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=1, bos_token_id=2, eos_token_id=3,
    )
    config = transformers.LlavaNextConfig(
        vision_config=vision_config, text_config=text_config, image_grid_pinpoints=PINPOINTS,
        image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(seed)
    return transformers.LlavaNextForConditionalGeneration(config).eval()


def tiny_processor(strategy="default", extra_tokens=1):
    """The unchanged ``LlavaNextProcessor``, left padding."""
    tokenizer = word_tokenizer(WORDS, split="punctuation", extra_special_tokens={"image_token": "<image>"},
                               padding_side="left")
    image_processor = transformers.LlavaNextImageProcessor(
        size={"shortest_edge": S}, crop_size={"height": S, "width": S}, image_grid_pinpoints=PINPOINTS,
    )
    return transformers.LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=extra_tokens,
    )


def images(sizes):
    """Random RGB images, each a function of its size alone."""
    return [np.random.default_rng(h * 1000 + w).integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def batch(sizes, processor=None):
    processor = processor or tiny_processor()
    prompts = ["user : <image> what is in the picture ?" + " a" * i for i in range(len(sizes))]
    return processor(images=images(sizes), text=prompts, return_tensors="pt", padding=True)
