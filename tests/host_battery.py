"""One battery of host contracts for every adapter, in the manner of transformers' ModelTesterMixin.

An adapter's test file subclasses :class:`HostBattery` and gives its :class:`HostCase` (a tiny
random plain model, the host processor's inputs, the adapter module); every check below then runs
on the adapted model: save / load, batching, left padding, greedy and beam generation, a training
step, bfloat16, pickling, unapply, a replaced DEM, the host's own errors, ``get_image_features``'
switches, the DEM's initialisation, and offloaded loading.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import pytest
import torch
from torch import nn

import dualview
from dualview import DEM
from dualview.lifecycle import ADAPTER_CONFIG, ADAPTER_WEIGHTS, dual_view_host
from dualview.adapters._common import recorded_options
from dualview.gate import DualViewGate

Size = tuple[int, int]


@dataclass
class HostCase:
    """What the battery needs to know about one host + adapter."""

    adapter: Any
    """The adapter module: ``apply``, ``unapply``, ``from_pretrained``."""
    build: Callable[[], nn.Module]
    """A plain tiny random model in eval mode, the same every call (seeded), vision tower frozen."""
    inputs: Callable[[Sequence[Size]], dict]
    """Model keyword inputs for one prompt per image of the given ``(H, W)`` sizes, made by the
    host's processor (left-padded where the prompts differ in length)."""
    options: dict = field(default_factory=dict)
    option_sets: tuple[dict, ...] = ()
    """Further option sets (each complete, like ``options``) that change what runs (fusion, directions,
    layers, ...): the option-dependent contracts (``tower_batch_size``) hold for each."""
    fixed: dict = field(default_factory=dict)
    """Option -> the value the adapter fixes it to: the adapter's own table (``_hf.ANYRES_FIXED``, the
    module's ``_FIXED``; an option that follows the host's config, e.g. AnyRes's ``pinpoints``, with the
    config's value). Empty: the host fixes none."""
    fixed_why: str = ""
    """Regex: the host's reason, which every refusal of a fixed option names."""
    sizes: tuple[Size, Size] = ((40, 70), (90, 30))
    """Two image sizes whose crops differ from their tiles (pinpoints / grids make them differ)."""
    dem_parent: Callable[[nn.Module], nn.Module] = lambda model: model.model
    """The module holding ``spatial_embed``."""
    vision_tower: Callable[[nn.Module], nn.Module] = lambda model: model.model.vision_tower
    projector: Callable[[nn.Module], nn.Module] = lambda model: model.model.multi_modal_projector
    image_features: Optional[Callable[..., Any]] = None
    """``(model, inputs, **kwargs) -> get_image_features output``; None: the host has no such method."""
    pooler_from_last: Optional[Callable[..., Any]] = None
    """``(model, last_hidden_state, inputs) -> pooler_output``: the host's own steps after the
    features (projector, pixel shuffle, packing), to check that ``last_hidden_state`` holds what
    they read; None: checked for shape and dependence on the DEM only."""
    mismatch_error: str = "Image features and image tokens do not match"
    """Regex of the host's own error when image tokens and features disagree."""
    generate_returns_prompt: bool = True
    offload_map: Optional[dict] = None
    """A ``device_map`` putting the vision tower on "disk"."""
    projector_key: str = "model.multi_modal_projector"
    """The projector's (connector's) name in the model, for ``device_map``."""
    image_token_id: Optional[int] = None
    input_ids_key: str = "input_ids"
    generate: Callable[..., torch.Tensor] = lambda model, inputs, **kwargs: model.generate(**inputs, **kwargs)
    """How the host's ``generate`` takes the inputs."""
    batch_of_two: Optional[Callable[[dict], tuple[dict, list[dict]]]] = None
    """``(inputs of two one-image prompts of one size) -> (those inputs with the second image unlike the
    first, the inputs of each prompt alone)``; None: the pixels are batch-first (the second image is
    flipped) and every batch-first tensor is sliced."""
    not_applicable: dict = field(default_factory=dict)
    """Check name ("mismatch", "image_features", "offload", "projector_offload", "offload_after_apply",
    "left_padding", "assignment_check") -> why the host has no such contract."""
    plain_inputs: Optional[Callable[[Sequence[Size]], dict]] = None
    """Inputs for the never-adapted model, where its processor makes other ones (default: ``inputs``)."""
    identity_inputs: Optional[Callable[[nn.Module, dict], dict]] = None
    """``(adapted model, its inputs) -> inputs`` on which the plain model computes what the adapted one
    does under ``init="identity"`` at initialisation: LLaVA-1.5 hosts see the dual-view thumbnail; None:
    the hosts that reuse their tile features, whose plain inputs (``plain_inputs`` or ``inputs``) are the
    same images."""


def dual_view_host_or_none(model: nn.Module) -> Optional[nn.Module]:
    try:
        return dual_view_host(model)
    except ValueError:
        return None


def plain_and_adapted(adapter: Any, plain: nn.Module, **options: Any) -> tuple[nn.Module, nn.Module]:
    """``plain`` and a dual-view copy of it: ``adapter.apply`` with ``num_heads=2`` unless ``options``
    say otherwise (the same random weights twice: the plain host beside dual view)."""
    return plain, adapter.apply(copy.deepcopy(plain), **{"num_heads": 2, **options})


def tower_calls(tower: nn.Module) -> list[int]:
    """The crop count of every call of ``tower`` from now on (a hook on its embeddings: every run starts
    there, also a layer-truncated one that skips the tower's own forward)."""
    embeddings = next(m for n, m in tower.named_modules() if n.endswith("embeddings"))
    calls: list[int] = []
    embeddings.register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    return calls


IMAGE_INPUTS = ("image_sizes", "batch_num_images", "pixel_attention_mask", "image_grid")
"""The processors' inputs besides the pixels that the hosts' ``get_image_features`` take, by name."""


def get_image_features(model: nn.Module, inputs: dict, **kwargs: Any) -> Any:
    """The host's ``model.model.get_image_features`` on ``inputs``' pixels and those of
    :data:`IMAGE_INPUTS` that ``inputs`` holds, without gradients: its whole output."""
    extra = {name: inputs[name] for name in IMAGE_INPUTS if name in inputs}
    with torch.no_grad():
        return model.model.get_image_features(inputs["pixel_values"], **extra, **kwargs)


