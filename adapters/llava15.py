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
from pathlib import Path
from typing import Any, Callable, Union

import torch
from torch import nn

from dualview import DEM
from dualview import grid as G

from . import _host, llava15_checkpoints, llava15_processing
from ._common import recorded_options
from .base import Geometry, HostAdapter
from .llava15_compat import CacheAsPastKeyValues, MptForward
from .llava15_processing import process_images  # noqa: F401 - re-exported
from .llava15_tower import FrozenTower
from .llava15_tower import check_llava_config as _check_llava_config, expects as _expects, unload_tower as _unload_tower
from .towers import HFVisionTower

try:
    from llava.model.llava_arch import LlavaMetaForCausalLM
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "dualview.adapters.llava15 needs the original LLaVA code: pip install --no-deps llava-torch==1.2.2.post1"
    ) from e

ADAPTER = "llava15"


class DualViewLlava(CacheAsPastKeyValues, _host.DualViewHost):
    """What the dual-view subclasses of llava's ``Llava*ForCausalLM`` add: the hook ``encode_images``."""

    dualview_adapter = ADAPTER
    dualview_projector = "mm_projector"

    def dualview_expects(self) -> tuple[int, G.Size]:
        return _expects(self.get_model())

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, tokens, hidden): dual view, then ``mm_projector``."""
        return self.dualview_project(encoder_of(self)(images))


class DualViewLlavaInner:
    """llava's inner model (``get_model()``, where ``spatial_embed`` lives) with the checks of an
    assigned DEM that :class:`~dualview.adapters._host.DualViewHost` gives the hosts it swaps: a DEM
    the host cannot use is refused before it replaces the registered one, and the DEM (or the gate
    of ``init="identity"``) is neither deleted nor set to None (:func:`~._host.check_kept`)."""

    dualview_plain: type

    def __setattr__(self, name: str, value: Any) -> None:
        if name == _host.DEM_ATTR and isinstance(value, nn.Module):
            dem = _host.unwrap_dem(value)
            if not isinstance(dem, DEM):
                raise TypeError(f"{_host.DEM_ATTR} must be a dualview.DEM, got {type(dem).__name__}")
            recorded = recorded_options(self.config) or {}
            _host.check_dem_fits(dem, adapter=ADAPTER, expects=_expects(self), full_map=False,
                                 thumbnail_fusion=recorded.get("thumbnail_fusion"))
        elif not isinstance(value, nn.Module):  # None or another value would remove the DEM (or the gate)
            _host.check_kept(self, name, value, adapter=ADAPTER)
        if name == _host.GATE_ATTR and isinstance(value, nn.Module):
            _host.check_gate_fits(_host.unwrap_dem(value), dim=_host.unwrap_dem(self.spatial_embed).dim, adapter=ADAPTER)
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        _host.check_kept(self, name, adapter=ADAPTER, deleting=True)
        super().__delattr__(name)


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

SUBCLASSES = {sub.dualview_plain.config_class.model_type: sub for sub in DualViewLlava.__subclasses__()}
"""config.model_type -> the dual-view subclass of its llava class."""
INNER_SUBCLASSES = {sub.dualview_plain: sub for sub in DualViewLlavaInner.__subclasses__()}
"""llava's inner model class (``get_model()``, which holds ``spatial_embed``) -> its dual-view subclass."""
HOSTS = tuple(sub.dualview_plain for sub in SUBCLASSES.values())
"""The host classes :func:`apply` takes (``dualview.apply`` picks this adapter for them)."""


