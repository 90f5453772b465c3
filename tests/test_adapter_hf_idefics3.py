"""The Idefics3 / SmolVLM adapter on tiny random models and the hosts' own processors (both hosts):
the grid arithmetic against the image processors, prepare_processor, the plain host's image-token
counts, features against a reference written from the definition, one tower call, pixel masks and
padding frames, the plain path, generate, training, save / load, and the errors."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import transformers

from dualview.adapters import hf_idefics3 as adapter
from dualview.adapters._common import recorded_options

from .host_battery import (
    HostBattery, assert_token_counts_follow_the_host, frozen_tower, get_image_features, image_features,
    plain_and_adapted, tower_calls,
)
from .tiny_models import global_crops
from .idefics3_models import (
    HOSTS, IMAGE_TOKEN_ID, LONGEST, PATCH, PROMPT, S, SEQ, batch, config_model, image, image_processor, tiny_model,
    tiny_processor,
)

H = W = S // PATCH  # tokens per tile side
# Extreme aspect ratios (1:20, 20:1), smaller than one tile, exactly one tile, exact multiples of the
# tile (after the resize: 4x2, 2x4, 4x4), odd sizes; with LONGEST = 4*S every one is split.
SIZES = [(10, 200), (200, 10), (20, 12), (32, 32), (128, 64), (64, 128), (256, 256), (57, 41), (41, 57), (90, 50),
         (33, 97)]


@pytest.fixture(scope="module", params=HOSTS)
def host(request):
    return request.param


@pytest.fixture(scope="module")
def models(host):
    return plain_and_adapted(adapter, tiny_model(host))


@pytest.fixture(scope="module")
def processor(host):
    return adapter.prepare_processor(tiny_processor(host), config_model(host))


def image_counts(inputs):
    return (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist()


# --- the host's tiling, as arithmetic --------------------------------------------------------------

# (33, 132), (99, 132), (132, 99) with tile 33: the short edge is resized to an odd multiple of the tile,
# which the processors round up to even, one pixel past the tile (one more row or column); (1, 1500):
# the short edge rescaled below one pixel is kept at one
GRID_SIZES = [(4, 4), (5, 7), (31, 32), (32, 32), (33, 32), (50, 90), (90, 50), (64, 96), (128, 128), (129, 40),
              (10, 200), (200, 10), (300, 301), (17, 1000), (1000, 17), (97, 65), (365, 364), (4, 257), (64, 32),
              (33, 132), (99, 132), (132, 99), (1, 1500), (1500, 1)]


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize("longest, tile, kwargs", [
    (LONGEST, S, {}), (80, S, {}), (S, S, {}), (132, 33, {}), (LONGEST, S, {"do_resize": False}),
    (100, S, {"do_resize": False}), (LONGEST, S, {"do_image_splitting": False}),
])
def test_processor_grid_is_the_image_processors_tiling(backend, longest, tile, kwargs):
    images = image_processor("idefics3", backend=backend, longest=longest, tile=tile, **kwargs)
    resize = kwargs.get("do_resize", True)
    for size in GRID_SIZES:
        out = images([image(size)], return_row_col_info=True, input_data_format="channels_last")
        want = (out["rows"][0][0], out["cols"][0][0])
        got = adapter.processor_grid(size, tile=tile, longest_edge=longest if resize else None,
                                     split=kwargs.get("do_image_splitting", True))
        assert got == want, size
        assert out["pixel_values"].shape[1] == adapter.frames_of(got)


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_processor_grid_applies_the_4096_pixel_cap_above_a_longest_edge_of_4096(backend):
    # longest edge 5000 -> capped to 4096 = 4 tiles of 1024 (5 without the cap), the short edge with it
    images = image_processor("idefics3", backend=backend, longest=5000, tile=1024)
    for size, want in [((17, 1000), (1, 4)), ((1000, 17), (4, 1)), ((40, 33), (4, 4))]:
        out = images([image(size)], return_row_col_info=True, input_data_format="channels_last")
        assert (out["rows"][0][0], out["cols"][0][0]) == want
        assert adapter.processor_grid(size, tile=1024, longest_edge=5000) == want


def test_processor_grid_agrees_with_get_number_of_image_patches_at_the_real_settings():
    images = image_processor("smolvlm")  # longest edge a multiple of the tile, as in the real checkpoints
    for size in GRID_SIZES:
        patches, rows, cols = images.get_number_of_image_patches(*size)
        assert adapter.processor_grid(size, tile=S, longest_edge=LONGEST) == (rows, cols)
        assert adapter.frames_of((rows, cols)) == (patches or 1)


def test_processor_grid_errors():
    with pytest.raises(ValueError, match="image_size"):
        adapter.processor_grid((0, 5), tile=S, longest_edge=LONGEST)
    with pytest.raises(ValueError, match="tile"):
        adapter.processor_grid((10, 5), tile=0, longest_edge=LONGEST)


# --- prepare_processor ---------------------------------------------------------------------------


def test_prepared_processor_adds_image_grid_and_changes_nothing_else(host):
    samples = [[(50, 90)], [(90, 50), (20, 12)], [(256, 256), (10, 200), (57, 41)]]
    plain = batch(tiny_processor(host), samples)
    prepared = batch(adapter.prepare_processor(tiny_processor(host), config_model(host)), samples)
    assert set(prepared) == set(plain) | {"image_grid"}
    for key in plain:
        assert torch.equal(prepared[key], plain[key]), key
    grids = [[adapter.processor_grid(s, tile=S, longest_edge=LONGEST) for s in sizes] for sizes in samples]
    want = [[list(g) for g in sample] + [[-1, -1]] * (3 - len(sample)) for sample in grids]
    assert prepared["image_grid"].tolist() == want
    assert prepared["image_grid"].dtype == torch.long


def test_prepare_processor_is_idempotent_saves_the_plain_processor_and_refuses_others(host, tmp_path):
    processor = adapter.prepare_processor(tiny_processor(host), config_model(host))
    assert adapter.prepare_processor(processor, config_model(host)) is processor
    assert "image_grid" in processor.model_input_names
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == {"idefics3": "Idefics3Processor", "smolvlm": "SmolVLMProcessor"}[host]
    with pytest.raises(TypeError, match="Idefics3Processor or SmolVLMProcessor"):
        adapter.prepare_processor(transformers.LlavaProcessor(image_processor=transformers.LlavaImageProcessor(),
                                                              tokenizer=processor.tokenizer), config_model(host))


@pytest.mark.parametrize("host_name", HOSTS)
def test_prepared_processor_answers_the_token_count_api_with_what_it_produces(host_name):
    host = host_name
    """``_get_num_multimodal_tokens`` (what serving engines ask) is the installed plain processor's,
    and it counts what the prompt holds: each image's whole expansion (fake-token / row-col /
    global tokens, newlines and <image> tokens; transformers < 5.25) or its <image> tokens (5.25)."""
    plain = tiny_processor(host_name)
    if not hasattr(plain, "_get_num_multimodal_tokens"):
        pytest.skip(f"this transformers' {type(plain).__name__} has no token-count API")
    processor = adapter.prepare_processor(tiny_processor(host_name), config_model(host_name))
    without_image = len(processor.tokenizer(PROMPT.replace("<image>", ""))["input_ids"])
    whole, placeholders, grids = [], [], []
    for size in SIZES:
        inputs = processor(images=[[image(size)]], text=[PROMPT], return_tensors="pt")
        whole.append(inputs["input_ids"].shape[1] - without_image)
        placeholders.append(image_counts(inputs)[0])
        grids.append(tuple(inputs["image_grid"][0, 0].tolist()))
    counted = assert_token_counts_follow_the_host(processor, plain, SIZES, whole=whole, placeholders=placeholders)
    assert list(counted.num_image_patches) == [adapter.frames_of(g) for g in grids]
    assert placeholders == [adapter.budget(config_model(host), size, processor=processor).tokens for size in SIZES]


# --- token parity and the features ---------------------------------------------------------------


def test_token_counts_are_the_plain_processors(models, processor, host):
    """Every size (extreme aspect ratios, smaller than a tile, exact multiples, odd): the adapted
    model's features fill exactly the <image> tokens the unchanged processor wrote."""
    plain, adapted = models
    inputs = batch(processor, [[size] for size in SIZES])
    grids = [adapter.processor_grid(size, tile=S, longest_edge=LONGEST) for size in SIZES]
    assert inputs["image_grid"][:, 0].tolist() == [list(g) for g in grids]
    budgets = [adapter.budget(config_model(host), s, processor=processor) for s in SIZES]
    assert image_counts(inputs) == [(r * c + 1) * SEQ for r, c in grids] == [b.tokens for b in budgets]
    with torch.no_grad():
        out = adapted(**inputs)  # the host's own token / feature check passes
    assert [p.shape[0] for p in out.image_outputs.pooler_output] == image_counts(inputs)