def image_features(model: nn.Module, inputs: dict, **kwargs: Any) -> Any:
    """:func:`get_image_features`' ``pooler_output``: what the language model reads."""
    return get_image_features(model, inputs, **kwargs).pooler_output


def labelled(inputs: dict, image_token_id: int) -> torch.Tensor:
    """Labels of a training batch: the prompt ids, the image tokens and the padding left out (-100)."""
    labels = inputs["input_ids"].clone()
    labels[(labels == image_token_id) | (inputs["attention_mask"] == 0)] = -100
    return labels


def frozen_tower(model: nn.Module, tower: str = "vision_tower") -> nn.Module:
    """``model`` with its vision tower (``model.model.<tower>``) frozen, as the battery's hosts are built."""
    getattr(model.model, tower).requires_grad_(False)
    return model


def assert_a_training_step_reaches_the_dem_and_projector(model: nn.Module, inputs: dict, image_token_id: int) -> None:
    """One training step of ``model`` on ``inputs`` (:func:`labelled`), its vision tower frozen: a finite
    scalar loss whose gradients reach every parameter of the DEM and the projector, none of the tower."""
    model.train()
    model.model.vision_tower.requires_grad_(False)
    out = model(**inputs, labels=labelled(inputs, image_token_id))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    inner = model.model
    for name, p in [*inner.spatial_embed.named_parameters(), *inner.multi_modal_projector.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in inner.vision_tower.parameters())


ANYRES_OFFLOAD_MAP = {"model.vision_tower": "disk", "model.multi_modal_projector": "cpu", "model.image_newline": "cpu",
                      "model.language_model": "cpu", "lm_head": "cpu"}
"""The AnyRes hosts' (LLaVA-NeXT, OneVision) ``offload_map``: the vision tower on "disk"."""


def anyres_projected_patches(adapter: Any, model: nn.Module, last: torch.Tensor, inputs: dict) -> list[torch.Tensor]:
    """An AnyRes host's projector over ``last_hidden_state``, split per image (its base image and the
    tiles of the grid ``adapter.budget`` gives): what the host's ``pack_image_features`` takes."""
    grids = (adapter.budget(model, tuple(size.tolist())).grid for size in inputs["image_sizes"])
    return list(model.model.multi_modal_projector(last).split([1 + rows * cols for rows, cols in grids]))


