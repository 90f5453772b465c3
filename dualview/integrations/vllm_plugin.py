"""Serve dual-view models with vLLM: a plug-in (``pip install "/path/to/dualview[vllm]"`` from a checkout).

vLLM loads every ``vllm.general_plugins`` entry point at start-up; dualview's calls :func:`register`,
which registers the architecture ``DualViewLlavaNextForConditionalGeneration`` (a subclass of vLLM's
own ``LlavaNextForConditionalGeneration``). A folder saved from a model adapted by
:mod:`dualview.adapters.hf_llava_next` is served as is once its ``config.json`` names that
architecture: save it with :func:`save_pretrained`, or mark a saved folder with :func:`mark_for_vllm`
(or pass ``--hf-overrides '{"architectures": ["DualViewLlavaNextForConditionalGeneration"]}'``)::

    from dualview.integrations import vllm_plugin
    vllm_plugin.save_pretrained(model, "my-dualview-model")    # model.save_pretrained + architectures
    processor.save_pretrained("my-dualview-model")
    # then: vllm serve ./my-dualview-model

What the subclass changes is only where vLLM turns pixels into features
(``_process_image_pixels``): the AnyRes base image, the R*C tiles and the R*C strided global crops
``canvas[a::R, b::C]`` of every image go through vLLM's vision tower in ONE batch, the DEM fuses the
local and global maps, and the fused map is cut back into the tiles' windows in the host's order;
the projector, unpad and ``image_newline`` packing are vLLM's. That is exactly what
:func:`dualview.adapters.hf_llava_next.anyres_dual_view` computes (called here, not re-implemented),
so the number of image tokens is plain LLaVA-NeXT's and vLLM's own multi-modal processor stays
valid. The DEM is the submodule ``spatial_embed``, built from ``config.dualview`` and loaded from the
checkpoint's ``model.spatial_embed.*`` keys (strictly: vLLM refuses a checkpoint without them).
Checkpoints written by transformers 5 name the vision tower ``vision_tower.embeddings.*`` where
vLLM's module is ``vision_tower.vision_model.*``: the weight mapper accepts either (a checkpoint holding a
tower weight under both names is refused, not loaded twice).

This module imports without vLLM; the model class is built on first access (vLLM's registry
imports it by name: ``dualview.integrations.vllm_plugin:DualViewLlavaNextForConditionalGeneration``).
LLaVA-OneVision, InternVL and Idefics3 are not served yet (see docs/serving.md).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Union

from dualview.adapters._common import CONFIG_KEY, DualViewOptions, recorded_options

LLAVA_NEXT = "DualViewLlavaNextForConditionalGeneration"
ARCHITECTURES = {LLAVA_NEXT: "LlavaNextForConditionalGeneration"}
"""The plug-in's architectures -> the transformers host architecture each one serves."""


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the dual-view architectures with vLLM
    (lazily, by name: nothing of vLLM's model code is imported here). Idempotent."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch in ARCHITECTURES:
        if arch not in supported:
            ModelRegistry.register_model(arch, f"{__name__}:{arch}")


def _check_options(entry: Any, where: str) -> None:
    """``config.dualview`` of ``where`` must be the dict of dual-view options an adapter records:
    ``None`` (switched off by hand) or another value is refused, not served as dual view."""

    if not isinstance(entry, dict):
        raise ValueError(
            f"{where} was not saved from a dual-view model: its config's '{CONFIG_KEY}' entry must be the dict of "
            f"dual-view options recorded by dualview.adapters.hf_llava_next, got {json.dumps(entry) if entry is None else type(entry).__name__}"
        )
    try:
        DualViewOptions.from_kwargs(**entry)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: its config's '{CONFIG_KEY}' entry is not valid dual-view options: {e}") from None


def mark_for_vllm(folder: Union[str, Path]) -> Path:
    """Point ``folder/config.json`` (saved from a dual-view model) at the plug-in's architecture,
    so that ``vllm serve folder`` runs dual view. transformers' loaders ignore the field (the
    adapter's ``from_pretrained`` still loads the folder). The config is replaced atomically (a
    temporary file, then ``os.replace``). Returns the config path."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    if CONFIG_KEY not in config:
        raise ValueError(f"{str(folder)!r} was not saved from a dual-view model: its config.json has no "
                         f"'{CONFIG_KEY}' entry (apply dualview.adapters.hf_llava_next before saving)")
    _check_options(config[CONFIG_KEY], repr(str(folder)))
    archs = config.get("architectures") or []
    if archs and all(a in ARCHITECTURES for a in archs):
        return path
    config["architectures"] = [_served_as(archs, repr(str(folder)))]
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".config.", suffix=".json", delete=False) as tmp:
        tmp.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    try:
        os.chmod(tmp.name, path.stat().st_mode & 0o777)  # the temporary file's 0600 would hide the config
        os.replace(tmp.name, path)
    except BaseException:
        os.unlink(tmp.name)
        raise
    return path


def _served_as(archs: list, where: str) -> str:
    """The plug-in's architecture serving a checkpoint whose config names ``archs``."""
    hosts = {host: arch for arch, host in ARCHITECTURES.items()}
    if len(archs) != 1 or archs[0] not in hosts:
        raise ValueError(f"{where}: architectures {archs} has no dual-view vLLM architecture; served: "
                         f"{sorted(hosts)} (as {sorted(ARCHITECTURES)})")
    return hosts[archs[0]]


def save_pretrained(model: Any, folder: Union[str, Path], **kwargs: Any) -> Path:
    """``model.save_pretrained(folder, **kwargs)`` of an adapted model, then :func:`mark_for_vllm`.

    The model is checked first (a dual-view model of a host the plug-in serves): a refused model
    writes nothing. ``push_to_hub`` is refused (it would upload the folder before it is marked):
    upload the saved folder afterwards, e.g. with ``huggingface_hub.upload_folder``."""
    if kwargs.get("push_to_hub"):
        raise ValueError(
            "push_to_hub=True is not supported: it uploads the folder before its config.json names the plug-in's "
            "architecture; save, then upload the folder (huggingface_hub.upload_folder(folder_path=folder, ...))"
        )
    where = f"model ({type(model).__name__})"
    from dualview.adapters._host import DualViewHost

    inner = getattr(model, "model", None)
    config = getattr(model, "config", None)
    if not isinstance(inner, DualViewHost) or config is None or CONFIG_KEY not in vars(config):
        raise ValueError(
            f"{where} is not a dual-view model: apply dualview.adapters.hf_llava_next to a LlavaNextForConditionalGeneration "
            f"before saving it for vLLM (its inner model is a {type(inner).__name__})"
        )
    _check_options(getattr(config, CONFIG_KEY), where)
    _served_as([type(model).__name__], where)
    model.save_pretrained(folder, **kwargs)
    mark_for_vllm(folder)
    return Path(folder)


_TOWER_NAME = re.compile(r"^(model\.)?vision_tower\.(vision_model\.)?")
"""A vision-tower weight in either layout: llava-hf's ``vision_tower.vision_model.*`` or transformers 5's
``model.vision_tower.*`` (no ``vision_model.`` level); both load into vLLM's ``vision_tower.vision_model.*``."""


def one_name_per_tower_weight(weights: Any) -> Any:
    """``weights`` ((name, tensor) pairs, as vLLM's loader takes them) passed on one by one; a vision-tower
    weight present under both layouts' names (they load into the same parameter, the later would silently
    win) is a ValueError naming both."""
    seen: dict = {}
    for name, tensor in weights:
        match = _TOWER_NAME.match(name)
        if match:
            target = "vision_tower.vision_model." + name[match.end():]
            if target in seen:
                raise ValueError(
                    f"checkpoint holds the vision-tower weight {target!r} twice, as {seen[target]!r} and {name!r} "
                    f"(llava-hf's and transformers 5's layouts): keep one layout in the checkpoint"
                )
            seen[target] = name
        yield name, tensor


def served_options(config: Any) -> DualViewOptions:
    """The options a served model runs with: its ``config.dualview`` (refused without one), AnyRes's
    fixed choices checked (a fixed option edited by hand is a ValueError), the pinpoints the config's."""
    from dualview.adapters.hf_llava_next import DualViewLlavaNextModel, LlavaNextAdapter

    recorded = recorded_options(config)
    if recorded is None:
        raise ValueError(
            f"{LLAVA_NEXT} serves models saved from dualview.adapters.hf_llava_next: this config has no "
            f"'{CONFIG_KEY}' entry"
        )
    LlavaNextAdapter.options(config, dict(recorded))
    live = {name: getattr(config, attr) for name, attr in DualViewLlavaNextModel.dualview_live.items()}
    return DualViewOptions.from_kwargs(**{**recorded, **live})


def __getattr__(name: str) -> Any:
    """The vLLM model classes, built (and cached) on first access: they subclass vLLM's."""
    if name == LLAVA_NEXT:
        cls = _llava_next_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _llava_next_class() -> type:
    import torch
    from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration
    from vllm.model_executor.models.utils import WeightsMapper

    from dualview import DualViewEncoder
    from dualview.adapters import _host, hf_llava_next
    from dualview.adapters._hf import feature_layers

    plain_mapper = LlavaNextForConditionalGeneration.hf_to_vllm_mapper

    class DualViewLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
        """vLLM's LLaVA-NeXT whose tile features are dual view (see the module docstring)."""

        hf_to_vllm_mapper = WeightsMapper(
            # transformers 5 saves the tower without its `vision_model.` level; llava-hf checkpoints have it
            orig_to_new_regex={re.compile(r"^(model\.)?vision_tower\.(?!vision_model\.)"): "vision_tower.vision_model."},
            orig_to_new_prefix={"model.spatial_embed.": "spatial_embed.", **plain_mapper.orig_to_new_prefix},
        )

        def load_weights(self, weights: Any) -> Any:
            return super().load_weights(one_name_per_tower_weight(weights))

        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            config = self.config
            options = self.dualview_options
            vision = config.vision_config
            side = vision.image_size // vision.patch_size
            dim = vision.hidden_size * len(feature_layers(config.vision_feature_layer))
            towers = list(self._tower_model_names)
            with self._mark_tower_model(vllm_config, "image"):  # skipped with the tower when images are off
                self.spatial_embed = _host.new_dem(options, dim, (side, side), like=self.multi_modal_projector)
            self._tower_model_names = towers + list(self._tower_model_names)

        @property
        def dualview_options(self) -> DualViewOptions:
            """``config.dualview`` with AnyRes's fixed choices checked, the pinpoints the config's."""
            return served_options(self.config)

        def dualview_encoder(self) -> DualViewEncoder:
            """DCM (from the options) -> vLLM's vision tower -> ``spatial_embed``, built now."""
            vision = self.config.vision_config
            tokens = (vision.image_size // vision.patch_size) ** 2
            strategy = self.config.vision_feature_select_strategy

            def tower(pixels: torch.Tensor) -> torch.Tensor:
                feats = self._image_pixels_to_features(self.vision_tower, pixels)
                if feats.shape[1] != tokens:
                    raise ValueError(
                        f"dual view needs the tower's {tokens} patch tokens per crop, got {feats.shape[1]} with "
                        f"vision_feature_select_strategy={strategy!r}: use 'default' with a CLS tower (CLIP), "
                        f"'full' with SigLIP"
                    )
                return feats

            return _host.encoder_from(self.dualview_options, tower, self.spatial_embed,
                                      crop_size=vision.image_size, patch_size=vision.patch_size)

        def _process_image_pixels(self, inputs: Any) -> tuple[torch.Tensor, ...]:
            """Per image (1 + R*C, h*w, text_dim): the base image's and the DEM-fused tiles' projected
            features, in vLLM's layout (its ``_merge_image_patch_embeddings`` unpads and packs them)."""
            pixel_values = inputs["pixel_values"]
            image_sizes = inputs.get("image_sizes")
            if image_sizes is None:
                raise ValueError(f"{LLAVA_NEXT} needs image_sizes (the AnyRes grid of each image) with pixel_values")
            if not isinstance(pixel_values, torch.Tensor):
                pixel_values = torch.cat(list(pixel_values))  # stacked (sum of 1 + R*C, 3, s, s)
            per_image = hf_llava_next.anyres_dual_view(self.dualview_encoder(), pixel_values, image_sizes)
            projector_dtype = next(self.multi_modal_projector.parameters()).dtype
            projected = self.multi_modal_projector(torch.cat(per_image).to(projector_dtype))
            return projected.split([t.shape[0] for t in per_image])

    DualViewLlavaNextForConditionalGeneration.__qualname__ = LLAVA_NEXT  # pickled by name, as registered
    return DualViewLlavaNextForConditionalGeneration
