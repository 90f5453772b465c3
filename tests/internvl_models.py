"""Tiny random InternVL models and the host's own processor built from kwargs, offline.

Tiles are ``S = 28`` pixels with ``PATCH = 7``: 4x4 tokens per tile, 2x2 after InternVL's pixel
shuffle (``downsample_ratio`` 0.5), so ``image_seq_length = 4`` (the real InternVL3: 448 / 14 ->
32x32 -> 256). ``MAX_PATCHES = 6`` allows every grid of up to 6 tiles (1x6 and 6x1 for extreme
aspect ratios, 2x3, 3x2, ...); the real processor allows 12. The tokenizer is word-level with the
host's special tokens ``<img>``, ``</img>``, ``<IMG_CONTEXT>`` and ``<video>``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import transformers

from dualview.testing import word_tokenizer

S, PATCH = 28, 7
SEQ = (S // PATCH // 2) ** 2  # image tokens per tile after the pixel shuffle
MIN_PATCHES, MAX_PATCHES = 1, 6
WORDS = ["<unk>", "<pad>", "<s>", "</s>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>", "user", "assistant",
         "what", "is", "in", "the", "picture", "a", "cat", "dog", ":", "?", "Frame1", "Frame2", "Frame3"]
IMAGE_TOKEN = "<IMG_CONTEXT>"
IMAGE_TOKEN_ID = WORDS.index(IMAGE_TOKEN)
PROMPT = f"user : {IMAGE_TOKEN} what is in the picture ?"


def tiny_model(
    *, tower: str = "internvit", use_mean_pooling: bool = True, vision_feature_layer: int = -1,
    strategy: str = "default", seed: int = 0,
) -> "transformers.InternVLForConditionalGeneration":
    """A seeded random InternVL model: a 2-layer vision tower with 16 channels (``"internvit"``, with
    a CLS token; or the ``"clip"`` / ``"siglip"`` towers the host also takes) and a 2-layer Qwen2."""
    sizes = dict(image_size=S, patch_size=PATCH, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=2)
    if tower == "internvit":
        vision = transformers.InternVLVisionConfig(**sizes, use_mean_pooling=use_mean_pooling)
    else:
        vision = {"clip": transformers.CLIPVisionConfig, "siglip": transformers.SiglipVisionConfig}[tower](**sizes)
    text = transformers.Qwen2Config(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=1, bos_token_id=2, eos_token_id=3,
    )
    config = transformers.InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, image_seq_length=SEQ,
        vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(seed)
    model = transformers.InternVLForConditionalGeneration(config).eval()
    # InternViT initialises its CLS token, position embeddings and layer scales to constants: random
    # ones make the tower's output depend on every input (as in a trained checkpoint)
    with torch.no_grad():
        for name, param in model.model.vision_tower.named_parameters():
            if "cls_token" in name or "position_embeddings" in name or "lambda" in name:
                param.normal_(0, 0.5)
    return model


def tiny_processor(*, backend: str = "torchvision", max_patches: int = MAX_PATCHES) -> "transformers.InternVLProcessor":
    """The unchanged ``InternVLProcessor``: ``GotOcr2ImageProcessor`` (``backend="torchvision"``) or
    ``GotOcr2ImageProcessorPil`` (``"pil"``) cropping to ``S x S`` tiles, ``InternVLVideoProcessor``."""
    backends = {"torchvision": transformers.GotOcr2ImageProcessor, "pil": transformers.GotOcr2ImageProcessorPil}
    image_cls = backends[backend]
    return transformers.InternVLProcessor(
        image_processor=image_cls(size={"height": S, "width": S}, crop_to_patches=True, min_patches=MIN_PATCHES,
                                  max_patches=max_patches),
        tokenizer=word_tokenizer(
            WORDS, padding_side="left",
            extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                  "context_image_token": IMAGE_TOKEN, "video_token": "<video>"},
        ),
        video_processor=transformers.InternVLVideoProcessor(size={"height": S, "width": S}),
        image_seq_length=SEQ,
    )


def image(size: tuple[int, int]) -> np.ndarray:
    """A random RGB image (H, W, 3), a function of its ``(H, W)`` alone."""
    height, width = size
    return np.random.default_rng(height * 1000 + width).integers(0, 256, (height, width, 3), dtype=np.uint8)


def video(frames: int = 3, size: tuple[int, int] = (30, 40)) -> np.ndarray:
    return np.random.default_rng(frames).integers(0, 256, (frames, *size, 3), dtype=np.uint8)


def batch(processor, sizes, **kwargs):
    """One single-image prompt per size (of different lengths: left padding)."""
    prompts = [PROMPT + " a" * i for i in range(len(sizes))]
    return processor(images=[image(s) for s in sizes], text=prompts, return_tensors="pt", padding=True, **kwargs)


def multi_image_batch(processor, samples, **kwargs):
    """``samples``: per prompt, a list of image sizes (one ``<IMG_CONTEXT>`` each)."""
    prompts = ["user :" + f" {IMAGE_TOKEN}" * len(sizes) + " what is in the picture ?" for sizes in samples]
    return processor(images=[[image(s) for s in sizes] for sizes in samples], text=prompts, return_tensors="pt",
                     padding=True, **kwargs)


@functools.lru_cache(maxsize=None)
def config_model():
    """A tiny model (built once) for what reads only its config: prepare_processor, budget."""
    return tiny_model()
