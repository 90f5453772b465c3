"""A host and its adapter defined outside the package (here, in this test module) work through every
entry point: ``dualview.apply`` / ``unapply`` / ``save_adapter`` / ``load`` / ``from_pretrained``, with
the facts declared once on the adapter. The registry that makes this possible is checked too."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, PretrainedConfig, PreTrainedModel

import dualview
from dualview import DCM
from dualview.adapters import Geometry, HostAdapter, Placement, register_adapter, registered_adapters
from dualview.adapters.interface import DualViewHost, adapter_for_class, dual_view_host
from dualview.adapters.towers import HFVisionTower


class TinyVLMConfig(PretrainedConfig):
    model_type = "dualview_test_tiny_vlm"
    sub_configs = {"vision_config": CLIPVisionConfig}

    def __init__(self, vision_config=None, text_dim: int = 12, classes: int = 5, initializer_range: float = 0.02,
                 **kwargs):
        super().__init__(**kwargs)
        if isinstance(vision_config, dict) or vision_config is None:
            vision_config = CLIPVisionConfig(**(vision_config or dict(
                hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                patch_size=7,
            )))
        self.vision_config = vision_config
        self.text_dim, self.classes, self.initializer_range = text_dim, classes, initializer_range


class TinyVLMPreTrainedModel(PreTrainedModel):
    config_class = TinyVLMConfig
    base_model_prefix = "model"


class TinyVLMModel(TinyVLMPreTrainedModel):
    """The host's inner model: CLIP patch tokens -> projector (one crop of ``image_size`` per image)."""

    def __init__(self, config: TinyVLMConfig) -> None:
        super().__init__(config)
        self.vision_tower = CLIPVisionModel(config.vision_config)
        self.multi_modal_projector = nn.Linear(config.vision_config.hidden_size, config.text_dim)
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.multi_modal_projector(HFVisionTower(self.vision_tower, layer=-1)(pixel_values))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.get_image_features(pixel_values)


class TinyVLM(TinyVLMPreTrainedModel):
    def __init__(self, config: TinyVLMConfig) -> None:
        super().__init__(config)
        self.model = TinyVLMModel(config)
        self.head = nn.Linear(config.text_dim, config.classes)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.model(pixel_values).mean(1))


def clip_geometry(vision: CLIPVisionConfig) -> Geometry:
    """What a CLIP tower of ``vision`` hands the DEM (its last layer, patch tokens)."""
    return Geometry(dim=vision.hidden_size, crop=vision.image_size, patch=vision.patch_size)


class DualViewTinyVLMModel(DualViewHost, TinyVLMModel):
    """The recipe's step 1: the image hook, dual view."""

    dualview_plain = TinyVLMModel

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tower = type(self).dualview_adapter._make_tower(self, {})
        return self.dualview_project(self.dualview_encoder(tower)(pixel_values))


class TinyVLMAdapter(HostAdapter):
    """The recipe's step 2: the declarations and the two required hooks. Defining it registers it."""

    name = "tiny_vlm_test"
    hosts = (TinyVLM,)
    dual_view_classes = (DualViewTinyVLMModel,)

    @classmethod
    def _measure(cls, module: nn.Module) -> Geometry:
        return clip_geometry(module.config.vision_config)

    @classmethod
    def _make_tower(cls, inner: nn.Module, call: dict) -> nn.Module:
        return HFVisionTower(inner.vision_tower, layer=-1)


def build(seed: int = 0) -> TinyVLM:
    torch.manual_seed(seed)
    return TinyVLM(TinyVLMConfig()).eval()


def pixels(seed: int = 1, size: tuple[int, int] = (84, 56)) -> torch.Tensor:
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))


def test_defining_the_adapter_registers_it_for_its_host_class():
    assert registered_adapters()["tiny_vlm_test"] is TinyVLMAdapter
    assert adapter_for_class(TinyVLM) is TinyVLMAdapter
    assert adapter_for_class(type("MyTinyVLM", (TinyVLM,), {})) is TinyVLMAdapter  # a user's subclass
    assert adapter_for_class(TinyVLMModel) is TinyVLMAdapter  # the plain inner class, for "use X" hints
    assert DualViewTinyVLMModel.dualview_adapter is TinyVLMAdapter


def test_dualview_apply_installs_it_and_identity_init_gives_the_plain_model_on_the_thumbnail():
    """Identity at g = 0 is the plain host on the thumbnail (thumbnail_fusion="mean"), bit for bit; the
    released init is not; unapply gives the plain classes back."""
    images = pixels()
    plain = build()
    thumbnail = DCM(28, (3, 3))(images).thumbnail
    with torch.no_grad():
        expected = plain(thumbnail)
    model = dualview.apply(build(), init="identity")
    assert type(model.model) is DualViewTinyVLMModel and type(model) is TinyVLM
    with torch.no_grad():
        assert torch.equal(model(images), expected)
    released = dualview.apply(build())
    with torch.no_grad():
        assert not torch.allclose(released(images), expected)
    dualview.unapply(model)
    assert type(model.model) is TinyVLMModel and "spatial_embed" not in model.model._modules
    assert not hasattr(model.config, "dualview")


