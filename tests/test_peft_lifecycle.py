"""dualview's lifecycle functions given a PEFT model (``freeze(model, "warm_start_lora")``'s
``peft.PeftModel``) on the tiny transformers Llava: each DEM and gate parameter counted once (PEFT's
``ModulesToSaveWrapper`` holds a frozen original and a trained copy), ``unapply`` through the wrapper,
``save_adapter`` -> ``load`` giving the same PEFT model back, and PEFT's own loader on a host without
dual view warning instead of dropping the trained DEM and gate in silence."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import dualview
from dualview.lifecycle import ADAPTER_CONFIG, DUAL_VIEW_EXCLUDED, LORA_TARGETS, PEFT_CONFIG

from .llava_models import tiny_model
from .test_adapter_hf_llava import BATTERY_OPTIONS, _inputs, _plain_inputs

peft = pytest.importorskip("peft")

OPTIONS = dict(BATTERY_OPTIONS, init="identity")


def logits(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs).logits


def dual_view_size(adapted):
    """The DEM's and the gate's parameter count, from the adapted host before PEFT wraps it."""
    return sum(p.numel() for p in adapted.model.spatial_embed.parameters()) + adapted.model.spatial_gate.g.numel()


def lora_model():
    """``freeze(apply(tiny), "warm_start_lora")`` with every trainable tensor moved off its start (as
    training would: LoRA's B != 0, g != 0, a changed DEM), and the DEM + gate size."""
    adapted = dualview.apply(tiny_model(), **OPTIONS)
    size = dual_view_size(adapted)
    model = dualview.freeze(adapted, "warm_start_lora")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model, size


def test_trainable_parameters_count_the_dem_and_gate_of_a_peft_model_once(capsys):
    model, size = lora_model()
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    counts = dualview.trainable_parameters(model)
    trainable, total = model.get_nb_trainable_parameters()  # PEFT's own count: originals of modules_to_save included
    assert counts["dual_view"] == size  # PEFT's trained copies, not also its frozen originals
    assert counts["trainable"] == trainable == size + lora
    assert counts["total"] == total
    assert f"dual view (DEM + gate): {size:,}" in capsys.readouterr().out


def test_freeze_presets_on_a_peft_model_train_its_copies_not_its_frozen_originals():
    model, size = lora_model()
    dualview.freeze(model, "warm_start")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".modules_to_save.default." in n for n in trainable)
    counts = dualview.trainable_parameters(model, print_fn=None)
    assert counts["trainable"] == counts["dual_view"] == size
    dualview.freeze(model, "stage1")
    projector = sum(p.numel() for p in model.base_model.model.model.multi_modal_projector.parameters())
    assert dualview.trainable_parameters(model, print_fn=None)["trainable"] == size + projector
    with pytest.raises(ValueError, match=r"already a peft\.PeftModel .*PeftModel\.from_pretrained\(host, folder, is_trainable=True\)"):
        dualview.freeze(model, "warm_start_lora")


def test_unapply_on_the_peft_wrapper_gives_the_plain_host_with_its_lora():
    plain = tiny_model()
    inputs = _plain_inputs(((40, 70),))
    fresh = dualview.freeze(dualview.apply(tiny_model(), **OPTIONS), "warm_start_lora")  # LoRA's B = 0
    assert dualview.unapply(fresh) is fresh
    assert not any("spatial_" in n for n, _ in fresh.named_modules())
    assert type(fresh.get_base_model().model) is type(plain.model)
    config = fresh.peft_config["default"]
    assert config.modules_to_save is None and config.exclude_modules is None
    torch.testing.assert_close(logits(fresh, inputs), logits(plain, inputs), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no dual view"):
        dualview.unapply(fresh)


def test_a_peft_model_after_unapply_saves_a_lora_the_plain_host_loads_without_warnings(tmp_path):
    model, _ = lora_model()
    dualview.unapply(model)
    inputs = _plain_inputs(((40, 70),))
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="You have passed exclude_modules")
        reloaded = peft.PeftModel.from_pretrained(tiny_model(), tmp_path)
    torch.testing.assert_close(logits(reloaded, inputs), logits(model, inputs), rtol=0, atol=0)


def test_save_adapter_of_a_peft_model_loads_back_the_same_peft_model(tmp_path):
    model, _ = lora_model()
    inputs = _inputs(((40, 70),))
    dualview.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert meta["host"] == "LlavaForConditionalGeneration" and meta["peft"] is True
    assert (tmp_path / PEFT_CONFIG).is_file()
    loaded = dualview.load(tiny_model(), tmp_path)
    assert isinstance(loaded, peft.PeftModel)
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)


