"""The vLLM lane (``bash run.sh test-vllm``, its own venv ``.venv-vllm``): a tiny LLaVA-NeXT with dual
view, saved by the adapter, served by vLLM in-process on CPU through dualview's plug-in; vLLM's greedy
tokens must equal the transformers adapted model's. Skipped where vLLM is not installed (the main suite)."""

from __future__ import annotations

import os
import re

import pytest

import vllm
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: hooks can count

import torch

from dualview.adapters import hf_llava_next
from dualview.integrations import vllm_plugin

from . import tiny_llava_next as tiny

NEW_TOKENS = 12
# wide and tall AnyRes grids (2x2 and 3x1 tiles), and a size twice
SIZES = [(90, 150), (150, 60), (90, 150)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("dualview-llava-next")
    vllm_plugin.save_pretrained(tiny.model(seed=0), path)
    tiny.processor().save_pretrained(path)
    return path


def engine(folder, images: int = 1):
    return vllm.LLM(
        model=str(folder), dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=4,
        limit_mm_per_prompt={"image": images}, seed=0, kv_cache_memory_bytes=64 * 2**20,
    )


@pytest.fixture(scope="module")
def llm(folder):
    return engine(folder)


def hf_greedy(model, image) -> list[int]:
    processor = tiny.processor()
    inputs = processor(images=image, text=tiny.PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def vllm_greedy(llm, images) -> list[list[int]]:
    params = vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, ignore_eos=True)
    prompts = [{"prompt": tiny.PROMPT, "multi_modal_data": {"image": image}} for image in images]
    return [list(out.outputs[0].token_ids) for out in llm.generate(prompts, params, use_tqdm=False)]


def test_the_plugin_registers_the_architecture_and_the_folder_names_it(folder):
    from importlib.metadata import entry_points

    from vllm.plugins import load_general_plugins

    (plugin,) = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "dualview"]
    assert plugin.value == "dualview.integrations.vllm_plugin:register"
    load_general_plugins()  # what every vLLM process does at start-up
    assert vllm_plugin.LLAVA_NEXT in vllm.ModelRegistry.get_supported_archs()
    config = (folder / "config.json").read_text()
    assert vllm_plugin.LLAVA_NEXT in config and '"dualview"' in config


def test_vllm_greedy_tokens_equal_the_adapted_transformers_model(folder, llm):
    check_served_as_adapted(folder, llm)


