"""Vision models as DualViewEncoder towers: callables (N, 3, s, s) -> (N, h*w, D) patch tokens.

    tower = vision_tower(CLIPVisionModel.from_pretrained("openai/clip-vit-large-patch14-336"))
    encoder = DualViewEncoder(tower, DCM(336), DEM(1024))

Each tower is an ``nn.Module`` with ``patch_size`` and ``image_size`` attributes, so the encoder
knows its token budget without running it, and the model's parameters stay visible to
``.to()``, ``state_dict()`` and optimisers. :class:`MaskedVisionTower` also takes per-crop pixel masks
(the tiled engine's per-crop tower inputs: Idefics3 / SmolVLM's ``pixel_attention_mask``).

**Only the layers the feature needs run.** LLaVA takes the penultimate hidden state; the plain
forward with ``output_hidden_states=True`` runs every layer and keeps a tuple of all ``L + 1``
hidden states alive (6.5 GB of activations for 152 ViT-L crops in bf16). The towers here run the
embeddings (and CLIP's pre-layernorm) and the encoder layers up to the deepest selected one, keeping
only the selected outputs. The result is bit for bit the plain forward's ``hidden_states[layer]``
(tests/test_towers.py checks it with ``torch.equal``) for the families listed in ``_FAMILIES``:
transformers CLIP, SigLIP, Idefics3 / SmolVLM (SigLIP-style) and InternVL vision models, as the
model itself or behind ``.vision_model`` (``CLIPVisionModelWithProjection``, ``CLIPModel``,
``SiglipModel``). Any other model class runs the plain forward (same output, all layers).

**Device rule.** Pixels go to the device and dtype of the model's patch-embedding weight; when that
weight is on ``meta`` (accelerate's CPU / disk offloading), the pixels stay where they are and the
offloading hooks move them. The first parameter's device is not used: under offloading it is
``meta``, and in a model split over devices it need not be the embedding's. Offloading hooks on the
embeddings and layers (``accelerate.cpu_offload``) run as usual; a hook on a module the truncated
run skips (the model, the backbone or its encoder, as ``device_map`` puts there) that loads weights
or moves inputs makes the tower use the plain forward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from dualview._checks import check_choice

Layers = Union[int, Sequence[int]]
Embed = Callable[[nn.Module, torch.Tensor], "tuple[torch.Tensor, Optional[torch.Tensor]]"]


def _embed_clip(backbone: nn.Module, pixels: torch.Tensor):
    # hidden_states[0] of CLIP is taken after the pre-layernorm (the first layer's input)
    return backbone.pre_layrnorm(backbone.embeddings(pixels)), None


def _embed_plain(backbone: nn.Module, pixels: torch.Tensor):
    return backbone.embeddings(pixels), None


def _embed_idefics3(backbone: nn.Module, pixels: torch.Tensor):
    # What Idefics3VisionTransformer.forward does when no patch mask is given: every patch valid,
    # position ids from that mask, and the attention mask the attention implementation wants.
    from transformers.masking_utils import create_bidirectional_mask

    n, p = pixels.shape[0], backbone.patch_size
    patches = torch.ones(n, pixels.shape[2] // p, pixels.shape[3] // p, dtype=torch.bool, device=pixels.device)
    hidden = backbone.embeddings(pixel_values=pixels, patch_attention_mask=patches)
    mask = create_bidirectional_mask(config=backbone.config, inputs_embeds=hidden, attention_mask=patches.view(n, -1))
    return hidden, mask


@dataclass(frozen=True)
class _Family:
    """How one family of transformers vision models reaches ``hidden_states[0]`` and where its layers are."""

    embed: Embed
    layers: str  # attribute path of the encoder's layer list, from the backbone
    prefix_tokens: int  # CLS-like tokens before the patch tokens


_CLIP = _Family(_embed_clip, "encoder.layers", 1)
_SIGLIP = _Family(_embed_plain, "encoder.layers", 0)
_IDEFICS3 = _Family(_embed_idefics3, "encoder.layers", 0)
_INTERNVL = _Family(_embed_plain, "encoder.layer", 1)
# Exact class names (a subclass may change forward): the module holding embeddings + encoder.
_FAMILIES = {
    "CLIPVisionModel": _CLIP,
    "SiglipVisionModel": _SIGLIP,
    "Idefics3VisionTransformer": _IDEFICS3,
    "SmolVLMVisionTransformer": _IDEFICS3,
    "InternVLVisionModel": _INTERNVL,
}


def _find_backbone(model: nn.Module) -> "tuple[Optional[nn.Module], Optional[_Family]]":
    """The module of a known family that holds the embeddings and the layers: ``model`` itself or
    the one behind its ``vision_model`` attributes; ``(None, None)`` when there is none."""
    module = model
    for _ in range(4):
        family = _FAMILIES.get(type(module).__name__)
        if family is not None and hasattr(module, "embeddings") and _attr_path(module, family.layers) is not None:
            return module, family
        module = getattr(module, "vision_model", None)
        if not isinstance(module, nn.Module):
            break
    return None, None


def _attr_path(module: nn.Module, path: str):
    for name in path.split("."):
        module = getattr(module, name, None)
    return module


def _square(value, name: str) -> int:
    """A config's image / patch size: an int, or a square (n, n) pair."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"config.{name} must be square, got {tuple(value)}")
        value = value[0]
    return int(value)


