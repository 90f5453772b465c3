"""What ``apply`` makes and what it refuses, beside the per-host battery (tests/host_battery.py): the
host class itself (not a subclass, where the adapter says so), the DEM and gate in the model's
precision, a gate the host cannot train, a DEM set to None, a processor where the model decides the budget, a
processor preparation that cannot work."""

from __future__ import annotations

import pytest
import torch
import transformers

from dualview.adapters import hf_llava
from dualview.gate import DualViewGate

from . import llava_models as llava
from . import tiny_models as tiny
from .test_adapter_hf_llava import adapted


def _prompt_inputs(model, size=(40, 70)):
    processor = hf_llava.prepare_processor(llava.tiny_processor(), model)
    return dict(processor(images=tiny.pil_image(*size), text=tiny.PROMPT, return_tensors="pt"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_apply_to_a_half_precision_model_makes_the_dem_and_gate_in_its_precision(dtype):
    model = hf_llava.apply(llava.tiny_model().to(dtype), grid=(2, 3), num_heads=4, init="identity")
    own = [*model.model.spatial_embed.parameters(), model.model.spatial_gate.g]
    assert {p.dtype for p in own} == {dtype} and not model.model.spatial_gate.g.any()
    inputs = _prompt_inputs(model)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        assert model(**inputs).logits.dtype == dtype


def test_a_gate_the_host_cannot_train_is_refused_at_assignment():
    model = hf_llava.apply(llava.tiny_model(), grid=(2, 3), num_heads=4, init="identity")
    gate, dim = model.model.spatial_gate, model.model.spatial_embed.dim
    with pytest.raises(ValueError, match=r"spatial_gate must have init='identity' \(a learnable g\), got init='released'"):
        model.model.spatial_gate = DualViewGate(dim, init="released")
    with pytest.raises(ValueError, match=rf"spatial_gate must have dim={dim} \(the DEM's\), got dim={dim + 1}"):
        model.model.spatial_gate = DualViewGate(dim + 1)
    assert model.model.spatial_gate is gate


def test_a_refused_none_assignment_leaves_the_registered_dem_in_place():
    """``spatial_embed = None`` is refused before it replaces the DEM (as every wrong DEM is): the
    registered DEM stays, and the model keeps working."""
    model, _ = adapted()
    dem = model.model.spatial_embed
    with pytest.raises((TypeError, ValueError), match="spatial_embed"):
        model.model.spatial_embed = None
    assert model.model._modules.get("spatial_embed") is dem


def test_prepare_processor_needs_a_fixed_grid_and_leaves_the_processor_plain():
    model = hf_llava.apply(llava.tiny_model(), grid="auto")
    processor = llava.tiny_processor()
    image_processor = processor.image_processor
    with pytest.raises(ValueError, match="prepare_processor needs a fixed grid, got grid='auto'"):
        hf_llava.prepare_processor(processor, model)
    assert type(processor) is transformers.LlavaProcessor and processor.image_processor is image_processor


def test_budget_refuses_a_processor_where_the_model_decides_the_grid():
    model = hf_llava.apply(llava.tiny_model(), grid=(2, 3))
    assert hf_llava.budget(model, (40, 70)) == hf_llava.encoder_of(model).budget((40, 70))
    with pytest.raises(ValueError, match="processor must be None for hf_llava: the model's options and config decide"):
        hf_llava.budget(model, (40, 70), processor=llava.tiny_processor())


def test_a_dem_or_gate_assigned_where_the_dem_does_not_live_is_refused_naming_where_it_does(tmp_path):
    """llava-torch's outer model is a dual-view class too, but the DEM and gate live on ``get_model()``: a DEM
    assigned on the outer model would shadow the one there (it is the first the image hook finds) and be
    saved beside it."""
    pytest.importorskip("llava")
    import copy

    from dualview.adapters import llava15

    from .llava15_models import save_tower, tiny_model

    model = llava15.apply(tiny_model(save_tower(tmp_path, 28)), init="identity")
    dem, gate = model.get_model().spatial_embed, model.get_model().spatial_gate
    for name, module in (("spatial_embed", dem), ("spatial_gate", gate)):
        with pytest.raises(TypeError, match=rf"{name} cannot be assigned on this DualViewLlavaLlamaForCausalLM: dual "
                                            r"view's DEM and gate live on its submodule 'model'; assign it there"):
            setattr(model, name, copy.deepcopy(module))
    assert not {"spatial_embed", "spatial_gate"} & model._modules.keys()
    assert model.get_model().spatial_embed is dem and model.get_model().spatial_gate is gate
