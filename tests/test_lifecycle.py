"""dualview's PEFT-style lifecycle (dualview/lifecycle.py) on the tiny transformers Llava: the one entry
point, adapter-only checkpoints and their strict loading, a dual-view checkpoint loaded by the plain
class, the freeze presets and the trainable-parameter report, PEFT's LoRA beside dual view.
(Every host's bit-exact adapter-only round trip is in the host battery.)"""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
import transformers

import dualview
from dualview.gate import DualViewGate
from dualview.lifecycle import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_TARGETS

from .llava_models import tiny_model
from .test_adapter_hf_llava import BATTERY_OPTIONS, _inputs

OPTIONS = dict(BATTERY_OPTIONS, init="identity")


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def trained(model):
    """The adapted model with a DEM and gate that are not what apply makes."""
    with torch.no_grad():
        for p in model.model.spatial_embed.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.model.spatial_gate.g.uniform_(-1, 1)
    return model


# ---- the entry point ----------------------------------------------------------------------------


def test_apply_picks_the_adapter_from_the_hosts_of_every_adapter():
    table = {cls.__name__: name for cls, name in dualview.lifecycle.host_table().items()}
    for cls, name in [("LlavaForConditionalGeneration", "hf_llava"), ("LlavaNextForConditionalGeneration", "hf_llava_next"),
                      ("LlavaOnevisionForConditionalGeneration", "hf_llava_onevision"),
                      ("InternVLForConditionalGeneration", "hf_internvl"),
                      ("Idefics3ForConditionalGeneration", "hf_idefics3"), ("SmolVLMForConditionalGeneration", "hf_idefics3")]:
        assert table[cls] == name
    model = dualview.apply(tiny_model(), **OPTIONS)
    assert type(model.model).__name__ == "DualViewLlavaModel" and model.config.dualview["init"] == "identity"
    with pytest.raises(ValueError, match="already applied"):
        dualview.apply(model)
    dualview.unapply(model)
    assert type(model.model) is transformers.LlavaModel
    with pytest.raises(ValueError, match="no dual view"):
        dualview.unapply(model)


def test_an_unknown_host_is_one_error_listing_the_supported_ones():
    with pytest.raises(TypeError, match=r"no adapter for Linear: supported host classes are .*"
                                        r"LlavaForConditionalGeneration \(hf_llava\).*LlavaNextForConditionalGeneration"):
        dualview.apply(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        dualview.apply("llava")


def test_a_bad_init_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"init must be one of \('released', 'identity'\), got 'zero'"):
        dualview.apply(tiny_model(), init="zero")
    with pytest.raises(ValueError, match=r"init must be one of"):
        DualViewGate(8, init="zero")


# ---- adapter-only checkpoints --------------------------------------------------------------------


def test_save_adapter_writes_a_small_file_and_load_is_strict(tmp_path):
    model = trained(dualview.apply(tiny_model(), **OPTIONS))
    inputs = _inputs(((40, 70),))
    expected = logits(model, inputs)
    dualview.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert meta["adapter"] == "hf_llava" and meta["dualview_version"] == dualview.__version__
    assert meta["options"] == model.config.dualview and meta["host"] == "LlavaForConditionalGeneration"
    dem_bytes = sum(p.numel() * p.element_size() for p in model.model.spatial_embed.parameters())
    assert (tmp_path / ADAPTER_WEIGHTS).stat().st_size < dem_bytes + 4096  # the DEM and the gate, nothing else
    torch.testing.assert_close(logits(dualview.load(tiny_model(), tmp_path), inputs), expected, rtol=0, atol=0)

    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / ADAPTER_WEIGHTS))

    def refused(tensors, match, meta_change=None):
        bad = tmp_path / f"bad{refused.n}"
        refused.n += 1
        bad.mkdir()
        save_file(tensors, str(bad / ADAPTER_WEIGHTS))
        (bad / ADAPTER_CONFIG).write_text(json.dumps({**meta, **(meta_change or {})}))
        plain = tiny_model()
        with pytest.raises((ValueError, TypeError, FileNotFoundError), match=match):
            dualview.load(plain, bad)
        assert type(plain.model) is transformers.LlavaModel and not hasattr(plain.config, "dualview")  # left plain

    refused.n = 0
    key = "spatial_embed.ln_fuse.weight"
    weights = str(tmp_path / f"bad{0}" / ADAPTER_WEIGHTS)
    refused({k: v for k, v in state.items() if k != key}, rf"{weights}.*missing keys \['ln_fuse.weight'\]")
    refused({**state, "spatial_embed.extra": torch.zeros(1)}, r"unexpected keys \['extra'\]")
    refused({**state, "lm_head.weight": torch.zeros(1)}, r"unexpected keys \['lm_head.weight'\]")
    refused({**state, key: torch.zeros(3)}, rf"key '{key}': shape \(3,\), expected \(32,\)")
    refused({**state, key: state[key].to(torch.int32)}, rf"key '{key}': dtype int32, expected a floating-point")
    refused({k: v for k, v in state.items() if k != "spatial_gate.g"}, r"missing keys \['g'\]")
    refused(state, r"'weights' must name a .safetensors file inside", {"weights": "../elsewhere.safetensors"})
    refused(state, r"'weights' must name a .safetensors file inside", {"weights": "/abs/x.safetensors"})
    refused(state, r"holds a dualview.adapters.hf_llava_next adapter .* dualview.adapters.hf_llava adapts",
            {"adapter": "hf_llava_next"})
    refused(state, r"unknown dual-view option\(s\) \['colour'\]", {"options": {**meta["options"], "colour": 1}})
    with pytest.raises(FileNotFoundError, match=ADAPTER_CONFIG):
        dualview.load(tiny_model(), tmp_path / "nothing")