def test_mixed_batch_multi_image_and_unsplit_images(models, host):
    """do_resize=False keeps each image's size: small images are not split, large ones are; samples
    hold different numbers of images and frames (zero-padded frames)."""
    plain, adapted = models
    processor = adapter.prepare_processor(tiny_processor(host, do_resize=False), config_model(host))
    samples = [[(20, 12), (64, 96)], [(32, 32)], [(100, 33), (7, 9), (64, 64)]]
    inputs = batch(processor, samples)
    grids = inputs["image_grid"].tolist()
    assert grids[0][:2] == [[0, 0], [2, 3]] and grids[1][0] == [0, 0] and grids[2][:3] == [[4, 2], [0, 0], [2, 2]]
    out = get_image_features(adapted, inputs)
    assert [p.shape[0] for p in out.pooler_output] == image_counts(inputs)
    reference = plain_features(plain, inputs)
    # unsplit images are the plain host's; split images' global frames too
    for sample, (got, want) in enumerate(zip(out.pooler_output, reference)):
        kept = kept_frames(grids[sample])
        got, want = got.view(-1, SEQ, got.shape[-1]), want.view(-1, SEQ, want.shape[-1])
        torch.testing.assert_close(got[kept], want[kept], rtol=1e-5, atol=1e-5)
        changed = [i for i in range(got.shape[0]) if i not in kept]
        assert bool(changed) == any(rows > 0 for rows, _ in grids[sample])
        assert all(not torch.allclose(got[i], want[i], atol=1e-3) for i in changed)


