"""Tiny random LLaVA-OneVision models and the host's own processor built from kwargs, offline.

Crops are ``S = 35`` pixels with ``PATCH = 7`` (5x5 tokens per crop: odd, like the real 27x27 of
SigLIP-so400m at 384/14); the pinpoints are every grid up to 3x3, as OneVision's own list is every
grid up to 6x6. ``anyres_max_2`` makes the host's downscale of the unpadded map happen already at
2x2 tiles (the real ``anyres_max_9`` only past 3x3 tiles, which tiny tests do not reach).
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

from dualview.testing import word_tokenizer

S, PATCH = 35, 7
H = W = S // PATCH
PINPOINTS = [[S * rows, S * cols] for rows in (1, 2, 3) for cols in (1, 2, 3)]
ASPECT = "anyres_max_2"
WORDS = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "<video>", "user", "assistant", "what", "is", "in", "the",
         "picture", "a", "cat", "dog", ":", "?", "."]
IMAGE_TOKEN_ID = WORDS.index("<image>")
VIDEO_TOKEN_ID = WORDS.index("<video>")
PROMPT = "user : <image> what is in the picture ?"


def tiny_model(
    *, tower: str = "siglip", strategy: str = "full", vision_feature_layer=-1, aspect: str = ASPECT,
    pinpoints=PINPOINTS, seed: int = 0,
) -> "transformers.LlavaOnevisionForConditionalGeneration":
    """A seeded random OneVision model: SigLIP (no CLS) or CLIP tower, a 2-layer Qwen2."""
    vision = dict(image_size=S, patch_size=PATCH, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2)
    if tower == "siglip":  # OneVision's SigLIP has no pooling head
        vision_config = transformers.SiglipVisionConfig(**vision, vision_use_head=False)
    else:
        vision_config = transformers.CLIPVisionConfig(**vision)
    text_config = transformers.Qwen2Config(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=1, bos_token_id=2, eos_token_id=3,
    )
    config = transformers.LlavaOnevisionConfig(
        vision_config=vision_config, text_config=text_config, image_grid_pinpoints=pinpoints,
        image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID, vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=strategy, vision_aspect_ratio=aspect,
    )
    torch.manual_seed(seed)
    return transformers.LlavaOnevisionForConditionalGeneration(config).eval()


def tiny_processor(*, strategy: str = "full", aspect: str = ASPECT, pinpoints=PINPOINTS) -> "transformers.LlavaOnevisionProcessor":
    """The unchanged ``LlavaOnevisionProcessor`` with a word-level tokenizer holding the host's
    special tokens. ``num_image_tokens`` counts the tower's tokens per crop (CLS included with
    ``"default"``, which the processor then subtracts)."""
    tokenizer = word_tokenizer(WORDS, split="punctuation", padding_side="left",
                               extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    return transformers.LlavaOnevisionProcessor(
        image_processor=transformers.LlavaOnevisionImageProcessor(size={"height": S, "width": S}, image_grid_pinpoints=pinpoints),
        video_processor=transformers.LlavaOnevisionVideoProcessor(size={"height": S, "width": S}),
        tokenizer=tokenizer, num_image_tokens=H * W + (strategy == "default"),
        vision_feature_select_strategy=strategy, vision_aspect_ratio=aspect,
    )


def image(size: tuple[int, int]) -> np.ndarray:
    """A random RGB image, a function of its ``(H, W)`` alone."""
    height, width = size
    return np.random.default_rng(height * 1000 + width).integers(0, 256, (height, width, 3), dtype=np.uint8)


def video(frames: int = 3, size: tuple[int, int] = (40, 50)) -> np.ndarray:
    return np.random.default_rng(frames).integers(0, 256, (frames, *size, 3), dtype=np.uint8)


def batch(sizes, processor=None, **kwargs):
    """One single-image prompt per size (of different lengths, left-padded)."""
    processor = processor or tiny_processor(**kwargs)
    prompts = [PROMPT + " a" * i for i in range(len(sizes))]
    return processor(images=[image(s) for s in sizes], text=prompts, return_tensors="pt", padding=True)


def multi_image_batch(samples, processor=None, **kwargs):
    """``samples``: per prompt, a list of image sizes (one ``<image>`` each)."""
    processor = processor or tiny_processor(**kwargs)
    prompts = ["user :" + " <image>" * len(sizes) + " what is in the picture ?" for sizes in samples]
    return processor(images=[[image(s) for s in sizes] for sizes in samples], text=prompts, return_tensors="pt",
                     padding=True)


def video_batch(processor=None, **kwargs):
    processor = processor or tiny_processor(**kwargs)
    return processor(videos=[video()], text=["user : <video> what is in the picture ?"], return_tensors="pt")