def test_peft_from_pretrained_on_a_host_without_dual_view_warns_and_names_dualview_load(tmp_path):
    model, _ = lora_model()
    inputs = _inputs(((40, 70),))
    model.save_pretrained(tmp_path)  # PEFT's folder alone (what Trainer checkpoints hold)
    with pytest.warns(UserWarning, match=r"drops them; load this adapter with dualview\.load"):
        peft.PeftModel.from_pretrained(tiny_model(), tmp_path)
    # the host with dual view (the same options) gets it all back, without that warning
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="You have passed exclude_modules")
        reloaded = peft.PeftModel.from_pretrained(dualview.apply(tiny_model(), **OPTIONS), tmp_path)
    torch.testing.assert_close(logits(reloaded, inputs), logits(model, inputs), rtol=0, atol=0)
    # dualview.load cannot rebuild the DEM without the options: it names the calls that can
    plain = tiny_model()
    with pytest.raises(ValueError, match=r"holds only PEFT's adapter .*dualview\.apply\(model, \*\*options\)"):
        dualview.load(plain, tmp_path)
    assert not any("spatial_" in n for n, _ in plain.named_modules())


@pytest.mark.parametrize("call", ["apply", "load"])
def test_apply_and_load_refuse_a_peft_model(call, tmp_path):
    wrapped = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=2, target_modules=LORA_TARGETS))
    assert dualview.lifecycle.adapter_for(wrapped)[0] == "hf_llava"  # its host's adapter
    args = (tmp_path,) if call == "load" else ()
    with pytest.raises(ValueError, match=rf"dualview\.{call}: model is a peft\.PeftModel; dual view goes on the host"):
        getattr(dualview, call)(wrapped, *args)


@pytest.mark.parametrize("excluded, combined", [
    (None, DUAL_VIEW_EXCLUDED),
    (r".*lm_head", rf"(?:.*lm_head)|{DUAL_VIEW_EXCLUDED}"),
    (["lm_head"], ["lm_head", "spatial_embed", "spatial_gate"]),
])
def test_a_given_lora_config_keeps_its_exclusions_and_gets_the_dem_and_gate_excluded(excluded, combined):
    lora = peft.LoraConfig(r=2, target_modules=LORA_TARGETS, exclude_modules=excluded)
    model = dualview.freeze(dualview.apply(tiny_model(), **OPTIONS), "warm_start_lora", lora=lora)
    config = model.peft_config["default"]
    assert config.exclude_modules == (set(combined) if isinstance(combined, list) else combined)
    assert not any("lora_" in n for n, _ in model.named_parameters() if "spatial_" in n)
    dualview.unapply(model)
    assert config.exclude_modules == (set(excluded) if isinstance(excluded, list) else excluded)


def test_load_refuses_a_bad_peft_entry_and_a_missing_peft_adapter(tmp_path):
    model, _ = lora_model()
    dualview.save_adapter(model, tmp_path)
    meta_path = tmp_path / ADAPTER_CONFIG
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "peft": "yes"}))
    with pytest.raises(ValueError, match=r"dualview_adapter\.json': 'peft' must be a bool, got 'yes'"):
        dualview.load(tiny_model(), tmp_path)
    meta_path.write_text(json.dumps(meta))
    (tmp_path / PEFT_CONFIG).unlink()
    plain = tiny_model()
    with pytest.raises(FileNotFoundError, match=r"was saved from a PEFT model, but PEFT's .*adapter_config\.json' does not"):
        dualview.load(plain, tmp_path)
    assert not any("spatial_" in n for n, _ in plain.named_modules())


def snapshot(model):
    """Everything a load could leave behind: module classes, tensors, flags, PEFT's config attribute."""
    return ({n: type(m).__name__ for n, m in model.named_modules()},  # module classes: no PEFT layer or wrapper
            {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: m.training for n, m in model.named_modules()}, hasattr(model, "peft_config"))


def assert_same(before, after):
    assert before[0] == after[0]
    assert before[1].keys() == after[1].keys()
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    assert before[2:] == after[2:]


