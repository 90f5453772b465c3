"""The tiny LLaVA-1.5 host of llava-torch (``llava``): a 2-layer Llama (or Mistral / MPT) over a 2-layer CLIP
tower saved to a folder (llava loads its tower itself, from ``mm_vision_tower``), its prompt ids and
image batches (nothing downloaded)."""

from __future__ import annotations

import torch
from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import tokenizer_image_token
from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
from llava.model.language_model.llava_mpt import LlavaMptConfig, LlavaMptForCausalLM
from transformers import CLIPImageProcessor, CLIPVisionModel

from dualview.adapters import llava15

from . import tiny_models as tiny


def save_tower(folder, image_size: int) -> str:
    """A tiny CLIP tower + its image processor in ``folder``, as llava's ``mm_vision_tower`` expects."""
    tiny.seeded(0)
    CLIPVisionModel(tiny.clip_config(image_size=image_size)).save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(folder)
    return str(folder)


def llava_settings(tower: str) -> dict:
    """The tiny LLaVA-1.5 config, its vision tower the folder ``tower`` (see :func:`save_tower`)."""
    return dict(
        vocab_size=len(tiny.WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, mm_vision_tower=tower, mm_hidden_size=32,
        mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        image_aspect_ratio="pad",
    )


def tiny_model(tower: str, cls=LlavaLlamaForCausalLM, config_cls=LlavaConfig, **config_overrides):
    """A llava-torch ``cls`` (Llama by default) over the CLIP tower saved at ``tower``, seed 0, eval mode."""
    tiny.seeded(0)
    return cls(config_cls(**{**llava_settings(tower), **config_overrides})).eval()


def prompt_ids() -> torch.Tensor:
    ids = tokenizer_image_token(tiny.PROMPT, tiny.tokenizer(), return_tensors="pt").unsqueeze(0)
    assert int((ids == IMAGE_TOKEN_INDEX).sum()) == 1
    return ids


def images(model, *sizes) -> torch.Tensor:
    processor = llava15.image_processor(model)
    return llava15.process_images([tiny.pil_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)], processor)


def mpt_model(tower: str):
    """The MPT variant of :func:`tiny_model`."""
    settings = {k: v for k, v in llava_settings(tower).items() if k.startswith(("mm_", "image_", "vocab"))}
    tiny.seeded(0)
    return LlavaMptForCausalLM(LlavaMptConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=512, **settings)).eval()