def test_save_adapter_then_load_onto_a_fresh_plain_host_is_bit_exact(tmp_path):
    model = dualview.apply(build(), init="identity")
    with torch.no_grad():
        model.model.spatial_gate.g.fill_(0.5)  # trained away from identity
        expected = model(pixels())
    dualview.save_adapter(model, tmp_path / "dv")
    assert json.loads((tmp_path / "dv" / "dualview_adapter.json").read_text())["adapter"] == "tiny_vlm_test"
    loaded = dualview.load(build(), tmp_path / "dv")
    with torch.no_grad():
        assert torch.equal(loaded(pixels()), expected)


def test_save_pretrained_then_dualview_from_pretrained_is_bit_exact(tmp_path):
    model = dualview.apply(build(), num_heads=2, grid=(2, 3))
    with torch.no_grad():
        expected = model(pixels())
    model.save_pretrained(tmp_path / "whole")
    loaded = dualview.from_pretrained(tmp_path / "whole")
    assert type(loaded) is TinyVLM and type(loaded.model) is DualViewTinyVLMModel
    assert dual_view_host(loaded).dualview_options.grid == (2, 3)
    with torch.no_grad():
        assert torch.equal(loaded(pixels()), expected)


def test_a_dem_of_another_width_is_refused_at_assignment_by_the_adapters_geometry():
    model = dualview.apply(build())
    with pytest.raises(ValueError, match=r"tiny_vlm_test: the DEM at spatial_embed must have dim=16 .* got dim=8"):
        model.model.spatial_embed = dualview.DEM(8, 2, out_size=(4, 4))


def test_another_adapter_cannot_take_a_registered_name_or_host_class():
    with pytest.raises(ValueError, match=r"host class\(es\) \['TinyVLM'\] are taken by adapter 'tiny_vlm_test'"):
        register_adapter(type("OtherAdapter", (), {"name": "other_test", "hosts": (TinyVLM,), "dual_view_classes": ()}))
    with pytest.raises(ValueError, match=r"adapter name 'hf_llava' is taken by dualview\.adapters\.hf_llava\.LlavaAdapter"):
        register_adapter(type("Clash", (), {"name": "hf_llava", "hosts": (), "dual_view_classes": ()}))
    assert "other_test" not in registered_adapters() and registered_adapters()["tiny_vlm_test"] is TinyVLMAdapter


def test_a_builtin_adapter_given_this_host_names_the_adapter_that_takes_it():
    from dualview.adapters import hf_llava

    with pytest.raises(TypeError, match=r"got TinyVLM; use tests\.test_third_party_adapter\.TinyVLMAdapter"):
        hf_llava.apply(build())


# ---- what a third-party author gets wrong, or does differently, and what dualview then does ---------------


@pytest.fixture
def scratch_registry():
    """Adapters a test defines leave the registry afterwards (the tied dual-view classes are the test's own)."""
    from dualview.adapters import registry

    before = dict(registry._REGISTRY)
    ties = {cls: adapter for adapter in before.values() for cls in adapter.dual_view_classes}
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)
    for cls, adapter in ties.items():
        cls.dualview_adapter = adapter


def own_host() -> tuple[type, type]:
    """A host class of a test's own (a TinyVLM) and a dual-view class of its inner model, for an adapter
    that must not take TinyVLMAdapter's classes."""

    class OwnTinyVLM(TinyVLM):
        pass

    class DualViewOwnTinyVLMModel(DualViewHost, TinyVLMModel):
        dualview_plain = TinyVLMModel
        get_image_features = DualViewTinyVLMModel.get_image_features

    return OwnTinyVLM, DualViewOwnTinyVLMModel


def test_an_adapter_without_a_tower_hook_says_so_and_apply_leaves_the_plain_model(scratch_registry):
    """A failure of the encoder built at apply (here: the required hook ``_make_tower`` left out) leaves
    the plain model: no dual-view class, DEM, gate or config.dualview stay behind."""
    host, dual_view = own_host()

    class NoTowerAdapter(HostAdapter):
        name, hosts, dual_view_classes = "no_tower_test", (host,), (dual_view,)
        _measure = TinyVLMAdapter.__dict__["_measure"]

    torch.manual_seed(0)
    model = host(TinyVLMConfig()).eval()
    with pytest.raises(NotImplementedError, match=r"NoTowerAdapter must implement _make_tower\(inner, call\)"):
        dualview.apply(model, init="identity")
    assert type(model.model) is TinyVLMModel and not hasattr(model.config, "dualview")
    assert "spatial_embed" not in model.model._modules and "spatial_gate" not in model.model._modules


