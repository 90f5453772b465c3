"""What the serving / evaluation integrations do without their engines (the main suite): the
modules import, the entry points name real callables, a saved dual-view folder is marked for vLLM
(and still loads with the adapter), the lmms-eval loader restores dual view and refuses another host.
The engines themselves run in the lanes (test_vllm_lane.py, test_lmms_eval_lane.py)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import stat
import sys
import threading
import tomllib
import types
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


# ---- vLLM: what save_pretrained / mark_for_vllm refuse and how they write ---------------------------


def test_vllm_save_pretrained_refuses_a_plain_model_before_writing_anything(tmp_path):
    """``vllm_plugin.save_pretrained`` checks before it writes: a plain (not adapted) LLaVA-NeXT is
    refused and the folder (here: a good dual-view save) is left as it was."""
    folder = tmp_path / "served"
    vllm_plugin.save_pretrained(tiny.model(seed=0), folder)  # a good dual-view folder
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="dual-view"):
        vllm_plugin.save_pretrained(tiny.model(dual_view=False), folder)
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    same = after == before
    assert same, "the refused plain model overwrote the dual-view folder before the refusal"


def test_mark_for_vllm_refuses_a_folder_whose_dualview_entry_is_null(tmp_path):
    """``"dualview": null`` in config.json (config.dualview set to None, e.g. by hand to switch dual view
    off) is no dual-view folder: ``mark_for_vllm`` refuses it rather than mark it for the plug-in."""
    model = tiny.model(dual_view=False)
    model.config.dualview = None
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dualview"] is None
    with pytest.raises(ValueError, match="dualview"):
        vllm_plugin.mark_for_vllm(tmp_path)


def test_vllm_save_pretrained_refuses_push_to_hub_before_writing(tmp_path):
    with pytest.raises(ValueError, match="push_to_hub"):
        vllm_plugin.save_pretrained(tiny.model(seed=0), tmp_path / "out", push_to_hub=True)
    assert not (tmp_path / "out").exists()


def test_mark_for_vllm_keeps_the_config_readable_and_leaves_no_temporary_file(tmp_path):
    tiny.model(seed=0).save_pretrained(tmp_path)
    mode = stat.S_IMODE((tmp_path / "config.json").stat().st_mode)
    vllm_plugin.mark_for_vllm(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [vllm_plugin.LLAVA_NEXT]
    assert stat.S_IMODE((tmp_path / "config.json").stat().st_mode) == mode
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".config.")]


def test_mark_for_vllm_refuses_unknown_dual_view_options(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlavaNextForConditionalGeneration"],
                                                      "dualview": {"gird": [3, 3]}}))
    with pytest.raises(ValueError, match="'dualview' entry is not valid dual-view options.*gird"):
        vllm_plugin.mark_for_vllm(tmp_path)


def test_a_tower_weight_under_both_layouts_is_refused_not_overwritten():
    one = torch.zeros(1)
    plain = [("vision_tower.vision_model.embeddings.patch_embedding.weight", one),
             ("model.vision_tower.encoder.layers.0.mlp.fc1.weight", one), ("model.spatial_embed.ln_fuse.weight", one)]
    assert [n for n, _ in vllm_plugin.checked_weights(iter(plain), {"spatial_embed.ln_fuse.weight": (1,)})] == [n for n, _ in plain]
    both = plain + [("model.vision_tower.embeddings.patch_embedding.weight", one)]
    with pytest.raises(ValueError, match="vision_tower.vision_model.embeddings.patch_embedding.weight' twice"):
        list(vllm_plugin.checked_weights(iter(both), {"spatial_embed.ln_fuse.weight": (1,)}))


# ---- lmms-eval: the loader's patch of llava_hf.model_map ------------------------------------------


def _fake_llava_hf(monkeypatch):
    names = ["lmms_eval", "lmms_eval.models", "lmms_eval.models.simple", "lmms_eval.models.simple.llava_hf"]
    modules = [types.ModuleType(n) for n in names]
    for parent, child, name in zip(modules, modules[1:], names[1:]):
        setattr(parent, name.rsplit(".", 1)[1], child)
    for name, module in zip(names, modules):
        monkeypatch.setitem(sys.modules, name, module)
    modules[-1].model_map = {"llava": "plain LlavaForConditionalGeneration"}
    return modules[-1]


def test_the_model_map_patch_is_undone_when_two_loads_overlap(monkeypatch):
    """``dual_view_loading`` leaves llava_hf's module-level map as it found it also when two loads
    overlap (two threads, or two evaluators built in one process) and end in the other order: a map
    left patched would send every later plain ``--model llava_hf`` through DualViewLoader (which
    refuses a plain checkpoint: 'was not saved from a dual-view model')."""
    llava_hf = _fake_llava_hf(monkeypatch)
    original = dict(llava_hf.model_map)
    first = lmms_eval_models.dual_view_loading("dualview_llava_next")
    second = lmms_eval_models.dual_view_loading("dualview_llava_onevision")
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the first load ends while the second still runs
    second.__exit__(None, None, None)
    assert llava_hf.model_map == original, f"llava_hf.model_map left patched: {llava_hf.model_map}"


def test_overlapping_loads_in_two_threads_each_load_their_own_model_id(monkeypatch, tmp_path):
    llava_hf = _fake_llava_hf(monkeypatch)
    original = dict(llava_hf.model_map)
    inside, release, errors = threading.Event(), threading.Event(), {}

    def other_load():
        with lmms_eval_models.dual_view_loading("dualview_llava_onevision"):
            inside.set()
            release.wait(30)

    thread = threading.Thread(target=other_load)
    thread.start()
    assert inside.wait(30)
    with lmms_eval_models.dual_view_loading("dualview_llava_next"):
        release.set()
        thread.join(30)
        try:  # the map's loader, in this thread: the next model id, whatever the other thread opened
            llava_hf.model_map["llava_onevision"].from_pretrained(tmp_path)
        except ValueError as e:
            errors["here"] = str(e)
    assert "--model dualview_llava_next evaluates llava_next models" in errors["here"]
    assert llava_hf.model_map == original
