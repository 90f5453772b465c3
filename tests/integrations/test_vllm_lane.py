"""The vLLM lane (``bash run.sh test-vllm``, its own venv ``.venv-vllm``): a tiny LLaVA-NeXT with dual
view, saved by the adapter, served by vLLM in-process on CPU through dualview's plug-in; vLLM's greedy
tokens must equal the transformers adapted model's. Skipped where vLLM is not installed (the main suite)."""

from __future__ import annotations

import os

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


@pytest.fixture(scope="module")
def llm(folder):
    return vllm.LLM(
        model=str(folder), dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=4,
        limit_mm_per_prompt={"image": 1}, seed=0, kv_cache_memory_bytes=64 * 2**20,
    )


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