def kept_frames(sample_grids):
    """Indices of the frames that dual view leaves alone: unsplit images and global images."""
    kept, first = [], 0
    for rows, cols in sample_grids:
        if rows < 0:
            continue
        frames = rows * cols + 1 if rows else 1
        kept.append(first + frames - 1)
        first += frames
    return kept


def plain_features(plain, inputs):
    with torch.no_grad():
        return plain.model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"]).pooler_output


def reference_image_features(inner, frames, masks, grid):
    """From the definition, independent of the adapter: the canvas put together from the R*C tiles by
    concatenation, the global crops canvas[a::R, b::C] by slicing (masks alike), the tower with the
    host's patch rule (a patch is kept if any pixel is), the model's DEM on (tiles, global crops),
    its full map cut back into tile windows, then the connector over tiles + the global image.
    frames (R*C + 1, 3, S, S), masks (R*C + 1, S, S) -> (frames * SEQ, text_dim)."""
    rows, cols = grid
    n = rows * cols

    pixels = torch.cat((frames, global_crops(frames[:n], grid)))
    pixel_masks = torch.cat((masks, global_crops(masks[:n], grid)))
    patch_mask = pixel_masks.view(-1, H, PATCH, W, PATCH).sum(dim=(2, 4)) > 0
    with torch.no_grad():
        hidden = inner.vision_model(pixel_values=pixels, patch_attention_mask=patch_mask).last_hidden_state
        fused = inner.spatial_embed(hidden[None, :n], hidden[None, n + 1:], grid)[0]
        fmap = fused.view(rows * H, cols * W, -1)
        windows = torch.stack([fmap[r * H:(r + 1) * H, c * W:(c + 1) * W].reshape(H * W, -1)
                               for r in range(rows) for c in range(cols)])
        out = inner.connector(torch.cat((windows, hidden[n:n + 1])))
    return out.reshape(-1, out.shape[-1])


