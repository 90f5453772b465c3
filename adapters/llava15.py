"""Dual view in the original LLaVA code (the ``llava`` package of haotian-liu/LLaVA, as released on
PyPI as ``llava-torch``): ``LlavaLlamaForCausalLM`` (LLaVA-1.5, INF-LLaVA), ``LlavaMistralForCausalLM``
and ``LlavaMptForCausalLM``.

    from dualview.adapters import llava15
    apply(model)                                   # 3x3 dual view, as many image tokens as before
    processor = image_processor(model)             # CLIPImageProcessor at 3*336, pads to square
    images = process_images([pil_image], processor)
    model.generate(input_ids, images=images, max_new_tokens=20)     # input_ids from llava's tokenizer_image_token
    model.save_pretrained("out");  model = from_pretrained("out")     # DEM weights and options kept
    model = from_pretrained(snapshot_download("WeihuangLin/INF-LLaVA-sft"))  # INF-LLaVA's keys as they are

``encode_images`` becomes DCM -> llava's vision tower over every crop in ONE call (at
``mm_vision_select_layer``, patch tokens, frozen) -> DEM -> thumbnail fusion -> ``mm_projector``.
The DEM is registered at ``model.get_model().spatial_embed`` (state-dict keys
``model.spatial_embed.*``, INF-LLaVA's names; ``transformer.spatial_embed.*`` for MPT).
Image tokens per image: ``encoder_of(model).budget((H, W)).tokens`` (576 by default for CLIP-336:
DEM resampled to the tower's 24x24 and averaged with the thumbnail). ``docs/upstream.md`` is the same
change written as a patch of ``llava/model/llava_arch.py``.

Sizes here are ``(height, width)``; ``llava.mm_utils`` and PIL use ``(width, height)``.

How it lives in the model: :func:`apply` swaps the model's class for the module-level subclass of
its llava class (``DualViewLlavaLlamaForCausalLM``, ``DualViewLlavaMistralForCausalLM``,
``DualViewLlavaMptForCausalLM``), whose ``encode_images`` reads ``model.get_model().spatial_embed``
and ``config.dualview`` at every call; :func:`unapply` gives the plain llava model back. The vision
tower runs layer-truncated to ``mm_vision_select_layer`` (the same tokens as llava's own tower
call, which computes every hidden state), without gradients as llava's ``@torch.no_grad`` tower.

Shims (methods of those subclasses, nothing is patched on llava's classes):

1. transformers 5 ``generate()`` hands the KV cache to the model as ``cache=``; llava's ``forward``
   only knows ``past_key_values=`` and raises TypeError. ``prepare_inputs_for_generation`` (where
   generate builds the forward's keywords) is wrapped to hand it on as ``past_key_values``;
   ``forward`` itself is left alone, since generate reads its signature. On transformers 4 the
   wrapper changes nothing.
2. MPT only: llava-torch 1.2.2's ``LlavaMptForCausalLM.forward`` calls
   ``prepare_inputs_labels_for_multimodal`` with its pre-1.2 five-argument signature and raises
   TypeError on every call, with or without dual view. It is replaced by the same forward with the
   current signature. (llava's MPT has no ``generate`` of its own: its output starts with the prompt.)
3. ``image_newline`` (a ``torch.empty`` parameter) exists only for ``mm_patch_merge_type='*unpad*'``
   (LLaVA-1.6 AnyRes). Dual view replaces AnyRes and needs the flat merge, so :func:`apply`
   refuses spatial merges and ``image_aspect_ratio='anyres'``; ``image_newline`` is never read.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from dualview import grid as G
from dualview.checkpoints import read_tensors

from . import _host
from .base import Geometry, HostAdapter, Placement
from ._common import (
    CONFIG_KEY, check_device_map, from_pretrained_without_dem, host_folder, load_dem_weights,
    load_gate_weights, recorded_options,
)
from .towers import HFVisionTower

try:
    from llava.model.llava_arch import LlavaMetaForCausalLM
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "dualview.adapters.llava15 needs the original LLaVA code: pip install --no-deps llava-torch==1.2.2.post1"
    ) from e

# config.model_type -> (module, class) of the llava model classes, imported on demand
MODEL_CLASSES = {
    "llava_llama": ("llava.model.language_model.llava_llama", "LlavaLlamaForCausalLM"),
    "llava_mistral": ("llava.model.language_model.llava_mistral", "LlavaMistralForCausalLM"),
    "llava_mpt": ("llava.model.language_model.llava_mpt", "LlavaMptForCausalLM"),
}
# model_type -> the class of its inner model (``get_model()``, which holds ``spatial_embed``)
INNER_CLASSES = {"llava_llama": "LlavaLlamaModel", "llava_mistral": "LlavaMistralModel", "llava_mpt": "LlavaMptModel"}


ADAPTER = "llava15"


class FrozenTower(nn.Module):
    """A tower run without gradients, as llava's ``CLIPVisionTower.forward`` (``@torch.no_grad``):
    the frozen CLIP keeps no activations for backward; the DEM after it still trains."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower
        self.patch_size = tower.patch_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.tower(pixels)


