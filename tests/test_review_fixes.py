"""Further cases of the review fixes (tests/test_review_findings.py holds the reviewer's own)."""

from __future__ import annotations

import pytest
import torch
import transformers

from dualview.adapters import hf_llava

from .test_review_findings import _dem_equal, _two_adapted_models


def test_from_pretrained_with_use_safetensors_false_restores_the_dem_of_the_bin_file(tmp_path):
    """A folder with both model.safetensors and pytorch_model.bin: ``use_safetensors=False`` loads the
    host from the .bin, and the DEM must come from the .bin too."""
    a, b = _two_adapted_models()
    a.save_pretrained(tmp_path)
    torch.save({k: v.clone() for k, v in b.state_dict().items()}, tmp_path / "pytorch_model.bin")
    loaded = hf_llava.from_pretrained(tmp_path, use_safetensors=False)
    assert _dem_equal(loaded.model.spatial_embed, b.model.spatial_embed)
    assert _dem_equal(hf_llava.from_pretrained(tmp_path).model.spatial_embed, a.model.spatial_embed)


def test_from_pretrained_refuses_a_hub_id_before_loading_anything(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("the host's from_pretrained ran (it would download the whole model)")

    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained", no_download)
    with pytest.raises(ValueError, match="path must be a local folder.*'llava-hf/llava-1.5-7b-hf'"):
        hf_llava.from_pretrained("llava-hf/llava-1.5-7b-hf")


def test_from_pretrained_refuses_a_state_dict_the_dem_would_not_come_from(tmp_path):
    a, _ = _two_adapted_models()
    a.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"\['state_dict'\]"):
        hf_llava.from_pretrained(tmp_path, state_dict=a.state_dict())


def test_a_missing_variant_names_the_variant(tmp_path):
    a, _ = _two_adapted_models()
    a.save_pretrained(tmp_path)
    with pytest.raises((OSError, ValueError), match="ema"):
        hf_llava.from_pretrained(tmp_path, variant="ema")


def test_vllm_save_pretrained_refuses_push_to_hub_before_writing(tmp_path):
    from dualview.integrations import vllm_plugin

    from .integrations import tiny_llava_next

    with pytest.raises(ValueError, match="push_to_hub"):
        vllm_plugin.save_pretrained(tiny_llava_next.model(seed=0), tmp_path / "out", push_to_hub=True)
    assert not (tmp_path / "out").exists()


def test_mark_for_vllm_keeps_the_config_readable_and_leaves_no_temporary_file(tmp_path):
    import json
    import stat

    from dualview.integrations import vllm_plugin

    from .integrations import tiny_llava_next

    tiny_llava_next.model(seed=0).save_pretrained(tmp_path)
    mode = stat.S_IMODE((tmp_path / "config.json").stat().st_mode)
    vllm_plugin.mark_for_vllm(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [vllm_plugin.LLAVA_NEXT]
    assert stat.S_IMODE((tmp_path / "config.json").stat().st_mode) == mode
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".config.")]


def test_mark_for_vllm_refuses_unknown_dual_view_options(tmp_path):
    import json

    from dualview.integrations import vllm_plugin

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlavaNextForConditionalGeneration"],
                                                      "dualview": {"gird": [3, 3]}}))
    with pytest.raises(ValueError, match="'dualview' entry is not valid dual-view options.*gird"):
        vllm_plugin.mark_for_vllm(tmp_path)


def test_overlapping_loads_in_two_threads_each_load_their_own_model_id(monkeypatch, tmp_path):
    import threading

    from dualview.integrations import lmms_eval_models

    from .test_review_findings import _fake_llava_hf

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


def test_a_tower_weight_under_both_layouts_is_refused_not_overwritten():
    from dualview.integrations import vllm_plugin

    one = torch.zeros(1)
    plain = [("vision_tower.vision_model.embeddings.patch_embedding.weight", one),
             ("model.vision_tower.encoder.layers.0.mlp.fc1.weight", one), ("model.spatial_embed.ln_fuse.weight", one)]
    assert [n for n, _ in vllm_plugin.checked_weights(iter(plain), {"spatial_embed.ln_fuse.weight": (1,)})] == [n for n, _ in plain]
    both = plain + [("model.vision_tower.embeddings.patch_embedding.weight", one)]
    with pytest.raises(ValueError, match="vision_tower.vision_model.embeddings.patch_embedding.weight' twice"):
        list(vllm_plugin.checked_weights(iter(both), {"spatial_embed.ln_fuse.weight": (1,)}))