@pytest.mark.parametrize("size", [(90, 50), (10, 200), (64, 128)])
def test_features_match_the_reference(models, processor, size):
    plain, adapted = models
    inputs = batch(processor, [[size]])
    rows, cols = inputs["image_grid"][0, 0].tolist()
    frames = inputs["pixel_values"][0, : rows * cols + 1]
    masks = inputs["pixel_attention_mask"][0, : rows * cols + 1]
    want = reference_image_features(adapted.model, frames, masks, (rows, cols))
    torch.testing.assert_close(image_features(adapted, inputs)[0], want, rtol=1e-5, atol=1e-5)


def test_a_grid_of_more_than_32_tiles_a_side_runs_as_the_host_makes_it(models, host):
    """do_resize=False keeps a 2x35-tile image as it is: the adapted model takes the host's grid (no
    limit of its own), as a grid entry of the input too, and fuses the tiles as for any grid."""
    plain, adapted = models
    processor = adapter.prepare_processor(tiny_processor(host, do_resize=False), config_model(host))
    size = (2 * S - 5, 35 * S - 7)
    assert adapter.processor_grid(size, tile=S, longest_edge=None) == (2, 35)
    inputs = batch(processor, [[size]])
    assert inputs["image_grid"][0, 0].tolist() == [2, 35]
    frames = inputs["pixel_values"][0, : 2 * 35 + 1]
    masks = inputs["pixel_attention_mask"][0, : 2 * 35 + 1]
    want = reference_image_features(adapted.model, frames, masks, (2, 35))
    torch.testing.assert_close(image_features(adapted, inputs)[0], want, rtol=1e-5, atol=1e-5)