class Connector(nn.Module):
    """A host's projector inside a submodule of the inner model (where the DEM goes too); it keeps the
    host's config, from which the adapter measures the tower."""

    def __init__(self, config: TinyVLMConfig) -> None:
        super().__init__()
        self.config = config
        self.multi_modal_projector = nn.Linear(config.vision_config.hidden_size, config.text_dim)


class ConnectorVLMModel(TinyVLMPreTrainedModel):
    def __init__(self, config: TinyVLMConfig) -> None:
        super().__init__(config)
        self.vision_tower = CLIPVisionModel(config.vision_config)
        self.connector = Connector(config)
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.connector.multi_modal_projector(HFVisionTower(self.vision_tower, layer=-1)(pixel_values))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.get_image_features(pixel_values)


class ConnectorVLM(TinyVLMPreTrainedModel):
    def __init__(self, config: TinyVLMConfig) -> None:
        super().__init__(config)
        self.model = ConnectorVLMModel(config)
        self.head = nn.Linear(config.text_dim, config.classes)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.model(pixel_values).mean(1))


class DualViewConnectorVLMModel(DualViewHost, ConnectorVLMModel):
    dualview_plain = ConnectorVLMModel

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tower = type(self).dualview_adapter._make_tower(self, {})
        return self.dualview_project(self.dualview_encoder(tower)(pixel_values))


class ConnectorVLMAdapter(HostAdapter):
    """``_place`` puts the DEM beside the projector, on a submodule of the inner model (written, as the
    hook's docstring says, for the model ``apply`` is given)."""

    name, hosts, dual_view_classes = "connector_vlm_test", (ConnectorVLM,), (DualViewConnectorVLMModel,)

    @classmethod
    def _place(cls, model: nn.Module) -> Placement:
        return Placement(outer=model, inner=model.model, dem_parent=model.model.connector)

    _make_tower = TinyVLMAdapter._make_tower

    @classmethod
    def _measure(cls, module: nn.Module) -> Geometry:
        return clip_geometry(module.config.vision_config)  # the connector keeps the host's config


def test_a_dem_placed_on_a_submodule_of_the_inner_model_runs_and_round_trips(tmp_path):
    images = pixels()
    torch.manual_seed(0)
    plain = ConnectorVLM(TinyVLMConfig()).eval()
    with torch.no_grad():
        expected = plain(DCM(28, (3, 3))(images).thumbnail)
    torch.manual_seed(0)
    model = dualview.apply(ConnectorVLM(TinyVLMConfig()).eval(), init="identity")
    assert "spatial_embed" in model.model.connector._modules and "spatial_embed" not in model.model._modules
    with torch.no_grad():
        assert torch.equal(model(images), expected)  # identity at g = 0
        model.model.connector.spatial_gate.g.fill_(0.5)
        moved = model(images)
    assert not torch.allclose(moved, expected)
    dualview.save_adapter(model, tmp_path / "dv")
    torch.manual_seed(0)
    loaded = dualview.load(ConnectorVLM(TinyVLMConfig()).eval(), tmp_path / "dv")
    with torch.no_grad():
        assert torch.equal(loaded(images), moved)
    dualview.unapply(loaded)
    assert type(loaded.model) is ConnectorVLMModel and not loaded.model.connector._modules.keys() - {"multi_modal_projector"}


def test_a_placement_of_the_dem_outside_the_inner_model_is_refused_before_anything_changes(scratch_registry):
    host, dual_view = own_host()

    class OutsideAdapter(HostAdapter):
        name, hosts, dual_view_classes = "outside_test", (host,), (dual_view,)
        _measure, _make_tower = TinyVLMAdapter.__dict__["_measure"], TinyVLMAdapter.__dict__["_make_tower"]

        @classmethod
        def _place(cls, model: nn.Module) -> Placement:
            return Placement(outer=model, inner=model.model, dem_parent=model)

    model = host(TinyVLMConfig())
    with pytest.raises(TypeError, match=r"OutsideAdapter\._place must put the DEM holder \(dem_parent\) on the inner "
                                        r"module or a submodule of it .*got a OwnTinyVLM outside the TinyVLMModel"):
        dualview.apply(model)
    assert type(model.model) is TinyVLMModel and "spatial_embed" not in model._modules
    assert not hasattr(model.config, "dualview")