@pytest.mark.parametrize("damage", ["garbage-weights", "other-rank"])
@pytest.mark.parametrize("saved", ["dem-and-gate", "lm-head-too"])
def test_a_failed_peft_load_leaves_the_model_as_it_was(tmp_path, damage, saved):
    # PEFT injects its layers (and wraps its modules_to_save) before it reads the weights: a failure
    # there must leave neither behind, also on a module of the host's own (lm_head)
    if saved == "dem-and-gate":
        model, _ = lora_model()
    else:
        lora = peft.LoraConfig(r=2, target_modules=LORA_TARGETS, modules_to_save=["lm_head"])
        model = dualview.freeze(dualview.apply(tiny_model(), **OPTIONS), "warm_start_lora", lora=lora)
    dualview.save_adapter(model, tmp_path)
    if damage == "garbage-weights":
        (tmp_path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    else:
        config = json.loads((tmp_path / PEFT_CONFIG).read_text())
        (tmp_path / PEFT_CONFIG).write_text(json.dumps({**config, "r": config["r"] * 2}))
    plain = tiny_model().train()
    plain.model.vision_tower.eval()  # a mix of train modes, as a user's model may hold
    next(plain.parameters()).requires_grad_(False)
    before = snapshot(plain)
    with pytest.raises(Exception):  # noqa: B017 - PEFT's own error (safetensors' or torch's size mismatch)
        dualview.load(plain, tmp_path)
    assert_same(before, snapshot(plain))


def test_load_refuses_peft_files_that_link_out_of_the_folder(tmp_path):
    model, _ = lora_model()
    folder, elsewhere = tmp_path / "dv", tmp_path / "elsewhere"
    dualview.save_adapter(model, folder)
    elsewhere.mkdir()
    for name in (PEFT_CONFIG, "adapter_model.safetensors"):
        (folder / name).rename(elsewhere / name)
        (folder / name).symlink_to(elsewhere / name)
        plain = tiny_model()
        before = snapshot(plain)
        with pytest.raises(ValueError, match=rf"PEFT's {name} beside .* is a link to .*outside the folder"):
            dualview.load(plain, folder)
        assert_same(before, snapshot(plain))
        (folder / name).unlink()
        (elsewhere / name).rename(folder / name)
    assert isinstance(dualview.load(tiny_model(), folder), peft.PeftModel)  # put back: it loads


def test_save_adapter_removes_the_peft_files_it_wrote_before_and_refuses_foreign_ones(tmp_path):
    from dualview._output import OutputError

    model, _ = lora_model()
    dualview.save_adapter(model, tmp_path / "dv")  # with PEFT's files
    plain_dv = dualview.apply(tiny_model(), **OPTIONS)
    dualview.save_adapter(plain_dv, tmp_path / "dv")  # no LoRA now: the old one must not stay loadable
    left = sorted(p.name for p in (tmp_path / "dv").iterdir() if p.name != "README.md")  # PEFT's card: read by no loader
    assert left == sorted([ADAPTER_CONFIG, "dualview_adapter.safetensors"])
    inputs = _inputs(((40, 70),))
    loaded = dualview.load(tiny_model(), tmp_path / "dv")
    torch.testing.assert_close(logits(loaded, inputs), logits(plain_dv, inputs), rtol=0, atol=0)

    model.save_pretrained(tmp_path / "trainer")  # PEFT's files that dualview did not write
    before = {p.name: p.read_bytes() for p in (tmp_path / "trainer").iterdir()}
    with pytest.raises(OutputError, match=r"holds PEFT's \['adapter_config.json', 'adapter_model.safetensors'\], which "
                                          r"dualview.save_adapter did not write"):
        dualview.save_adapter(plain_dv, tmp_path / "trainer")
    assert {p.name: p.read_bytes() for p in (tmp_path / "trainer").iterdir()} == before


def test_freeze_leaves_the_callers_lora_config_as_it_was():
    # PEFT keeps the config object as the model's: editing the caller's would tie two models' configs
    lora = peft.LoraConfig(r=2, target_modules=LORA_TARGETS, modules_to_save=["lm_head"])
    first = dualview.freeze(dualview.apply(tiny_model(), **OPTIONS), "warm_start_lora", lora=lora)
    second = dualview.freeze(dualview.apply(tiny_model(), **OPTIONS), "warm_start_lora", lora=lora)
    assert lora.modules_to_save == ["lm_head"] and lora.exclude_modules is None
    assert first.peft_config["default"] is not second.peft_config["default"]
    dualview.unapply(first)
    assert set(second.peft_config["default"].modules_to_save) == {"lm_head", "spatial_embed", "spatial_gate"}