def test_global_crops_are_strided_samples_of_the_image(models, host):
    """An image of exactly 2x3 tiles with do_resize=False is not resampled: its tiles ARE the image,
    so the global crops the tower sees must be the normalised image's strided samples."""
    plain, adapted = models
    processor = adapter.prepare_processor(tiny_processor(host, do_resize=False), config_model(host))
    picture = image((2 * S, 3 * S))
    inputs = processor(images=[[picture]], text=[PROMPT], return_tensors="pt")
    seen = []
    hook = adapted.model.vision_model.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(kwargs["pixel_values"]), with_kwargs=True)
    try:
        get_image_features(adapted, inputs)
    finally:
        hook.remove()
    normalised = (torch.from_numpy(picture).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    crops = seen[0][7:]  # after the 6 tiles and the global image
    want = torch.stack([normalised[:, a::2, b::3] for a in range(2) for b in range(3)])
    torch.testing.assert_close(crops, want, rtol=0, atol=1e-6)


def test_one_tower_call_over_frames_and_global_crops(models, processor, host):
    plain, adapted = models
    sizes = [[(90, 50), (20, 12)], [(256, 256)]]
    inputs = batch(processor, sizes)
    calls = []
    hook = adapted.model.vision_model.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    try:
        get_image_features(adapted, inputs)
    finally:
        hook.remove()
    grids = [adapter.processor_grid(s, tile=S, longest_edge=LONGEST) for sample in sizes for s in sample]
    assert calls == [sum(2 * r * c + 1 for r, c in grids)]
    model = config_model(host)
    assert calls == [sum(adapter.budget(model, s, processor=processor).tower_passes for sample in sizes for s in sample)]


def test_tower_batch_size_chunks_the_call_with_the_same_result(host, processor):
    plain, adapted = plain_and_adapted(adapter, tiny_model(host), tower_batch_size=5)
    _, whole = plain_and_adapted(adapter, tiny_model(host))
    inputs = batch(processor, [[(90, 50)]])
    got = get_image_features(adapted, inputs, output_hidden_states=True)
    want = get_image_features(whole, inputs, output_hidden_states=True)
    torch.testing.assert_close(got.pooler_output[0], want.pooler_output[0], rtol=1e-5, atol=1e-5)
    assert len(got.hidden_states) == len(want.hidden_states) == 3  # embeddings + 2 layers
    rows, cols = adapter.processor_grid((90, 50), tile=S, longest_edge=LONGEST)
    assert got.hidden_states[-1].shape[0] == 2 * rows * cols + 1  # every crop of the one (chunked) call
    for got_layer, want_layer in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(got_layer, want_layer, rtol=1e-5, atol=1e-5)


def test_tower_batch_size_none_is_the_encoders_automatic_chunking(host, processor, monkeypatch):
    """``tower_batch_size=None`` means automatic chunks, as everywhere (the encoder's rule: the fewest
    equal calls of at most AUTO_CHUNK_TOKENS tokens), not one call; None, "all" and small ints give
    the same features."""
    import dualview.encoder as encoder_module

    inputs = batch(processor, [[(90, 50)]])
    rows, cols = adapter.processor_grid((90, 50), tile=S, longest_edge=LONGEST)
    crops, tokens = 2 * rows * cols + 1, (S // PATCH) ** 2
    monkeypatch.setattr(encoder_module, "AUTO_CHUNK_TOKENS", 4 * tokens)  # at most 4 crops per call
    outputs, calls = {}, {}
    for size in (None, "all", 1, 3):
        _, model = plain_and_adapted(adapter, tiny_model(host), tower_batch_size=size)
        seen = tower_calls(model.model.vision_model)
        outputs[size] = image_features(model, inputs)[0]
        calls[size] = seen
    assert calls[None] == encoder_module.even_chunks(crops, tokens, 4 * tokens) and len(calls[None]) > 1
    assert calls["all"] == [crops] and calls[1] == [1] * crops and sum(calls[3]) == crops
    for size in ("all", 1, 3):
        torch.testing.assert_close(outputs[size], outputs[None], rtol=1e-5, atol=1e-5)


def test_pixel_masks_are_used_as_the_host_uses_them(models, host):
    """Frames with padded pixels (mask 0): unsplit frames get the host's features exactly, split
    images the reference's with the canvas mask cut into global crops too."""
    plain, adapted = models
    processor = adapter.prepare_processor(tiny_processor(host, do_resize=False), config_model(host))
    inputs = batch(processor, [[(64, 64), (20, 12)]])
    pixels, masks = inputs["pixel_values"].clone(), inputs["pixel_attention_mask"].clone()
    for frame, (h, w) in [(3, (20, 9)), (4, (11, 30)), (1, (32, 17))]:  # a tile, the global image, unsplit
        pixels[0, frame, :, h:] = 0
        pixels[0, frame, :, :, w:] = 0
        masks[0, frame, h:] = 0
        masks[0, frame, :, w:] = 0
    inputs = {**inputs, "pixel_values": pixels, "pixel_attention_mask": masks}
    got = image_features(adapted, inputs)[0].view(-1, SEQ, 32)
    want = reference_image_features(adapted.model, pixels[0, :5], masks[0, :5], (2, 2)).view(-1, SEQ, 32)
    torch.testing.assert_close(got[:5], want, rtol=1e-5, atol=1e-5)
    plain_out = plain_features(plain, inputs)[0].view(-1, SEQ, 32)
    torch.testing.assert_close(got[5], plain_out[5], rtol=1e-5, atol=1e-5)


def test_no_split_image_runs_the_plain_host(models, host):
    plain, adapted = models
    processor = adapter.prepare_processor(tiny_processor(host, do_image_splitting=False), config_model(host))
    inputs = batch(processor, [[(90, 50)], [(20, 12), (256, 10)]])
    assert inputs["image_grid"].tolist() == [[[0, 0], [-1, -1]], [[0, 0], [0, 0]]]
    with torch.no_grad():
        got = adapted(**inputs).logits
        want = plain(**{k: v for k, v in inputs.items() if k != "image_grid"}).logits
    assert torch.equal(got, want)


def test_smolvlm_video_frames_run_the_plain_host():
    from transformers.video_utils import VideoMetadata

    plain, adapted = plain_and_adapted(adapter, tiny_model("smolvlm"))
    processor = adapter.prepare_processor(tiny_processor("smolvlm"), config_model("smolvlm"))
    videos = [np.random.default_rng(n).integers(0, 256, (n, 40, 60, 3), dtype=np.uint8) for n in (3, 2)]
    metadata = [VideoMetadata(total_num_frames=n, fps=1, frames_indices=list(range(n))) for n in (3, 2)]
    inputs = processor(videos=videos, text=["User: <video> what", "User: <video> a"], return_tensors="pt",
                       padding=True, do_sample_frames=False, video_metadata=metadata)
    assert inputs["image_grid"].tolist() == [[[0, 0]] * 3, [[0, 0]] * 2 + [[-1, -1]]]
    with torch.no_grad():
        got = adapted(**inputs).logits
        want = plain(**{k: v for k, v in inputs.items() if k != "image_grid"}).logits
    assert torch.equal(got, want)


# --- the model: errors, generate, training, save / load -------------------------------------------


def test_without_image_grid_the_error_says_prepare_processor(models, host):
    plain, adapted = models
    inputs = batch(tiny_processor(host), [[(90, 50)]])
    with pytest.raises(ValueError, match="prepare_processor"):
        with torch.no_grad():
            adapted(**inputs)
    with pytest.raises(ValueError, match="prepare_processor"):
        adapted.model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"])


def test_bad_image_grid_errors(models, processor):
    plain, adapted = models
    inputs = batch(processor, [[(90, 50)], [(20, 12)]])
    pixels, masks = inputs["pixel_values"], inputs["pixel_attention_mask"]
    bad = {
        "integer tensor": inputs["image_grid"].float(),
        r"batch=2, images, 2": inputs["image_grid"][:1],
        r"\(0, 3\)": torch.tensor([[[0, 3]], [[2, 2]]]),
        "real \\(not all-zero\\) frames": torch.tensor([[[2, 2]], [[2, 2]]]),
    }
    for message, grid in bad.items():
        with pytest.raises(ValueError, match=message):
            adapted.model.get_image_features(pixels, masks, image_grid=grid)


def test_generate_with_the_prepared_processors_inputs(models, processor):
    plain, adapted = models
    inputs = batch(processor, [[(90, 50)], [(20, 12), (10, 200)]])
    with torch.no_grad():
        out = adapted.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)


def _cache_of(out):
    """The KV cache of a forward's output (``cache`` in transformers >= 5.2x, ``past_key_values`` before)."""
    for name in ("cache", "past_key_values"):
        value = out.get(name) if hasattr(out, "get") else None
        if value is not None:
            return value
    raise AssertionError(f"no cache in the output ({list(out.keys())})")


@pytest.mark.parametrize("inner", [False, True], ids=["outer", "inner"])
def test_a_kv_cache_is_used_under_every_name_the_host_takes(models, processor, inner):
    """The prompt run once with ``use_cache``, its last token run alone with the cache (under each
    name the installed host's forward takes: ``past_key_values`` and, where it exists, ``cache``)
    gives the last position of the whole prompt's run, as in the plain host."""
    import inspect

    plain, adapted = models
    inputs = batch(processor, [[(90, 50)]])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    head = dict(inputs, input_ids=ids[:, :-1], attention_mask=mask[:, :-1])
    names = ["past_key_values"] + (["cache"] if "cache" in inspect.signature(type(plain).forward).parameters else [])
    for model_ in (plain, adapted):
        model = model_.model if inner else model_
        with torch.no_grad():
            whole = model(**inputs)
            whole = whole.last_hidden_state if inner else whole.logits
            for name in names:
                first = model(**head, use_cache=True)
                out = model(input_ids=ids[:, -1:], attention_mask=mask, **{name: _cache_of(first)}, use_cache=True)
                last = out.last_hidden_state if inner else out.logits
                where = f"{type(model).__name__}, {name}"
                torch.testing.assert_close(last[:, -1], whole[:, -1], atol=1e-5, rtol=1e-4,
                                           msg=lambda m, where=where: f"{where}: {m}")


def test_training_step_reaches_the_dem_only(host, processor):
    plain, adapted = plain_and_adapted(adapter, tiny_model(host))
    adapted.train()
    adapted.model.vision_model.requires_grad_(False)
    inputs = batch(processor, [[(90, 50)]])
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)
    adapted(**inputs, labels=labels).loss.backward()
    dem_grads = [p.grad for p in adapted.model.spatial_embed.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in dem_grads)
    assert any(g.abs().sum() > 0 for g in dem_grads)
    assert all(p.grad is None for p in adapted.model.vision_model.parameters())


