"""The original LLaVA code (llava-torch) with dual view: loss, generate, gradients, save/load, token
counts, INF-LLaVA checkpoints, the Mistral and MPT variants. Tiny random models, no downloads."""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch
from llava.constants import IMAGE_TOKEN_INDEX
from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
from llava.model.language_model.llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM
from llava.model.language_model.llava_mpt import LlavaMptForCausalLM
from safetensors.torch import load_file, save_file

import dualview
from dualview.adapters import llava15
from dualview.adapters._host import dem_settings
from dualview.adapters._common import DualViewOptions, recorded_options

from . import tiny_models as tiny
from .conftest import FIXTURES
from .host_battery import HostBattery, HostCase, tower_calls
from .llava15_models import images, llava_settings, mpt_model, prompt_ids, save_tower, tiny_model

# llava's own forward passes `past_key_values`, which transformers 5 deprecates: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")


@pytest.fixture(scope="module")
def tower_28(tmp_path_factory) -> str:
    return save_tower(tmp_path_factory.mktemp("clip28"), 28)


def adapted(tower: str, **options):
    return llava15.apply(tiny_model(tower), **options)


def llm_input_length(model, **inputs) -> int:
    """Sequence length of the embeddings the language model receives."""
    seen = []
    hook = model.get_model().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return seen[0]


def test_forward_with_labels_gives_a_finite_loss(tower_28):
    model = adapted(tower_28)
    ids = prompt_ids()
    pixels = images(model, (40, 70))
    assert pixels.shape == (1, 3, 84, 84)  # 3x3 canvas of 28-pixel crops
    out = model(input_ids=ids, images=pixels, labels=ids.clamp(min=0))
    assert torch.isfinite(out.loss)
    assert out.logits.shape == (1, ids.shape[1] - 1 + llava15.num_image_tokens(model), len(tiny.WORDS))


def test_image_tokens_equal_the_encoder_budget_and_one_tower_call(tower_28):
    model = adapted(tower_28)
    ids = prompt_ids()
    calls = tower_calls(model.get_vision_tower())
    length = llm_input_length(model, input_ids=ids, images=images(model, (50, 50), (30, 90)))
    tokens = llava15.encoder_of(model).budget((84, 84)).tokens
    assert tokens == llava15.num_image_tokens(model) == 4  # DEM at the tower's 2x2 grid, mean with the thumbnail
    assert length == ids.shape[1] - 1 + tokens
    assert calls == [2 * (2 * 9 + 1)]  # both images' 9 local + 9 global crops + thumbnail in ONE call


@pytest.mark.parametrize(
    "options, tokens",
    [
        (dict(out_size=None, thumbnail_fusion="concat"), 9 * 4 + 4),
        (dict(grid=(2, 3), out_size=(3, 3), thumbnail_fusion="none"), 9),
    ],
)
def test_token_count_follows_the_options(tower_28, options, tokens):
    model = adapted(tower_28, **options)
    ids = prompt_ids()
    pixels = images(model, (60, 45))
    assert pixels.shape[-1] == 84  # the processor's canvas is max(R, C) crops wide
    assert llava15.num_image_tokens(model) == tokens
    assert llm_input_length(model, input_ids=ids, images=pixels) == ids.shape[1] - 1 + tokens


