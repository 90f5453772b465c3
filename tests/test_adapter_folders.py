"""Adapter-only folders (``dualview.save_adapter`` / ``dualview.load``) and whole-model folders
(``dualview.from_pretrained``) on the tiny transformers Llava: which files ``load`` follows (links out
of the folder are refused, the Hugging Face cache's own layout is followed), ``load`` onto a host that
the plain class loaded from a whole dual-view folder, a failed ``load`` that changes nothing, the
``subfolder`` of ``from_pretrained``, and ``save_adapter``'s all-or-nothing writes. An adapter's own
``from_pretrained`` reads the DEM from the files the host's weights come from (``subfolder``,
``variant``, ``use_safetensors``) and refuses what it cannot honour (a hub id, ``state_dict``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import transformers

import dualview
from dualview._output import OutputError
from dualview.adapters import hf_llava
from dualview.adapters._common import expecting_unexpected_keys
from dualview.lifecycle import ADAPTER_CONFIG, ADAPTER_WEIGHTS

from .llava_models import tiny_model
from .test_adapter_hf_llava import _inputs, adapted
from .test_lifecycle import OPTIONS, logits, trained


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained adapted model, its logits on one image, its adapter folder and its whole folder."""
    root = tmp_path_factory.mktemp("saved")
    model = trained(dualview.apply(tiny_model(), **OPTIONS))
    inputs = _inputs(((40, 70),))
    dualview.save_adapter(model, root / "dv")
    model.save_pretrained(root / "whole")
    return dict(model=model, inputs=inputs, expected=logits(model, inputs), adapter=root / "dv", whole=root / "whole")


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, cls, config, state):
    """``model`` is what it was: its inner class, its config (``config.dualview`` included), its tensors."""
    assert type(model.model) is cls and model.config.to_dict() == config
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


# ---- which files load follows -----------------------------------------------------------------------


def hub_snapshot(root: Path, repo: str, files: dict) -> Path:
    """The Hugging Face cache's layout: ``<repo>/snapshots/<rev>/<name>`` -> ``../../blobs/<hash>``."""
    snap = root / repo / "snapshots" / "0123abcd"
    (root / repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for i, (name, source) in enumerate(files.items()):
        shutil.copy(source, root / repo / "blobs" / f"blob{i}")
        (snap / name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    return snap


def test_load_follows_the_hub_cache_layout_and_refuses_other_links_out_of_the_folder(saved, tmp_path):
    files = {name: saved["adapter"] / name for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)}
    snap = hub_snapshot(tmp_path / "hub", "models--owner--dv", files)
    loaded = dualview.load(tiny_model(), snap)
    torch.testing.assert_close(logits(loaded, saved["inputs"]), saved["expected"], rtol=0, atol=0)

    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):  # a link to a file of another folder
        bad = tmp_path / f"out-{name}"
        shutil.copytree(saved["adapter"], bad)
        (bad / name).unlink()
        (bad / name).symlink_to(files[name])
        plain = tiny_model()
        with pytest.raises(ValueError, match=rf"{re.escape(str(bad / name))}' is a link to "
                                             rf"'{re.escape(str(files[name].resolve()))}', outside the folder"):
            dualview.load(plain, bad)
        assert type(plain.model) is transformers.LlavaModel and not hasattr(plain.config, "dualview")

    # a snapshot linking into the blobs of another cache repository, or a "snapshots" folder outside a models-- one
    other = hub_snapshot(tmp_path / "hub", "models--owner--other", files)
    (other / ADAPTER_WEIGHTS).unlink()
    (other / ADAPTER_WEIGHTS).symlink_to(Path("..", "..", "..", "models--owner--dv", "blobs", "blob0"))
    plain = hub_snapshot(tmp_path / "not-hub", "owner-dv", files)
    for folder in (other, plain):
        with pytest.raises(ValueError, match="outside the folder"):
            dualview.load(tiny_model(), folder)


# ---- load onto a host loaded by the plain class; a failed load ------------------------------------