@pytest.mark.parametrize("inner", [False, True])
def test_save_and_load_round_trip(host, processor, tmp_path, inner):
    plain, adapted = plain_and_adapted(adapter, tiny_model(host))
    model = adapted.model if inner else adapted
    with torch.no_grad():
        for p in adapted.model.spatial_embed.parameters():
            p.normal_()  # trained-looking DEM weights
    inputs = batch(processor, [[(90, 50)]])
    model.save_pretrained(tmp_path)
    loaded = adapter.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert recorded_options(loaded.config) == recorded_options(model.config)
    with torch.no_grad():
        if inner:
            got, want = loaded(**inputs).last_hidden_state, model(**inputs).last_hidden_state
        else:
            got, want = loaded(**inputs).logits, model(**inputs).logits
    assert torch.equal(got, want)


def test_unapply_gives_the_plain_model_back(host, processor):
    plain, adapted = plain_and_adapted(adapter, tiny_model(host))
    adapter.unapply(adapted)
    assert type(adapted) is type(plain) and type(adapted.model) is type(plain.model)
    assert not hasattr(adapted.model, "spatial_embed") and recorded_options(adapted.config) is None
    inputs = {k: v for k, v in batch(processor, [[(90, 50)]]).items() if k != "image_grid"}
    with torch.no_grad():
        assert torch.equal(adapted(**inputs).logits, plain(**inputs).logits)


