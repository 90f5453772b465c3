"""What the serving / evaluation integrations do without their engines (the main suite): the
modules import, the entry points name real callables, a saved dual-view folder is marked for vLLM
(and still loads with the adapter), the lmms-eval loader restores dual view and refuses another host.
The engines themselves run in the lanes (test_vllm_lane.py, test_lmms_eval_lane.py)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import tomllib
from pathlib import Path

import pytest


import torch

from dualview.adapters import _host, hf_llava_next
from dualview.integrations import lmms_eval_models, vllm_plugin

from . import tiny_llava_next as tiny

ROOT = Path(__file__).resolve().parents[2]


def test_the_entry_points_name_callables_of_the_integrations():
    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert entry_points["vllm.general_plugins"] == {"dualview": "dualview.integrations.vllm_plugin:register"}
    assert entry_points["lmms_eval.models"] == {"dualview": "dualview.integrations.lmms_eval_models:manifests"}
    for group in entry_points.values():
        for value in group.values():
            module, name = value.split(":")
            assert callable(getattr(importlib.import_module(module), name))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed: the lane builds the class")
def test_the_model_classes_need_their_engine_and_unknown_names_are_attribute_errors():
    with pytest.raises(ImportError):
        vllm_plugin.DualViewLlavaNextForConditionalGeneration  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute"):
        vllm_plugin.NotAModel  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute"):
        lmms_eval_models.NotAModel  # noqa: B018


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dualview-llava-next")
    model = tiny.model(seed=0)
    vllm_plugin.save_pretrained(model, folder)
    return folder, model


def test_save_pretrained_names_the_plugins_architecture_and_the_adapter_still_loads_it(saved):
    folder, model = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [vllm_plugin.LLAVA_NEXT] and "dualview" in config
    again = hf_llava_next.from_pretrained(folder)
    saved_dem, loaded_dem = model.model.spatial_embed.state_dict(), again.model.spatial_embed.state_dict()
    assert all(torch.equal(saved_dem[k], loaded_dem[k]) for k in saved_dem)
    assert vllm_plugin.mark_for_vllm(folder) == folder / "config.json"  # marking twice changes nothing
    assert json.loads((folder / "config.json").read_text()) == config


def test_served_options_are_the_saved_ones_with_the_configs_pinpoints_and_refuse_a_fixed_one_edited(saved):
    """What the vLLM model class runs with, checked here without vLLM (the lane builds the class)."""
    folder, model = saved
    config = type(model.config).from_pretrained(folder)
    options = vllm_plugin.served_options(config)
    assert options.pinpoints == [tuple(p) for p in config.image_grid_pinpoints] or options.pinpoints == config.image_grid_pinpoints
    assert options.to_dict() | {"pinpoints": None} == config.dualview | {"pinpoints": None}
    edited = type(model.config).from_pretrained(folder)
    edited.dualview = {**edited.dualview, "fit": "resize"}
    with pytest.raises(ValueError, match="option fit is fixed"):
        vllm_plugin.served_options(edited)
    del edited.dualview
    with pytest.raises(ValueError, match="has no 'dualview' entry"):
        vllm_plugin.served_options(edited)


def test_mark_for_vllm_refuses_a_plain_folder_and_a_host_it_does_not_serve(tmp_path):
    plain = tmp_path / "plain"
    tiny.model(dual_view=False).save_pretrained(plain)
    with pytest.raises(ValueError, match="not saved from a dual-view model"):
        vllm_plugin.mark_for_vllm(plain)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["InternVLForConditionalGeneration"],
                                                   "dualview": {}}))
    with pytest.raises(ValueError, match="no dual-view vLLM architecture"):
        vllm_plugin.mark_for_vllm(other)


def test_the_lmms_eval_loader_restores_dual_view_with_llava_hfs_arguments(saved):
    folder, model = saved
    loader = lmms_eval_models.DualViewLoader("dualview_llava_next", "llava_next")
    # what llava_hf passes: device_map="" (refused by transformers 5), torch_dtype, attn_implementation=None
    loaded = loader.from_pretrained(folder, revision="main", torch_dtype=torch.float32, device_map="",
                                    trust_remote_code=False, attn_implementation=None)
    assert isinstance(loaded.model, _host.DualViewHost) and loaded.dtype == torch.float32
    saved_dem, loaded_dem = model.model.spatial_embed.state_dict(), loaded.model.spatial_embed.state_dict()
    assert all(torch.equal(saved_dem[k], loaded_dem[k]) for k in saved_dem)


def test_the_lmms_eval_loader_refuses_a_host_of_another_kind(saved):
    folder, _ = saved
    loader = lmms_eval_models.DualViewLoader("dualview_llava_next", "llava_onevision")
    with pytest.raises(ValueError, match="use --model dualview_llava_onevision"):
        loader.from_pretrained(folder)
    with pytest.raises(ValueError, match="evaluates llava_next models"):
        lmms_eval_models.DualViewLoader("dualview_llava_next", "llava").from_pretrained(folder)


# The vLLM weight-name mapping and checks (vllm_plugin.checked_weights runs in the plug-in's load_weights):
# pure functions, checked here without vLLM against the names the adapter saves.

DEM_KEY = "spatial_embed.ln_fuse.weight"


@pytest.fixture(scope="module")
def saved_identity(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dualview-llava-next-identity")
    model = tiny.model(seed=0, init="identity")
    vllm_plugin.save_pretrained(model, folder)
    return folder, model


def test_served_names_place_both_layouts_of_a_weight_on_one_parameter():
    tower = "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    for name in (tower, "model." + tower, "model.vision_tower.encoder.layers.0.mlp.fc1.weight"):
        assert vllm_plugin.served_name(name) == tower
    for name in ("model.spatial_embed.pos.0", "spatial_embed.pos.0"):
        assert vllm_plugin.served_name(name) == "spatial_embed.pos.0"
    for name in ("model.spatial_gate.g", "spatial_gate.g"):
        assert vllm_plugin.served_name(name) == "spatial_gate.g"
    for name in ("model.language_model.layers.0.mlp.up_proj.weight", "lm_head.weight", "model.image_newline",
                 "model.spatial_embedding.x", "model.my_spatial_embed.x"):
        assert vllm_plugin.served_name(name) is None


def test_the_saved_dem_and_gate_keys_map_onto_the_plugin_models_parameters(saved_identity):
    """What vLLM's weight mapper (DUAL_VIEW_PREFIXES) and checked_weights see of a saved identity-init folder:
    every DEM / gate key lands on the parameter of the same name and shape in the model (the plug-in model
    holds the DEM and gate as the adapter's inner model does), and the checks pass all weights through."""
    folder, model = saved_identity
    from safetensors.torch import load_file

    weights = load_file(folder / "model.safetensors")
    shapes = vllm_plugin.dual_view_shapes(model.model)
    assert {"spatial_gate.g", DEM_KEY} <= shapes.keys()
    mapped = {}
    for name, tensor in weights.items():
        prefix = next((p for p in vllm_plugin.DUAL_VIEW_PREFIXES if name.startswith(p)), None)
        if prefix is not None:
            target = vllm_plugin.DUAL_VIEW_PREFIXES[prefix] + name[len(prefix):]
            assert target == vllm_plugin.served_name(name)
            mapped[target] = tuple(tensor.shape)
    assert mapped == shapes
    assert [n for n, _ in vllm_plugin.checked_weights(iter(weights.items()), shapes)] == list(weights)


def test_a_dem_or_gate_weight_under_both_names_is_refused_not_overwritten():
    one = torch.zeros(4)
    shapes = {DEM_KEY: (4,), "spatial_gate.g": (4,)}
    for target in shapes:
        both = [("model." + target, one), ("model.language_model.norm.weight", one), (target, one)]
        with pytest.raises(ValueError, match=rf"'{target}' twice, as 'model\.{target}' and '{target}'"):
            list(vllm_plugin.checked_weights(iter(both), shapes))


def test_a_dem_weight_of_another_shape_or_unknown_to_the_config_names_the_key_and_shapes():
    shapes = {DEM_KEY: (4,)}
    wrong = [("model." + DEM_KEY, torch.zeros(6))]
    with pytest.raises(ValueError, match=r"'model\.spatial_embed\.ln_fuse\.weight' has shape \(6,\).*"
                                         r"'spatial_embed\.ln_fuse\.weight' of shape \(4,\)"):
        list(vllm_plugin.checked_weights(iter(wrong), shapes))
    gate = [("model.spatial_gate.g", torch.zeros(4))]  # a gate in a checkpoint whose options say init="released"
    with pytest.raises(ValueError, match=r"'model\.spatial_gate\.g' has no parameter 'spatial_gate\.g'"):
        list(vllm_plugin.checked_weights(iter(gate), shapes))


def test_a_dual_view_config_naming_the_plain_architecture_is_refused_with_the_fix(saved):
    folder, model = saved
    config = type(model.config).from_pretrained(folder)
    with pytest.raises(ValueError, match=r"mark_for_vllm\(folder\).*--hf-overrides .*"
                                         r"\"architectures\": \[\"DualViewLlavaNextForConditionalGeneration\"\]"):
        vllm_plugin.check_plain_config(config, "LlavaNextForConditionalGeneration")
    del config.dualview
    vllm_plugin.check_plain_config(config, "LlavaNextForConditionalGeneration")  # a plain model passes