def _saved(folder, init):
    """An adapter-only checkpoint of a trained model with ``init``: (its weights, its config)."""
    from safetensors.torch import load_file

    model = dualview.apply(tiny_model(), **{**OPTIONS, "init": init})
    with torch.no_grad():
        for p in model.model.spatial_embed.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    dualview.save_adapter(model, folder)
    return load_file(str(folder / ADAPTER_WEIGHTS)), json.loads((folder / ADAPTER_CONFIG).read_text())


def _refused(folder, match, *, tensors=None, meta=None, raw_weights=None, raw_meta=None):
    """``dualview.load`` of ``folder`` written from these parts is one ValueError matching ``match``, and
    the plain model it was given stays plain."""
    from safetensors.torch import save_file

    folder.mkdir()
    if raw_weights is not None:
        (folder / ADAPTER_WEIGHTS).write_bytes(raw_weights)
    elif tensors is not None:
        save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    (folder / ADAPTER_CONFIG).write_text(raw_meta if raw_meta is not None else json.dumps(meta))
    plain = tiny_model()
    with pytest.raises(ValueError, match=match):
        dualview.load(plain, folder)
    assert type(plain.model) is transformers.LlavaModel and not hasattr(plain.config, "dualview")
    assert not hasattr(plain.model, "spatial_embed")


def test_load_refuses_what_an_adapter_checkpoint_must_not_hold_and_leaves_the_model_plain(tmp_path):
    state, meta = _saved(tmp_path / "released", "released")
    assert not any(k.startswith("spatial_gate.") for k in state)
    # init="released" has no gate: a gate weight in its checkpoint is not silently dropped
    _refused(tmp_path / "gate", r"unexpected keys \['spatial_gate.g'\]", tensors={**state, "spatial_gate.g": torch.zeros(32)},
             meta=meta)
    # the weights are read from a .safetensors file only (a .bin is a pickle), even inside the folder
    (tmp_path / "bin").mkdir()
    torch.save(state, tmp_path / "bin" / "dualview_adapter.bin")
    (tmp_path / "bin" / ADAPTER_CONFIG).write_text(json.dumps({**meta, "weights": "dualview_adapter.bin"}))
    plain = tiny_model()
    with pytest.raises(ValueError, match=r"'weights' must name a .safetensors file inside .*'dualview_adapter.bin'"):
        dualview.load(plain, tmp_path / "bin")
    assert type(plain.model) is transformers.LlavaModel
    # an unreadable weight file fails before dual view is applied
    _refused(tmp_path / "garbage", r"is not a readable safetensors file", raw_weights=b"not safetensors", meta=meta)
    _refused(tmp_path / "format", r"format 2 is not one this dualview reads \(1\)", tensors=state,
             meta={**meta, "format": 2})
    _refused(tmp_path / "list", r"must hold a JSON object, got list", tensors=state, raw_meta="[]")


def test_whole_model_save_pretrained_keeps_working_and_dualview_from_pretrained_resolves_it(tmp_path):
    model = trained(dualview.apply(tiny_model(), **OPTIONS))
    inputs = _inputs(((40, 70),))
    model.save_pretrained(tmp_path)
    loaded = dualview.from_pretrained(tmp_path)
    assert type(loaded.model).__name__ == "DualViewLlavaModel"
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)
    with pytest.raises(ValueError, match="was not saved from a dual-view model"):
        tiny_model().save_pretrained(tmp_path / "plain")
        dualview.from_pretrained(tmp_path / "plain")