def test_a_bare_inner_model_is_adapted_alike(host, models, processor):
    """apply(Idefics3Model / SmolVLMModel): the same features and hidden states as the inner model of
    an adapted ...ForConditionalGeneration with the same DEM; unapply gives the plain class back."""
    plain, adapted = models
    bare = adapter.apply(copy.deepcopy(plain.model), num_heads=2)
    assert type(bare) is type(adapted.model)
    bare.spatial_embed.load_state_dict(adapted.model.spatial_embed.state_dict())
    inputs = batch(processor, [[(90, 50)]])
    with torch.no_grad():
        torch.testing.assert_close(bare(**inputs).last_hidden_state, adapted.model(**inputs).last_hidden_state,
                                   rtol=0, atol=0)
    assert type(adapter.unapply(bare)) is type(plain.model)


def test_apply_to_the_inner_model_of_a_for_conditional_generation_is_refused_naming_what_to_pass(host):
    """``apply(model.model)`` would adapt a forward that works while the outer model's ``generate``
    refuses ``image_grid``: refused, naming the outer class and ``apply(model)``; the model is left plain."""
    model = tiny_model(host)
    inner_cls = type(model.model)
    with pytest.raises(ValueError, match=rf"inner model of a {type(model).__name__}.*apply\(model\)"):
        adapter.apply(model.model, num_heads=2)
    assert type(model.model) is inner_cls and not hasattr(model.model, "spatial_embed")
    assert recorded_options(model.config) is None
    adapter.apply(model, num_heads=2)  # the whole model: generate takes image_grid
    processor = adapter.prepare_processor(tiny_processor(host), config_model(host))
    with torch.no_grad():
        model.generate(**batch(processor, [[(90, 50)]]), max_new_tokens=1, do_sample=False)


def test_apply_errors(host):
    plain, adapted = plain_and_adapted(adapter, tiny_model(host))
    with pytest.raises(ValueError, match="already applied"):
        adapter.apply(adapted)
    with pytest.raises(ValueError, match=r"option fit is fixed for Idefics3 / SmolVLM \(the image processor tiles"):
        adapter.apply(tiny_model(host), fit="pad")
    with pytest.raises(ValueError, match="out_size is fixed"):
        adapter.apply(tiny_model(host), out_size=[2, 2])
    with pytest.raises(TypeError, match="Idefics3ForConditionalGeneration"):
        adapter.apply(torch.nn.Linear(2, 2))