class DualViewLlava(_host.DualViewHost):
    """What the dual-view subclasses of llava's ``Llava*ForCausalLM`` add (see the module docstring)."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, tokens, hidden): dual view, then ``mm_projector``."""
        feats = encoder_of(self)(images)  # (B, tokens, mm_hidden_size)
        return self.dualview_project(feats)

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, past_key_values: Any = None, inputs_embeds: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> dict:
        """llava's ``prepare_inputs_for_generation``, with transformers 5's ``cache`` handed on as
        ``past_key_values`` (shim 1). Keeps llava's parameter names: generate reads them."""
        inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds, **kwargs
        )
        if "cache" in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs


class DualViewLlavaMpt(DualViewLlava):
    """MPT's forward with the current ``prepare_inputs_labels_for_multimodal`` signature (shim 2)."""

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        past_key_values: Any = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        images: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ):
        if inputs_embeds is None:
            prepared = self.prepare_inputs_labels_for_multimodal(
                input_ids, None, attention_mask, past_key_values, labels, images
            )
            input_ids, _, attention_mask, past_key_values, inputs_embeds, labels = prepared
        base_forward = super(type(self).dualview_plain, self).forward  # the MPT LM's, past llava's broken one
        # transformers 5 calls the cache ``cache``; 4.x ``past_key_values``
        cache_key = "cache" if "cache" in inspect.signature(base_forward).parameters else "past_key_values"
        return base_forward(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
            use_cache=use_cache, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=return_dict, **{cache_key: past_key_values}, **kwargs,
        )


class DualViewLlavaInner(_host.GuardsDualViewModules):
    """llava's inner model (``get_model()``, which holds ``mm_projector`` and gets ``spatial_embed``):
    an assigned DEM or gate is checked there as on the other hosts' inner models."""


def _unload_tower(tower: nn.Module) -> None:
    """Undo llava's ``CLIPVisionTower.load_model``: the tower delay-loaded again (its config only)."""
    del tower.vision_tower
    del tower.image_processor
    tower.is_loaded = False


def _define_subclasses() -> dict[str, type]:
    """``DualView<LlavaClass>`` for every llava class this llava-torch can import, defined in this
    module's namespace (so pickle finds them by name). model_type -> subclass."""
    out = {}
    for model_type, (module, name) in MODEL_CLASSES.items():
        try:
            plain = getattr(importlib.import_module(module), name)
        except ImportError:  # pragma: no cover - a variant this transformers cannot import
            continue
        mixin = DualViewLlavaMpt if model_type == "llava_mpt" else DualViewLlava
        sub_name = "DualView" + name
        sub = type(sub_name, (mixin, plain), {"__module__": __name__, "__qualname__": sub_name, "dualview_plain": plain})
        setattr(sys.modules[__name__], sub_name, sub)
        out[model_type] = sub
        inner = getattr(importlib.import_module(module), INNER_CLASSES[model_type], None)
        if inner is not None:
            inner_name = "DualView" + inner.__name__
            inner_sub = type(inner_name, (DualViewLlavaInner, inner),
                             {"__module__": __name__, "__qualname__": inner_name, "dualview_plain": inner})
            setattr(sys.modules[__name__], inner_name, inner_sub)
            INNER_SUBCLASSES[inner] = inner_sub
    return out


INNER_SUBCLASSES: dict[type, type] = {}
SUBCLASSES = _define_subclasses()
HOSTS = tuple(sub.dualview_plain for sub in SUBCLASSES.values())
DUAL_VIEW_CLASSES = (*SUBCLASSES.values(), *INNER_SUBCLASSES.values())
"""The host classes :func:`apply` takes (``dualview.apply`` picks this adapter for them)."""


