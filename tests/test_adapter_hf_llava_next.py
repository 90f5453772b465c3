"""The LLaVA-NeXT adapter on a tiny random LlavaNextForConditionalGeneration and a local processor:
plain AnyRes's token counts, one tower call, DEM-fused tiles, training, generation, save / load."""

from __future__ import annotations


import pytest
import torch
import transformers

from dualview import DEM
from dualview import grid as G
from dualview.budget import anyres_budget
from dualview.adapters import hf_llava_next as adapter
from dualview.adapters._common import recorded_options
from dualview.adapters._hf import ANYRES_FIXED

from .host_battery import (
    ANYRES_OFFLOAD_MAP, HostBattery, HostCase, anyres_projected_patches,
    assert_a_training_step_reaches_the_dem_and_projector, frozen_tower, get_image_features, image_features,
    plain_and_adapted, tower_calls,
)
from .tiny_models import global_crops
from .llava_next_models import IMAGE_TOKEN_ID, PINPOINTS, H, S, W, batch, tiny_model, tiny_processor

# 1:3 to 3:1, exact and odd sizes: every grid of PINPOINTS occurs.
SIZES = [(28, 84), (84, 28), (30, 90), (90, 31), (57, 41), (41, 57), (100, 100), (13, 37), (45, 23), (201, 67), (56, 57)]


def grid_of(size):
    return G.select_grid(size, S, G.grids_from_pinpoints(PINPOINTS, S))


def reference_tile_features(model, pixel_values, image_size, layers):
    """What the tile part must be, built independently of the adapter: canvas from the tiles by
    concatenation, global crops by strided slicing, the tower, the model's DEM and projector, then
    LLaVA-NeXT's unpad (grid.unpad_box) and one image_newline per row. -> (tokens, text_dim)."""
    inner = model.model
    rows, cols = grid_of(image_size)
    tiles = pixel_values[1 : 1 + rows * cols]
    strided = global_crops(tiles, (rows, cols))
    with torch.no_grad():
        hidden = inner.vision_tower(pixel_values=torch.cat((tiles, strided)), output_hidden_states=True).hidden_states
        feats = torch.cat([hidden[i] for i in layers], dim=-1)[:, 1:]  # CLS dropped
        local, global_ = feats.split(rows * cols)
        fused = inner.spatial_embed(local[None], global_[None], (rows, cols))[0]
        fmap = inner.multi_modal_projector(fused).view(rows * H, cols * W, -1)
    box = G.unpad_box(image_size, (rows * H, cols * W))
    fmap = fmap[box.slices]
    newline = inner.image_newline.detach().expand(fmap.shape[0], 1, -1)
    return torch.cat((fmap, newline), dim=1).flatten(0, 1)


# (a) token counts ---------------------------------------------------------------------------------