def test_load_onto_a_plain_class_load_of_a_whole_folder_does_not_warn_and_a_failed_load_changes_nothing(saved, tmp_path):
    """The plain class loads a whole dual-view folder without the DEM and keeps ``config.dualview``:
    ``dualview.load`` of the adapter restores the trained DEM and gate (no "untrained DEM" warning);
    a load that fails, before or after dual view is applied, leaves that model exactly as it was."""
    from safetensors.torch import load_file, save_file

    model = transformers.LlavaForConditionalGeneration.from_pretrained(saved["whole"]).eval()
    assert model.config.dualview == saved["model"].config.dualview
    config, state = model.config.to_dict(), state_of(model)

    missing = tmp_path / "missing"  # fails after apply: the gate's weight is missing
    shutil.copytree(saved["adapter"], missing)
    tensors = load_file(str(missing / ADAPTER_WEIGHTS))
    del tensors["spatial_gate.g"]
    save_file(tensors, str(missing / ADAPTER_WEIGHTS))
    unknown = tmp_path / "unknown"  # fails in apply: an unknown option
    shutil.copytree(saved["adapter"], unknown)
    meta = json.loads((unknown / ADAPTER_CONFIG).read_text())
    (unknown / ADAPTER_CONFIG).write_text(json.dumps({**meta, "options": {**meta["options"], "colour": 1}}))
    for folder, match in ((missing, r"missing keys \['g'\]"), (unknown, r"unknown dual-view option\(s\) \['colour'\]")):
        with pytest.raises((ValueError, TypeError), match=match):
            dualview.load(model, folder)
        assert_unchanged(model, transformers.LlavaModel, config, state)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dualview.load(model, saved["adapter"])
    torch.testing.assert_close(logits(model, saved["inputs"]), saved["expected"], rtol=0, atol=0)


def test_load_onto_a_model_with_dual_view_already_changes_nothing(saved):
    model = dualview.apply(tiny_model(), **OPTIONS)
    config, state = model.config.to_dict(), state_of(model)
    cls = type(model.model)
    with pytest.raises(ValueError, match="already applied"):
        dualview.load(model, saved["adapter"])
    assert_unchanged(model, cls, config, state)


# ---- from_pretrained -----------------------------------------------------------------------------------


def test_from_pretrained_honours_subfolder_and_points_an_adapter_folder_to_load(saved, tmp_path):
    shutil.copytree(saved["whole"], tmp_path / "repo" / "llava")
    loaded = dualview.from_pretrained(tmp_path / "repo", subfolder="llava")
    assert type(loaded.model).__name__ == "DualViewLlavaModel"
    torch.testing.assert_close(logits(loaded, saved["inputs"]), saved["expected"], rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "repo" / "nothing" / "config.json"))):
        dualview.from_pretrained(tmp_path / "repo", subfolder="nothing")

    shutil.copytree(saved["adapter"], tmp_path / "repo" / "dv")
    for path, kwargs in ((saved["adapter"], {}), (tmp_path / "repo", {"subfolder": "dv"})):
        folder = str(Path(path, *kwargs.values()))
        with pytest.raises(ValueError, match=rf"{re.escape(folder)}' holds a dual-view adapter \({ADAPTER_CONFIG}, "
                                             r"written by dualview.save_adapter\), not a whole model: .*"
                                             rf"dualview.load\(model, '{re.escape(folder)}'\)"):
            dualview.from_pretrained(path, **kwargs)


