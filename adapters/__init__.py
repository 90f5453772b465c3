"""Shims that put dual view into existing vision-language stacks (installed as ``dualview.adapters``).

Each adapter is a :class:`~dualview.adapters.base.HostAdapter` subclass, registered in the one registry
(:mod:`~dualview.adapters.registry`) that ``dualview.apply`` / ``load`` / ``from_pretrained`` read. Its
``apply(model, **options) -> model`` changes the model in place, registers the DEM as ``spatial_embed``
(so ``state_dict`` / ``save_pretrained`` carry it), records the options in the model's config, and
leaves everything else alone; its ``from_pretrained(path)`` loads it back. The package's modules also
offer these as functions:

- :mod:`dualview.adapters.llava15`: the original LLaVA code (``llava-torch``, module ``llava``).
- :mod:`dualview.adapters.hf_llava`: transformers' ``LlavaForConditionalGeneration``.
- :mod:`dualview.adapters.hf_llava_next`: transformers' ``LlavaNextForConditionalGeneration``.
- :mod:`dualview.adapters.hf_llava_onevision`: transformers' ``LlavaOnevisionForConditionalGeneration``
  (multi-image prompts and video stay plain).
- :mod:`dualview.adapters.hf_internvl`: transformers' ``InternVLForConditionalGeneration`` (InternVL
  2.5 / 3; ``prepare_processor`` adds the tile grids the model needs; video frames stay plain).
- :mod:`dualview.adapters.hf_idefics3`: transformers' ``Idefics3ForConditionalGeneration`` and
  ``SmolVLMForConditionalGeneration`` (``prepare_processor`` adds the ``image_grid`` the model needs;
  unsplit images and video frames stay plain).
- :mod:`dualview.adapters.towers`: CLIP / SigLIP (transformers) and timm ViT models as towers.
- :mod:`dualview.adapters.interface`: the public interface for integrations and new adapters.

Adapter modules import their host library lazily; importing this package needs only the core.
"""

from ._common import DualViewOptions, record_options, recorded_options
from .base import Geometry, HostAdapter, Placement
from .registry import register_adapter, registered_adapters

__all__ = [
    "DualViewOptions", "Geometry", "HostAdapter", "Placement", "record_options", "recorded_options",
    "register_adapter", "registered_adapters",
]