def test_token_counts_equal_plain_anyres_and_the_processor_for_every_size():
    plain, adapted = plain_and_adapted(adapter, tiny_model())
    inputs = batch(SIZES)
    dual = image_features(adapted, inputs)
    anyres = image_features(plain, inputs)
    in_prompt = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist()
    grids = set()
    for i, size in enumerate(SIZES):
        rows, cols = grid_of(size)
        grids.add((rows, cols))
        # the grid the adapter asks dualview.grid for is transformers' own choice
        best = transformers.image_processing_utils.select_best_resolution(size, PINPOINTS)
        assert (rows, cols) == (best[0] // S, best[1] // S)
        expected = anyres_budget(size, (rows, cols), S, (H, W)).tokens
        assert dual[i].shape == anyres[i].shape == (expected, 32), size
        assert in_prompt[i] == expected, size
        cost = adapter.budget(adapted, size)
        assert (cost.grid, cost.tokens, cost.tower_passes) == ((rows, cols), expected, 1 + 2 * rows * cols)
    assert len(grids) == len(PINPOINTS)


def test_single_images_and_stacked_pixel_values_give_the_same_features():
    _, adapted = plain_and_adapted(adapter, tiny_model())
    sizes = [SIZES[6], SIZES[0], SIZES[4], SIZES[1]]
    inputs = batch(sizes)
    together = image_features(adapted, inputs)
    counts = [1 + r * c for r, c in map(grid_of, sizes)]
    assert counts[0] > counts[1] and len(set(counts)) > 1  # unequal patch counts, the largest first
    stacked = torch.cat([pv[:n] for pv, n in zip(inputs["pixel_values"], counts)])
    for i, feats in enumerate(image_features(adapted, {"pixel_values": stacked, "image_sizes": inputs["image_sizes"]})):
        torch.testing.assert_close(feats, together[i])
    for i in range(4):
        alone = image_features(adapted, batch([sizes[i]]))[0]
        torch.testing.assert_close(alone, together[i], atol=1e-5, rtol=1e-4)


# (f) one tower call, DEM-fused tiles, untouched base image ----------------------------------------


@pytest.mark.parametrize("layers", [-2, [-2, -1]], ids=["layer-2", "layers-2,-1"])
def test_tiles_become_dem_fused_local_global_features_in_one_tower_call(layers):
    plain, adapted = plain_and_adapted(adapter, tiny_model(vision_feature_layer=layers))
    assert adapted.model.spatial_embed.dim == 16 * len(layers if isinstance(layers, list) else [layers])
    sizes = [(30, 90), (57, 41), (201, 67)]
    inputs = batch(sizes)
    plain_calls, dual_calls = tower_calls(plain.model.vision_tower), tower_calls(adapted.model.vision_tower)
    anyres = image_features(plain, inputs)
    dual = image_features(adapted, inputs)
    grids = [grid_of(s) for s in sizes]
    assert plain_calls == [sum(1 + r * c for r, c in grids)]
    assert dual_calls == [sum(1 + 2 * r * c for r, c in grids)]  # base + local + global, ONE call
    layer_list = layers if isinstance(layers, list) else [layers]
    for i, size in enumerate(sizes):
        base, tiles = dual[i][: H * W], dual[i][H * W :]
        torch.testing.assert_close(base, anyres[i][: H * W])  # the base image as in plain LLaVA-NeXT
        assert (tiles - anyres[i][H * W :]).abs().max() > 1e-3  # the tiles are not plain AnyRes's
        reference = reference_tile_features(adapted, inputs["pixel_values"][i], size, layer_list)
        torch.testing.assert_close(tiles, reference, atol=1e-5, rtol=1e-4)


def test_dem_is_the_only_new_state_and_the_tower_is_not_duplicated():
    plain, adapted = plain_and_adapted(adapter, tiny_model())
    new = set(adapted.state_dict()) - set(plain.state_dict())
    assert new and all(k.startswith("model.spatial_embed.") for k in new)
    assert set(plain.state_dict()) <= set(adapted.state_dict())
    assert sum(p.numel() for p in adapted.parameters()) == sum(p.numel() for p in plain.parameters()) + sum(
        p.numel() for p in adapted.model.spatial_embed.parameters()
    )
    assert adapter.encoder_of(adapted).dem is adapted.model.spatial_embed
    assert recorded_options(adapted.config)["pinpoints"] is None  # follows config.image_grid_pinpoints
    assert adapter.encoder_of(adapted).dcm.candidates == G.grids_from_pinpoints(PINPOINTS, S)


def test_a_replaced_spatial_embed_is_the_dem_used():
    _, model = plain_and_adapted(adapter, tiny_model())
    inputs = batch([(57, 41)])
    before = image_features(model, inputs)[0]
    torch.manual_seed(1)
    model.model.spatial_embed = DEM(16, num_heads=2, out_size=None, fusion="add")
    after = image_features(model, inputs)[0]
    assert adapter.encoder_of(model).dem is model.model.spatial_embed
    torch.testing.assert_close(after[: H * W], before[: H * W])
    assert (after[H * W :] - before[H * W :]).abs().max() > 1e-3
    torch.testing.assert_close(after[H * W :], reference_tile_features(model, inputs["pixel_values"][0], (57, 41), [-2]))


# (b) forward with labels, (c) generate, (d) gradients -------------------------------------------


def test_mixed_size_batch_trains_with_a_finite_loss_and_gradients_reach_dem_and_projector():
    _, model = plain_and_adapted(adapter, tiny_model())
    inputs = batch([(30, 90), (100, 100), (90, 31), (13, 37)])
    assert len({grid_of(tuple(s)) for s in inputs["image_sizes"].tolist()}) == 4
    assert_a_training_step_reaches_the_dem_and_projector(model, inputs, IMAGE_TOKEN_ID)


def test_generate_produces_tokens_for_a_mixed_batch():
    _, model = plain_and_adapted(adapter, tiny_model())
    inputs = batch([(41, 57), (201, 67)])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


# (e) save / load ----------------------------------------------------------------------------------


def test_from_pretrained_refuses_a_plain_checkpoint(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dualview"):
        adapter.from_pretrained(tmp_path)


# vision_feature_select_strategy, options, misuse ---------------------------------------------------


def test_full_strategy_with_a_cls_tower_is_refused():
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):
        adapter.apply(tiny_model(strategy="full"))
    _, model = plain_and_adapted(adapter, tiny_model())
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):
        image_features(model, batch([(30, 90)]), vision_feature_select_strategy="full")