def logits(model: nn.Module, inputs: dict, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def greedy(model: nn.Module, inputs: dict, steps: int) -> torch.Tensor:
    """The tokens greedy decoding must produce: the argmax of full forwards, one token at a time."""
    inputs = dict(inputs)
    ids = inputs.pop("input_ids")
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    mask = inputs.pop("attention_mask", None)
    new = []
    for _ in range(steps):
        kwargs = dict(inputs, input_ids=ids)
        if mask is not None:
            kwargs["attention_mask"] = mask
        last = logits(model, kwargs)[:, -1]
        last[:, eos] = float("-inf")  # generate's min_new_tokens: no end of sequence yet
        nxt = last.argmax(-1, keepdim=True)
        new.append(nxt)
        ids = torch.cat((ids, nxt), 1)
        if mask is not None:
            mask = torch.cat((mask, torch.ones_like(nxt)), 1)
    return torch.cat(new, 1)


class HostBattery:
    """Mixin of host-contract tests; subclasses define ``case()``."""

    @staticmethod
    def case() -> HostCase:  # pragma: no cover - overridden
        raise NotImplementedError

    def adapted(self) -> tuple[HostCase, nn.Module]:
        case = self.case()
        return case, case.adapter.apply(case.build(), **case.options)

    @staticmethod
    def skip_unless(case: HostCase, check: str) -> None:
        if check in case.not_applicable:
            pytest.skip(case.not_applicable[check])

    def dem(self, case: HostCase, model: nn.Module) -> DEM:
        return case.dem_parent(model).spatial_embed

    def gate(self, case: HostCase, model: nn.Module) -> DualViewGate:
        return case.dem_parent(model).spatial_gate

    def identity(self) -> tuple[HostCase, nn.Module]:
        case = self.case()
        return case, case.adapter.apply(case.build(), **{**case.options, "init": "identity"})

    @staticmethod
    def plain_twin_inputs(case: HostCase, model: nn.Module, sizes: Sequence[Size]) -> tuple[dict, dict]:
        """(inputs of the adapted model, inputs giving the plain model the same images)."""
        inputs = case.inputs(sizes)
        if case.identity_inputs is not None:
            return inputs, case.identity_inputs(model, inputs)
        return inputs, (case.plain_inputs or case.inputs)(sizes)

    @staticmethod
    def labels(case: HostCase, inputs: dict) -> torch.Tensor:
        ids = inputs[case.input_ids_key]
        if case.image_token_id is None:
            return ids.clamp(min=0)
        return ids.clamp(min=0).masked_fill(ids == case.image_token_id, -100)

    @staticmethod
    def tower_calls(case: HostCase, model: nn.Module) -> list[int]:
        """The crop count of every vision-tower call from now on (:func:`tower_calls`)."""
        return tower_calls(case.vision_tower(model))

    # -- options: the fixed ones, bad ones, tower_batch_size ---------------------------------------------

    def test_a_fixed_option_is_refused_with_another_value_and_accepted_with_its_own(self):
        """Every option the adapter fixes (its own table, ``HostCase.fixed``): another value is a
        ValueError naming the option, the value given and the host's reason, the model left plain;
        the fixed value itself may be restated (the same recorded options as not passing it)."""
        case = self.case()
        self.skip_unless(case, "fixed_options")
        assert case.fixed, "HostCase.fixed: the adapter's fixed options, or not_applicable['fixed_options']"
        for name, value in case.fixed.items():
            other = another_value(name, value)
            plain = case.build()
            with pytest.raises(ValueError, match=rf"option {name} is fixed\b.*got {re.escape(repr(other))}") as error:
                case.adapter.apply(plain, **{**case.options, name: other})
            assert re.search(case.fixed_why, str(error.value)), (case.fixed_why, str(error.value))
            assert_plain(plain)
        restated = case.adapter.apply(case.build(), **{**case.options, **case.fixed})
        assert restated.config.dualview == case.adapter.apply(case.build(), **case.options).config.dualview

    def test_bad_options_are_refused_naming_them_and_leave_the_model_plain(self):
        """An unknown option (TypeError), a head count that does not divide the DEM's channels and
        ``tower_batch_size=0`` (ValueError) are refused by ``apply``, naming the option, before the
        model is touched."""
        case, model = self.adapted()
        dim = self.dem(case, model).dim
        heads = next(k for k in range(3, dim) if dim % k)
        for bad, error in ((dict(bogus=1), TypeError), (dict(num_heads=heads), ValueError),
                           (dict(tower_batch_size=0), ValueError)):
            plain = case.build()
            (name,) = bad
            with pytest.raises(error, match=name):
                case.adapter.apply(plain, **{**case.options, **bad})
            assert_plain(plain)

    def test_tower_batch_size_splits_the_tower_calls_not_the_features(self):
        """For every option set: ``tower_batch_size`` None (automatic), 1, 3 (on ``options``) and "all"
        run the same crops (one call per crop under 1, calls of 3 and the rest under 3, one call under
        "all") and give the same image features and logits, within the float error of other matmul
        batch sizes."""
        case = self.case()
        inputs = case.inputs(case.sizes)
        for options in (case.options, *case.option_sets):
            dem, calls, out, features = None, {}, {}, {}
            sizes = (None, 1, 3, "all") if options is case.options else (None, 1, "all")  # the int rule once
            for size in sizes:
                model = case.adapter.apply(case.build(), **{**options, "tower_batch_size": size})
                if dem is None:
                    dem = self.dem(case, model).state_dict()
                self.dem(case, model).load_state_dict(dem)
                seen = self.tower_calls(case, model)
                out[size] = logits(model, inputs)
                calls[size] = list(seen)
                if case.image_features is not None:
                    with torch.no_grad():
                        features[size] = case.image_features(model, inputs).pooler_output
            crops = sum(calls["all"])
            assert calls["all"] == [crops] and crops > 3, (options, calls)
            assert calls[1] == [1] * crops and sum(calls[None]) == crops
            if 3 in calls:
                assert calls[3] == [3] * (crops // 3) + [crops % 3] * bool(crops % 3)
            for size in sizes[1:]:
                torch.testing.assert_close(out[size], out[None], atol=1e-5, rtol=1e-4)
                if features:
                    torch.testing.assert_close(features[size], features[None], atol=1e-4, rtol=1e-4)

    # -- init="identity": the plain host at initialisation, a learned correction after ------------------

    def test_identity_init_gives_the_plain_models_logits_bit_for_bit(self):
        """Under ``init="identity"`` the adapted model's logits are the plain model's on the same images
        (float32, bit for bit); the gate is the only new state besides the DEM; the released
        initialisation (default) is not the plain model (this test can tell them apart)."""
        case, model = self.identity()
        plain = case.build()
        inputs, plain_inputs = self.plain_twin_inputs(case, model, case.sizes)
        expected = logits(plain, plain_inputs)
        assert model.config.dualview["init"] == "identity"
        gate = self.gate(case, model)
        assert isinstance(gate, DualViewGate) and gate.dim == self.dem(case, model).dim and not gate.g.any()
        new = set(model.state_dict()) - set(plain.state_dict())
        assert {k for k in new if ".spatial_gate." in "." + k} and all(
            ".spatial_embed." in "." + k or ".spatial_gate." in "." + k for k in new)
        torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
        released = case.adapter.apply(case.build(), **case.options)
        assert not torch.allclose(logits(released, inputs), expected)
        # a moved gate moves the output
        with torch.no_grad():
            gate.g.fill_(0.5)
        assert not torch.allclose(logits(model, inputs), expected)

    @pytest.mark.parametrize("dem_dtype", [torch.bfloat16, torch.float16])
    def test_identity_is_bit_exact_with_the_dem_and_gate_in_lower_precision(self, dem_dtype):
        """A float32 model whose DEM and gate are kept in half precision gives, under ``init="identity"``,
        the plain float32 model's logits bit for bit: the host's features (the thumbnail's, or the
        tiles') are never rounded to the DEM's dtype on the way to the gate."""
        case, model = self.identity()
        self.dem(case, model).to(dem_dtype)
        self.gate(case, model).to(dem_dtype)
        inputs, plain_inputs = self.plain_twin_inputs(case, model, case.sizes)
        torch.testing.assert_close(logits(model, inputs), logits(case.build(), plain_inputs), rtol=0, atol=0)

    def test_identity_training_moves_the_gate_first_then_the_dem(self):
        """Step 0: the loss's gradient reaches the gate (``d out / d g = dem - host``) and not yet the
        DEM (``g = 0``); after one optimizer step the DEM's parameters get non-zero gradients and the
        output has left the plain model's."""
        case, model = self.identity()
        inputs, plain_inputs = self.plain_twin_inputs(case, model, case.sizes)
        plain = logits(case.build(), plain_inputs)
        model.train()
        dem, gate = self.dem(case, model), self.gate(case, model)
        model.requires_grad_(False)
        dem.requires_grad_(True)
        gate.requires_grad_(True)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        labels = self.labels(case, inputs)
        model(**inputs, labels=labels).loss.backward()
        assert gate.g.grad is not None and gate.g.grad.abs().sum() > 0
        assert all(p.grad is None or not p.grad.any() for p in dem.parameters())
        optimizer.step()
        optimizer.zero_grad()
        assert gate.g.any()
        model(**inputs, labels=labels).loss.backward()
        grads = [p.grad for p in dem.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
        model.eval()
        assert not torch.allclose(logits(model, inputs), plain)

    def test_identity_round_trips_through_save_pretrained_and_checks_the_assigned_gate(self, tmp_path):
        """A trained gate and DEM come back bit-exactly with ``from_pretrained`` (``init`` restored from
        config.json); a gate of the wrong width or kind is refused at assignment; unapply removes it."""
        case, model = self.identity()
        with torch.no_grad():
            self.gate(case, model).g.uniform_(-1, 1)
            for p in self.dem(case, model).parameters():
                p.add_(torch.randn_like(p) * 0.1)
        inputs = case.inputs(case.sizes[:1])
        expected = logits(model, inputs)
        model.save_pretrained(tmp_path)
        loaded = case.adapter.from_pretrained(tmp_path).eval()
        assert loaded.config.dualview["init"] == "identity"
        assert torch.equal(self.gate(case, loaded).g, self.gate(case, model).g)
        torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)
        dim = self.dem(case, model).dim
        for bad, message in ((DualViewGate(dim + 2), rf"dim={dim}.*got dim={dim + 2}"),
                             (DualViewGate(dim, init="released"), "init='identity'"),
                             (nn.Linear(dim, dim), "DualViewGate")):
            with pytest.raises((TypeError, ValueError), match=rf"spatial_gate.*{message}"):
                case.dem_parent(model).spatial_gate = bad
        case.adapter.unapply(model)
        assert not any("spatial_gate" in k for k in model.state_dict())

    # -- the DEM that is registered is the DEM that runs ---------------------------------------------

    def test_dem_is_a_registered_submodule_and_the_only_new_state(self):
        case = self.case()
        plain = case.build()
        model = case.adapter.apply(case.build(), **case.options)
        dem = self.dem(case, model)
        assert isinstance(dem, DEM) and any(m is dem for m in model.modules())
        new = set(model.state_dict()) - set(plain.state_dict())
        assert new and all(".spatial_embed." in "." + k for k in new)
        assert "dualview" in model.config.to_dict()

    def test_a_replaced_dem_is_the_one_that_runs(self):
        case, model = self.adapted()
        inputs = case.inputs(case.sizes[:1])
        before = logits(model, inputs)
        replacement = copy.deepcopy(self.dem(case, model))
        with torch.no_grad():
            for p in replacement.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        case.dem_parent(model).spatial_embed = replacement
        after = logits(model, inputs)
        assert not torch.allclose(before, after)
        # the same weights loaded with load_state_dict into a fresh adapted model give the same logits
        _, twin = self.adapted()
        self.dem(case, twin).load_state_dict(replacement.state_dict())
        torch.testing.assert_close(logits(twin, inputs), after, rtol=0, atol=0)

    @pytest.mark.parametrize("init", ["released", "identity"])
    def test_deleting_the_dem_or_gate_is_refused_as_assigning_none(self, init):
        """``del parent.spatial_embed`` (and ``spatial_gate`` under ``init="identity"``) raises the
        TypeError that assigning None raises, naming the submodule and ``unapply``; the DEM and gate
        stay registered and the model runs as before. Under "released" a stray gate may be deleted
        (what the missing-gate check tells users to do)."""
        case = self.case()
        model = case.adapter.apply(case.build(), **{**case.options, "init": init})
        parent = case.dem_parent(model)
        inputs = case.inputs(case.sizes[:1])
        expected = logits(model, inputs)
        kept = {name: parent._modules[name] for name in ("spatial_embed", "spatial_gate") if name in parent._modules}
        assert set(kept) == ({"spatial_embed", "spatial_gate"} if init == "identity" else {"spatial_embed"})
        name = case.adapter.__name__.rpartition(".")[2]  # the package's adapters are named as their module
        unapply = rf"the registered (DEM|gate) is kept.*dualview\.adapters\.{name}\.unapply\(model\)"
        for name in kept:
            with pytest.raises(TypeError, match=rf"{name} must be .*got NoneType: {unapply}"):
                setattr(parent, name, None)
            with pytest.raises(TypeError, match=rf"{name} cannot be deleted: {unapply}"):
                delattr(parent, name)
        assert {name: parent._modules.get(name) for name in kept} == kept
        torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
        if init == "released":  # a stray gate: refused by the forward, and deletable
            parent.spatial_gate = DualViewGate(self.dem(case, model).dim).to(self.dem(case, model).ln_fuse.weight)
            with pytest.raises(ValueError, match="delete spatial_gate"):
                logits(model, inputs)
            del parent.spatial_gate
            torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
        case.adapter.unapply(model)  # unapply itself removes them
        assert not any(name in case.dem_parent(model)._modules for name in kept)

    def test_a_dem_the_host_cannot_use_is_refused_at_assignment(self, tmp_path):
        """A DEM of the wrong ``dim``, or an ``out_size`` the host cannot take (None under the
        thumbnail mean; another grid than the tower's; any for full-map hosts), is refused when
        assigned to ``spatial_embed`` (naming it, expected and actual), the registered DEM kept: the
        model runs, saves and reloads."""
        case, model = self.adapted()
        self.skip_unless(case, "assignment_check")
        dem = self.dem(case, model)
        settings = dict(directions=dem.directions, fusion=dem.fusion, resample=dem.resample or "bilinear",
                        eps=dem.ln_fuse.eps)
        heads = dem.attention.num_heads
        bad = [(DEM(dem.dim + heads, heads, out_size=dem.out_size, **settings), rf"dim={dem.dim}.*got dim={dem.dim + heads}")]
        fusion = model.config.dualview["thumbnail_fusion"]
        if dem.out_size is None:  # the full map replaces the host's tiles
            bad.append((DEM(dem.dim, heads, out_size=(2, 2), **settings), r"out_size=None.*got out_size=\(2, 2\)"))
        elif fusion == "mean":
            h, w = dem.out_size
            bad.append((DEM(dem.dim, heads, out_size=None, **settings), rf"out_size=\({h}, {w}\).*got out_size=None"))
            bad.append((DEM(dem.dim, heads, out_size=(h + 1, w), **settings),
                        rf"out_size=\({h}, {w}\).*got out_size=\({h + 1}, {w}\)"))
        for candidate, message in bad:
            with pytest.raises(ValueError, match=rf"spatial_embed.*{message}"):
                case.dem_parent(model).spatial_embed = candidate
            assert self.dem(case, model) is dem
        inputs = case.inputs(case.sizes[:1])
        expected = logits(model, inputs)
        model.save_pretrained(tmp_path)
        torch.testing.assert_close(logits(case.adapter.from_pretrained(tmp_path).eval(), inputs), expected,
                                   rtol=0, atol=0)

    @pytest.mark.parametrize("init", ["released", "identity"])
    def test_adapter_only_checkpoint_onto_a_fresh_plain_host_is_bit_exact(self, tmp_path, init):
        """``dualview.apply`` picks this adapter from the model's class; ``dualview.save_adapter`` writes the
        DEM (+ gate) and the options only; ``dualview.load`` onto a fresh PLAIN host gives the trained
        adapted model's logits bit for bit; ``dualview.unapply`` gives the plain model back."""
        case = self.case()
        model = dualview.apply(case.build(), **{**case.options, "init": init})
        assert type(dual_view_host(model)).dualview_adapter.name == case.adapter.__name__.rpartition(".")[2]
        with torch.no_grad():  # trained weights, not what a fresh apply makes
            for p in self.dem(case, model).parameters():
                p.add_(torch.randn_like(p) * 0.1)
            if init == "identity":
                self.gate(case, model).g.uniform_(-1, 1)
        inputs = case.inputs(case.sizes)
        expected = logits(model, inputs)
        dualview.save_adapter(model, tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
        from safetensors import safe_open

        with safe_open(str(tmp_path / ADAPTER_WEIGHTS), framework="pt") as f:
            keys = set(f.keys())
        own = {"spatial_embed." + k for k in self.dem(case, model).state_dict()}
        if init == "identity":
            own.add("spatial_gate.g")
        assert keys == own
        loaded = dualview.load(case.build(), tmp_path)
        assert loaded.config.dualview == model.config.dualview
        torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)
        plain = dualview.unapply(loaded)
        assert "dualview" not in plain.config.to_dict() and not isinstance(dual_view_host_or_none(plain), nn.Module)

    def test_apply_twice_is_refused_and_unapply_gives_the_plain_model_back(self):
        case = self.case()
        plain = case.build()
        inputs = (case.plain_inputs or case.inputs)(case.sizes[:1])
        model = case.adapter.apply(case.build(), **case.options)
        with pytest.raises(ValueError, match="already applied"):
            case.adapter.apply(model, **case.options)
        restored = case.adapter.unapply(model)
        assert type(restored) is type(plain)
        assert set(restored.state_dict()) == set(plain.state_dict())
        assert "dualview" not in restored.config.to_dict()
        torch.testing.assert_close(logits(restored, inputs), logits(plain, inputs), rtol=0, atol=0)
        with pytest.raises(ValueError, match="no dual view"):
            case.adapter.unapply(restored)
        case.adapter.apply(restored, **case.options)  # and it can be applied again

    # -- save / load, pickling -------------------------------------------------------------------------

    def test_save_pretrained_then_from_pretrained_is_bit_exact(self, tmp_path):
        """For every option set, with DEM weights unlike any fresh initialisation: config.json holds
        the recorded options; ``from_pretrained`` gives them back, the same classes, a DEM of the same
        settings and weights, and the same image features and logits, bit for bit."""
        case = self.case()
        inputs = case.inputs(case.sizes)
        for i, options in enumerate((case.options, *case.option_sets)):
            model = case.adapter.apply(case.build(), **options)
            with torch.no_grad():
                for p in self.dem(case, model).parameters():
                    p.add_(torch.randn_like(p))
            model.save_pretrained(tmp_path / str(i))
            saved = json.loads((tmp_path / str(i) / "config.json").read_text())["dualview"]
            assert saved == recorded_options(model.config)
            loaded = case.adapter.from_pretrained(tmp_path / str(i)).eval()
            assert type(loaded) is type(model) and type(case.dem_parent(loaded)) is type(case.dem_parent(model))
            assert recorded_options(loaded.config) == saved
            dem, again = self.dem(case, model), self.dem(case, loaded)
            assert dem_settings(again) == dem_settings(dem)
            assert dem.state_dict().keys() == again.state_dict().keys()
            assert all(torch.equal(a, again.state_dict()[k]) for k, a in dem.state_dict().items())
            torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)
            if case.image_features is not None:
                with torch.no_grad():
                    torch.testing.assert_close(case.image_features(loaded, inputs).pooler_output,
                                               case.image_features(model, inputs).pooler_output, rtol=0, atol=0)

    def test_pickle_deepcopy_and_torch_save_round_trip(self):
        case, model = self.adapted()
        inputs = case.inputs(case.sizes[:1])
        expected = logits(model, inputs)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        copies = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model), torch.load(buffer, weights_only=False)]
        for other in copies:
            assert type(other) is type(model)
            assert self.dem(case, other) is not self.dem(case, model)
            torch.testing.assert_close(logits(other, inputs), expected, rtol=0, atol=0)
        # each copy runs its own DEM
        with torch.no_grad():
            self.dem(case, copies[1]).ln_fuse.bias.add_(1.0)
        assert not torch.allclose(logits(copies[1], inputs), expected)

    # -- batching, padding, generation -----------------------------------------------------------------

    @staticmethod
    def batch_and_samples(case: HostCase) -> tuple[dict, list[dict]]:
        """Inputs of a batch of two prompts with two different images of one size (same prompt length,
        no padding), and the inputs of each prompt alone."""
        both = case.inputs([case.sizes[0]] * 2)
        if case.batch_of_two is not None:
            return case.batch_of_two(both)
        pixels_key = next(k for k in both if "pixel" in k or k == "images")
        both[pixels_key] = both[pixels_key].clone()
        both[pixels_key][1] = both[pixels_key][1].flip(-1)
        return both, [{k: (v[i : i + 1] if isinstance(v, torch.Tensor) and v.shape[0] == 2 else v)
                       for k, v in both.items()} for i in range(2)]

    def test_batched_equals_one_at_a_time(self):
        case, model = self.adapted()
        both, ones = self.batch_and_samples(case)
        batched = logits(model, both)
        for i, one in enumerate(ones):
            torch.testing.assert_close(batched[i : i + 1], logits(model, one), atol=1e-5, rtol=1e-4)

    def test_every_returned_field_of_a_batch_is_what_its_prompts_return_alone(self):
        """transformers' ``test_batching_equivalence``, in our words: with ``output_hidden_states`` and
        ``output_attentions`` (eager attention; in the call and the config), every tensor the model returns (logits, the language
        model's hidden states and attentions, the image outputs: features, the vision tower's hidden
        states and attentions) holds for each prompt of a batch what the prompt alone returns: its row
        of a per-prompt tensor, its consecutive rows of a per-image or per-crop one."""
        case, model = self.adapted()
        model.set_attn_implementation("eager")
        # in the config too, as transformers' test sets them: the image hook reads them from there
        model.config.output_hidden_states = model.config.output_attentions = True
        both, ones = self.batch_and_samples(case)
        kwargs = dict(output_hidden_states=True, output_attentions=True, use_cache=False, return_dict=True)
        with torch.no_grad():
            batched = model(**both, **kwargs)
            alone = [model(**one, **kwargs) for one in ones]
        compared = assert_batch_of(batched, alone)
        # every field the plain host returns for one prompt was compared (the tower's own hidden
        # states and attentions among the image outputs, where the host returns them)
        plain = case.build()
        plain.set_attn_implementation("eager")
        plain.config.output_hidden_states = plain.config.output_attentions = True
        _, plain_inputs = self.plain_twin_inputs(case, model, case.sizes[:1])
        with torch.no_grad():
            out = plain(**plain_inputs, **kwargs)
        fields = assert_batch_of(out, [out])
        assert "logits" in fields and set(fields) <= set(compared), sorted(set(fields) - set(compared))

    def test_left_padding_leaves_the_last_logits_unchanged(self):
        case, model = self.adapted()
        self.skip_unless(case, "left_padding")
        inputs = case.inputs(case.sizes[:1])
        ids = inputs[case.input_ids_key]
        pad = torch.full((1, 3), getattr(model.config, "pad_token_id", None) or 0, dtype=ids.dtype)
        mask = inputs.get("attention_mask", torch.ones_like(ids))
        padded = dict(inputs, **{case.input_ids_key: torch.cat((pad, ids), 1)},
                      attention_mask=torch.cat((torch.zeros_like(pad), mask), 1))
        positions = (padded["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        plain_positions = (mask.cumsum(-1) - 1).clamp(min=0)
        expected = logits(model, dict(inputs, attention_mask=mask), position_ids=plain_positions)[:, -1]
        got = logits(model, padded, position_ids=positions)[:, -1]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

    def test_greedy_generate_equals_a_manual_greedy_loop(self):
        case, model = self.adapted()
        inputs = case.inputs(case.sizes[:1])
        out = case.generate(model, inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, num_beams=1)
        new = out[:, -3:]
        if case.generate_returns_prompt:
            assert out.shape[1] == inputs["input_ids"].shape[1] + 3
        assert torch.equal(new, greedy(model, inputs, 3))

    def test_beam_search_generates_the_requested_sequences(self):
        case, model = self.adapted()
        inputs = case.inputs(case.sizes[:1])
        out = case.generate(model, inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, num_beams=2,
                            num_return_sequences=2)
        assert out.shape[0] == 2 and out.shape[1] >= 3
        again = case.generate(model, inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, num_beams=2,
                              num_return_sequences=2)
        assert torch.equal(out, again)

    # -- training, precision -----------------------------------------------------------------------------

    def test_a_training_step_trains_the_dem_and_projector_not_the_frozen_tower(self):
        case, model = self.adapted()
        model.train()
        inputs = case.inputs(case.sizes)
        ids = inputs[case.input_ids_key]
        labels = ids.clamp(min=0).masked_fill(ids == case.image_token_id, -100) if case.image_token_id is not None else ids.clamp(min=0)
        dem, tower, projector = self.dem(case, model), case.vision_tower(model), case.projector(model)
        before = copy.deepcopy(dem.state_dict())
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        loss = model(**inputs, labels=labels).loss
        assert torch.isfinite(loss)
        loss.backward()
        for name, module in (("DEM", dem), ("projector", projector)):
            grads = [p.grad for p in module.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads), name
            assert any(g.abs().sum() > 0 for g in grads), name
        assert all(p.grad is None for p in tower.parameters())
        optimizer.step()
        assert any(not torch.equal(before[k], v) for k, v in dem.state_dict().items())

    def test_bfloat16_model_runs(self):
        case, model = self.adapted()
        model.to(torch.bfloat16)
        inputs = {k: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in case.inputs(case.sizes).items()}
        out = logits(model, inputs)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()

    # The DEM may be kept in another precision than the model (a float32 DEM in a bfloat16 / float16
    # model, e.g. trained in mixed precision, or the reverse), made so by ``.to`` or assigned.
    DTYPE_MATRIX = [
        (torch.bfloat16, torch.float32, "to"), (torch.float16, torch.float32, "to"),
        (torch.float32, torch.bfloat16, "to"), (torch.float32, torch.float16, "to"),
        (torch.bfloat16, torch.float16, "to"), (torch.bfloat16, torch.float32, "assign"),
    ]

    @pytest.mark.parametrize("model_dtype, dem_dtype, how", DTYPE_MATRIX)
    def test_a_dem_in_another_precision_than_the_model(self, model_dtype, dem_dtype, how):
        """The model runs in its dtype whatever the DEM's, and gives the float32 model's answer
        within the lower precision's error (the DEM runs in its own dtype, the projector in its)."""
        case, model = self.adapted()
        inputs = case.inputs(case.sizes[:1])
        reference = logits(model, inputs)
        dem = self.dem(case, model)
        model.to(model_dtype)
        if how == "assign":
            case.dem_parent(model).spatial_embed = copy.deepcopy(dem).to(dem_dtype)
        else:
            dem.to(dem_dtype)
        assert next(self.dem(case, model).parameters()).dtype == dem_dtype
        assert next(case.projector(model).parameters()).dtype == model_dtype
        cast = {k: (v.to(model_dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in inputs.items()}
        out = logits(model, cast)
        assert out.dtype == model_dtype
        scale = float(reference.abs().max())
        torch.testing.assert_close(out.float(), reference, atol=0.1 * scale, rtol=0)

    # -- the host's own errors and switches ---------------------------------------------------------------

    def test_image_tokens_and_features_that_disagree_raise_the_hosts_error(self):
        case, model = self.adapted()
        self.skip_unless(case, "mismatch")
        inputs = case.inputs(case.sizes[:1])
        ids = inputs[case.input_ids_key].clone()
        first = int((ids[0] == case.image_token_id).nonzero()[0])
        ids[0, first] = 0 if case.image_token_id != 0 else 1
        with pytest.raises(ValueError, match=case.mismatch_error):
            logits(model, dict(inputs, **{case.input_ids_key: ids}))

    def _features(self, case, model, **kwargs):
        self.skip_unless(case, "image_features")
        with torch.no_grad():
            return case.image_features(model, case.inputs(case.sizes[:1]), **kwargs)

    def _tower_layers(self, case, model) -> int:
        return case.vision_tower(model).config.num_hidden_layers

    # The next five are transformers' common-battery checks of the same names, in our words.

    def test_get_image_features_hidden_states(self):
        """The vision tower's hidden states, of every crop, when asked (and none when not)."""
        case, model = self.adapted()
        out = self._features(case, model, output_hidden_states=True)
        states = out.hidden_states
        assert states is not None and len(states) == self._tower_layers(case, model) + 1
        assert len({s.shape[0] for s in states}) == 1 and states[0].shape[0] > 1  # every crop, one entry per layer
        assert self._features(case, model).hidden_states is None  # not asked: none kept

    def test_get_image_features_attentions(self):
        """The vision tower's attention maps, of every crop, when asked."""
        case, model = self.adapted()
        self.skip_unless(case, "image_features")
        case.vision_tower(model).set_attn_implementation("eager")
        out = self._features(case, model, output_attentions=True)
        assert out.attentions is not None and len(out.attentions) == self._tower_layers(case, model)
        crops, heads, tokens, _ = out.attentions[0].shape
        assert crops == out.hidden_states[0].shape[0] if out.hidden_states else crops > 1
        torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(crops, heads, tokens))

    def test_get_image_features_last_hidden_state(self):
        """``last_hidden_state``: the dual-view features the host's projector reads (DEM-fused
        tiles; D = the DEM's channels), as the host gives the features before its projector."""
        case, model = self.adapted()
        out = self._features(case, model)
        last = out.last_hidden_state
        assert isinstance(last, torch.Tensor) and last.ndim == 3, type(last)
        assert last.shape[-1] == self.dem(case, model).dim and torch.isfinite(last.float()).all()
        if case.pooler_from_last is not None:
            with torch.no_grad():
                want = case.pooler_from_last(model, last, case.inputs(case.sizes[:1]))
            got = out.pooler_output
            got = list(got) if isinstance(got, (list, tuple)) else [got]
            want = list(want) if isinstance(want, (list, tuple)) else [want]
            assert len(got) == len(want)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            self.dem(case, model).ln_fuse.bias.add_(1.0)
        assert not torch.allclose(self._features(case, model).last_hidden_state, last)  # the DEM's output

    def test_get_image_features_output_return_dict_false(self):
        """``config.return_dict=False`` (or ``return_dict=False`` in the call) gives a tuple."""
        case, model = self.adapted()
        as_dict = self._features(case, model)
        model.config.return_dict = False
        as_tuple = self._features(case, model)
        assert isinstance(as_tuple, tuple)
        assert any(isinstance(x, (list, tuple)) and len(x) == len(as_dict.pooler_output) for x in as_tuple)
        as_tuple = self._features(case, model, return_dict=False)
        assert isinstance(as_tuple, tuple)

    def test_can_init_all_missing_weights(self):
        """The DEM made by ``apply`` is exactly what the host's ``_init_weights`` makes of a DEM whose
        weights are missing (built on the meta device), under one seed."""
        case = self.case()
        model = case.build()
        torch.manual_seed(123)
        case.adapter.apply(model, **case.options)
        dem = self.dem(case, model)
        # the same DEM built on the meta device (as a load with missing weights builds it), then
        # initialised by the host's own per-module rule under the same seed
        with torch.device("meta"):
            twin = copy.deepcopy(dem).to("meta")
        twin = twin.to_empty(device="cpu")
        init_owner = model.get_model() if hasattr(model, "get_model") and not hasattr(model, "model") else model
        torch.manual_seed(123)
        twin.apply(init_owner._init_weights)
        for (name, a), (_, b) in zip(dem.state_dict().items(), twin.state_dict().items()):
            assert torch.equal(a, b), name
        std = getattr(model.config, "initializer_range", None) or model.config.get_text_config().initializer_range
        linear = next(m for m in dem.modules() if isinstance(m, nn.Linear))
        assert abs(float(linear.weight.detach().std()) - std) < 0.25 * std and not linear.bias.abs().any()

    @pytest.mark.parametrize("where", ["cpu", "disk"])
    def test_offloaded_projector_with_device_map(self, tmp_path, where):
        """The DEM is placed with the projector: with the projector offloaded by ``device_map`` (its
        weights on "meta" behind accelerate's hooks) the DEM holds the saved weights on the device
        the projector runs on, and the loaded model gives the logits of the model in memory; so
        does ``apply`` on a plain model loaded with its projector offloaded."""
        case, model = self.adapted()
        self.skip_unless(case, "projector_offload")
        pytest.importorskip("accelerate")
        with torch.no_grad():  # a trained DEM: not what a fresh initialisation gives
            for p in self.dem(case, model).parameters():
                p.add_(torch.randn_like(p) * 0.1)
        inputs = case.inputs(case.sizes[:1])
        model.save_pretrained(tmp_path / "saved")
        device_map = projector_offload_map(case.build(), case.projector_key, where)
        loaded = case.adapter.from_pretrained(tmp_path / "saved", device_map=device_map,
                                              offload_folder=str(tmp_path / "offload")).eval()
        dem = self.dem(case, loaded)
        assert all(p.device.type != "meta" for p in dem.parameters())
        for (name, saved), got in zip(self.dem(case, model).state_dict().items(), dem.state_dict().values()):
            assert torch.equal(got.cpu(), saved), name
        torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=1e-5, rtol=1e-5)
        # apply on a plain model loaded with its projector offloaded: a real (initialised) DEM
        plain = case.build()
        plain.save_pretrained(tmp_path / "plain")
        offloaded = type(plain).from_pretrained(tmp_path / "plain", device_map=device_map,
                                                offload_folder=str(tmp_path / "offload_plain")).eval()
        case.adapter.apply(offloaded, **case.options)
        dem = self.dem(case, offloaded)
        assert all(p.device.type != "meta" and torch.isfinite(p).all() for p in dem.parameters())
        assert torch.isfinite(logits(offloaded, inputs)).all()

    def test_offloaded_vision_tower_with_device_map(self, tmp_path):
        """``from_pretrained(..., device_map=...)`` with the tower on "disk" (accelerate hooks, meta
        parameters) loads and gives the logits of the model in memory."""
        case, model = self.adapted()
        self.skip_unless(case, "offload")
        pytest.importorskip("accelerate")
        inputs = case.inputs(case.sizes[:1])
        model.save_pretrained(tmp_path / "saved")
        offloaded = case.adapter.from_pretrained(
            tmp_path / "saved", device_map=case.offload_map, offload_folder=str(tmp_path / "offload")
        ).eval()
        assert any(p.device.type == "meta" for p in case.vision_tower(offloaded).parameters())
        torch.testing.assert_close(logits(offloaded, inputs), logits(model, inputs), atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("init", ["released", "identity"])
    @pytest.mark.parametrize("how", ["cpu_offload", "dem_on_disk"])
    def test_offloading_after_apply_gives_the_same_logits(self, tmp_path, how, init):
        """accelerate's offloading of an adapted model in memory: ``cpu_offload(model)`` (every weight
        on "meta", loaded at each call) or ``dispatch_model`` with the DEM on "disk": the forward runs
        on the hooks' execution device and gives the logits of the model as it was."""
        accelerate = pytest.importorskip("accelerate")
        case = self.case()
        if "offload_after_apply" in case.not_applicable:  # the plain host fails so too: checked, then skipped
            plain = case.build()
            accelerate.cpu_offload(plain, execution_device=torch.device("cpu"))
            with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
                logits(plain, (case.plain_inputs or case.inputs)(case.sizes[:1]))
            pytest.skip(case.not_applicable["offload_after_apply"])
        model = case.adapter.apply(case.build(), **{**case.options, "init": init})
        with torch.no_grad():  # a trained DEM and gate: the DEM's output reaches the logits
            for p in self.dem(case, model).parameters():
                p.add_(torch.randn_like(p) * 0.1)
            if init == "identity":
                self.gate(case, model).g.uniform_(-1, 1)
        inputs = case.inputs(case.sizes[:1])
        expected = logits(model, inputs)
        dem = self.dem(case, model)
        if how == "cpu_offload":
            accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
        else:
            dem_key = next(name for name, module in model.named_modules() if module is dem)
            accelerate.dispatch_model(model, device_map=projector_offload_map(model, dem_key, "disk"),
                                      main_device=torch.device("cpu"), offload_dir=str(tmp_path))
        assert all(p.device.type == "meta" for p in dem.parameters())
        torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
        # save_adapter writes the weights the hooks hold, not the "meta" placeholders
        dualview.save_adapter(model, tmp_path / "adapter")
        loaded = dualview.load(case.build(), tmp_path / "adapter")
        torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)


# another value than the fixed one, per option: what a user might pass instead
_OTHER_VALUES = {"grid": (2, 2), "out_size": (2, 2), "resample": "bilinear", "pinpoints": [[28, 28]]}
_SWAPPED = {"fit": ("pad", "squash"), "thumbnail_fusion": ("concat", "mean")}


def another_value(name: str, fixed: Any) -> Any:
    """A value of option ``name`` other than ``fixed``."""
    if name in _SWAPPED:
        first, second = _SWAPPED[name]
        return second if fixed == first else first
    if name == "max_tiles":
        return fixed + 3
    other = _OTHER_VALUES[name]
    assert other != fixed, (name, fixed)
    return other


def assert_batch_of(batched: Any, alone: Sequence[Any], path: str = "") -> list[str]:
    """``batched`` (a model output, or a field of one) holds what each prompt ``alone`` returns: a
    tensor their tensors one after the other on dim 0 (a prompt's row, or its image's crops), a
    sequence of one length theirs item by item (e.g. per layer), a longer one their items one after
    the other (e.g. per image); other values (a cache) are not compared. -> the paths compared."""
    if isinstance(batched, torch.Tensor):
        assert all(isinstance(a, torch.Tensor) for a in alone), path
        assert batched.shape[0] == sum(a.shape[0] for a in alone), (path, batched.shape, [a.shape for a in alone])
        torch.testing.assert_close(batched, torch.cat(list(alone)), atol=1e-5, rtol=1e-4, msg=lambda m: f"{path}: {m}")
        return [path.rstrip(".")]
    if isinstance(batched, dict):  # ModelOutput too: its fields that are set
        keys = [k for k, v in batched.items() if v is not None]
        assert all([k for k, v in a.items() if v is not None] == keys for a in alone), path
        return [p for k in keys for p in assert_batch_of(batched[k], [a[k] for a in alone], f"{path}{k}.")]
    if isinstance(batched, (list, tuple)):
        if all(len(a) == len(batched) for a in alone):
            parts = [[a[i] for a in alone] for i in range(len(batched))]
        else:
            items = [x for a in alone for x in a]
            assert len(items) == len(batched), path
            parts = [[x] for x in items]
        return [p for i, (b, a) in enumerate(zip(batched, parts)) for p in assert_batch_of(b, a, f"{path}{i}.")]
    return []


def dem_settings(dem: DEM) -> tuple:
    """What a DEM is built with (its weights aside)."""
    return (dem.dim, dem.num_heads, dem.out_size, dem.directions, dem.fusion, dem.resample)


def assert_plain(model: nn.Module) -> None:
    """No dual view installed (a refused ``apply`` leaves the model as it was)."""
    assert "dualview" not in model.config.to_dict()
    assert dual_view_host_or_none(model) is None
    assert not any("spatial_embed" in k for k in model.state_dict())


def assert_token_counts_follow_the_host(
    prepared: Any, plain: Any, sizes: Sequence[Size], *, whole: Sequence[int], placeholders: Sequence[int]
) -> Any:
    """The prepared processor's ``_get_num_multimodal_tokens`` (what serving engines ask) is the plain
    processor's of the INSTALLED transformers, and that answer is what the prompts hold under one
    of the two rules transformers releases have used, the same for every size: each image's whole
    expansion (``whole``: start / end / row-col tokens too) or only its placeholder tokens
    (``placeholders``). Returns the prepared processor's answer."""
    counted = prepared._get_num_multimodal_tokens(image_sizes=list(sizes))
    host = plain._get_num_multimodal_tokens(image_sizes=list(sizes))
    assert list(counted.num_image_tokens) == list(host.num_image_tokens)
    assert list(counted.num_image_patches) == list(host.num_image_patches)
    tokens = list(counted.num_image_tokens)
    assert tokens == list(whole) or tokens == list(placeholders), (tokens, list(whole), list(placeholders))
    return counted


def projector_offload_map(model: nn.Module, projector_key: str, where: str) -> dict:
    """A ``device_map`` of ``model``: every module on "cpu" down to the projector's parent, the
    projector (``projector_key``) on ``where``."""
    parent, _, _ = projector_key.rpartition(".")
    mapping = {}
    for name, _ in model.named_children():
        if parent == name or parent.startswith(name + "."):
            holder = model.get_submodule(parent)
            for child in [n for n, _ in holder.named_children()] + [n for n, _ in holder.named_parameters(recurse=False)]:
                mapping[f"{parent}.{child}"] = "cpu"
        else:
            mapping[name] = "cpu"
    mapping[projector_key] = where
    return mapping
