"""Checkpoint reading is strict and contained: floating-point DEM weights of the expected shapes only,
shard names confined to the checkpoint folder, folders read through their index or standard weight
file names, and every failure one line naming the file and the key."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from dualview import DEM
from dualview.checkpoints import Origin, check_dem_state, read_tensors, weight_files
from dualview.tools.convert import convert_inf_llava, load_converted

PREFIX = "model.spatial_embed."


def dem_state(dim: int = 16) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in DEM(dim, num_heads=2).state_dict().items()}


def prefixed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {PREFIX + k: v for k, v in state.items()}


def sharded(folder, tensors: dict[str, torch.Tensor], *, index: bool = True, weight_map=None):
    """``model-0000i-of-00002.safetensors`` shards (and their index unless ``index=False``)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: tensors[k] for k in names}, folder / name)
    if index:
        if weight_map is None:
            weight_map = {k: name for name, names in shards.items() for k in names}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {k: name for name, names in shards.items() for k in names}


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


# ---- dtypes and shapes of DEM keys -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.float8_e4m3fn, torch.int64])
def test_a_dem_weight_that_is_not_floating_point_is_refused_never_cast(tmp_path, dtype):
    state = prefixed(dem_state())
    key = PREFIX + "ffn_crop.0.weight"
    state[key] = (state[key] * 4).to(dtype)
    save_file(state, tmp_path / "dem.safetensors")
    with pytest.raises(ValueError) as error:
        DEM.from_inf_llava(tmp_path / "dem.safetensors")
    message = one_line(error)
    assert f"checkpoint {str(tmp_path / 'dem.safetensors')!r}, key {key!r}" in message
    assert str(dtype).replace("torch.", "") in message and "not cast" in message
    with pytest.raises(ValueError, match="state dict key .attention.linears.0.weight.: dtype int32"):  # the dim key
        DEM.from_inf_llava({**dem_state(), "attention.linears.0.weight": torch.zeros(16, 16, dtype=torch.int32)})


def test_half_precision_weights_load_into_a_float32_dem_exactly(tmp_path):
    state = {k: v.to(torch.bfloat16) for k, v in dem_state().items()}
    save_file(prefixed(state), tmp_path / "bf16.safetensors")
    dem = DEM.from_inf_llava(tmp_path / "bf16.safetensors")
    assert dem.ln_fuse.weight.dtype == torch.float32
    assert all(torch.equal(dem.state_dict()[k], v.float()) for k, v in state.items())


def test_a_0d_or_wrongly_shaped_weight_names_its_file_and_key(tmp_path):
    state = prefixed(dem_state())
    zero_d = dict(state, **{PREFIX + "attention.linears.0.weight": torch.tensor(1.0)})
    save_file(zero_d, tmp_path / "0d.safetensors")
    with pytest.raises(ValueError) as error:
        DEM.from_inf_llava(tmp_path / "0d.safetensors")
    assert "0d.safetensors', key 'model.spatial_embed.attention.linears.0.weight'" in one_line(error)
    assert "square (dim, dim)" in str(error.value) and "shape ()" in str(error.value)

    wrong = dict(state, **{PREFIX + "ln_fuse.bias": torch.zeros(15)})
    sharded(tmp_path / "ckpt", wrong)
    with pytest.raises(ValueError) as error:
        DEM.from_inf_llava(tmp_path / "ckpt")
    holder = sharded(tmp_path / "names", wrong, index=False)[PREFIX + "ln_fuse.bias"]
    message = one_line(error)
    assert f"{str(tmp_path / 'ckpt' / holder)!r}, key 'model.spatial_embed.ln_fuse.bias'" in message  # the shard
    assert "shape (15,), expected (16,)" in message


def test_check_dem_state_is_the_strict_validator_for_any_loader(tmp_path):
    dem = DEM(16, num_heads=2)
    state = dem_state()
    check_dem_state(state, dem)  # the same keys, dtypes and shapes: no error
    origin = Origin(tmp_path / "model.safetensors", "model.spatial_embed.")
    with pytest.raises(ValueError, match=r"model.safetensors', key 'model.spatial_embed.ln_fuse.weight': dtype int32"):
        check_dem_state({**state, "ln_fuse.weight": state["ln_fuse.weight"].int()}, dem, origin=origin)
    with pytest.raises(ValueError, match=r"does not match the DEM: missing keys \['ln_fuse.bias'\], unexpected keys \[\]"):
        check_dem_state({k: v for k, v in state.items() if k != "ln_fuse.bias"}, dem.state_dict(), origin=origin)