def test_full_strategy_with_siglip_matches_plain_anyres():
    plain, adapted = plain_and_adapted(adapter, tiny_model(tower="siglip", strategy="full"))
    sizes = [(30, 90), (57, 41)]
    inputs = batch(sizes, tiny_processor(strategy="full", extra_tokens=0))
    anyres, dual = image_features(plain, inputs), image_features(adapted, inputs)
    in_prompt = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist()
    for i in range(len(sizes)):
        assert dual[i].shape == anyres[i].shape and dual[i].shape[0] == in_prompt[i]
        torch.testing.assert_close(dual[i][: H * W], anyres[i][: H * W])
    with pytest.raises(ValueError, match="'default'"):
        adapter.apply(tiny_model(tower="siglip", strategy="default"))


def test_per_call_layers_must_fit_the_dem():
    _, model = plain_and_adapted(adapter, tiny_model())
    inputs = batch([(30, 90)])
    same_width = image_features(model, inputs, vision_feature_layer=-1)  # honoured: 16 channels as built
    assert (same_width[0] - image_features(model, inputs)[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="vision_feature_layer"):
        image_features(model, inputs, vision_feature_layer=[-2, -1])


def test_misuse_is_refused_naming_what_fits():
    """(The fixed options, restated or changed, and a second apply: the host battery.)"""
    model = adapter.apply(tiny_model(), num_heads=2)
    with pytest.raises(TypeError, match="LlavaNextForConditionalGeneration"):
        adapter.apply(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="apply"):
        adapter.encoder_of(tiny_model())
    inputs = batch([(30, 90), (100, 100)])
    with pytest.raises(ValueError, match="pixel_values"):
        image_features(model, {"pixel_values": inputs["pixel_values"][:, :3], "image_sizes": inputs["image_sizes"]})


# -- the host battery ------------------------------------------------------------------------------



def _pooler_from_last(model, last, inputs):
    """The host's projector and packing over the per-image patches of ``last_hidden_state``."""
    return model.model.pack_image_features(
        anyres_projected_patches(adapter, model, last, inputs), inputs["image_sizes"],
        model.config.vision_feature_select_strategy, image_newline=model.model.image_newline)[0]


class TestHostBattery(HostBattery):
    @staticmethod
    def case() -> HostCase:
        return HostCase(
            adapter=adapter, build=lambda: frozen_tower(tiny_model()), inputs=lambda sizes: dict(batch(sizes)), options=dict(num_heads=2),
            sizes=((30, 90), (57, 41)), image_token_id=IMAGE_TOKEN_ID,
            option_sets=(dict(num_heads=2, directions="global_to_local", fusion="conv3x3"),),
            fixed={**ANYRES_FIXED, "pinpoints": PINPOINTS}, fixed_why="LLaVA-NeXT's AnyRes",
            image_features=get_image_features,
            pooler_from_last=_pooler_from_last,
            offload_map=ANYRES_OFFLOAD_MAP,
        )