def _patch_weight(model: nn.Module, embeddings: Optional[nn.Module] = None) -> Optional[torch.Tensor]:
    """The patch embedding's weight (the first Conv2d of the embeddings, else of the model)."""
    for scope in (embeddings, model):
        if scope is not None:
            for module in scope.modules():
                if isinstance(module, nn.Conv2d):
                    return module.weight
    return next(model.parameters(), None)


def _to_model(pixels: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Pixels on the patch embedding's device and dtype; left on their device if the weight is on meta."""
    if weight is None:
        return pixels
    device = None if weight.device.type == "meta" else weight.device
    return pixels.to(device=device, dtype=weight.dtype)


def _skipped_hook_matters(module: nn.Module, top: bool) -> bool:
    """Whether an accelerate hook on ``module``, which the truncated run does not call, does work the
    run needs: loading offloaded weights (device_map with "cpu" / "disk" on that module), moving
    inputs to an execution device (the model's own input move is what the device rule does), or an
    unknown kind of hook. Hooks on the embeddings and the layers run: those modules are called."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return False
    for part in getattr(hook, "hooks", (hook,)):
        if type(part).__name__ != "AlignDevicesHook" or getattr(part, "offload", True):
            return True
        if not top and getattr(part, "execution_device", None) is not None:
            return True
    return False


def _check_layers(layer: Layers, arg: str = "layer") -> list[int]:
    if isinstance(layer, int) and not isinstance(layer, bool):
        return [layer]
    layers = list(layer) if isinstance(layer, (list, tuple)) else []
    if not layers or any(not isinstance(i, int) or isinstance(i, bool) for i in layers):
        raise ValueError(f"{arg} must be an int or a non-empty list of ints, got {layer!r}")
    return layers


def _resolve(layers: Sequence[int], count: int, what: str) -> list[int]:
    """Indices into ``count`` states, negative ones from the end; out of range is a ValueError."""
    bad = [i for i in layers if not -count <= i < count]
    if bad:
        raise ValueError(f"layer must index the {count} {what}: -{count} <= layer <= {count - 1}, got {bad[0]}")
    return [i % count for i in layers]


class HFVisionTower(nn.Module):
    """A transformers vision model (``CLIPVisionModel``, ``SiglipVisionModel``, Idefics3 / SmolVLM
    and InternVL vision models, or any model whose output has ``hidden_states`` and whose config has
    ``patch_size`` and ``image_size``) as a tower. Only the layers up to the deepest selected one run
    (see the module docstring); the output equals the plain forward's bit for bit.

    Args:
        model: the vision model.
        layer: hidden state(s) to use, as LLaVA's ``mm_vision_select_layer`` / transformers'
            ``vision_feature_layer``: an index into the ``L + 1`` hidden states (0: the embeddings,
            after CLIP's pre-layernorm; -1 or ``L``: the last layer's output, before the
            post-layernorm; -2: the penultimate layer). A list concatenates those layers on
            channels, as transformers' Llava does.
        select: ``"patch"`` drops the prefix (CLS) token (CLIP and InternVL have one, SigLIP none),
            ``"cls_patch"`` keeps it (LLaVA's ``mm_vision_select_feature``); DEM needs ``"patch"``.

    Attributes: ``layers`` (as given), ``patch_size``, ``image_size``, ``num_prefix_tokens``,
    ``truncated`` (True when only the needed layers run).

    Shapes: forward((N, 3, s, s)) -> (N, h*w, D * len(layers)) (``(N, prefix + h*w, ...)`` with
    ``"cls_patch"``), in the dtype of the pixels.
    """

    def __init__(self, model: nn.Module, *, layer: Layers = -2, select: str = "patch") -> None:
        super().__init__()
        check_choice(select, "select", ("patch", "cls_patch"))
        self.model = model
        self.layers = _check_layers(layer)
        self.select = select
        backbone, family = _find_backbone(model)
        config = (backbone if backbone is not None else model).config
        self.patch_size = _square(config.patch_size, "patch_size")
        self.image_size = _square(config.image_size, "image_size")
        if family is None:
            # The plain forward; prefix tokens as LLaVA assumes: CLIP-like towers have a CLS token.
            model_type = getattr(config, "model_type", "")
            self.num_prefix_tokens = 0 if ("siglip" in model_type or "idefics" in model_type) else 1
            self._backbone = self._family = None
            self._weight_source = (model, None)
            return
        stack = _attr_path(backbone, family.layers)
        self.num_prefix_tokens = family.prefix_tokens
        self._resolved = _resolve(self.layers, len(stack) + 1, f"hidden states of {type(backbone).__name__}")
        # Not registered as submodules (they are the model's): plain attributes in a tuple.
        self._backbone, self._family = (backbone,), family
        chain, module = [], model  # the modules from the model down to the backbone, then the encoder
        while module is not backbone:
            chain.append(module)
            module = module.vision_model
        self._skipped = (*chain, backbone, backbone.encoder, stack)
        self._weight_source = (model, backbone.embeddings)
        # InternVL's layers take no attention mask
        self._takes_mask = "attention_mask" in inspect.signature(stack[0].forward).parameters

    @property
    def truncated(self) -> bool:
        return self._family is not None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = _to_model(pixels, _patch_weight(*self._weight_source))
        feats = self._run_layers(x) if self._can_truncate() else self._plain_forward(x)
        if self.select == "patch":
            feats = feats[:, self.num_prefix_tokens :]
        return feats.to(pixels.dtype)

    def _can_truncate(self) -> bool:
        # accelerate hooks on the modules the truncated run skips (the model, the backbone, its
        # encoder) would not run: fall back when one of them loads offloaded weights or moves inputs
        return self._family is not None and not any(_skipped_hook_matters(m, top=m is self.model) for m in self._skipped)

    def _run_layers(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings, then the layers up to the deepest selected one; only selected outputs kept."""
        backbone, family = self._backbone[0], self._family
        hidden, mask = family.embed(backbone, x)
        wanted = set(self._resolved)
        kept = {0: hidden} if 0 in wanted else {}
        mask_kwargs = {"attention_mask": mask} if self._takes_mask else {}
        for index, layer in enumerate(_attr_path(backbone, family.layers)[: max(wanted)], start=1):
            hidden = layer(hidden, **mask_kwargs)
            if index in wanted:
                kept[index] = hidden
        return torch.cat([kept[i] for i in self._resolved], dim=-1)

    def _plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.model(pixel_values=x, output_hidden_states=True).hidden_states
        resolved = _resolve(self.layers, len(hidden), f"hidden states of {type(self.model).__name__}")
        return torch.cat([hidden[i] for i in resolved], dim=-1)


class TimmTower(nn.Module):
    """A timm ``VisionTransformer`` (or any timm model with ``forward_intermediates``) as a tower.

    Args:
        model: the timm model.
        layer: ``None``: ``forward_features`` (every block, then the final norm). An int or a list:
            the output of those blocks (timm's ``forward_intermediates`` indices, 0 = the first
            block's output, -1 = the last block's, before the final norm; negative indices agree
            with transformers' ``hidden_states``, non-negative ones are one lower), concatenated
            on channels; only the blocks up to the deepest selected one run.

    Prefix tokens (CLS, registers) are dropped. Shapes: (N, 3, s, s) -> (N, h*w, D * len(layers)).
    """

    def __init__(self, model: nn.Module, *, layer: Optional[Layers] = None) -> None:
        super().__init__()
        self.model = model
        self.layer = layer
        self.layers = None if layer is None else _check_layers(layer)
        if self.layers is not None:
            if not hasattr(model, "forward_intermediates"):
                raise TypeError(f"layer={layer!r} needs a timm model with forward_intermediates, got {type(model).__name__}")
            self._resolved = _resolve(self.layers, len(model.blocks), f"blocks of {type(model).__name__}")
        patch = model.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        size = model.patch_embed.img_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        proj = getattr(self.model.patch_embed, "proj", None)
        x = _to_model(pixels, proj.weight if isinstance(proj, nn.Conv2d) else _patch_weight(self.model))
        if self.layers is None:
            feats = self.model.forward_features(x)[:, self.num_prefix_tokens :]
        else:
            blocks = sorted(set(self._resolved))  # timm returns them in block order
            outs = self.model.forward_intermediates(
                x, indices=blocks, output_fmt="NLC", intermediates_only=True, stop_early=True
            )
            by_block = dict(zip(blocks, outs))
            feats = torch.cat([by_block[i] for i in self._resolved], dim=-1)
        return feats.to(pixels.dtype)


def vision_tower(model: nn.Module, **options) -> nn.Module:
    """The right tower wrapper for ``model``: timm VisionTransformer -> :class:`TimmTower`,
    transformers vision model -> :class:`HFVisionTower`. ``options`` go to the wrapper."""
    if hasattr(model, "forward_features") and hasattr(model, "patch_embed"):
        return TimmTower(model, **options)
    if hasattr(model, "config") and (hasattr(model.config, "patch_size") or _find_backbone(model)[0] is not None):
        return HFVisionTower(model, **options)
    raise TypeError(
        f"model must be a timm VisionTransformer or a transformers vision model, got {type(model).__name__}"
    )


class RecordsOutputs:
    """Mixin of a tower that keeps the vision model's own ``hidden_states`` / ``attentions`` of the crops it
    runs (in tower-batch order), one ``recorded`` model output per call: the engine calls :meth:`regroup`
    with the order that gives them back image by image (:func:`dualview.tiled.encode_tiled`), so a batch's
    rows slice like each image's.

    The one :meth:`outputs` contract: a key only when asked (one of ``asked``) and returned by every call
    (absent, never None, otherwise); its value, per layer, every call's crops joined (an entry the model
    left None stays None)."""

    order: Optional[torch.Tensor] = None
    asked: tuple[str, ...] = ()
    recorded: list

    def regroup(self, order: Sequence[int]) -> None:
        """Give the recorded outputs back as ``rows[order]`` (indices into the tower batch)."""
        self.order = torch.as_tensor(list(order), dtype=torch.long)

    def in_order(self, states: tuple) -> tuple:
        """``states`` (per layer, every crop of the tower batch) in the order :meth:`regroup` set."""
        if self.order is None:
            return states
        return tuple(s if s is None else s.index_select(0, self.order.to(s.device)) for s in states)

    def outputs(self) -> dict:
        """``hidden_states`` / ``attentions`` tuples over all recorded calls, by the contract above."""
        out = {}
        for key in self.asked:
            per_call = [getattr(o, key, None) for o in self.recorded]
            if per_call and all(p is not None for p in per_call):
                out[key] = self.in_order(tuple(None if None in layer else torch.cat(layer) for layer in zip(*per_call)))
        return out


class MaskedVisionTower(RecordsOutputs, nn.Module):
    """A vision transformer that takes a ``patch_attention_mask`` (Idefics3, SmolVLM) as the tiled engine's
    tower: (N, 3, H, W) pixels and their (N, H, W) pixel masks -> (N, h*w, D), a patch kept if any of its
    pixels is (the host's rule); the ``hidden_states`` / ``attentions`` the call asks for (``kwargs``, passed
    to the model) are kept per call and joined by :meth:`outputs`."""

    def __init__(self, vision: nn.Module, patch_size: int, kwargs: dict) -> None:
        super().__init__()
        self.vision = vision
        self.patch_size = patch_size
        self.kwargs = kwargs
        self.asked = ("hidden_states", "attentions")  # asked by ``kwargs`` or the model's config: given when asked
        self.recorded: list = []

    def forward(self, pixels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        kept = masks.unfold(1, p, p).unfold(2, p, p).sum(dim=(-1, -2)) > 0
        out = self.vision(pixel_values=pixels, patch_attention_mask=kept, return_dict=True, **self.kwargs)
        self.recorded.append(out)
        return out.last_hidden_state


class RecordingTower(RecordsOutputs, nn.Module):
    """A patch-token tower (``HFVisionTower``) that, when asked, also keeps the transformers vision
    model's ``hidden_states`` / ``attentions`` of every crop it ran (one entry per layer, crops of all
    chunks concatenated, image by image as the engine regroups them, :class:`RecordsOutputs`).
    Without a request it is the tower itself (layer-truncated where the tower does that)."""

    def __init__(self, tower: nn.Module, *, hidden_states: bool = False, attentions: bool = False) -> None:
        super().__init__()
        self.tower = tower
        self.hidden_states = hidden_states
        self.attentions = attentions
        self.asked = tuple(key for key, wanted in (("hidden_states", hidden_states), ("attentions", attentions)) if wanted)
        self.recorded: list = []
        self.patch_size = tower.patch_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if not (self.hidden_states or self.attentions):
            return self.tower(pixels)
        tower = self.tower
        dtype = next(tower.model.parameters()).dtype
        out = tower.model(
            pixel_values=pixels.to(dtype=dtype), output_hidden_states=True, output_attentions=self.attentions, return_dict=True
        )
        self.recorded.append(out)
        feats = torch.cat([out.hidden_states[i] for i in tower.layers], dim=-1)
        if getattr(tower, "select", "patch") == "patch":
            feats = feats[:, tower.num_prefix_tokens:]
        return feats.to(pixels.dtype)


def output_flags(config: Any, kwargs: dict) -> tuple[bool, bool]:
    """``output_hidden_states`` / ``output_attentions`` as the host reads them: the call's keyword,
    else the config's. A list of indices for ``output_hidden_states`` counts as a request."""
    flags = []
    for key in ("output_hidden_states", "output_attentions"):
        value = kwargs.get(key)
        if value is None:
            value = getattr(config, key, False)
        flags.append(bool(value) if not isinstance(value, (list, tuple)) else True)
    return flags[0], flags[1]
