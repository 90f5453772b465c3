"""A user's subclass of a supported host class: ``dualview.apply`` accepts it where dual view swaps
only the inner model's class (LLaVA, LLaVA-NeXT, OneVision, InternVL): the model keeps its class and
methods, ``init="identity"`` gives the plain subclass's logits bit for bit, and ``unapply`` gives it
back. Where dual view swaps the class of the model given (Idefics3 / SmolVLM, llava-torch's
LLaVA-1.5), a subclass is refused with the reason."""

from __future__ import annotations

import copy

import pytest
import torch

import dualview

from . import idefics3_models, test_adapter_hf_internvl, test_adapter_hf_llava, test_adapter_hf_llava_next
from . import test_adapter_hf_llava_onevision
from .host_battery import HostBattery, logits


def user_subclass(cls: type) -> type:
    class UserHost(cls):
        """What a user writes: the host class plus a method of their own."""

        def describe(self) -> str:
            return f"user {cls.__name__}"

    UserHost.__name__ = UserHost.__qualname__ = f"User{cls.__name__}"
    return UserHost


@pytest.mark.parametrize("tests", [test_adapter_hf_llava, test_adapter_hf_llava_next, test_adapter_hf_llava_onevision,
                                   test_adapter_hf_internvl], ids=lambda m: m.__name__.rsplit("_adapter_", 1)[1])
def test_a_user_subclass_is_adapted_and_is_its_plain_self_under_identity_init(tests):
    case = tests.TestHostBattery.case()
    base = case.build()
    cls = user_subclass(type(base))
    plain = cls(base.config).eval()
    plain.load_state_dict(base.state_dict())
    inner = type(plain.model)
    model = dualview.apply(copy.deepcopy(plain), **{**case.options, "init": "identity"})
    assert type(model) is cls and model.describe() == f"user {type(base).__name__}"
    assert dualview.lifecycle.adapter_for(model)[1].__module__ == case.adapter.__name__ and type(model.model).dualview_plain is inner
    inputs, plain_inputs = HostBattery.plain_twin_inputs(case, model, case.sizes)
    torch.testing.assert_close(logits(model, inputs), logits(plain, plain_inputs), rtol=0, atol=0)
    with torch.no_grad():  # dual view runs: a moved gate moves the output
        dualview.lifecycle.dual_view_host(model).dualview_gate.g.fill_(0.5)
    assert not torch.allclose(logits(model, inputs), logits(plain, plain_inputs))
    dualview.unapply(model)
    assert type(model) is cls and type(model.model) is inner and not hasattr(model.config, "dualview")
    # the inner model's own class is swapped: a subclass of it is refused, saying why
    model.model.__class__ = user_subclass(inner)
    with pytest.raises(TypeError, match=rf"got User{inner.__name__} \(a subclass of {inner.__name__}: dual view swaps "
                                        rf"this module's class"):
        dualview.apply(model, **case.options)
    assert type(model.model).__name__ == f"User{inner.__name__}" and not hasattr(model.config, "dualview")


def test_a_subclass_of_a_host_whose_own_class_is_swapped_is_refused_saying_why():
    base = idefics3_models.tiny_model()
    for model in (user_subclass(type(base))(base.config), user_subclass(type(base.model))(base.config)):
        plain = type(model).__mro__[1].__name__
        with pytest.raises(TypeError, match=rf"got {type(model).__name__} \(a subclass of {plain}: dual view swaps this "
                                            rf"module's class for a subclass of {plain}, which would drop "
                                            rf"{type(model).__name__}'s own methods; apply it to a plain {plain}\)"):
            dualview.apply(model)
        assert type(model).__name__.startswith("User") and not hasattr(model.config, "dualview")


def test_a_subclass_of_a_llava15_host_is_refused_saying_why(tmp_path):
    pytest.importorskip("llava")
    from .llava15_models import LlavaLlamaForCausalLM, save_tower, tiny_model

    cls = user_subclass(LlavaLlamaForCausalLM)
    model = tiny_model(save_tower(tmp_path, 28), cls=cls)
    with pytest.raises(TypeError, match=r"got UserLlavaLlamaForCausalLM \(a subclass "
                                        r"of LlavaLlamaForCausalLM: .*which would drop UserLlavaLlamaForCausalLM's own"):
        dualview.apply(model)
    assert type(model) is cls and not hasattr(model.config, "dualview")
