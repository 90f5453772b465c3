"""Tiny random Idefics3 / SmolVLM models and the hosts' own processors built from kwargs, offline.

Tiles are ``S = 32`` pixels with ``PATCH = 8``: 4x4 tokens per tile, 2x2 after the connector's pixel
shuffle (``scale_factor`` 2), so ``image_seq_len = 4`` (SmolVLM-256M: 512 / 16 -> 32x32 -> 64 with
scale 4). The processors resize the longest edge to ``LONGEST = 4*S`` as the real ones do (4 * 364,
4 * 512), so an image becomes up to 4x4 tiles plus the global image. The tokenizer is word-level with
the hosts' special tokens (``<fake_token_around_image>``, ``<image>``, ``<global-img>``,
``<row_r_col_c>``, ``<end_of_utterance>``); newlines are tokens, as in the real vocabularies.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import transformers

from dualview.testing import word_tokenizer

S, PATCH, SCALE = 32, 8, 2
SEQ = (S // PATCH // SCALE) ** 2  # image tokens per frame after the pixel shuffle
LONGEST = 4 * S
HOSTS = ("idefics3", "smolvlm")
ROW_COL = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
SPECIAL = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
WORDS = ["<unk>", "<pad>", "<|im_start|>", *SPECIAL, "\n", "User:", "Assistant:", "what", "is", "in", "the",
         "picture", "?", "a", "cat", "dog", ".", "<video>", "You", "are", "provided", "following", "series", "of",
         "frames", "from", "[H:MM:SS]", "video.", "Frame", "one", "two", "three", "0:00:02", "00:00:", "00:01:",
         *ROW_COL]
IMAGE_TOKEN_ID = WORDS.index("<image>")
PROMPT = "User: <image> what is in the picture ?"


def tiny_model(host: str = "idefics3", *, seed: int = 0, hidden: int = 32):
    """A seeded random ``Idefics3ForConditionalGeneration`` / ``SmolVLMForConditionalGeneration``: a
    2-layer SigLIP-style tower (no CLS token, ``hidden`` channels) and a 2-layer Llama."""
    vision = dict(image_size=S, patch_size=PATCH, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=2, num_attention_heads=2)
    text = transformers.LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=1, bos_token_id=2, eos_token_id=6,
    )
    config_cls, model_cls = {
        "idefics3": (transformers.Idefics3Config, transformers.Idefics3ForConditionalGeneration),
        "smolvlm": (transformers.SmolVLMConfig, transformers.SmolVLMForConditionalGeneration),
    }[host]
    config = config_cls(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, scale_factor=SCALE,
                        pad_token_id=1)
    torch.manual_seed(seed)
    return model_cls(config).eval()


def image_processor(host: str = "idefics3", *, backend: str = "torchvision", longest: int = LONGEST, tile: int = S,
                    **kwargs):
    """The unchanged ``Idefics3ImageProcessor`` / ``SmolVLMImageProcessor`` (or its ``Pil`` twin)
    with ``tile``-pixel tiles and the longest edge resized to ``longest``."""
    cls = {
        ("idefics3", "torchvision"): transformers.Idefics3ImageProcessor,
        ("idefics3", "pil"): transformers.Idefics3ImageProcessorPil,
        ("smolvlm", "torchvision"): transformers.SmolVLMImageProcessor,
        ("smolvlm", "pil"): transformers.SmolVLMImageProcessorPil,
    }[host, backend]
    return cls(size={"longest_edge": longest}, max_image_size={"longest_edge": tile}, **kwargs)


def tiny_processor(host: str = "idefics3", *, backend: str = "torchvision", longest: int = LONGEST, **kwargs):
    """The unchanged ``Idefics3Processor`` / ``SmolVLMProcessor`` (with ``SmolVLMVideoProcessor``)."""
    images = image_processor(host, backend=backend, longest=longest, **kwargs)
    tokenizer = word_tokenizer(
        WORDS, split="lines", bos_token="<|im_start|>", eos_token="<end_of_utterance>",
        additional_special_tokens=SPECIAL + ROW_COL, padding_side="left",
        extra_special_tokens={"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                              "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"},
    )
    if host == "idefics3":
        return transformers.Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=SEQ)
    video = transformers.SmolVLMVideoProcessor(size={"longest_edge": longest}, max_image_size={"longest_edge": S})
    return transformers.SmolVLMProcessor(image_processor=images, tokenizer=tokenizer, video_processor=video,
                                         image_seq_len=SEQ)


def image(size: tuple[int, int]) -> np.ndarray:
    """A random RGB image (H, W, 3), a function of its ``(H, W)`` alone."""
    height, width = size
    return np.random.default_rng(height * 1000 + width).integers(0, 256, (height, width, 3), dtype=np.uint8)


def batch(processor, samples, **kwargs):
    """``samples``: per prompt, a list of image sizes (one ``<image>`` each); prompts of different
    lengths (left padding)."""
    prompts = ["User:" + " <image>" * len(sizes) + " what is in the picture ?" + " a" * i for i, sizes in enumerate(samples)]
    return processor(images=[[image(s) for s in sizes] for sizes in samples], text=prompts, return_tensors="pt",
                     padding=True, **kwargs)


@functools.lru_cache(maxsize=None)
def config_model(host: str = "idefics3"):
    """A tiny model (built once) for what reads only its config: prepare_processor, budget."""
    return tiny_model(host)