# ---- save_adapter writes all or nothing ---------------------------------------------------------------


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_save_adapter_writes_both_files_with_one_mode_and_refuses_a_file_at_the_path(saved, tmp_path):
    model = saved["model"]
    folder = dualview.save_adapter(model, tmp_path / "new" / "dv")
    assert sorted(p.name for p in folder.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    modes = {name: (folder / name).stat().st_mode & 0o777 for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
    assert set(modes.values()) == {0o666 & ~umask()}, modes
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["dv"]  # no temporary left beside it
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        assert (folder / name).read_bytes() == (saved["adapter"] / name).read_bytes()

    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OutputError, match=rf"folder '{re.escape(str(tmp_path / 'file'))}' is an existing file, not a folder"):
        dualview.save_adapter(model, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "not a folder"

    (tmp_path / "held").mkdir()
    (tmp_path / "held" / ADAPTER_CONFIG).mkdir()
    with pytest.raises(OutputError, match=rf"'{re.escape(str(tmp_path / 'held' / ADAPTER_CONFIG))}' is a folder"):
        dualview.save_adapter(model, tmp_path / "held")
    assert [p.name for p in (tmp_path / "held").iterdir()] == [ADAPTER_CONFIG]


def test_a_failed_save_adapter_leaves_no_half_folder_and_keeps_the_old_files(saved, tmp_path, monkeypatch):
    import safetensors.torch

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    model = saved["model"]
    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(OutputError, match=rf"folder '{re.escape(str(tmp_path / 'dv'))}' could not be written: "
                                          r"No space left on device"):
        dualview.save_adapter(model, tmp_path / "dv")
    assert list(tmp_path.iterdir()) == []

    old = tmp_path / "old"
    shutil.copytree(saved["adapter"], old)
    (old / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    with pytest.raises(OutputError, match="No space left on device"):
        dualview.save_adapter(model, old)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]

    monkeypatch.undo()  # a save into an existing folder replaces the two files and keeps the others
    other = dualview.apply(tiny_model(), **OPTIONS)  # g = 0, not the saved one
    dualview.save_adapter(other, old)
    assert (old / "notes.txt").read_text() == "mine" and sorted(p.name for p in old.iterdir()) == sorted(before)
    assert torch.equal(dualview.load(tiny_model(), old).model.spatial_gate.g, torch.zeros_like(other.model.spatial_gate.g))


def test_a_folder_another_writer_made_meanwhile_is_joined_not_refused(tmp_path, monkeypatch):
    # two ranks of a DDP / ZeRO-2 job saving the same adapter: the second finds the first's folder at
    # its rename ("Directory not empty"); its files then replace those of the same names
    from dualview import _output
    from dualview._output import write_files_atomically

    target = tmp_path / "dv"
    real = _output._write_new_file

    def and_another_writer(path, write):
        real(path, write)
        if not target.exists():
            target.mkdir()
            (target / "a.txt").write_text("the other rank's")
            (target / "theirs.txt").write_text("kept")

    monkeypatch.setattr(_output, "_write_new_file", and_another_writer)
    write_files_atomically(target, {"a.txt": lambda p: p.write_text("mine"), "b.txt": lambda p: p.write_text("b")})
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a.txt": "mine", "b.txt": "b", "theirs.txt": "kept"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dv"]  # no temporary folder left


def test_a_file_given_as_none_is_removed_from_an_existing_folder_and_never_written(tmp_path):
    from dualview._output import write_files_atomically

    (tmp_path / "old.txt").write_text("stale")
    write_files_atomically(tmp_path, {"new.txt": lambda p: p.write_text("n"), "old.txt": None, "absent.txt": None})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.txt"]
    write_files_atomically(tmp_path / "fresh", {"new.txt": lambda p: p.write_text("n"), "old.txt": None})
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == ["new.txt"]


class _Host:
    _keys_to_ignore_on_load_unexpected = [r"^own\."]


class _Inheriting(_Host):
    pass


def test_expecting_unexpected_keys_adds_the_patterns_for_the_block_only():
    """The class's own patterns stay first; on exit (also by an exception) the class is as before:
    its own list back, an inherited one not shadowed by a copy."""
    own = _Host._keys_to_ignore_on_load_unexpected
    with expecting_unexpected_keys(_Host, "a", "b"):
        assert _Host._keys_to_ignore_on_load_unexpected == [r"^own\.", "a", "b"]
    assert _Host.__dict__["_keys_to_ignore_on_load_unexpected"] is own == [r"^own\."]
    with pytest.raises(KeyError), expecting_unexpected_keys(_Inheriting, "c"):
        assert _Inheriting._keys_to_ignore_on_load_unexpected == [r"^own\.", "c"]
        raise KeyError("inside")
    assert "_keys_to_ignore_on_load_unexpected" not in _Inheriting.__dict__
    with expecting_unexpected_keys(transformers.PreTrainedModel, "d"):
        assert transformers.PreTrainedModel._keys_to_ignore_on_load_unexpected == ["d"]
    assert transformers.PreTrainedModel.__dict__["_keys_to_ignore_on_load_unexpected"] is None


# ---- an adapter's from_pretrained: the DEM from the files the host's weights come from -------------


def _dem_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _two_adapted_models():
    """Two adapted hf_llava models that differ only in their DEM weights (b = a + 1)."""
    a, _ = adapted()
    b, _ = adapted()
    with torch.no_grad():
        for pa, pb in zip(a.model.spatial_embed.parameters(), b.model.spatial_embed.parameters()):
            pb.copy_(pa + 1.0)
    return a, b


def test_from_pretrained_with_subfolder_restores_the_dem_of_that_subfolder(tmp_path):
    """``subfolder``: the DEM comes from the subfolder the host's weights come from, not from the parent
    folder's checkpoint (a run folder with its final model and checkpoint-N/ subfolders)."""
    a, b = _two_adapted_models()
    a.save_pretrained(tmp_path)  # e.g. the final model
    b.save_pretrained(tmp_path / "checkpoint-500")  # an intermediate checkpoint
    loaded = hf_llava.from_pretrained(tmp_path, subfolder="checkpoint-500")
    same = _dem_equal(loaded.model.spatial_embed, b.model.spatial_embed)
    assert same, "the DEM came from the parent folder, not from subfolder='checkpoint-500'"


def test_from_pretrained_with_variant_restores_the_dem_of_that_variant(tmp_path):
    """``variant="ema"``: the DEM comes from ``model.ema.safetensors`` as the host's weights do, not from
    ``model.safetensors`` (no silent mix of two checkpoints)."""
    a, b = _two_adapted_models()
    a.save_pretrained(tmp_path)
    b.save_pretrained(tmp_path, variant="ema")
    loaded = hf_llava.from_pretrained(tmp_path, variant="ema")
    same = _dem_equal(loaded.model.spatial_embed, b.model.spatial_embed)
    assert same, "the DEM came from model.safetensors, not from variant='ema' (model.ema.safetensors)"


def test_from_pretrained_with_use_safetensors_false_restores_the_dem_of_the_bin_file(tmp_path):
    """A folder with both model.safetensors and pytorch_model.bin: ``use_safetensors=False`` loads the
    host from the .bin, and the DEM must come from the .bin too."""
    a, b = _two_adapted_models()
    a.save_pretrained(tmp_path)
    torch.save({k: v.clone() for k, v in b.state_dict().items()}, tmp_path / "pytorch_model.bin")
    loaded = hf_llava.from_pretrained(tmp_path, use_safetensors=False)
    assert _dem_equal(loaded.model.spatial_embed, b.model.spatial_embed)
    assert _dem_equal(hf_llava.from_pretrained(tmp_path).model.spatial_embed, a.model.spatial_embed)


def test_from_pretrained_refuses_a_hub_id_before_loading_anything(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("the host's from_pretrained ran (it would download the whole model)")

    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained", no_download)
    with pytest.raises(ValueError, match="path must be a local folder.*'llava-hf/llava-1.5-7b-hf'"):
        hf_llava.from_pretrained("llava-hf/llava-1.5-7b-hf")


def test_from_pretrained_refuses_a_state_dict_the_dem_would_not_come_from(tmp_path):
    a, _ = _two_adapted_models()
    a.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"\['state_dict'\]"):
        hf_llava.from_pretrained(tmp_path, state_dict=a.state_dict())


def test_a_missing_variant_names_the_variant(tmp_path):
    a, _ = _two_adapted_models()
    a.save_pretrained(tmp_path)
    with pytest.raises((OSError, ValueError), match="ema"):
        hf_llava.from_pretrained(tmp_path, variant="ema")