def _check_llava_config(config: Any) -> None:
    """Dual view replaces llava's single-crop path; it cannot sit under AnyRes or CLS tokens."""
    if getattr(config, "mm_vision_tower", None) is None:
        raise ValueError("model.config.mm_vision_tower is not set: the model has no vision tower to adapt")
    select = getattr(config, "mm_vision_select_feature", "patch")
    if select != "patch":
        raise ValueError(
            "config.mm_vision_select_feature must be 'patch' (DEM needs the square grid of patch tokens), "
            f"got {select!r}"
        )
    merge = getattr(config, "mm_patch_merge_type", "flat") or "flat"
    if merge != "flat":
        raise ValueError(
            f"config.mm_patch_merge_type must be 'flat' (dual view replaces LLaVA-1.6 AnyRes), got {merge!r}"
        )
    if getattr(config, "image_aspect_ratio", None) == "anyres":
        raise ValueError("config.image_aspect_ratio must not be 'anyres' (dual view replaces AnyRes); use 'pad'")


class Llava15Adapter(HostAdapter):
    """The host's declarations: llava's ``Llava*ForCausalLM`` is itself the swapped module (its
    ``encode_images`` the hook); the DEM, the gate and ``mm_projector`` live on ``get_model()``, whose
    class is swapped too (an assigned DEM is checked there). Every option is free (default: the
    released INF-LLaVA, 3x3 squashed, DEM to the tower's token grid, thumbnail mean). A delay-loaded
    vision tower is loaded (and put on the projector's device and dtype)."""

    name = ADAPTER
    hosts = HOSTS
    dual_view_classes = DUAL_VIEW_CLASSES
    projector = "mm_projector"

    @classmethod
    def _place(cls, model: nn.Module) -> Placement:
        return Placement(outer=model, inner=model, dem_parent=model.get_model())

    @classmethod
    def _check_host(cls, model: nn.Module) -> None:
        _check_llava_config(model.config)
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
        return functools.partial(_unload_tower, tower)

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
    def from_pretrained(cls, path: Union[str, Path], **kwargs: Any) -> nn.Module:
        return from_pretrained(path, **kwargs)


apply, unapply, encoder_of, budget = (Llava15Adapter.apply, Llava15Adapter.unapply, Llava15Adapter.encoder_of,
                                      Llava15Adapter.budget)


def canvas_size(model: nn.Module) -> G.Size:
    """``(height, width)`` of the pixels :func:`image_processor` produces: ``max(R, C) * crop`` square."""
    dcm = encoder_of(model).dcm
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
    return encoder_of(model).budget(image_size if image_size is not None else canvas_size(model)).tokens


def _model_class(model_type: str) -> type:
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"config.model_type must be one of {sorted(MODEL_CLASSES)}, got {model_type!r}")
    module, name = MODEL_CLASSES[model_type]
    return getattr(importlib.import_module(module), name)


def _prefix(model: nn.Module, module: nn.Module) -> str:
    """State-dict prefix of ``module`` inside ``model``: ``model.spatial_embed.`` (``transformer.`` for MPT)."""
    return next(name for name, m in model.named_modules() if m is module) + "."


def from_pretrained(
    path: Union[str, Path], *, options: Optional[Mapping[str, Any]] = None, strict: bool = True, **kwargs: Any
) -> nn.Module:
    """Load a dual-view llava model from a local folder: one saved by ``save_pretrained`` of an
    adapted model, or an INF-LLaVA checkpoint (keys ``model.spatial_embed.*``, ``model.mm_projector.*``).

    The llava class comes from ``config.model_type``; dual view is re-applied with the options in
    config.json (``options`` overrides them; neither: the released INF-LLaVA defaults), the DEM
    weights are loaded strictly, and vision-tower weights saved in the folder replace those read
    from ``mm_vision_tower``. With ``strict``, any other missing or unexpected key is a ValueError.
    ``kwargs`` go to ``from_pretrained`` of the class (``dtype``, ``device_map``, ...). A plain
    LLaVA-1.5 checkpoint has no DEM (ValueError here): use ``apply(cls.from_pretrained(path))``.
    """
    from transformers import AutoConfig

    path = Path(path)
    check_device_map(kwargs.get("device_map"))
    folder, files = host_folder(path, kwargs)  # the DEM and the tower are read from the host's own files
    for model_type in MODEL_CLASSES:  # importing a class registers its config with AutoConfig
        try:
            _model_class(model_type)
        except ImportError:  # pragma: no cover - a variant transformers cannot import
            pass
    cls = _model_class(AutoConfig.from_pretrained(folder).model_type)
    with _tower_keys_expected(cls):
        model, info = from_pretrained_without_dem(cls, path, output_loading_info=True, **kwargs)
    problems = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if strict and any(problems.values()):
        raise ValueError(f"checkpoint {str(path)!r} does not match {cls.__name__}: {problems}")
    settings = dict(recorded_options(model.config) or {})
    settings.update(options or {})
    if hasattr(model.config, CONFIG_KEY):  # recorded again by apply (a plain host carrying it is warned about)
        delattr(model.config, CONFIG_KEY)
    apply(model, **settings)
    encoder = encoder_of(model)
    load_dem_weights(encoder.dem, folder, _prefix(model, encoder.dem), **files)
    if encoder.gate is not None:
        load_gate_weights(encoder.gate, folder, _prefix(model, encoder.gate), **files)
    _load_saved_tower(model, folder, _prefix(model, model.get_model()) + "vision_tower.", files)
    return model