# ---- folders: index, standard names, containment -------------------------------------------------


@pytest.mark.parametrize("escape", ["../outside.safetensors", "/ABS/outside.safetensors", "sub/../../outside.safetensors"])
def test_shard_names_that_leave_the_folder_are_refused(tmp_path, escape):
    state = prefixed(dem_state())
    save_file(state, tmp_path / "outside.safetensors")  # readable, and must not be read
    folder = tmp_path / "ckpt"
    folder.mkdir()
    name = escape.replace("/ABS", str(tmp_path))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: name for k in state}}))
    with pytest.raises(ValueError) as error:
        DEM.from_inf_llava(folder)
    message = one_line(error)
    assert "model.safetensors.index.json" in message and repr(name) in message
    assert "not a file inside the checkpoint folder" in message


def test_symlinked_shards_inside_the_folder_load_as_in_the_hf_cache(tmp_path):
    # models--x/snapshots/<rev>/<file> -> ../../blobs/<hash>, as huggingface_hub lays them out
    state = prefixed(dem_state())
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    weight_map = sharded(blobs, state, index=False)
    snapshot.mkdir(parents=True)
    for i, name in enumerate(sorted(set(weight_map.values()))):
        os.rename(blobs / name, blobs / f"hash{i}")
        os.symlink(f"../../blobs/hash{i}", snapshot / name)
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    dem = DEM.from_inf_llava(snapshot)
    assert torch.equal(dem.ln_fuse.bias, state[PREFIX + "ln_fuse.bias"])


class TrainingArguments:  # what the HF Trainer pickles into training_args.bin: not a tensor file
    learning_rate = 1e-3


def test_training_args_bin_beside_the_weights_is_never_read(tmp_path):
    state = prefixed(dem_state())
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "training_args.bin").write_bytes(pickle.dumps(TrainingArguments()))
    (tmp_path / "optimizer.pt").write_bytes(b"not a checkpoint")
    assert weight_files(tmp_path) == [tmp_path / "pytorch_model.bin"]
    dem = DEM.from_inf_llava(tmp_path)
    assert torch.equal(dem.ln_fuse.weight, state[PREFIX + "ln_fuse.weight"])
    # with safetensors beside it, as transformers does, safetensors is read
    save_file({k: v + 1 for k, v in state.items()}, tmp_path / "model.safetensors")
    assert torch.equal(DEM.from_inf_llava(tmp_path).ln_fuse.weight, state[PREFIX + "ln_fuse.weight"] + 1)


