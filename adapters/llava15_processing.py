"""The processor side of :mod:`dualview.adapters.llava15` (which re-exports these functions):
llava's ``CLIPImageProcessor`` at the dual-view canvas, llava's pad-to-square
``process_images``, and the image tokens per image. Sizes are ``(height, width)``; ``llava.mm_utils``
and PIL use ``(width, height)``.
"""

from __future__ import annotations

import types
from typing import Any, Optional, Sequence

import torch
from torch import nn

from dualview import grid as G

from .registry import adapter_named


def canvas_size(model: nn.Module) -> G.Size:
    """``(height, width)`` of the pixels :func:`image_processor` produces: ``max(R, C) * crop`` square."""
    dcm = _encoder_of(model).dcm
    if dcm.grid == "auto":
        raise ValueError("the image processor needs a fixed grid, got grid='auto'")
    side = max(dcm.grid) * dcm.crop_size
    return side, side


def image_processor(model: nn.Module, processor: Any = None) -> Any:
    """A copy of llava's ``CLIPImageProcessor`` (``processor``, default: the tower's) resizing to the
    dual-view canvas: ``size={'shortest_edge': S}``, ``crop_size=S x S`` with ``S = max(R, C) * crop``
    (1008 for 3x3 CLIP-336). Pair it with :func:`process_images`, which pads to square first, so the
    centre crop keeps the whole image."""
    if processor is None:
        processor = model.get_vision_tower().image_processor
    side, _ = canvas_size(model)
    settings = {**processor.to_dict(), "size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}}
    settings.pop("image_processor_type", None)
    return type(processor).from_dict(settings)


def process_images(images: Sequence[Any], processor: Any) -> torch.Tensor:
    """PIL images -> (B, 3, S, S) pixels as the released training made them: llava's
    ``process_images`` with ``image_aspect_ratio='pad'`` (``expand2square`` with the processor's mean
    colour, then the processor)."""
    from llava.mm_utils import process_images as llava_process_images

    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError(f"images must be a non-empty list of PIL images, got {type(images).__name__}")
    pixels = llava_process_images(list(images), processor, types.SimpleNamespace(image_aspect_ratio="pad"))
    if not isinstance(pixels, torch.Tensor):  # llava returns a list when shapes differ
        raise ValueError(f"processor gave images of different sizes {[tuple(p.shape) for p in pixels]}")
    return pixels


def num_image_tokens(model: nn.Module, image_size: Optional[G.Size] = None) -> int:
    """Tokens the LLM sees per image of ``(H, W)`` pixels (default: :func:`canvas_size`)."""
    size = image_size if image_size is not None else canvas_size(model)
    return _encoder_of(model).budget(size).tokens


def _encoder_of(model: nn.Module) -> Any:
    return adapter_named("llava15").encoder_of(model)  # the registry's: the adapter module imports this one