@pytest.mark.parametrize("loader", ["class", "auto"])
def test_a_dual_view_checkpoint_loaded_by_the_plain_class_does_not_drop_dual_view_silently(tmp_path, loader, caplog):
    """transformers' plain ``from_pretrained`` (the class's, or ``AutoModelForImageTextToText``) cannot
    run our code: it drops ``spatial_embed.*`` / ``spatial_gate.*`` as UNEXPECTED keys (its load report,
    a logged warning, names them) and keeps ``config.dualview``. Applying dual view to that plain model
    then warns loudly that the trained DEM was dropped and how to load it; ``dualview.from_pretrained``
    is the resolution."""
    model = trained(dualview.apply(tiny_model(), **OPTIONS))
    model.save_pretrained(tmp_path)
    cls = transformers.LlavaForConditionalGeneration if loader == "class" else transformers.AutoModelForImageTextToText
    with caplog.at_level(logging.WARNING):
        plain = cls.from_pretrained(tmp_path)
    report = caplog.text
    assert "UNEXPECTED" in report and "model.spatial_embed." in report and "model.spatial_gate.g" in report
    assert type(plain.model) is transformers.LlavaModel and plain.config.dualview == model.config.dualview
    with pytest.warns(UserWarning, match=r"DROPPED the trained DEM .*dualview.from_pretrained\(path\)"):
        dualview.apply(plain, **OPTIONS)
    # the adapters' own loading does not warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dualview.from_pretrained(tmp_path)


# ---- training helpers --------------------------------------------------------------------------------


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_presets_and_the_trainable_parameter_report(capsys):
    model = dualview.apply(tiny_model(), **OPTIONS)
    dem = {f"model.spatial_embed.{n}" for n, _ in model.model.spatial_embed.named_parameters()} | {"model.spatial_gate.g"}
    projector = {f"model.multi_modal_projector.{n}" for n, _ in model.model.multi_modal_projector.named_parameters()}
    assert dualview.freeze(model, "warm_start") is model and _trainable(model) == dem
    counts = dualview.trainable_parameters(model)
    out = capsys.readouterr().out
    own = sum(p.numel() for p in model.model.spatial_embed.parameters()) + model.model.spatial_gate.g.numel()
    total = sum(p.numel() for p in model.parameters())
    assert counts == {"trainable": own, "total": total, "percent": 100 * own / total, "dual_view": own}
    assert f"trainable params: {own:,} || all params: {total:,}" in out
    dualview.freeze(model, "stage1")
    assert _trainable(model) == dem | projector
    with pytest.raises(ValueError, match=r"preset must be one of \('stage1', 'warm_start', 'warm_start_lora'\), got 'all'"):
        dualview.freeze(model, "all")
    with pytest.raises(ValueError, match="no dual view"):
        dualview.freeze(tiny_model(), "warm_start")
    assert dualview.trainable_parameters(tiny_model(), print_fn=None)["dual_view"] == 0


def test_peft_lora_and_dual_view_train_save_and_load_together(tmp_path):
    """``freeze(model, "warm_start_lora")``: PEFT's LoRA on the language model's attention, the DEM and
    gate as PEFT ``modules_to_save``; the identity start is kept (LoRA's B = 0, g = 0); one step
    trains the gate and the LoRA; PEFT's save / load onto a fresh adapted host reproduces the logits."""
    peft = pytest.importorskip("peft")
    inputs = _inputs(((40, 70),))
    adapted = dualview.apply(tiny_model(), **OPTIONS)
    start = logits(adapted, inputs)  # the plain model's on the thumbnail (the battery checks it)
    model = dualview.freeze(adapted, "warm_start_lora")
    assert isinstance(model, peft.PeftModel)
    trainable = _trainable(model)
    assert trainable and all("lora_" in n or "spatial_embed" in n or "spatial_gate" in n for n in trainable)
    assert any("language_model" in n and "lora_A" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    torch.testing.assert_close(logits(model, inputs), start, rtol=0, atol=0)  # LoRA's B = 0 and g = 0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = inputs["input_ids"]
    model.train()
    for _ in range(2):
        loss = model(**inputs, labels=ids.masked_fill(ids == model.config.image_token_id, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    gate = dualview.lifecycle.dual_view_host(model).dualview_gate  # the trained copy PEFT wraps
    assert gate.g.any()
    after = logits(model, inputs)
    assert not torch.allclose(after, start)
    model.save_pretrained(tmp_path)
    fresh = dualview.apply(tiny_model(), **OPTIONS)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, inputs), after, rtol=0, atol=0)
    # dual view's adapter checkpoint of the PEFT model holds the trained DEM and gate, and PEFT's adapter:
    # load gives the PEFT model back (tests/test_peft_lifecycle.py has the rest)
    dualview.save_adapter(model, tmp_path / "dv")
    again = dualview.load(tiny_model(), tmp_path / "dv")
    assert isinstance(again, peft.PeftModel)
    assert torch.equal(dualview.lifecycle.dual_view_host(again).dualview_gate.g, gate.g)


def test_lora_targets_the_language_model_only():
    import re

    names = [n for n, _ in dualview.apply(tiny_model(), **OPTIONS).named_modules()]
    hit = [n for n in names if re.fullmatch(LORA_TARGETS, n)]
    assert hit and all(n.startswith("model.language_model.") for n in hit)