def greedy_by_hand(model, ids: torch.Tensor, pixels: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding with full forwards over embeddings: no cache, no generate()."""
    with torch.no_grad():
        *_, embeds, _ = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, pixels)
        out = []
        for _ in range(steps):
            token = model(inputs_embeds=embeds).logits[:, -1].argmax(-1)
            out.append(int(token))
            embeds = torch.cat([embeds, model.get_model().embed_tokens(token)[:, None]], dim=1)
    return out


@pytest.mark.parametrize("variant", ["llama", "mistral", "mpt"])
def test_generate_with_an_image_matches_greedy_decoding(tower_28, variant):
    if variant == "mpt":
        model = llava15.apply(mpt_model(tower_28))
    else:
        classes = {
            "llama": (LlavaLlamaForCausalLM, LlavaConfig), "mistral": (LlavaMistralForCausalLM, LlavaMistralConfig)
        }
        model = llava15.apply(tiny_model(tower_28, *classes[variant]))
    tiny.seeded(1)
    with torch.no_grad():  # a fresh tiny model's logits are nearly flat: larger weights make a telling check
        for name, p in model.named_parameters():
            if "vision_tower" not in name:
                p.normal_(0, 0.5)
    model.generation_config.eos_token_id = None  # exactly 4 new tokens, like the greedy loop
    ids, pixels = prompt_ids(), images(model, (64, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        out = model.generate(ids, images=pixels, max_new_tokens=4, do_sample=False)
    if variant == "mpt":  # llava's MPT has no generate() of its own: the prompt comes back too
        assert torch.equal(out[:, : ids.shape[1]], ids)
        out = out[:, ids.shape[1]:]
    assert out.shape == (1, 4)  # llava's generate returns the new tokens only
    expected = greedy_by_hand(model, ids, pixels, 4)
    assert out[0].tolist() == expected  # the KV cache was used correctly
    assert len(set(expected)) > 1


def test_mpt_forward_continues_from_its_kv_cache(tower_28):
    """llava's MPT forward, replaced (its own calls llava with an old signature), hands the cache on:
    the last token over the cache of the others gives the full forward's last logits. (generate runs
    llava's MPT without a cache, so only a direct call checks it.)"""
    model = llava15.apply(mpt_model(tower_28))
    with torch.no_grad():
        *_, embeds, _ = model.prepare_inputs_labels_for_multimodal(
            prompt_ids(), None, None, None, None, images(model, (28, 28))
        )
        full = model(inputs_embeds=embeds).logits[:, -1]
        head = model(inputs_embeds=embeds[:, :-1], use_cache=True)
        last = model(inputs_embeds=embeds[:, -1:], past_key_values=head.cache, use_cache=True).logits[:, -1]
        alone = model(inputs_embeds=embeds[:, -1:]).logits[:, -1]
    torch.testing.assert_close(last, full)
    assert not torch.allclose(alone, full, atol=1e-3)  # the cache is what makes the difference


def test_generate_fails_without_the_cache_shim(tower_28):
    model = adapted(tower_28)
    plain = type(model).dualview_plain
    # the subclass minus its cache shim: llava's own prepare_inputs_for_generation
    model.__class__ = type("NoShim", (type(model),), {"prepare_inputs_for_generation": plain.prepare_inputs_for_generation})
    with pytest.raises(TypeError, match="cache"):
        model.generate(prompt_ids(), images=images(model, (28, 28)), max_new_tokens=2)


def test_gradients_reach_dem_and_projector_not_the_frozen_tower(tower_28):
    model = adapted(tower_28).train()
    ids = prompt_ids()
    model(input_ids=ids, images=images(model, (50, 80)), labels=ids.clamp(min=0)).loss.backward()
    inner = model.get_model()
    for name, module in (("DEM", inner.spatial_embed), ("projector", inner.mm_projector)):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name
    tower = model.get_vision_tower()
    assert all(not p.requires_grad and p.grad is None for p in tower.parameters())


def test_only_the_dem_is_added_to_the_state_dict(tower_28):
    plain, model = tiny_model(tower_28), adapted(tower_28)
    plain.get_model().get_vision_tower().load_model()
    added = set(model.state_dict()) - set(plain.state_dict())
    assert added == {f"model.spatial_embed.{k}" for k in model.get_model().spatial_embed.state_dict()}
    assert set(plain.state_dict()) <= set(model.state_dict())
    assert not any("dual_view_encoder" in k for k in model.state_dict())


def test_save_pretrained_and_from_pretrained_keep_dem_and_options(tower_28, tmp_path):
    options = dict(grid=(2, 2), num_heads=4, directions="global_to_local", thumbnail_fusion="concat", out_size=(3, 3))
    model = adapted(tower_28, **options)
    with torch.no_grad():  # a DEM unlike a fresh one, so a re-initialised DEM would show
        for p in model.get_model().spatial_embed.parameters():
            p.add_(torch.randn_like(p))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["dualview"]
    # the options given, with the DEM's architecture as it ran (concrete sizes, FFN width)
    dem_now = dem_settings(model.get_model().spatial_embed)
    assert saved == {**DualViewOptions.from_kwargs(**options).to_dict(), **dem_now}
    assert dem_now["num_heads"] == 4 and dem_now["out_size"] == [3, 3]

    again = llava15.from_pretrained(tmp_path)
    assert recorded_options(again.config) == saved
    # the one entry point resolves the saved dual-view class (architectures: DualViewLlava...) to this adapter
    archs = json.loads((tmp_path / "config.json").read_text())["architectures"]
    assert archs == ["DualViewLlavaLlamaForCausalLM"]
    resolved = dualview.from_pretrained(tmp_path)
    assert type(resolved) is type(again) and type(resolved.get_model()) is type(again.get_model())
    assert all(torch.equal(a, b) for a, b in zip(resolved.state_dict().values(), again.state_dict().values()))
    dem, dem_again = model.get_model().spatial_embed, again.get_model().spatial_embed
    assert dem_again is llava15.encoder_of(again).dem and dem_again.num_heads == 4 and dem_again.out_size == (3, 3)
    assert all(torch.equal(a, b) for a, b in zip(dem.state_dict().values(), dem_again.state_dict().values()))
    state, state_again = model.state_dict(), again.state_dict()
    assert state.keys() == state_again.keys()
    assert all(torch.equal(state[k], state_again[k]) for k in state)
    ids, pixels = prompt_ids(), images(model, (30, 50))
    with torch.no_grad():
        expected = model(input_ids=ids, images=pixels).logits
        torch.testing.assert_close(again(input_ids=ids, images=pixels).logits, expected)


def test_from_pretrained_names_unexpected_keys(tower_28, tmp_path):
    adapted(tower_28).save_pretrained(tmp_path)
    (shard,) = tmp_path.glob("*.safetensors")
    state = load_file(shard)
    state["model.extra.weight"] = torch.zeros(2)
    save_file(state, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.extra.weight"):
        llava15.from_pretrained(tmp_path)


def test_from_pretrained_refuses_a_config_of_no_llava_class(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path)
    expected = "config.model_type must be one of ['llava_llama', 'llava_mistral', 'llava_mpt'], got 'llama'"
    with pytest.raises(ValueError, match=re.escape(expected)):
        llava15.from_pretrained(tmp_path)


def test_the_host_classes_are_module_level_classes_of_the_adapter():
    """Defined by ``class`` statements in llava15 (pickle finds them by name), one per llava class, each
    listed by the adapter beside the inner model's."""
    names = ("LlavaLlama", "LlavaMistral", "LlavaMpt")
    adapter = llava15.Llava15Adapter
    assert [cls.__name__ for cls in adapter.hosts] == [f"{name}ForCausalLM" for name in names]
    for name in names:
        for suffix in ("ForCausalLM", "Model"):
            sub = getattr(llava15, f"DualView{name}{suffix}")
            assert sub.__module__ == llava15.__name__ and sub.__qualname__ == sub.__name__
            assert sub.dualview_plain.__name__ == f"{name}{suffix}" and sub in adapter.dual_view_classes
            assert sub.dualview_adapter is adapter


def write_inf_llava_checkpoint(folder, tower: str) -> dict:
    """A sharded checkpoint with INF-LLaVA's key names: the fixture's DEM at ``model.spatial_embed.*``,
    plus a tiny model's ``model.mm_projector.*`` and everything else; its config has no dual-view entry."""
    fixture = load_file(FIXTURES / "inf_llava_dem_n3_d32.safetensors")
    config = LlavaConfig(**llava_settings(tower))
    base = LlavaLlamaForCausalLM(config)
    base.get_model().get_vision_tower().load_model()
    state = {k: v.clone().contiguous() for k, v in base.state_dict().items()}
    state.update({f"model.spatial_embed.{k[6:]}": v for k, v in fixture.items() if k.startswith("state.")})
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, folder / name, metadata={"format": "pt"})
    weight_map = {k: name for name, names in shards.items() for k in names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    assert "dualview" not in json.loads((folder / "config.json").read_text())
    return {"state": state, "fixture": fixture}


@pytest.fixture(scope="module")
def inf_llava_checkpoint(tmp_path_factory):
    """INF-LLaVA's DEM has dim 32 and a 24x24 output: a tiny CLIP tower of hidden 32 at 336 pixels."""
    tower = save_tower(tmp_path_factory.mktemp("clip336"), 336)
    folder = tmp_path_factory.mktemp("inf_llava")
    return folder, tower, write_inf_llava_checkpoint(folder, tower)


def check_reproduces_the_fixture(model, fixture) -> None:
    with torch.no_grad():
        out = model.get_model().spatial_embed(fixture["local_feats"], fixture["global_feats"], (3, 3))
    assert out.shape == fixture["output"].shape == (1, 576, 32)
    assert (out - fixture["output"]).abs().max().item() <= 1e-4


def test_inf_llava_checkpoint_loads_with_no_missing_or_unexpected_key(inf_llava_checkpoint):
    folder, tower, written = inf_llava_checkpoint
    model = llava15.apply(LlavaLlamaForCausalLM(LlavaConfig(**llava_settings(tower))))
    assert set(model.state_dict()) == set(written["state"])  # same names, both ways
    llava15.load_checkpoint(model, folder)
    assert all(torch.equal(v, written["state"][k]) for k, v in model.state_dict().items())
    check_reproduces_the_fixture(model, written["fixture"])
    assert llava15.num_image_tokens(model) == 576  # the released budget: 24x24, as plain LLaVA-1.5


def test_inf_llava_checkpoint_through_from_pretrained(inf_llava_checkpoint):
    folder, _, written = inf_llava_checkpoint
    model = llava15.from_pretrained(folder)  # no recorded options: the released INF-LLaVA defaults
    released = {**DualViewOptions().to_dict(), **dem_settings(model.get_model().spatial_embed)}
    assert recorded_options(model.config) == released and released["out_size"] == [24, 24]
    check_reproduces_the_fixture(model, written["fixture"])
    assert torch.equal(model.get_model().mm_projector[0].weight, written["state"]["model.mm_projector.0.weight"])


def test_load_checkpoint_names_missing_and_unexpected_keys(inf_llava_checkpoint, tmp_path):
    _, tower, written = inf_llava_checkpoint
    model = llava15.apply(LlavaLlamaForCausalLM(LlavaConfig(**llava_settings(tower))))
    state = dict(written["state"])
    del state["model.spatial_embed.ln_fuse.weight"]
    state["model.spatial_embed.extra"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    names = r"missing keys \['model.spatial_embed.ln_fuse.weight'\], unexpected keys \['model.spatial_embed.extra'\]"
    with pytest.raises(ValueError, match=names):
        llava15.load_checkpoint(model, tmp_path / "model.safetensors")


def test_image_processor_pads_to_square_with_the_mean_colour(tower_28):
    model = adapted(tower_28)
    processor = llava15.image_processor(model)
    assert processor.crop_size["height"] == processor.crop_size["width"] == processor.size["shortest_edge"] == 84
    assert model.get_vision_tower().image_processor.crop_size["height"] == 28  # the tower's own is untouched
    # PIL sizes are (width, height): a wide image is padded above and below, a tall one left and right
    wide, tall = (llava15.process_images([tiny.pil_image(*hw)], processor)[0] for hw in ((28, 84), (84, 28)))
    for pixels, padded, kept in ((wide, wide[:, :20], wide[:, 32:52]), (tall, tall[:, :, :20], tall[:, :, 32:52])):
        assert pixels.shape == (3, 84, 84)
        assert padded.abs().max() < 0.02  # the mean colour normalises to ~0
        assert kept.std() > 0.3  # the random image itself


def test_deepcopy_keeps_its_own_encoder(tower_28):
    model = adapted(tower_28)
    twin = copy.deepcopy(model)
    encoder = llava15.encoder_of(twin)
    assert encoder.dem is twin.get_model().spatial_embed and encoder.dem is not model.get_model().spatial_embed
    assert encoder.tower.tower.model is twin.get_vision_tower().vision_tower
    assert encoder.tower.tower.model is not model.get_vision_tower().vision_tower
    ids, pixels = prompt_ids(), images(model, (40, 40))
    with torch.no_grad():
        twin.get_model().spatial_embed.ln_fuse.bias.add_(1.0)
        assert not torch.equal(twin(input_ids=ids, images=pixels).logits, model(input_ids=ids, images=pixels).logits)


def test_mistral_variant(tower_28):
    model = llava15.apply(tiny_model(tower_28, LlavaMistralForCausalLM, LlavaMistralConfig))
    assert "model.spatial_embed.attention.linears.0.weight" in model.state_dict()
    ids = prompt_ids()
    out = model(input_ids=ids, images=images(model, (40, 60)), labels=ids.clamp(min=0))
    assert torch.isfinite(out.loss)
    assert out.logits.shape[1] == ids.shape[1] - 1 + 4


def test_mpt_variant_forward_and_save_load(tower_28, tmp_path):
    model = llava15.apply(mpt_model(tower_28))
    assert "transformer.spatial_embed.attention.linears.0.weight" in model.state_dict()
    ids = prompt_ids()
    out = model(input_ids=ids, images=images(model, (40, 60)), labels=ids.clamp(min=0))
    assert torch.isfinite(out.loss)
    assert out.logits.shape[1] == ids.shape[1] - 1 + 4
    out.loss.backward()
    assert all(p.grad is not None for p in model.get_model().spatial_embed.parameters())
    model.save_pretrained(tmp_path)
    again = llava15.from_pretrained(tmp_path)
    assert isinstance(again, LlavaMptForCausalLM)
    state, state_again = model.state_dict(), again.state_dict()
    assert all(torch.equal(state[k], state_again[k]) for k in state)


def test_apply_errors(tower_28):
    with pytest.raises(TypeError, match="model must be a LlavaLlamaForCausalLM or .*got Linear"):
        llava15.apply(torch.nn.Linear(2, 2))
    model = adapted(tower_28)
    with pytest.raises(ValueError, match="already applied"):
        llava15.apply(model)
    with pytest.raises(TypeError, match="unknown dual-view option"):
        llava15.apply(tiny_model(tower_28), grid_size=3)
    with pytest.raises(ValueError, match="mm_patch_merge_type must be 'flat'.*'spatial_unpad'"):
        llava15.apply(tiny_model(tower_28, mm_patch_merge_type="spatial_unpad"))
    with pytest.raises(ValueError, match="mm_vision_select_feature must be 'patch'.*'cls_patch'"):
        llava15.apply(tiny_model(tower_28, mm_vision_select_feature="cls_patch"))
    with pytest.raises(ValueError, match="no dual view"):
        llava15.encoder_of(tiny_model(tower_28))
    with pytest.raises(ValueError, match="fixed grid"):
        llava15.image_processor(adapted(tower_28, grid="auto"))



@pytest.mark.parametrize("config, options, message", [
    ({}, dict(num_heads=5), "divisible by num_heads"),  # the DEM cannot be built
    ({}, dict(thumbnail_fusion="none", init="identity"), "init='identity'"),  # the encoder cannot be built
    (dict(mm_hidden_size=48), {}, "mm_hidden_size=48"),  # the host's check
])
def test_a_failed_apply_leaves_a_delay_loaded_model_as_it_was(tower_28, config, options, message):
    """llava builds its vision tower with delay_load=True; ``apply`` loads it. An ``apply`` that fails
    leaves the model as it was: the same state-dict keys and values (no tower loaded), its class, no
    config.dualview; it applies afterwards."""
    model = tiny_model(tower_28, **config)
    assert not model.get_vision_tower().is_loaded
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(message)):
        llava15.apply(model, **options)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert type(model) is LlavaLlamaForCausalLM and not model.get_vision_tower().is_loaded
    assert not hasattr(model.config, "dualview")
    if not config:
        llava15.apply(model)
        assert model.get_vision_tower().is_loaded


# -- the host battery ------------------------------------------------------------------------------



@pytest.fixture(scope="class")
def battery_tower(tmp_path_factory):
    TestHostBattery.tower = save_tower(tmp_path_factory.mktemp("clip28-battery"), 28)


@pytest.mark.usefixtures("battery_tower")
class TestHostBattery(HostBattery):
    tower: str = ""

    @classmethod
    def case(cls) -> HostCase:
        def build():
            model = tiny_model(cls.tower)
            model.get_model().get_vision_tower().load_model()
            return model

        def inputs(sizes):
            model = llava15.apply(tiny_model(cls.tower))
            ids = prompt_ids().repeat(len(sizes), 1)
            return {"input_ids": ids, "images": images(model, *sizes), "attention_mask": torch.ones_like(ids)}

        return HostCase(
            adapter=llava15, build=build, inputs=inputs, options=dict(grid=(2, 3), num_heads=4),
            dem_parent=lambda model: model.get_model(), vision_tower=lambda model: model.get_vision_tower(),
            projector=lambda model: model.get_model().mm_projector, image_token_id=IMAGE_TOKEN_INDEX,
            generate=lambda model, inputs, **kw: model.generate(
                inputs["input_ids"], images=inputs["images"], attention_mask=inputs["attention_mask"], **kw),
            generate_returns_prompt=False,
            plain_inputs=lambda sizes: {"input_ids": prompt_ids().repeat(len(sizes), 1),
                                        "images": torch.randn(len(sizes), 3, 28, 28)},
            # init="identity" gives the plain model's answer on the dual-view thumbnail of the same image
            identity_inputs=lambda model, inputs: dict(
                inputs, images=llava15.encoder_of(model).dcm(inputs["images"]).thumbnail),
            option_sets=(dict(grid=(2, 3), num_heads=4, directions="global_to_local", fusion="conv3x3"),),
            not_applicable={
                "fixed_options": "llava-torch's LLaVA-1.5 fixes no option (the image processor follows the grid)",
                "mismatch": "llava's prepare_inputs_labels_for_multimodal has no image-token / feature check",
                "image_features": "llava has no get_image_features (encode_images returns projected features)",
                "offload": "llava loads its vision tower itself from mm_vision_tower, outside from_pretrained's device_map",
                "projector_offload": "llava's from_pretrained loads the vision tower itself, outside the device_map",
                "offload_after_apply": "llava's own forward fails once accelerate offloaded the model (its code moves "
                                       "tensors to the device of its 'meta' weights)",
            },
        )