class Llava15Adapter(HostAdapter):
    """The host's declarations: llava's ``Llava*ForCausalLM`` is itself the swapped module (its
    ``encode_images`` the hook); the DEM, the gate and ``mm_projector`` live on ``get_model()``, whose
    class is swapped too (an assigned DEM is checked there). Every option is free (default: the
    released INF-LLaVA, 3x3 squashed, DEM to the tower's token grid, thumbnail mean). A delay-loaded
    vision tower is loaded (and put on the projector's device and dtype)."""

    name = ADAPTER
    hosts = HOSTS
    projector = "mm_projector"

    @classmethod
    def check_type(cls, model: nn.Module) -> None:
        if not isinstance(model, LlavaMetaForCausalLM):
            fits = _host.adapter_for(type(model)) or _host.adapter_for(type(getattr(model, "model", model)))
            raise TypeError(
                f"model must be a llava Llava*ForCausalLM (llava.model.language_model), got {type(model).__name__}"
                + (f"; use dualview.adapters.{fits}" if fits else "")
            )

    @classmethod
    def inner_of(cls, model: nn.Module) -> nn.Module:
        return model

    @classmethod
    def dem_parent_of(cls, inner: nn.Module) -> nn.Module:
        return inner.get_model()

    @classmethod
    def dual_view_class_for(cls, inner: nn.Module) -> type:
        subclass = SUBCLASSES.get(getattr(inner.config, "model_type", None))
        if subclass is None or type(inner) is not subclass.dualview_plain:
            raise TypeError(
                f"dualview.adapters.llava15 adapts {sorted(c.dualview_plain.__name__ for c in SUBCLASSES.values())}, "
                f"got {type(inner).__name__} (config.model_type={getattr(inner.config, 'model_type', None)!r})"
                + (_host.subclass_refused(type(inner), subclass.dualview_plain) if subclass is not None else "")
            )
        return subclass

    @classmethod
    def check_host(cls, model: nn.Module) -> None:
        cls.dual_view_class_for(model)
        _check_llava_config(model.config)
        tower = model.get_model().get_vision_tower()  # its config is read without loading it
        dim = int(getattr(model.config, "mm_hidden_size", tower.hidden_size))
        if dim != tower.hidden_size:
            raise ValueError(f"config.mm_hidden_size={dim} differs from the vision tower's hidden_size={tower.hidden_size}")

    @classmethod
    def prepare_host(cls, model: nn.Module) -> Callable[[], None]:
        """llava builds the tower with delay_load=True: it is loaded (on the projector's device and in
        its dtype), and unloaded again if ``apply`` fails."""
        inner = model.get_model()
        tower = inner.get_vision_tower()
        if tower.is_loaded:
            return lambda: None
        tower.load_model()
        ref = next(inner.mm_projector.parameters())
        tower.to(device=ref.device, dtype=ref.dtype)
        return functools.partial(_unload_tower, tower)

    @classmethod
    def geometry_of(cls, inner: nn.Module) -> Geometry:
        tower = inner.get_vision_tower()
        dim = int(getattr(inner.config, "mm_hidden_size", tower.hidden_size))
        return Geometry(dim=dim, crop=tower.config.image_size, patch=tower.config.patch_size)

    @classmethod
    def tower(cls, inner: nn.Module, kwargs: dict) -> nn.Module:
        """The frozen vision tower at ``mm_vision_select_layer``, patch tokens."""
        vision = inner.get_vision_tower()
        return FrozenTower(HFVisionTower(vision.vision_tower, layer=int(vision.select_layer), select="patch"))

    @classmethod
    def wrap(cls, model: nn.Module) -> None:
        inner = model.get_model()
        if type(inner) in INNER_SUBCLASSES:  # an assigned DEM is checked there
            _host.swap_class(inner, INNER_SUBCLASSES[type(inner)])

    @classmethod
    def unwrap(cls, model: nn.Module) -> None:
        inner = model.get_model()
        if isinstance(inner, DualViewLlavaInner):
            _host.swap_class(inner, type(inner).dualview_plain)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], **kwargs: Any) -> nn.Module:
        return from_pretrained(path, **kwargs)


apply, unapply, encoder_of, budget = (Llava15Adapter.apply, Llava15Adapter.unapply, Llava15Adapter.encoder_of,
                                      Llava15Adapter.budget)
# the helpers of the processing and checkpoint modules, this adapter as their first argument
canvas_size, image_processor, num_image_tokens, from_pretrained, load_checkpoint = (functools.partial(
    helper, Llava15Adapter) for helper in (llava15_processing.canvas_size, llava15_processing.image_processor,
    llava15_processing.num_image_tokens, llava15_checkpoints.from_pretrained, llava15_checkpoints.load_checkpoint))