def test_a_folder_is_read_through_its_index_or_its_standard_names_only(tmp_path):
    state = prefixed(dem_state())
    sharded(tmp_path / "no_index", state, index=False)  # a complete shard set without index still loads
    assert len(read_tensors(tmp_path / "no_index")) == len(state)
    (tmp_path / "no_index" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete or mixed set of shards"):
        read_tensors(tmp_path / "no_index")
    other = tmp_path / "other"
    other.mkdir()
    save_file(state, other / "weights.safetensors")
    with pytest.raises(ValueError) as error:
        read_tensors(other)
    assert "none of the standard weight files" in one_line(error) and "weights.safetensors" in str(error.value)
    projector_only = tmp_path / "pretrain"
    projector_only.mkdir()
    torch.save(state, projector_only / "mm_projector.bin")  # LLaVA's pretraining stage output
    assert len(read_tensors(projector_only)) == len(state)


@pytest.mark.parametrize(
    "index, message",
    [
        ({"metadata": {}}, "has no 'weight_map'"),
        ({"weight_map": []}, "has no 'weight_map'"),
        ({"weight_map": {"model.spatial_embed.ln_fuse.weight": "missing.safetensors"}}, "names the shard 'missing.safetensors', which does not exist"),
        ("{not json", "could not be read as JSON"),
    ],
)
def test_a_broken_index_is_one_line_naming_it(tmp_path, index, message):
    (tmp_path / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        DEM.from_inf_llava(tmp_path)
    assert message in one_line(error) and "model.safetensors.index.json" in str(error.value)


# ---- conversion -------------------------------------------------------------------------------------


def test_convert_refuses_an_output_folder_before_reading_and_an_int_projector(tmp_path):
    state = prefixed(dem_state())
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=r"output .*out' is a folder: give the file to write"):
        convert_inf_llava(tmp_path / "missing", tmp_path / "out")  # the output is checked first
    save_file({**state, "model.mm_projector.0.weight": torch.ones(2, 2, dtype=torch.int8)}, tmp_path / "int.safetensors")
    with pytest.raises(ValueError, match=r"int.safetensors', key 'model.mm_projector.0.weight': dtype torch.int8"):
        convert_inf_llava(tmp_path / "int.safetensors", tmp_path / "o.safetensors")


def test_load_converted_names_missing_or_bad_metadata(tmp_path):
    state = dict(prefixed(dem_state(32)))
    save_file(state, tmp_path / "model.safetensors")
    out = tmp_path / "dem.safetensors"
    convert_inf_llava(tmp_path, out)
    dem, _ = load_converted(out)
    assert dem.out_size == (24, 24) and dem.num_heads == 8
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key, value in (("out_size", None), ("num_heads", None), ("out_size", "24by24"), ("num_heads", "eight")):
        broken = {k: v for k, v in meta.items() if k != key}
        if value is not None:
            broken[key] = value
        save_file(tensors, tmp_path / "broken.safetensors", metadata=broken)
        with pytest.raises(ValueError) as error:
            load_converted(tmp_path / "broken.safetensors")
        assert "broken.safetensors" in one_line(error) and f"metadata entry {key!r}" in str(error.value)


def test_check_dem_state_refuses_a_transposed_weight_of_the_same_size():
    dem = DEM(dim=8, num_heads=2)
    state = {k: v.clone() for k, v in dem.state_dict().items()}
    key = next(k for k, v in state.items() if v.ndim == 2 and v.shape[0] != v.shape[1])
    state[key] = state[key].t().contiguous()  # same numel, another shape
    with pytest.raises(ValueError, match=key):
        check_dem_state(state, dem)


# ---- issue 22: refusals never advise weights_only=False; the files a conversion reads -------------


@pytest.mark.parametrize(
    "content",
    [
        b"garbage" * 10,  # not a pickle, not a zip
        pickle.dumps({"attention.linears.0.weight": object()}),  # a pickled object
        pickle.dumps({"x": 1})[:5],  # truncated
    ],
)
def test_a_refused_torch_file_never_suggests_weights_only_false(tmp_path, content):
    (tmp_path / "model.bin").write_bytes(content)
    for load in (lambda p: DEM.from_inf_llava(p), lambda p: read_tensors(p)):
        with pytest.raises(ValueError) as error:
            load(tmp_path / "model.bin")
        text = one_line(error)
        assert text.startswith(f"checkpoint {str(tmp_path / 'model.bin')!r} could not be read with torch.load(weights_only=True)")
        assert "which dualview never loads" in text
        for advice in ("weights_only=False", "`False`", "False", "trusted source", "Re-running", "arbitrary code"):
            assert advice not in text, text


def test_checkpoint_files_are_the_files_read(tmp_path):
    from dualview.checkpoints import checkpoint_files

    sharded(tmp_path / "ckpt", prefixed(dem_state()))
    (tmp_path / "ckpt" / "training_args.bin").write_bytes(b"never read")
    assert [p.name for p in checkpoint_files(tmp_path / "ckpt")] == [
        "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
    ]
    assert checkpoint_files(tmp_path / "ckpt" / "x.bin") == [tmp_path / "ckpt" / "x.bin"]


def test_convert_refuses_to_write_over_a_file_it_reads_before_reading(tmp_path):
    state = prefixed(dem_state())
    save_file({**state, "model.embed_tokens.weight": torch.ones(3, 2)}, tmp_path / "model.safetensors")
    before = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(OSError, match=r"output '.*model.safetensors' is an input file: writing it would destroy the input"):
        convert_inf_llava(tmp_path / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(OSError, match=r"output '.*model.safetensors' is an input file"):
        convert_inf_llava(tmp_path, tmp_path / "model.safetensors")  # the folder's own weight file
    with pytest.raises(OSError, match=r"is an input file \(it resolves to '.*model.safetensors'\)"):
        convert_inf_llava(tmp_path, tmp_path / "sub" / ".." / "model.safetensors")
    assert (tmp_path / "model.safetensors").read_bytes() == before
