"""Towers run only the layers the selected feature needs, and give the plain forward's hidden states
bit for bit (torch.equal), for CLS and no-CLS towers, single layers and lists, in both transformers
layouts (the model itself / behind ``.vision_model``), and in timm."""

from __future__ import annotations

import pytest
import torch

from dualview.adapters.towers import HFVisionTower, TimmTower, vision_tower

transformers = pytest.importorskip("transformers")

SMALL = dict(image_size=42, patch_size=14, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
             num_attention_heads=4)


def build(name: str) -> torch.nn.Module:
    """A tiny random model of each supported family (3 layers, 3x3 patches of 14 pixels)."""
    torch.manual_seed(0)
    if name == "clip":
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SMALL)).eval()
    if name == "clip_projection":  # the tower behind .vision_model
        return transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**SMALL)).eval()
    if name == "siglip":
        return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SMALL)).eval()
    if name == "idefics3":
        from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer

        return Idefics3VisionTransformer(transformers.Idefics3VisionConfig(**SMALL)).eval()
    if name == "internvl":
        config = transformers.InternVLVisionConfig(
            image_size=42, patch_size=14, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, use_mean_pooling=False, layer_scale_init_value=0.5,
        )
        model = transformers.InternVLVisionModel(config).eval()
        with torch.no_grad():  # zero-initialised: make them matter
            model.embeddings.cls_token.normal_()
            model.embeddings.position_embeddings.normal_()
        return model
    raise KeyError(name)


FAMILIES = {"clip": 1, "clip_projection": 1, "siglip": 0, "idefics3": 0, "internvl": 1}  # prefix tokens


def count_layer_calls(model: torch.nn.Module) -> list[int]:
    """Indices of the encoder layers that ran, in order (forward hooks on each layer)."""
    calls: list[int] = []
    encoder = model.vision_model.encoder if hasattr(model, "vision_model") else model.encoder
    stack = encoder.layers if hasattr(encoder, "layers") else encoder.layer
    for i, layer in enumerate(stack):
        layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    return calls


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("layer", [-1, -2, 0, 3, -4, [-2, 0, -1], [1, 1]])
def test_truncated_tower_equals_plain_hidden_states_bit_for_bit(family, layer):
    model = build(family)
    layers = [layer] if isinstance(layer, int) else layer
    pixels = torch.randn(5, 3, 42, 42)
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        expected = torch.cat([hidden[i] for i in layers], dim=-1)
        calls = count_layer_calls(model)
        tower = HFVisionTower(model, layer=layer, select="cls_patch")
        out = tower(pixels)
        patch = HFVisionTower(model, layer=layer)(pixels)
    assert tower.truncated and tower.num_prefix_tokens == FAMILIES[family]
    assert len(hidden) == 4 and torch.equal(out, expected)
    assert torch.equal(patch, expected[:, FAMILIES[family]:]) and patch.shape[1] == 9
    deepest = max(i % 4 for i in layers)
    assert calls == list(range(deepest)) * 2  # two towers, each only up to the deepest layer


def test_last_layer_is_before_the_post_layernorm():
    model = build("clip")
    pixels = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        out = HFVisionTower(model, layer=-1, select="cls_patch")(pixels)
        plain = model(pixel_values=pixels)
    assert torch.equal(out, plain.last_hidden_state)  # CLIP applies post_layernorm only to the pooled CLS
    assert not torch.equal(out[:, 0], plain.pooler_output)


@pytest.mark.parametrize("layer", [4, -5, [0, 7]])
def test_layer_out_of_range_is_one_clear_error(layer):
    with pytest.raises(ValueError, match=r"layer must index the 4 hidden states of CLIPVisionModel: -4 <= layer <= 3"):
        HFVisionTower(build("clip"), layer=layer)


@pytest.mark.parametrize("layer", [[], "2", 1.0, True, [0, None]])
def test_layer_of_wrong_type_is_an_error(layer):
    with pytest.raises(ValueError, match="layer must be an int or a non-empty list of ints"):
        HFVisionTower(build("clip"), layer=layer)


class SubclassedCLIP(transformers.CLIPVisionModel):
    """A class the tower does not know: it may have changed forward, so the plain forward runs."""


def test_unknown_model_class_falls_back_to_the_plain_forward():
    torch.manual_seed(0)
    model = SubclassedCLIP(transformers.CLIPVisionConfig(**SMALL)).eval()
    pixels = torch.randn(3, 3, 42, 42)
    tower = HFVisionTower(model, layer=[-2, 1])
    calls = count_layer_calls(model)
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        out = tower(pixels)
    assert not tower.truncated and tower.num_prefix_tokens == 1
    assert torch.equal(out, torch.cat([hidden[-2], hidden[1]], -1)[:, 1:])
    assert calls == [0, 1, 2] * 2
    with pytest.raises(ValueError, match="layer must index the 4 hidden states of SubclassedCLIP"):
        HFVisionTower(model, layer=9)(pixels)