def check_served_as_adapted(folder, llm):
    """vLLM's greedy tokens on SIZES' images are the adapted transformers model's (and not the plain one's)."""
    images = [tiny.image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    calls = []

    def count_dem_calls(model):
        assert type(model).__name__ == vllm_plugin.LLAVA_NEXT
        return model.spatial_embed.register_forward_hook(lambda *_: calls.append(1))

    llm.apply_model(count_dem_calls)
    served = vllm_greedy(llm, images)
    assert calls, "vLLM did not run the DEM"

    adapted = hf_llava_next.from_pretrained(folder).eval()  # the folder as saved: DEM and options restored
    plain = hf_llava_next.unapply(hf_llava_next.from_pretrained(folder).eval())
    for image, tokens in zip(images, served):
        assert tokens == hf_greedy(adapted, image)
    # the comparison can fail: without dual view the same weights answer otherwise
    assert any(tokens != hf_greedy(plain, image) for image, tokens in zip(images, served))


def test_the_dem_weights_are_the_checkpoints(folder, llm):
    adapted = hf_llava_next.from_pretrained(folder)
    saved = {k: v.clone() for k, v in adapted.model.spatial_embed.state_dict().items()}

    def dem_state(model):
        return {k: v.detach().cpu().clone() for k, v in model.spatial_embed.state_dict().items()}

    (served,) = llm.apply_model(dem_state)
    assert served.keys() == saved.keys()
    assert all(torch.equal(served[k], saved[k]) for k in saved)


def test_padded_5d_pixel_values_give_what_the_per_image_list_gives(llm):
    """vLLM hands over a list of (1 + R*C, 3, s, s) per image, or one (B, P, 3, s, s) tensor zero-padded
    on P: both must give each image the same features."""
    sizes = torch.tensor(SIZES[:2])  # 1 + 2*2 and 1 + 3*1 patches

    def both(model):
        generator = torch.Generator().manual_seed(0)
        patches = [torch.randn(n, 3, tiny.CROP, tiny.CROP, generator=generator) for n in (5, 4)]
        padded = torch.zeros(2, 5, 3, tiny.CROP, tiny.CROP)
        for i, p in enumerate(patches):
            padded[i, : len(p)] = p
        with torch.no_grad():
            listed = model._process_image_pixels({"pixel_values": patches, "image_sizes": sizes})
            stacked = model._process_image_pixels({"pixel_values": padded, "image_sizes": sizes})
        return [t.clone() for t in listed], [t.clone() for t in stacked]

    ((listed, stacked),) = llm.apply_model(both)
    assert [t.shape[0] for t in listed] == [5, 4]
    for a, b in zip(listed, stacked):
        torch.testing.assert_close(a, b)


def test_an_identity_init_model_is_served_with_its_gate(tmp_path):
    """init="identity": the gate (spatial_gate, g trained away from 0) is built, loaded and run by the plug-in."""
    model = tiny.model(seed=1, init="identity")
    vllm_plugin.save_pretrained(model, tmp_path)
    tiny.processor().save_pretrained(tmp_path)
    llm = engine(tmp_path)
    (served,) = llm.apply_model(lambda m: m.spatial_gate.g.detach().cpu().clone())
    assert torch.equal(served, model.model.spatial_gate.g)
    check_served_as_adapted(tmp_path, llm)
    del llm
    text_only = engine(tmp_path, images=0)  # the DEM and gate skipped with the tower, their weights still checked
    (kinds,) = text_only.apply_model(lambda m: (type(m.spatial_embed).__name__, type(m.spatial_gate).__name__))
    assert kinds == ("StageMissingLayer", "StageMissingLayer")
    text = "user : what is in the picture ? assistant :"
    params = vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, ignore_eos=True)
    (out,) = text_only.generate([text], params, use_tqdm=False)
    inputs = tiny.processor()(text=text, return_tensors="pt")
    with torch.no_grad():
        hf = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert list(out.outputs[0].token_ids) == hf[0, inputs["input_ids"].shape[1]:].tolist()


def test_a_dual_view_folder_not_marked_for_the_plugin_is_refused_with_the_fix(tmp_path):
    tiny.model(seed=0).save_pretrained(tmp_path)  # config.json names LlavaNextForConditionalGeneration
    tiny.processor().save_pretrained(tmp_path)
    with pytest.raises(Exception, match=r"mark_for_vllm\(folder\).*--hf-overrides") as caught:
        engine(tmp_path)
    assert "no module or parameter named" not in str(caught.value)


def test_a_plain_llava_next_folder_is_still_served_by_vllms_own_model(tmp_path):
    """The plug-in registers vLLM's plain LLaVA-NeXT again, guarded: a plain checkpoint is served as before."""
    from safetensors.torch import load_file, save_file

    model = tiny.model(seed=0, dual_view=False)
    model.save_pretrained(tmp_path)
    tiny.processor().save_pretrained(tmp_path)
    # llava-hf's layout (vision_tower.vision_model.*): vLLM's plain class does not read transformers 5's
    weights = {re.sub(r"^(model\.)?vision_tower\.(?!vision_model\.)", r"\g<0>vision_model.", k): v
               for k, v in load_file(tmp_path / "model.safetensors").items()}
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    llm = engine(tmp_path)
    (name,) = llm.apply_model(lambda m: type(m).__name__)
    assert name == vllm_plugin.GUARDS["LlavaNextForConditionalGeneration"]
    images = [tiny.image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    for image, tokens in zip(images, vllm_greedy(llm, images)):
        assert tokens == hf_greedy(model, image)


def test_a_dem_weight_under_both_names_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    vllm_plugin.save_pretrained(tiny.model(seed=0), tmp_path)
    tiny.processor().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["spatial_embed.ln_fuse.weight"] = weights["model.spatial_embed.ln_fuse.weight"] + 1
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception, match=r"'spatial_embed\.ln_fuse\.weight' twice, as 'model\.spatial_embed"):
        engine(tmp_path)
