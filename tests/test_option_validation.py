"""Every option of the public entry points is type- and range-checked when it is given: ``DCM``, ``DEM``,
``DualViewEncoder``, ``dualview.apply`` (each adapter's options) and ``dualview.load`` (the options read
back from an adapter folder). A bad value is ONE ValueError naming the option, the expectation and the
value (``..., got 'x'``); a bool is not an int, a truthy string is not a bool, a float is finite and in
range. A refused ``apply`` / ``load`` leaves the model plain (no ``config.dualview``, no ``spatial_embed``).
Valid values at the edge of each range are still taken."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import transformers

import dualview
from dualview import DCM, DEM, DualViewEncoder
from dualview.adapters import hf_llava
from dualview.adapters._common import DualViewOptions
from dualview.gate import DualViewGate
from dualview.lifecycle import ADAPTER_CONFIG

from . import idefics3_models, internvl_models, llava_onevision_models
from . import llava_next_models
from .llava_models import tiny_model

NAN, INF = math.nan, math.inf


def cases(table: dict) -> list:
    """``{option: [bad value, ...]}`` as pytest params ``(option, value)``, ids ``option=value``."""
    return [pytest.param(name, value, id=f"{name}={value!r}") for name, values in table.items() for value in values]


def refused(error: pytest.ExceptionInfo, name: str, value: object, got: str = None) -> None:
    """The message names the option (``name must be ...``) and ends with the value given."""
    message = str(error.value)
    assert re.search(rf"\b{name}\b[^,]* must be ", message), message
    assert message.endswith(f", got {got if got is not None else repr(value)}"), message


NOT_A_BOOL = ["yes", "no", "False", 1, 0, None, np.bool_(True)]
NOT_A_POSITIVE_INT = [0, -1, 3.0, True, "3", None]

# ---- DCM ---------------------------------------------------------------------------------------------

DCM_BAD = {
    "crop_size": NOT_A_POSITIVE_INT,
    "grid": [3, "3", "3by3", (0, 3), (2, 33), (True, 2), (2.0, 3), None],
    "fit": ["crop", None, True],
    "thumbnail": NOT_A_BOOL,
    "max_tiles": NOT_A_POSITIVE_INT,  # with the fixed default grid too, where it used to be recorded unread
    "interpolation": ["lanczos", None],
    "antialias": NOT_A_BOOL,
    "pad_value": ["0", None, NAN, INF, -INF, True, torch.tensor(0.0)],
    "channels": NOT_A_POSITIVE_INT,
    "allow_small": NOT_A_BOOL,
    "check_finite": NOT_A_BOOL,
}


@pytest.mark.parametrize("name, value", cases(DCM_BAD))
def test_dcm_refuses_each_bad_option_naming_it(name, value):
    with pytest.raises(ValueError) as error:
        DCM(**{"crop_size": 10, name: value})
    refused(error, name, value)


@pytest.mark.parametrize("value, got", [("x", "'x'"), ([], "[]"), ([[0, 20]], "[0, 20]"), ([[20]], "[20]"),
                                        ([["20", "20"]], "['20', '20']"), ([(20, 20.0)], "(20, 20.0)")])
def test_dcm_refuses_bad_pinpoints_naming_them(value, got):
    with pytest.raises(ValueError) as error:
        DCM(10, "auto", pinpoints=value)
    refused(error, "pinpoints", value, got)


def test_dcm_takes_the_edges_of_every_range():
    dcm = DCM(1, (1, 1), max_tiles=1, pad_value=-1, channels=1, thumbnail=False, antialias=True, allow_small=True,
              check_finite=True)
    assert (dcm.crop_size, dcm.grid, dcm.pad_value, dcm.thumbnail, dcm.antialias) == (1, (1, 1), -1.0, False, True)
    assert type(dcm.pad_value) is float
    assert DCM(10, "auto", max_tiles=1).candidates == [(1, 1)]
    assert DCM(10, "2x3").grid == DCM(10, [2, 3]).grid == (2, 3)
    assert DCM(10, (32, 32), pad_value=np.float32(0.5)).pad_value == 0.5
    assert DCM(10, "auto", pinpoints=[[10, 20], (20, 10)]).candidates == [(1, 2), (2, 1)]


# ---- DEM ---------------------------------------------------------------------------------------------

DEM_BAD = {
    "dim": NOT_A_POSITIVE_INT,
    "num_heads": NOT_A_POSITIVE_INT,
    "out_size": ["24", 0, -2, True, 2.5, (0, 4), (4,), (True, 4), [4, "4"]],
    "directions": ["global", None, True],
    "fusion": ["mul", None],
    "resample": ["nearest", True, "none"],
    "ffn_hidden": [0, -1, 2.0, True, "4"],
    "eps": ["x", "1e-5", None, -1.0, 0, 0.0, NAN, INF, -INF, True, [1e-5], torch.tensor(1e-5)],
    "fused_attn": NOT_A_BOOL,
    "fast": NOT_A_BOOL,
}


@pytest.mark.parametrize("name, value", cases(DEM_BAD))
def test_dem_refuses_each_bad_option_naming_it(name, value):
    with pytest.raises(ValueError) as error:
        DEM(**{"dim": 16, "num_heads": 2, "out_size": (4, 4), name: value})
    refused(error, name, value)


@pytest.mark.parametrize("value", [0, 2.0, True])
def test_dem_checks_ffn_hidden_with_a_fusion_that_does_not_read_it(value):
    with pytest.raises(ValueError, match=rf"ffn_hidden must be a positive int or None, got {value!r}"):
        DEM(16, 2, fusion="add", ffn_hidden=value)


def test_dem_takes_the_edges_of_every_range():
    dem = DEM(2, 1, out_size=1, ffn_hidden=1, eps=1e-12, fused_attn=False, fast=False)
    assert (dem.out_size, dem.ln_fuse.eps, dem.attention.ln.eps, dem.fast) == ((1, 1), 1e-12, 1e-12, False)
    assert DEM(16, 2, eps=1).ln_fuse.eps == 1.0 and DEM(16, 2, eps=np.float32(0.5)).ln_fuse.eps == 0.5
    assert DEM(16, 2, out_size=None, resample=None).out_size is None
    feats = torch.randn(1, 4, 4, 2)
    assert torch.isfinite(dem(feats, feats, (2, 2))).all()


# ---- DualViewEncoder ---------------------------------------------------------------------------------

def _tower(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.new_zeros(pixels.shape[0], 4, 16)


def _encoder(**options) -> DualViewEncoder:
    return DualViewEncoder(_tower, DCM(10, (2, 2)), DEM(16, 2, out_size=(2, 2)), **options)


ENCODER_BAD = {
    "thumbnail_fusion": ["avg", None, True],
    "tower_batch_size": [0, -1, 2.0, True, "4", "ALL"],
    "patch_size": [0, -5, 5.0, True, "5"],
    "init": ["zero", None, True],
}


@pytest.mark.parametrize("name, value", cases(ENCODER_BAD))
def test_encoder_refuses_each_bad_option_naming_it(name, value):
    with pytest.raises(ValueError) as error:
        _encoder(**{name: value})
    refused(error, name, value)


@pytest.mark.parametrize("name, value, match", [
    ("tower", "clip", "tower must be callable"),
    ("dcm", "3x3", "dcm must be a dualview.DCM, got str"),
    ("dem", None, "dem must be a dualview.DEM, got NoneType"),
    ("compile", "yes", "compile must be a bool or a dict of torch.compile options, got str"),
    ("gate", torch.nn.Identity(), "gate must be a dualview.gate.DualViewGate, got Identity"),
])
def test_encoder_refuses_objects_of_the_wrong_type_naming_them(name, value, match):
    args = dict(tower=_tower, dcm=DCM(10, (2, 2)), dem=DEM(16, 2, out_size=(2, 2)), init="identity")
    with pytest.raises(TypeError, match=match):
        DualViewEncoder(**{**args, name: value})


def test_encoder_takes_the_edges_of_every_range():
    assert _encoder(tower_batch_size=1).tower_chunks(3) == [1, 1, 1]
    assert _encoder(tower_batch_size="all").tower_chunks(3) == [3]
    assert _encoder(patch_size=5).feat_size == (2, 2)
    assert isinstance(_encoder(init="identity", gate=DualViewGate(16)).gate, DualViewGate)
    assert _encoder(tower_batch_size=None, patch_size=None).patch_size is None


# ---- dualview.apply: every adapter option --------------------------------------------------------------

OPTIONS_BAD = {
    "grid": [3, "3", (0, 3), (2, 33), (True, 2), (2.0, 3), None],
    "fit": ["crop", None, True, np.array("squash")],  # a 0-d array equals "squash" but is no JSON string
    "max_tiles": NOT_A_POSITIVE_INT,
    "pinpoints": ["x", [], 5],
    "num_heads": NOT_A_POSITIVE_INT,
    "out_size": ["big", 0, -2, True, 2.5, (0, 2), (2,), (True, 2), [2, "2"]],
    "directions": ["global", None, True, np.array("both")],
    "fusion": ["mul", None, np.array("add")],
    "resample": ["nearest", True, "none", np.array("bilinear")],
    "thumbnail_fusion": ["avg", None, False, np.array("mean")],
    "tower_batch_size": [0, -1, 2.0, True, "4", "ALL", np.array("all")],
    "ffn_hidden": [0, -1, 2.0, True, "8"],
    "eps": ["x", "1e-5", None, -1.0, 0, 0.0, NAN, INF, -INF, True, [1e-5]],
    "init": ["zero", None, True, np.array("identity")],
    "fast": ["no", "yes", "False", 1, 0, None],
}


def assert_plain(model: torch.nn.Module) -> None:
    """No trace of dual view: no recorded options, no DEM or gate, no dual-view class."""
    assert not hasattr(model.config, "dualview")
    assert not [n for n, _ in model.named_modules() if n.endswith(("spatial_embed", "spatial_gate"))]
    with pytest.raises(ValueError, match="has no dual view"):
        dualview.lifecycle.dual_view_host(model)


@pytest.fixture(scope="module")
def llava():
    """One plain tiny LLaVA for every refused apply: each must leave it plain for the next."""
    return tiny_model()


def test_the_option_table_walks_every_option():
    assert set(OPTIONS_BAD) == set(DualViewOptions.__dataclass_fields__)


@pytest.mark.parametrize("name, value", cases(OPTIONS_BAD))
def test_apply_refuses_each_bad_option_naming_it_and_leaves_the_model_plain(llava, name, value):
    with pytest.raises(ValueError) as error:
        dualview.apply(llava, **{"grid": (2, 3), "num_heads": 4, name: value})
    refused(error, name, value)
    assert_plain(llava)
    assert type(llava.model) is transformers.LlavaModel


def test_apply_takes_the_edges_of_every_range_and_records_them_as_json(tmp_path):
    model = dualview.apply(tiny_model(), grid="1x1", max_tiles=1, num_heads=1, out_size=1, thumbnail_fusion="concat",
                           ffn_hidden=1, tower_batch_size=1, eps=np.float32(0.25), fast=False)
    recorded = model.config.dualview
    assert (recorded["grid"], recorded["out_size"], recorded["eps"], recorded["fast"]) == ([1, 1], [1, 1], 0.25, False)
    assert model.model.spatial_embed.ln_fuse.eps == 0.25 and model.model.spatial_embed.out_size == (1, 1)
    dualview.save_adapter(model, tmp_path)  # a numpy eps recorded as a float: the options stay JSON
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text())["options"]["eps"] == 0.25
    model = dualview.apply(tiny_model(), grid="auto", max_tiles=4, pinpoints=None, out_size=None, resample=None,
                           thumbnail_fusion="concat", tower_batch_size="all", eps=1e-12)
    assert model.config.dualview["tower_batch_size"] == "all" and model.config.dualview["eps"] == 1e-12


def _llava15_model(tmp_path):
    from .llava15_models import save_tower, tiny_model as llava15_model

    return llava15_model(save_tower(tmp_path / "clip", 28))


HOSTS = {
    "hf_llava": lambda tmp_path: tiny_model(),
    "hf_llava_next": lambda tmp_path: llava_next_models.tiny_model(),
    "hf_llava_onevision": lambda tmp_path: llava_onevision_models.tiny_model(),
    "hf_internvl": lambda tmp_path: internvl_models.tiny_model(),
    "hf_idefics3": lambda tmp_path: idefics3_models.tiny_model(),
    "llava15": _llava15_model,
}


@pytest.mark.parametrize("host", HOSTS)
def test_every_adapter_refuses_bad_options_before_the_model_changes(tmp_path, host):
    """The hosts with fixed options (AnyRes, InternVL, Idefics3) check the free ones all the same."""
    model = HOSTS[host](tmp_path)
    for name, value in [("eps", "x"), ("eps", -1.0), ("fast", "no"), ("num_heads", True), ("ffn_hidden", 0),
                        ("tower_batch_size", 2.0)]:
        with pytest.raises(ValueError) as error:
            dualview.apply(model, **{name: value})
        refused(error, name, value)
        assert_plain(model)


# ---- dualview.load / from_pretrained: options read back from a folder ----------------------------------

LOAD_BAD = [("eps", "x"), ("eps", None), ("eps", -1.0), ("eps", 0), ("max_tiles", 0), ("max_tiles", 9.5),
            ("fast", "no"), ("fast", 1), ("grid", 3), ("grid", [2, 0]), ("out_size", "big"), ("num_heads", "4"),
            ("tower_batch_size", 0), ("init", "zero"), ("ffn_hidden", True)]


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    dualview.save_adapter(dualview.apply(tiny_model(), grid=(2, 3), num_heads=4, init="identity"), folder)
    return folder


@pytest.mark.parametrize("name, value", [pytest.param(n, v, id=f"{n}={v!r}") for n, v in LOAD_BAD])
def test_load_refuses_a_hand_edited_option_naming_the_file_and_leaves_the_model_plain(
        llava, adapter_folder, tmp_path, name, value):
    meta = json.loads((adapter_folder / ADAPTER_CONFIG).read_text())
    meta["options"][name] = value
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(meta))
    (tmp_path / meta["weights"]).write_bytes((adapter_folder / meta["weights"]).read_bytes())
    with pytest.raises(ValueError) as error:
        dualview.load(llava, tmp_path)
    assert str(error.value).startswith(f"{str(tmp_path / ADAPTER_CONFIG)!r}: 'options': ")
    refused(error, name, value)
    assert_plain(llava)


def test_load_still_takes_an_unedited_folder(adapter_folder):
    model = dualview.load(tiny_model(), adapter_folder)
    assert model.config.dualview["grid"] == [2, 3] and model.model.spatial_gate is not None


def test_from_pretrained_refuses_a_hand_edited_option_in_config_json(tmp_path):
    dualview.apply(tiny_model(), grid=(2, 3), num_heads=4).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["dualview"]["eps"] = "x"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0, got 'x'$"):
        dualview.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0, got 'x'$"):
        hf_llava.from_pretrained(tmp_path)



def test_a_choice_must_be_of_its_own_type():
    # the shared validator: True is not the choice 1 (bool is an int), a 0-d array is not the string it equals
    from dualview._checks import check_choice

    check_choice(1, "n", (1, 2))
    check_choice(np.str_("a"), "s", ("a", "b"))  # a str subclass: records as a JSON string
    for value, choices in ((True, (1, 2)), (1, (True, False)), (np.array("a"), ("a", "b")), (np.int64(1), (1, 2))):
        with pytest.raises(ValueError, match=r"must be one of"):
            check_choice(value, "n", choices)