def test_budget(processor, host):
    for size in SIZES:
        rows, cols = adapter.processor_grid(size, tile=S, longest_edge=LONGEST)
        got = adapter.budget(config_model(host), size, processor=processor)
        assert (got.grid, got.tower_passes, got.tokens) == ((rows, cols), 2 * rows * cols + 1, (rows * cols + 1) * SEQ)
    unsplit = adapter.prepare_processor(tiny_processor("idefics3", do_image_splitting=False), config_model("idefics3"))
    got = adapter.budget(config_model("idefics3"), (90, 50), processor=unsplit)
    assert (got.tower_passes, got.tokens) == (1, SEQ)
    with pytest.raises(ValueError, match="processor is required for hf_idefics3"):
        adapter.budget(config_model(host), (90, 50))
    # the call order before the one budget signature: the processor where the model goes
    with pytest.raises(TypeError, match=f"model must be a transformers Idefics3 or SmolVLM model, got {type(processor).__name__}"):
        adapter.budget(processor, (90, 50))
    from . import internvl_models

    with pytest.raises(TypeError, match="model must be a transformers Idefics3 or SmolVLM model, got InternVL"):
        adapter.prepare_processor(tiny_processor(host), internvl_models.config_model())


def test_a_processor_that_does_not_fit_the_model_is_refused(host):
    """prepare_processor and budget check the processor's tile and tokens per frame against the model's."""
    other_tile = tiny_processor(host)
    other_tile.image_processor.max_image_size = {"longest_edge": 2 * S}
    other_tokens = tiny_processor(host)
    other_tokens.image_seq_len = SEQ + 1
    for processor, got in ((other_tile, f"max_image_size\\['longest_edge'\\]={2 * S}"), (other_tokens, f"image_seq_len={SEQ + 1}")):
        with pytest.raises(ValueError, match=f"processor must cut the model's {S}-pixel tiles into {SEQ} tokens.*{got}"):
            adapter.prepare_processor(processor, config_model(host))
        assert type(processor) in (transformers.Idefics3Processor, transformers.SmolVLMProcessor)  # left as it was
        with pytest.raises(ValueError, match="processor must cut"):
            adapter.budget(config_model(host), (90, 50), processor=processor)


# --- the host battery of the adapter mechanism ----------------------------------------------------


def _case(host):
    from .host_battery import HostCase

    processor = adapter.prepare_processor(tiny_processor(host), config_model(host))

    def inputs(sizes):
        return batch(processor, [[s] for s in sizes])

    def plain_inputs(sizes):  # the plain processor's: no image_grid
        return {k: v for k, v in inputs(sizes).items() if k != "image_grid"}

    return HostCase(
        adapter=adapter,
        build=lambda: frozen_tower(tiny_model(host), "vision_model"),
        inputs=inputs,
        plain_inputs=plain_inputs,
        options={"num_heads": 2},
        option_sets=({"num_heads": 2, "directions": "global_to_local", "fusion": "conv3x3"},),
        fixed=adapter.FIXED, fixed_why="Idefics3 / SmolVLM",
        sizes=((40, 70), (90, 30)),  # 3x4 and 4x2 tiles: the global crops differ from the tiles
        vision_tower=lambda model: model.model.vision_model,
        projector=lambda model: model.model.connector,
        projector_key="model.connector",
        image_features=get_image_features,
        pooler_from_last=lambda model, last, inputs: [model.model.connector(last).flatten(0, 1)],
        image_token_id=IMAGE_TOKEN_ID,
        offload_map={"model.vision_model": "disk", "model.connector": "cpu", "model.text_model": "cpu",
                     "lm_head": "cpu"},
        not_applicable={} if host == "smolvlm" else {
            "offload": "plain Idefics3Model.forward moves the text embeddings to `self.device`, the device of its "
                       "first parameter: with the vision tower offloaded that is 'meta' and the plain host fails "
                       "(SmolVLMModel uses the input ids' device and runs)",
            "offload_after_apply": "plain Idefics3Model.forward moves the text embeddings to `self.device`: 'meta' "
                                   "once accelerate offloaded the model, and the plain host fails"},
    )


class TestIdefics3Battery(HostBattery):
    @staticmethod
    def case():
        return _case("idefics3")


class TestSmolVLMBattery(HostBattery):
    @staticmethod
    def case():
        return _case("smolvlm")