@contextmanager
def _tower_keys_expected(cls: type) -> Iterator[None]:
    """llava builds the vision tower with delay_load=True, so ``from_pretrained`` of the class finds
    no module for the saved tower weights; they are expected (and loaded afterwards)."""
    had = "_keys_to_ignore_on_load_unexpected" in cls.__dict__
    old = cls.__dict__.get("_keys_to_ignore_on_load_unexpected")
    inherited = old or getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or []
    cls._keys_to_ignore_on_load_unexpected = list(inherited) + [r"(^|\.)vision_tower\.vision_tower\."]
    try:
        yield
    finally:
        if had:
            cls._keys_to_ignore_on_load_unexpected = old
        else:
            del cls._keys_to_ignore_on_load_unexpected


def _load_saved_tower(model: nn.Module, path: Path, prefix: str, files: Mapping[str, Any]) -> None:
    """Vision-tower weights stored in the checkpoint (llava saves them) replace the ones read from
    ``mm_vision_tower``: all of them, or none when the checkpoint has none."""
    saved = read_tensors(path, keep=lambda k: k.startswith(prefix), **files)
    if not saved:
        return
    tower = model.get_vision_tower()
    ref = next(tower.parameters())
    state = {k[len(prefix):]: v.to(device=ref.device, dtype=ref.dtype) for k, v in saved.items()}
    incompatible = tower.load_state_dict(state, strict=False)
    if incompatible.missing_keys or incompatible.unexpected_keys:
        raise ValueError(
            f"vision-tower weights under '{prefix}' in {str(path)!r} do not match the tower: missing keys "
            f"{sorted(incompatible.missing_keys)}, unexpected keys {sorted(incompatible.unexpected_keys)}"
        )


def load_checkpoint(model: nn.Module, path: Union[str, Path], *, strict: bool = True) -> None:
    """Load every tensor of a checkpoint (a file, or a sharded folder) with INF-LLaVA's key names
    (``model.spatial_embed.*``, ``model.mm_projector.*``, ...) into an adapted model.

    With ``strict`` a missing or unexpected key is a ValueError that names it. Allowed to be
    missing: a tied weight (``lm_head.weight`` saved once), and the whole vision tower when the
    checkpoint holds none of it (the tower then stays as read from ``mm_vision_tower``)."""
    encoder_of(model)  # the DEM must exist, or its keys would be "unexpected"
    incompatible = model.load_state_dict(read_tensors(path), strict=False)
    tied = getattr(model, "all_tied_weights_keys", None)  # transformers 5: only the ties the config asks for
    tied = set(tied if tied is not None else getattr(model, "_tied_weights_keys", None) or ())
    tower_prefix = _prefix(model, model.get_model()) + "vision_tower."
    tower_keys = {k for k in model.state_dict() if k.startswith(tower_prefix)}
    missing = set(incompatible.missing_keys) - tied
    if tower_keys <= missing:  # no tower in the checkpoint at all
        missing -= tower_keys
    if strict and (missing or incompatible.unexpected_keys):
        raise ValueError(
            f"checkpoint {str(path)!r} does not match the adapted {type(model).__name__}: missing keys "
            f"{sorted(missing)}, unexpected keys {sorted(incompatible.unexpected_keys)}"
        )