def test_gradients_equal_the_plain_forward_in_training_with_checkpointing():
    model = build("clip").train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    pixels = torch.randn(2, 3, 42, 42)
    weight = torch.randn(2, 9, 32)
    plain_px, trunc_px = pixels.clone().requires_grad_(), pixels.clone().requires_grad_()
    plain = model(pixel_values=plain_px, output_hidden_states=True).hidden_states[-2][:, 1:]
    (plain * weight).sum().backward()
    plain_grad = model.encoder.layers[0].mlp.fc1.weight.grad.clone()
    model.zero_grad()
    out = HFVisionTower(model, layer=-2)(trunc_px)
    (out * weight).sum().backward()
    assert torch.equal(out, plain)
    assert torch.equal(trunc_px.grad, plain_px.grad)
    assert torch.equal(model.encoder.layers[0].mlp.fc1.weight.grad, plain_grad)
    assert model.encoder.layers[2].mlp.fc1.weight.grad is None  # the last layer did not run


def test_offloaded_model_keeps_pixels_where_they_are_and_gives_the_same_output():
    accelerate = pytest.importorskip("accelerate")
    model = build("siglip")
    pixels = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        expected = HFVisionTower(model, layer=-2)(pixels)
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))  # hooks on every module with weights
        assert model.embeddings.patch_embedding.weight.device.type == "meta"
        tower = HFVisionTower(model, layer=-2)
        out = tower(pixels)
    assert tower._can_truncate() and torch.equal(out, expected)


def test_weights_loaded_by_a_skipped_module_make_the_tower_use_the_plain_forward():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = build("clip")
    pixels = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        expected = HFVisionTower(model, layer=-2)(pixels)
        # as device_map does for an offloaded encoder: its hook brings in every layer's weights
        weights = accelerate.utils.OffloadedWeightsLoader(state_dict=model.encoder.state_dict())
        add_hook_to_module(model.encoder, AlignDevicesHook(execution_device="cpu", offload=True, weights_map=weights,
                                                           place_submodules=True))
        assert model.encoder.layers[0].mlp.fc1.weight.device.type == "meta"
        tower = HFVisionTower(model, layer=-2)
        out = tower(pixels)
    assert not tower._can_truncate() and torch.equal(out, expected)


def test_pixels_follow_the_patch_embedding_not_the_first_parameter():
    model = build("clip").to(torch.float64)
    model.embeddings.class_embedding.data = model.embeddings.class_embedding.data.float()  # first parameter
    tower = HFVisionTower(model, layer=0)
    out = tower(torch.randn(1, 3, 42, 42, dtype=torch.float16))
    assert out.dtype == torch.float16  # returned in the pixels' dtype, computed in the embedding's


def test_internvl_tuple_sizes_and_non_square_config():
    tower = HFVisionTower(build("internvl"))
    assert (tower.image_size, tower.patch_size) == (42, 14)
    model = build("internvl")
    model.config.image_size = (42, 28)
    with pytest.raises(ValueError, match=r"config.image_size must be square, got \(42, 28\)"):
        HFVisionTower(model)


def test_clip_model_with_text_side_is_found_through_vision_model():
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4),
        vision_config=SMALL,
    )
    model = transformers.CLIPModel(config).eval()
    tower = vision_tower(model, layer=-2)
    pixels = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
        assert tower.truncated and torch.equal(tower(pixels), hidden[-2][:, 1:])


timm = pytest.importorskip("timm")


def timm_vit(**kw):
    torch.manual_seed(0)
    return timm.models.VisionTransformer(img_size=42, patch_size=14, embed_dim=32, depth=4, num_heads=4, **kw).eval()


@pytest.mark.parametrize("layer", [-1, -2, 0, 3, [-2, 0], [2, -3]])
@pytest.mark.parametrize("prefix", [dict(), dict(reg_tokens=2), dict(class_token=False, global_pool="avg")])
def test_timm_block_outputs_bit_for_bit_and_only_needed_blocks_run(layer, prefix):
    model = timm_vit(**prefix)
    outputs: dict[int, torch.Tensor] = {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o)) for i, b in enumerate(model.blocks)]
    pixels = torch.randn(3, 3, 42, 42)
    with torch.no_grad():
        model.forward_features(pixels)  # the reference: every block's output, by hooks
        reference = dict(outputs)
        outputs.clear()
        tower = TimmTower(model, layer=layer)
        out = tower(pixels)
    layers = [layer] if isinstance(layer, int) else layer
    n = tower.num_prefix_tokens
    expected = torch.cat([reference[i % 4][:, n:] for i in layers], dim=-1)
    assert torch.equal(out, expected) and out.shape[1] == 9
    assert sorted(outputs) == list(range(max(i % 4 for i in layers) + 1))  # blocks after the deepest did not run
    for h in hooks:
        h.remove()


def test_timm_layer_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="layer must index the 4 blocks of VisionTransformer: -4 <= layer <= 3, got 4"):
        TimmTower(timm_vit(), layer=[0, 4])