def test_an_adapter_cannot_take_another_adapters_dual_view_class(scratch_registry):
    """Registering ties each dual-view class to its adapter: a second adapter listing hf_llava's class would
    re-tie it, and every hf_llava model would then refuse its own adapter."""
    from transformers import LlavaForConditionalGeneration

    from dualview.adapters.hf_llava import DualViewLlavaModel, LlavaAdapter

    class MyLlava(LlavaForConditionalGeneration):
        pass

    with pytest.raises(ValueError, match=r"dual-view class DualViewLlavaModel is taken by adapter 'hf_llava' "
                                         r"\(dualview\.adapters\.hf_llava\.LlavaAdapter\); .*MyLlavaAdapter needs its own"):
        class MyLlavaAdapter(LlavaAdapter):
            name, hosts, dual_view_classes = "my_llava_test", (MyLlava,), (DualViewLlavaModel,)
    assert DualViewLlavaModel.dualview_adapter is LlavaAdapter and "my_llava_test" not in registered_adapters()


def test_an_adapter_with_no_host_or_a_dual_view_class_without_its_plain_class_is_refused(scratch_registry):
    """Each is one error at the class statement; registered, the second would break every adapter look-up
    (``dualview.apply`` of any model)."""
    host, dual_view = own_host()

    class NoPlain(DualViewHost, TinyVLMModel):
        pass

    with pytest.raises(TypeError, match=r"NoHostAdapter\.hosts must be a non-empty tuple of host classes, got \(\)"):
        class NoHostAdapter(HostAdapter):
            name, hosts, dual_view_classes = "no_host_test", (), (dual_view,)
    with pytest.raises(TypeError, match=r"ListAdapter\.dual_view_classes must be a tuple of dual-view classes, got \["):
        class ListAdapter(HostAdapter):
            name, hosts, dual_view_classes = "list_test", (host,), [dual_view]
    with pytest.raises(TypeError, match=r"NoPlainAdapter\.dual_view_classes: NoPlain must set dualview_plain to "
                                        r"the host class it extends \(one of its bases\), got None"):
        class NoPlainAdapter(HostAdapter):
            name, hosts, dual_view_classes = "no_plain_test", (host,), (NoPlain,)
    assert not {"no_host_test", "list_test", "no_plain_test"} & registered_adapters().keys()
    with pytest.raises(TypeError, match=r"dualview has no adapter for Linear"):
        dualview.apply(nn.Linear(2, 2))


def test_dualview_from_pretrained_gives_back_the_host_class_that_was_saved_of_an_adapter_with_two(
    scratch_registry, tmp_path,
):
    """An adapter taking two host classes: the folder's ``architectures`` says which one to load."""
    first, dual_view = own_host()

    class SecondTinyVLM(TinyVLM):
        pass

    class TwoHostAdapter(HostAdapter):
        name, hosts, dual_view_classes = "two_hosts_test", (first, SecondTinyVLM), (dual_view,)
        _measure, _make_tower = TinyVLMAdapter.__dict__["_measure"], TinyVLMAdapter.__dict__["_make_tower"]

    torch.manual_seed(0)
    model = dualview.apply(SecondTinyVLM(TinyVLMConfig()).eval(), num_heads=2)
    with torch.no_grad():
        expected = model(pixels())
    model.save_pretrained(tmp_path / "whole")
    for load in (dualview.from_pretrained, TwoHostAdapter.from_pretrained):
        loaded = load(tmp_path / "whole")
        assert type(loaded) is SecondTinyVLM
        with torch.no_grad():
            assert torch.equal(loaded(pixels()), expected)


def test_deep_copy_pickle_and_torch_save_keep_the_third_party_model_bit_exact(tmp_path):
    import copy
    import pickle

    model = dualview.apply(build(), init="identity")
    with torch.no_grad():
        model.model.spatial_gate.g.fill_(0.25)
        expected = model(pixels())
    torch.save(model, tmp_path / "model.pt")
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)),
                  torch.load(tmp_path / "model.pt", weights_only=False)):
        assert type(other.model) is DualViewTinyVLMModel
        with torch.no_grad():
            assert torch.equal(other(pixels()), expected)


def test_peft_lora_over_the_third_party_host_saves_and_loads_through_dualview(tmp_path):
    peft = pytest.importorskip("peft")
    model = dualview.freeze(dualview.apply(build(), init="identity"), "warm_start_lora",
                            lora=peft.LoraConfig(r=2, target_modules=["head"]))
    assert isinstance(model, peft.PeftModel)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:  # trained: the LoRA, the DEM and the gate (PEFT's copies)
                param.add_(0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
        expected = model(pixels())
    dualview.save_adapter(model, tmp_path / "dv")
    loaded = dualview.load(build(), tmp_path / "dv")
    assert isinstance(loaded, peft.PeftModel)
    with torch.no_grad():
        assert torch.equal(loaded(pixels()), expected)
