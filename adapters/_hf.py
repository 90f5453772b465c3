"""What the transformers adapters share: the host's own decorators for ``get_image_features``, the
feature-layer and select-strategy rules, and the vision tower of one call."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import torch
from torch import nn

from dualview import DualViewEncoder
from dualview._checks import check_size
from dualview.budget import Budget, anyres_budget
from dualview.grid import Size
from dualview.tiled import TiledImage

from . import _host
from .base import Geometry, HostAdapter
from .towers import HFVisionTower, RecordingTower, output_flags

Layers = Union[int, Sequence[int]]


def bind_host_call(method: Callable, host: nn.Module, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """A call's ``args`` / ``kwargs`` bound to the installed host's ``method`` (its own signature, through
    its decorators): ``(named, rest)``, the arguments it names and those its ``**kwargs`` takes (e.g.
    a deprecated name such as ``past_key_values``, which the host's own decorator maps). Calling
    ``method(host, **named, **rest)`` is then exactly the host's call, whatever its release names."""
    signature = inspect.signature(method)
    named = dict(signature.bind(host, *args, **kwargs).arguments)
    named.pop(next(iter(signature.parameters)))  # self
    var_kw = [p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    rest = named.pop(var_kw[0], {}) if var_kw else {}
    return named, rest


def forward_naming(cls: type, name: str) -> None:
    """Give ``cls`` (a dual-view subclass of ``cls.dualview_plain``) its own ``forward``: the one it
    inherits from its mixin, under the host forward's signature plus the input ``name``
    (:func:`signature_with`), so that ``generate`` accepts that input and sees the host's others."""
    inherited = cls.forward

    @functools.wraps(inherited)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return inherited(self, *args, **kwargs)

    forward.__signature__ = signature_with(cls.dualview_plain.forward, name)
    cls.forward = forward


def signature_with(method: Callable, name: str) -> inspect.Signature:
    """The host ``method``'s signature plus the keyword-only input ``name`` (default None), before its
    ``**kwargs``: what ``generate`` reads to accept an input and to learn what the host takes."""
    signature = inspect.signature(method)
    params = list(signature.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    params.insert(at, inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Any))
    return signature.replace(parameters=params)


class ExtraInputHost:
    """Mixin of a dual-view class whose image hook needs an input the host's ``forward`` does not pass
    on (InternVL's ``image_sizes``, Idefics3's ``image_grid``, :attr:`dualview_input`): ``forward``
    takes it, computes the image features with it (:meth:`dualview_image_features`) and hands them to
    the host's forward as ``mm_encoder_outputs``, the host's own way to take pre-computed features.
    The class's ``forward`` names the input in its signature, so that ``generate`` passes it."""

    dualview_input: ClassVar[str]
    dualview_plain: ClassVar[type]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "dualview_plain" in cls.__dict__:
            forward_naming(cls, cls.dualview_input)

    def dualview_image_features(self, call: dict, extra: Any) -> Any:
        """The image features of one forward call (``call``: its arguments by the host's names)."""
        raise NotImplementedError

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        extra = kwargs.pop(self.dualview_input, None)
        # the call under the installed host's names (a deprecated ``past_key_values`` reaches its own mapping)
        call, rest = bind_host_call(type(self).dualview_plain.forward, self, args, kwargs)
        if call.get("pixel_values") is not None and call.get("mm_encoder_outputs") is None:
            call["mm_encoder_outputs"] = {"image": self.dualview_image_features(call, extra)}
            call["pixel_values"] = None
        return super().forward(**call, **rest)


def host_decorators() -> tuple[Callable, Callable]:
    """transformers' ``merge_with_config_defaults`` and ``can_return_tuple``, the decorators its
    ``get_image_features`` carry (``vision_feature_*`` defaults from the config; ``return_dict=False``,
    in the call or the config, gives a tuple). Releases without the first get an identity: the hooks
    read the config defaults themselves."""
    from transformers.utils.generic import can_return_tuple

    try:
        from transformers.utils.generic import merge_with_config_defaults
    except ImportError:  # pragma: no cover - older transformers 5 releases
        def merge_with_config_defaults(func: Callable) -> Callable:
            return func
    return merge_with_config_defaults, can_return_tuple


def feature_layers(layer: Layers) -> list[int]:
    """``vision_feature_layer`` as a list (transformers concatenates a list of layers on channels)."""
    layers = [layer] if isinstance(layer, int) else list(layer)
    if not layers or not all(isinstance(i, int) for i in layers):
        raise ValueError(f"vision_feature_layer must be an int or a non-empty list of ints, got {layer!r}")
    return layers


_DROPS = {"default": 1, "full": 0}  # prefix tokens each select strategy drops
_KNOWN_TOWERS = ("clip", "siglip", "intern_vit", "idefics3", "smolvlm")


def check_strategy(strategy: str, vision_model: nn.Module) -> None:
    """One rule for every host: ``vision_feature_select_strategy`` must drop exactly the tower's
    prefix tokens (DEM needs the square grid of patch tokens): ``"default"`` with a CLS tower
    (CLIP), ``"full"`` with a tower without one (SigLIP)."""
    if strategy not in _DROPS:
        raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
    tower = HFVisionTower(vision_model)
    model_type = getattr(vision_model.config, "model_type", "")
    if not tower.truncated and not any(name in model_type for name in _KNOWN_TOWERS):
        raise ValueError(
            f"dual view needs a vision tower with a fixed square grid of patch tokens (CLIP, SigLIP, InternViT, "
            f"Idefics3); got {type(vision_model).__name__} (model_type={model_type!r}), whose token layout it does "
            f"not know"
        )
    prefix = tower.num_prefix_tokens
    if _DROPS[strategy] != prefix:
        fix = "default" if prefix else "full"
        raise ValueError(
            f"vision_feature_select_strategy={strategy!r} drops {_DROPS[strategy]} token(s), but the vision tower "
            f"({type(vision_model).__name__}) has {prefix} prefix (CLS) token(s); dual view needs the patch tokens "
            f"only: set config.vision_feature_select_strategy = {fix!r} (or pass vision_feature_select_strategy="
            f"{fix!r})"
        )


def vision_tower_for(host: nn.Module, layers: list[int], strategy: str, kwargs: dict) -> RecordingTower:
    """The patch-token tower of one ``get_image_features`` call on a transformers host: its
    ``vision_tower`` at ``layers`` (checked against the registered DEM's channels and against
    ``strategy``), recording the tower's own outputs when the call or the config asks for them."""
    check_strategy(strategy, host.vision_tower)
    tower = HFVisionTower(host.vision_tower, layer=layers)
    dim = host.config.vision_config.hidden_size * len(layers)
    dem_dim = host.dualview_dem.dim
    if dim != dem_dim:
        raise ValueError(
            f"vision_feature_layer={layers} gives {dim} channels, but the DEM at spatial_embed has dim={dem_dim} "
            f"(built for config.vision_feature_layer={host.config.vision_feature_layer})"
        )
    hidden, attentions = output_flags(host.config, kwargs)
    return RecordingTower(tower, hidden_states=hidden, attentions=attentions)


class LlavaFamilyHost:
    """What the LLaVA-style hosts' dual-view classes (LLaVA, LLaVA-NeXT, OneVision) share: the encoder of
    one ``get_image_features`` call."""

    def dualview_call(
        self, vision_feature_layer: Optional[Layers], vision_feature_select_strategy: Optional[str], kwargs: dict
    ) -> tuple[DualViewEncoder, RecordingTower, str]:
        """(encoder, tower, strategy) of one call: the call's feature layers and select strategy, else
        the config's; the tower records its own outputs when ``kwargs`` ask for them."""
        call = {**kwargs, "vision_feature_layer": vision_feature_layer,
                "vision_feature_select_strategy": vision_feature_select_strategy}
        tower = type(self).dualview_adapter._make_tower(self, call)
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        return self.dualview_encoder(tower), tower, strategy


class LlavaFamilyAdapter(HostAdapter):
    """The LLaVA-style hosts' geometry (CLIP / SigLIP tower at ``config.vision_feature_layer``), tower
    and apply-time check (the select strategy drops exactly the tower's prefix tokens)."""

    @classmethod
    def _measure(cls, module: nn.Module) -> Geometry:
        config = module.config
        vision = config.vision_config
        return Geometry(dim=vision.hidden_size * len(feature_layers(config.vision_feature_layer)),
                        crop=vision.image_size, patch=vision.patch_size)

    @classmethod
    def _make_tower(cls, inner: nn.Module, call: dict) -> nn.Module:
        config = inner.config
        layer = call.get("vision_feature_layer")
        layers = feature_layers(config.vision_feature_layer if layer is None else layer)
        strategy = call.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        return vision_tower_for(inner, layers, strategy, call)

    @classmethod
    def _check_host(cls, model: nn.Module) -> None:
        feature_layers(model.config.vision_feature_layer)
        check_strategy(model.config.vision_feature_select_strategy, model.model.vision_tower)


# AnyRes (LLaVA-NeXT, OneVision) fixes these: the grid comes from the pinpoints, the canvas is padded,
# the full DEM map replaces the tile map and the base image stays in front ("concat" thumbnail).
ANYRES_FIXED = {"grid": "auto", "fit": "pad", "out_size": None, "resample": None, "thumbnail_fusion": "concat"}


class AnyResAdapter(LlavaFamilyAdapter):
    """The AnyRes hosts (LLaVA-NeXT, OneVision): the grid follows ``config.image_grid_pinpoints`` at every
    call, the canvas is padded, the full DEM map replaces the tiles; the LLM tokens stay the host's."""

    fixed, follows = ANYRES_FIXED, {"pinpoints": "image_grid_pinpoints"}

    @classmethod
    def max_patches(cls, config: Any) -> Optional[int]:
        """The ``anyres_max_N`` downscale of the packed map (OneVision), or None (LLaVA-NeXT)."""
        return None

    @classmethod
    def budget(cls, model: nn.Module, image_size: Size, *, processor: Any = None) -> Budget:
        """Tower passes (``1 + 2*R*C``) and LLM tokens (plain AnyRes's, :func:`dualview.budget.anyres_budget`)
        for one ``(H, W)`` image alone in its prompt; runs nothing."""
        cls.check_budget_processor(processor)
        encoder = cls.encoder_of(model)
        size = check_size(tuple(image_size), "image_size")
        grid = encoder.dcm.grid_for(size)
        plain = anyres_budget(size, grid, encoder.dcm.crop_size, encoder.feat_size,
                              max_patches=cls.max_patches(model.config))
        passes = encoder.budget(size).tower_passes
        return Budget(f"dual_view_{plain.scheme}", grid, plain.canvas_size, passes, plain.tokens)


def anyres_patches(pixel_values: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """pixel_values (B, P, 3, s, s) zero-padded on P, or (sum counts, 3, s, s) stacked
    -> per image (counts[i], 3, s, s): the base image, then the R*C tiles row-major."""
    if pixel_values.dim() == 5:
        if pixel_values.shape[0] != len(counts) or pixel_values.shape[1] < max(counts):
            raise ValueError(
                f"pixel_values (B, patches, 3, s, s) must hold {len(counts)} images of up to {max(counts)} patches "
                f"(base + R*C tiles per image, from image_sizes), got shape {tuple(pixel_values.shape)}"
            )
        return [pv[:n] for pv, n in zip(pixel_values, counts)]
    if pixel_values.dim() == 4:
        if pixel_values.shape[0] != sum(counts):
            raise ValueError(
                f"stacked pixel_values (patches, 3, s, s) must hold {sum(counts)} patches (base + R*C tiles "
                f"per image, from image_sizes), got shape {tuple(pixel_values.shape)}"
            )
        return list(pixel_values.split(counts))
    raise ValueError(f"pixel_values must be 5-D (B, patches, 3, s, s) or 4-D, got shape {tuple(pixel_values.shape)}")


def anyres_images(
    encoder: DualViewEncoder, pixel_values: torch.Tensor, image_sizes: Union[torch.Tensor, Sequence[Sequence[int]]],
    tiled: Sequence[bool]
) -> list[TiledImage]:
    """AnyRes patches (LLaVA-NeXT, OneVision) -> per image the tiled engine's input: a tiled image
    (base + R*C tiles, grid from ``image_sizes`` by the encoder's DCM) has its tiles after the base;
    an untiled one (``tiled[i]`` False: a multi-image sample's, one square crop) passes through.
    ``encoder.encode_tiled`` then gives each (1 + R*C, h*w, D) or (1, h*w, D) in AnyRes's layout."""
    sizes = [check_size(tuple(int(v) for v in s), "image_sizes entry") for s in image_sizes]
    if len(tiled) != len(sizes):
        raise ValueError(f"tiled must hold one flag per image ({len(sizes)}), got {len(tiled)}")
    grids = [encoder.dcm.grid_for(size) if tile else None for size, tile in zip(sizes, tiled)]
    crop = encoder.dcm.crop_size
    if pixel_values.dim() not in (4, 5) or tuple(pixel_values.shape[-3:]) != (3, crop, crop):
        raise ValueError(
            f"pixel_values must be (images, patches, 3, {crop}, {crop}) or stacked (patches, 3, {crop}, {crop}) "
            f"(vision_config.image_size={crop}), got shape {tuple(pixel_values.shape)}"
        )
    pixel_values = pixel_values.to(device=_host.placement(encoder.dem))
    patches = anyres_patches(pixel_values, [1 + g[0] * g[1] if g else 1 for g in grids])
    return [TiledImage(p, g, tiles_at=1) if g else TiledImage(p) for p, g in zip(patches, grids)]


def anyres_dual_view(
    encoder: DualViewEncoder, pixel_values: torch.Tensor, image_sizes: Union[torch.Tensor, Sequence[Sequence[int]]],
    tiled: Optional[Sequence[bool]] = None,
) -> list[torch.Tensor]:
    """AnyRes patches -> per image its features in AnyRes's layout, for the host's packing: a tiled image
    gives (1 + R*C, h*w, D), the base image's features then the DEM-fused map cut back into the tile
    windows; an untiled one (1, h*w, D), plain. ``tiled``: default all (:func:`anyres_images`). The core's
    tiled engine (:meth:`dualview.DualViewEncoder.encode_tiled`): one tower batch, one DEM call per grid;
    the vLLM plug-in calls this with vLLM's tower."""
    tiled = [True] * len(image_sizes) if tiled is None else tiled
    return encoder.encode_tiled(anyres_images(encoder, pixel_values, image_sizes, tiled))

