"""Dual view in the original LLaVA code (``llava-torch``, the ``llava`` package of haotian-liu/LLaVA):
``LlavaLlamaForCausalLM`` (LLaVA-1.5, INF-LLaVA), ``LlavaMistralForCausalLM`` and ``LlavaMptForCausalLM``.

    from dualview.adapters import llava15
    apply(model)                                   # 3x3 dual view, as many image tokens as before
    images = process_images([pil_image], image_processor(model))   # padded to square, 3*336 pixels
    model.generate(input_ids, images=images, max_new_tokens=20)     # input_ids from llava's tokenizer_image_token
    model = from_pretrained(folder)      # saved by save_pretrained, or INF-LLaVA's release as it is

:func:`apply` swaps the model's class (and ``get_model()``'s) for its subclass here: ``encode_images`` runs DCM
-> llava's frozen tower -> DEM (``get_model().spatial_embed``) -> thumbnail fusion -> ``mm_projector``. Beside it:
``llava15_processing`` (image processor, token count), ``llava15_checkpoints`` (whole checkpoints), ``llava15_compat``
(llava-torch under transformers 5), ``llava15_tower`` (llava's vision side); ``docs/upstream.md``: this as a patch.
"""

from __future__ import annotations

import functools
from contextlib import suppress
from typing import Callable

import torch
from torch import nn

from . import _host
from .base import Geometry, HostAdapter, Placement
from .llava15_checkpoints import from_pretrained, load_checkpoint
from .llava15_compat import CacheAsPastKeyValues, MptForward
from .llava15_processing import canvas_size, image_processor, num_image_tokens, process_images
from .llava15_tower import FrozenTower, check_llava_config, unload_tower
from .towers import HFVisionTower

try:
    import llava.model.llava_arch  # noqa: F401 - the llava package, with its error when it is missing
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "dualview.adapters.llava15 needs the original LLaVA code: pip install --no-deps llava-torch==1.2.2.post1"
    ) from e


class DualViewLlava(CacheAsPastKeyValues, _host.DualViewHost):
    """What the dual-view subclasses of llava's ``Llava*ForCausalLM`` add: the hook ``encode_images``."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, tokens, hidden): dual view, then ``mm_projector``."""
        return self.dualview_project(encoder_of(self)(images))


class DualViewLlavaInner(_host.GuardsDualViewModules):
    """llava's inner model (``get_model()``, which holds ``mm_projector`` and gets ``spatial_embed``): an
    assigned DEM or gate is checked there, as on the other hosts' inner models."""


# The subclasses of each llava class that llava-torch imports here (a variant it cannot import is skipped)
with suppress(ImportError):
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM, LlavaLlamaModel

    class DualViewLlavaLlamaModel(DualViewLlavaInner, LlavaLlamaModel):
        dualview_plain = LlavaLlamaModel

    class DualViewLlavaLlamaForCausalLM(DualViewLlava, LlavaLlamaForCausalLM):
        dualview_plain = LlavaLlamaForCausalLM

with suppress(ImportError):
    from llava.model.language_model.llava_mistral import LlavaMistralForCausalLM, LlavaMistralModel

    class DualViewLlavaMistralModel(DualViewLlavaInner, LlavaMistralModel):
        dualview_plain = LlavaMistralModel

    class DualViewLlavaMistralForCausalLM(DualViewLlava, LlavaMistralForCausalLM):
        dualview_plain = LlavaMistralForCausalLM

with suppress(ImportError):
    from llava.model.language_model.llava_mpt import LlavaMptForCausalLM, LlavaMptModel

    class DualViewLlavaMptModel(DualViewLlavaInner, LlavaMptModel):
        dualview_plain = LlavaMptModel

    class DualViewLlavaMptForCausalLM(MptForward, DualViewLlava, LlavaMptForCausalLM):
        dualview_plain = LlavaMptForCausalLM


class Llava15Adapter(HostAdapter):
    """The host's declarations: llava's ``Llava*ForCausalLM`` is itself the swapped module (its
    ``encode_images`` the hook); the DEM, the gate and ``mm_projector`` live on ``get_model()``, whose
    class is swapped too (an assigned DEM is checked there). Every option is free (default: the
    released INF-LLaVA, 3x3 squashed, DEM to the tower's token grid, thumbnail mean). A delay-loaded
    vision tower is loaded (and put on the projector's device and dtype)."""

    name = "llava15"
    dual_view_classes = (*DualViewLlava.__subclasses__(), *DualViewLlavaInner.__subclasses__())
    hosts = tuple(cls.dualview_plain for cls in DualViewLlava.__subclasses__())
    projector = "mm_projector"

    @classmethod
    def _place(cls, model: nn.Module) -> Placement:
        return Placement(outer=model, inner=model, dem_parent=model.get_model())

    @classmethod
    def _measure(cls, module: nn.Module) -> Geometry:
        """``mm_hidden_size`` and the llava vision tower's crop and patch (``module``: the model or its inner model)."""
        tower = module.get_vision_tower()
        dim = int(getattr(module.config, "mm_hidden_size", tower.hidden_size))
        return Geometry(dim=dim, crop=tower.config.image_size, patch=tower.config.patch_size)

    @classmethod
    def _make_tower(cls, inner: nn.Module, call: dict) -> nn.Module:
        """The frozen vision tower at ``mm_vision_select_layer``, patch tokens."""
        vision = inner.get_vision_tower()
        return FrozenTower(HFVisionTower(vision.vision_tower, layer=int(vision.select_layer), select="patch"))

    @classmethod
    def _check_host(cls, model: nn.Module) -> None:
        check_llava_config(model.config)
        tower = model.get_model().get_vision_tower()  # its config is read without loading it
        dim = int(getattr(model.config, "mm_hidden_size", tower.hidden_size))
        if dim != tower.hidden_size:
            raise ValueError(f"config.mm_hidden_size={dim} differs from the vision tower's hidden_size={tower.hidden_size}")

    @classmethod
    def _prepare_host(cls, model: nn.Module) -> Callable[[], None]:
        """llava builds the tower with delay_load=True: it is loaded (on the projector's device and in
        its dtype), and unloaded again if ``apply`` fails."""
        inner = model.get_model()
        tower = inner.get_vision_tower()
        if tower.is_loaded:
            return lambda: None
        tower.load_model()
        ref = next(inner.mm_projector.parameters())
        tower.to(device=ref.device, dtype=ref.dtype)
        return functools.partial(unload_tower, tower)

    from_pretrained = staticmethod(from_pretrained)  # whole llava checkpoints, INF-LLaVA's release included


apply, unapply, encoder_of, budget = (Llava15Adapter.apply, Llava15Adapter.unapply, Llava15Adapter.encoder_of,
                                      Llava15Adapter.budget)
__all__ = ["apply", "unapply", "encoder_of", "budget", "from_pretrained", "load_checkpoint", "canvas_size",
           "image_processor", "num_image_tokens", "process_images", "Llava15Adapter"]
