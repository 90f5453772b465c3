"""A tiny random LLaVA-NeXT with dual view applied, saved with its processor to a local folder:
what the serving (vLLM) and evaluation (lmms-eval) lanes load, offline.

Sizes fit vLLM's CPU backend: the language model's head size is 32 (its attention kernels take
32, 64, 80, ...), the CLIP tower's crop 56 with patch 14 gives 4x4 tokens per crop, so a 2x2 AnyRes
grid makes an 8x8 local and global map for the DEM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dualview.testing import word_tokenizer

CROP, PATCH = 56, 14
PINPOINTS = [[CROP, 2 * CROP], [2 * CROP, CROP], [2 * CROP, 2 * CROP], [3 * CROP, CROP], [CROP, 3 * CROP]]
WORDS = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "user", "assistant", "what", "is", "in", "the", "picture",
         "a", "cat", "dog", "red", "green", "blue", "small", "big", "dot", "yes", "no", ":", "?", "."]
IMAGE_TOKEN = "<image>"
PROMPT = "user : <image> what is in the picture ? assistant :"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} :"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %} <image>{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)


def model(seed: int = 0, *, dual_view: bool = True, num_heads: int = 2, init: str = "released"):
    """A 2-layer CLIP (crop 56) + 2-layer Llama (head size 32) LlavaNextForConditionalGeneration, float32,
    random weights; with ``dual_view`` the DEM is applied by ``dualview.adapters.hf_llava_next`` (with
    ``init``; under "identity" the gate's ``g`` is drawn in [0.25, 1), as after training: at 0 the
    model would answer as the plain one)."""
    import transformers

    from dualview.adapters import hf_llava_next

    vision = transformers.CLIPVisionConfig(
        image_size=CROP, patch_size=PATCH, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2,
    )
    text = transformers.LlamaConfig(
        vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=1, bos_token_id=2, eos_token_id=3,
        tie_word_embeddings=False,
    )
    config = transformers.LlavaNextConfig(
        vision_config=vision, text_config=text, image_grid_pinpoints=PINPOINTS,
        image_token_id=WORDS.index(IMAGE_TOKEN), vision_feature_layer=-2, vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    host = transformers.LlavaNextForConditionalGeneration(config).eval()
    if dual_view:
        hf_llava_next.apply(host, num_heads=num_heads, init=init)
        louder_dem(host)
        if init == "identity":
            with torch.no_grad():
                host.model.spatial_gate.g.uniform_(0.25, 1.0)
    return host


def louder_dem(model) -> None:
    """Re-draw the DEM's matrices with std 0.5 (the host's init draws 0.02): a random DEM that visibly
    changes the tiles' features, so a test can tell dual view from the plain model by the answers."""
    with torch.no_grad():
        for p in model.model.spatial_embed.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5)


def processor():
    """LlavaNextProcessor over an in-memory word-level tokenizer (nothing downloaded)."""
    import transformers
    tokenizer = word_tokenizer(WORDS, extra_special_tokens={"image_token": IMAGE_TOKEN}, chat_template=CHAT_TEMPLATE)
    image_processor = transformers.LlavaNextImageProcessor(
        size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP}, image_grid_pinpoints=PINPOINTS,
    )
    return transformers.LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )


def image(height: int = 90, width: int = 150, seed: int = 0):
    """A random RGB PIL image (2x2... grids: the AnyRes grid depends on the aspect ratio)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def save(folder: Path, seed: int = 0) -> Path:
    """The adapted tiny model and its processor saved to ``folder`` (``hf_llava_next.from_pretrained`` loads it)."""
    folder = Path(folder)
    model(seed).save_pretrained(folder)
    processor().save_pretrained(folder)
    return folder
