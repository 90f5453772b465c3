"""The dualview command, run as a subprocess: outputs, numbers, conversion, and clean failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dualview import DCM, DEM, DualViewEncoder
from dualview.tools.convert import load_converted
from dualview.tools.show import load_image

from .conftest import FIXTURES

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


def dualview(*args, ok=True):
    result = subprocess.run([sys.executable, "-m", "dualview", *map(str, args)], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def test_show_writes_a_png_of_the_expected_size(tmp_path):
    out = tmp_path / "crops.png"
    result = dualview("show", "--grid", "2x3", "--crop-size", "112", "-o", out)
    assert f"wrote {out} (1600x900 PNG)" in result.stdout
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (1600, 900)


def test_show_reads_any_pil_image_with_exif_orientation(tmp_path):
    path = tmp_path / "photo.jpg"
    img = Image.new("RGB", (80, 40), (200, 30, 30))  # stored 80 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    img.save(path, exif=exif)
    assert tuple(load_image(path).shape) == (3, 80, 40)  # displayed 40 wide, 80 high
    out = tmp_path / "c.png"
    dualview("show", path, "--crop-size", "28", "-o", out)
    with Image.open(out) as shown:
        assert shown.size == (1600, 900)


def test_budget_prints_the_encoders_own_numbers():
    data = json.loads(dualview("budget", "--size", "700x1900", "--max-tiles", "6", "--json").stdout)
    rows = {b["scheme"]: b for b in data["budgets"]}
    dcm = DCM(336, "auto", max_tiles=6)
    encoder = DualViewEncoder(lambda x: x, dcm, DEM(16, num_heads=8, out_size=(24, 24)), patch_size=14)
    own = encoder.budget((700, 1900))
    assert rows["dual_view"]["tower_passes"] == own.tower_passes
    assert rows["dual_view"]["tokens"] == own.tokens == 576
    assert tuple(rows["dual_view"]["grid"]) == own.grid
    text = dualview("budget", "--size", "700x1900", "--max-tiles", "6").stdout
    assert f"dual_view {own.grid[0]}x{own.grid[1]} {own.tower_passes} {own.tokens}" in " ".join(text.split())


def inf_llava_checkpoint(folder, state):
    """A sharded checkpoint folder with INF-LLaVA's key names (model.spatial_embed.*, model.mm_projector.*)."""
    folder.mkdir()
    tensors = {f"model.spatial_embed.{k}": v for k, v in state.items()}
    tensors["model.mm_projector.0.weight"] = torch.randn(64, 32)
    tensors["model.mm_projector.0.bias"] = torch.randn(64)
    tensors["model.embed_tokens.weight"] = torch.randn(10, 64)
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: tensors[k] for k in names}, folder / name)
    index = {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return tensors


def test_convert_inf_llava_sharded_folder_reproduces_the_fixture(tmp_path):
    fx = load_file(FIXTURES / "inf_llava_dem_n3_d32.safetensors")
    state = {k[len("state."):]: v for k, v in fx.items() if k.startswith("state.")}
    tensors = inf_llava_checkpoint(tmp_path / "ckpt", state)
    out = tmp_path / "dem.safetensors"
    result = dualview("convert-inf-llava", tmp_path / "ckpt", "-o", out)
    assert "DEM dim 32" in result.stdout and "projector (2 tensors)" in result.stdout
    for dem in (DEM.from_inf_llava(out), load_converted(out)[0]):
        with torch.no_grad():
            got = dem(fx["local_feats"], fx["global_feats"], (3, 3))
        assert (got - fx["output"]).abs().max().item() <= 1e-4
    _, projector = load_converted(out)
    assert torch.equal(projector["0.weight"], tensors["model.mm_projector.0.weight"])
    # the pretraining stage's single mm_projector.bin holds spatial_embed too
    torch.save({k: v for k, v in tensors.items() if "embed_tokens" not in k}, tmp_path / "mm_projector.bin")
    dualview("convert-inf-llava", tmp_path / "mm_projector.bin", "-o", tmp_path / "dem2.safetensors")
    assert torch.equal(load_file(tmp_path / "dem2.safetensors")["spatial_embed.ln_fuse.weight"], state["ln_fuse.weight"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["show", "{tmp}/missing.png"], "does not exist"),
        (["show", "{tmp}/text.png"], "is not an image PIL can read"),
        (["convert-inf-llava", "{tmp}/nothing", "-o", "{tmp}/o.safetensors"], "does not exist"),
        (["convert-inf-llava", "{tmp}/plain.safetensors", "-o", "{tmp}/o.safetensors"], "holds no 'spatial_embed.' keys"),
        (["convert-inf-llava", "{tmp}/broken.safetensors", "-o", "{tmp}/o.safetensors"], "not a readable safetensors file"),
        (["convert-inf-llava", "{tmp}/pickle.bin", "-o", "{tmp}/o.safetensors"], "weights_only=True"),
        (["convert-inf-llava", "{tmp}/plain.safetensors", "-o", "{tmp}/text.png/o.safetensors"],
         "-o '{tmp}/text.png/o.safetensors' could not be written: "),
        (["show", "-o", "{tmp}/text.png/crops.png"], "-o '{tmp}/text.png/crops.png' could not be written: "),
        (["show", "--grid", "32x32", "-o", "{tmp}/crops.png"], "--grid 32x32 at --crop-size 336 makes a 10752x10752 canvas"),
        (["show", "{tmp}/wide.png", "--crop-size", "2016", "-o", "{tmp}/crops.png"],
         "--grid auto (the grid 1x5 for this image) at --crop-size 2016"),
        (["show", "{tmp}", "-o", "{tmp}/crops.png"], "image '{tmp}' is a folder: give an image file"),
        (["show", "{tmp}/float.tif", "-o", "{tmp}/crops.png"],
         "image '{tmp}/float.tif': a PIL image of mode 'F' must hold values in [0, 1], got [0, 255]"),
        (["show", "{tmp}/small.png", "-o", "{tmp}/crops.png"],
         "image '{tmp}/small.png' (48x64, HxW) is smaller than --crop-size 336 on both sides (dual view cuts crops "
         "from an image at least one crop high or wide): upscale it to at least 336 pixels high or wide, "
         "or choose --crop-size 56 or less"),
        (["show", "{tmp}/one.png", "-o", "{tmp}/crops.png"],
         "image '{tmp}/one.png' (1x1, HxW) is smaller than --crop-size 336 on both sides (dual view cuts crops "
         "from an image at least one crop high or wide): upscale it to at least 336 pixels high or wide"),
        (["convert-inf-llava", "{tmp}/plain.safetensors", "-o", "{tmp}"], "is a folder: give the file to write"),
        (["convert-inf-llava", "{tmp}/noindex", "-o", "{tmp}/o.safetensors"], "has no 'weight_map'"),
        (["convert-inf-llava", "{tmp}/int.safetensors", "-o", "{tmp}/o.safetensors"], "key 'model.spatial_embed.ln_fuse.weight': dtype int32"),
    ],
)
def test_failures_are_one_line_with_a_non_zero_exit(tmp_path, args, message):
    (tmp_path / "text.png").write_text("not an image")
    Image.new("RGB", (9000, 500)).save(tmp_path / "wide.png")
    Image.new("RGB", (64, 48)).save(tmp_path / "small.png")
    Image.new("RGB", (1, 1)).save(tmp_path / "one.png")
    Image.frombytes("F", (400, 1), torch.linspace(0, 255, 400).numpy().tobytes()).save(tmp_path / "float.tif")
    save_file({"model.layers.0.weight": torch.zeros(2)}, tmp_path / "plain.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    import pickle

    (tmp_path / "pickle.bin").write_bytes(pickle.dumps({"x": object()}))
    (tmp_path / "noindex").mkdir()
    (tmp_path / "noindex" / "model.safetensors.index.json").write_text("{}")
    state = {f"model.spatial_embed.{k}": v for k, v in DEM(16, num_heads=2).state_dict().items()}
    save_file({**state, "model.spatial_embed.ln_fuse.weight": torch.ones(16, dtype=torch.int32)}, tmp_path / "int.safetensors")
    result = dualview(*[a.format(tmp=tmp_path) for a in args], ok=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message.format(tmp=tmp_path) in lines[0]
    assert "allow_small" not in lines[0]  # an option of DCM, not of the command
    assert lines[0].startswith(f"dualview {args[0]}: error:")
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "crops.png").exists()


@pytest.mark.parametrize("command", ["show", "budget", "convert-inf-llava", "bench"])
def test_help_on_every_command(command):
    result = dualview(command, "--help")
    assert "usage: dualview " + command in result.stdout


def test_bad_command_line_is_a_usage_error():
    result = dualview("budget", ok=False)
    assert result.returncode == 2 and "--size" in result.stderr


@pytest.mark.parametrize(
    "args, option",
    [
        (["budget", "--size", "100x100", "--patch-size", "0"], "--patch-size"),
        (["budget", "--size", "100x100", "--crop-size", "-3"], "--crop-size"),
        (["show", "--max-tiles", "x"], "--max-tiles"),
        (["bench", "--grids", "2x2,auto"], "--grids"),
        (["convert-inf-llava", "ckpt", "-o", "dem.safetensors", "--num-heads", "0"], "--num-heads"),
        (["bench", "--repeats", "0"], "--repeats"),
        (["bench", "--crop", "100000"], "--crop"),
    ],
)
def test_a_bad_number_is_a_usage_error_naming_the_option(args, option):
    result = dualview(*args, ok=False)
    assert result.returncode == 2
    assert f"dualview {args[0]}: error: argument {option}:" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["show", "--grid", "3x"], "argument --grid: must be 'auto' or RxC with R and C in 1..32, like 3x3, got '3x'"),
        (["show", "--grid", "0x3"], "argument --grid: must be 'auto' or RxC with R and C in 1..32, like 3x3, got '0x3'"),
        (["show", "--grid", "3by3"], "argument --grid: must be 'auto' or RxC with R and C in 1..32, like 3x3, got '3by3'"),
        (["budget", "--size", "100x100", "--grid", "33x1"], "argument --grid: must be 'auto' or RxC with R and C in 1..32"),
        (["budget", "--size", "0x1800"], "argument --size: must be HxW with positive ints, like 1000x1800, got '0x1800'"),
        (["budget", "--size", "10by3"], "argument --size: must be HxW with positive ints, like 1000x1800, got '10by3'"),
        (["bench", "--grids", "2x2,0x3"], "argument --grids: must be comma-separated RxC grids with R and C in 1..32, "
                                          "like 2x2,3x3 (not 'auto'), got '0x3' in '2x2,0x3'"),
        (["bench", "--device", "tpu"], "argument --device: must be a torch device like cpu, cuda or cuda:1, got 'tpu'"),
        (["bench", "--tower-batch-size", "foo"], "argument --tower-batch-size: must be 'auto', 'all' or an int >= 1, "
                                                 "got 'foo'"),
        # one set of limits for every command: crop sizes 14..2016, multiples of the patch size
        (["show", "--crop-size", "13"], "argument --crop-size: must be an int in 14..2016, a multiple of the patch "
                                        "size 14, got '13'"),
        (["show", "--crop-size", "100"], "argument --crop-size: must be an int in 14..2016, a multiple of the patch "
                                         "size 14, got '100'"),
        (["bench", "--crop", "15"], "argument --crop: must be an int in 14..2016, a multiple of the patch size 14, got '15'"),
        (["budget", "--size", "100x100", "--crop-size", "13"], "argument --crop-size: must be an int in 14..2016, got '13'"),
        (["budget", "--size", "100x100", "--crop-size", "100002"],
         "argument --crop-size: must be an int in 14..2016, got '100002'"),
        (["budget", "--size", "100x100", "--crop-size", "15"],
         "argument --crop-size: must be a multiple of --patch-size 14, got 15"),
        (["budget", "--size", "100x100", "--crop-size", "28", "--patch-size", "16"],
         "argument --crop-size: must be a multiple of --patch-size 16, got 28"),
        (["budget", "--size", "10x10", "--grid", "32x32"],
         "--size 10x10 is smaller than --crop-size 336 on both sides (dual view cuts crops from an image at least "
         "one crop high or wide): give a --size at least 336 pixels high or wide"),
        (["budget", "--size", "10x30", "--crop-size", "56"], "give a --size at least 56 pixels high or wide, "
                                                             "or choose --crop-size 28 or less"),
        (["show", "-o", "x.gif"], "argument -o/--output: must end in one of .png, .jpg"),
        (["convert-inf-llava", "ckpt", "-o", "dem.bin"],
         "argument -o/--output: must be a .safetensors file (the converted checkpoint is safetensors"),
    ],
)
def test_a_malformed_command_line_exits_2_in_the_users_words(args, message, tmp_path):
    root = str(Path(__file__).resolve().parents[1])  # this checkout's code, run from an empty folder
    result = subprocess.run([sys.executable, "-m", "dualview", *args], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": root})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dualview {args[0]}: error: ") and message in last
    assert "(0, 3)" not in last and not list(tmp_path.iterdir())  # nothing written


def test_version_is_the_package_version():
    from dualview import __version__

    assert dualview("--version").stdout.strip() == f"dualview {__version__}"


def test_bench_command_shares_every_option_of_python_m_dualview_bench():
    from dualview.bench.run import build_parser

    options = {o for action in build_parser()._actions for o in action.option_strings}
    assert len(options) > 12
    help_text = dualview("bench", "--help").stdout
    assert all(o in help_text for o in options)
    module_help = subprocess.run([sys.executable, "-m", "dualview.bench", "--help"], capture_output=True, text=True,
                                 timeout=300)
    assert module_help.stdout.startswith("usage: python -m dualview.bench")


def test_bench_command_runs_with_the_modules_options(tmp_path):
    result = dualview("bench", "--device", "cpu", "--tower", "tiny", "--llm", "tiny", "--crop", "28", "--grids", "1x2",
                      "--warmup", "0", "--repeats", "1", "--out", tmp_path)
    table = (tmp_path / "bench.md").read_text()
    assert "| 1x2 | dual_576 |" in table and table in result.stdout
    # a 1-repeat CPU run says nothing about the GPU targets
    target_rows = [line for line in table.splitlines() if line.startswith("| DEM >=")]
    assert target_rows and all(line.endswith("| not judged: cpu run, the targets are set for a GPU |") for line in target_rows)


NO_MATPLOTLIB = """
import sys
sys.modules["matplotlib"] = None  # as if dualview[viz] were not installed
from dualview.tools.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", [["show"], ["bench", "--tower", "tiny", "--llm", "tiny", "--crop", "28"]])
def test_missing_matplotlib_is_one_line_naming_the_extra_before_any_work(tmp_path, command):
    out = tmp_path / "out"
    args = [*command, "--out" if command[0] == "bench" else "-o", out / ("" if command[0] == "bench" else "c.png")]
    result = subprocess.run([sys.executable, "-c", NO_MATPLOTLIB, *map(str, args)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dualview {command[0]}: error:")
    assert "needs matplotlib" in lines[0] and "install dualview[viz]" in lines[0]
    assert not out.exists() and not result.stdout  # nothing was computed or written


def test_missing_matplotlib_in_python_m_dualview_bench_is_one_line_before_any_work(tmp_path):
    code = "import sys; sys.modules['matplotlib'] = None; import runpy; runpy.run_module('dualview.bench', run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", code, "--out", str(tmp_path / "out")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "install dualview[viz]" in lines[0]
    assert not (tmp_path / "out").exists()


# --- issue 22: outputs, inputs, extras, devices -------------------------------------------------


def released_file(path, dim=16):
    """One safetensors file with INF-LLaVA's keys: the DEM, and an LLM weight the conversion drops."""
    state = {f"model.spatial_embed.{k}": v for k, v in DEM(dim, num_heads=2).state_dict().items()}
    save_file({**state, "model.layers.0.weight": torch.randn(4, 4)}, path)
    return path


def one_line_error(result, command):
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dualview {command}: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("how", ["same path", "another spelling", "symlink", "hard link"])
def test_convert_never_writes_over_its_source(tmp_path, how):
    source = released_file(tmp_path / "model.safetensors")
    before = source.read_bytes()
    output = {
        "same path": source,
        "another spelling": tmp_path / "sub" / ".." / "model.safetensors",
        "symlink": tmp_path / "link.safetensors",
        "hard link": tmp_path / "hard.safetensors",
    }[how]
    (tmp_path / "sub").mkdir()
    if how == "symlink":
        output.symlink_to(source)
    if how == "hard link":
        output.hardlink_to(source)
    line = one_line_error(dualview("convert-inf-llava", source, "-o", output, ok=False), "convert-inf-llava")
    assert f"-o {str(output)!r} is an input file" in line and "choose another output file" in line
    assert source.read_bytes() == before  # the LLM weights are still there
    assert "model.layers.0.weight" in load_file(source)


def test_convert_never_writes_over_a_shard_of_its_source_folder(tmp_path):
    fx = load_file(FIXTURES / "inf_llava_dem_n3_d32.safetensors")
    state = {k[len("state."):]: v for k, v in fx.items() if k.startswith("state.")}
    inf_llava_checkpoint(tmp_path / "ckpt", state)
    shard = tmp_path / "ckpt" / "model-00001-of-00002.safetensors"
    before = shard.read_bytes()
    line = one_line_error(dualview("convert-inf-llava", tmp_path / "ckpt", "-o", shard, ok=False), "convert-inf-llava")
    assert "is an input file" in line and shard.read_bytes() == before
    # another file in the same folder is fine
    dualview("convert-inf-llava", tmp_path / "ckpt", "-o", tmp_path / "ckpt" / "dem.safetensors")
    assert shard.read_bytes() == before


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_convert_writes_atomically_with_the_ordinary_file_mode(tmp_path, umask):
    source = released_file(tmp_path / "model.safetensors")
    out = tmp_path / "out" / "dem.safetensors"
    code = f"import os, sys; os.umask({umask}); from dualview.tools.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", code, "convert-inf-llava", str(source), "-o", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # 0o644 under umask 022, as open() makes it, not 0o600
    assert sorted(p.name for p in out.parent.iterdir()) == ["dem.safetensors"]  # no temporary file left
    assert set(load_file(out)) == {k[len("model."):] for k in load_file(source) if "spatial_embed" in k}


def test_a_failed_conversion_leaves_the_old_output_and_no_temporary_file(tmp_path):
    out = tmp_path / "dem.safetensors"
    out.write_bytes(b"the previous conversion")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    one_line_error(dualview("convert-inf-llava", tmp_path / "broken.safetensors", "-o", out, ok=False), "convert-inf-llava")
    assert out.read_bytes() == b"the previous conversion"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.safetensors", "dem.safetensors"]


def test_write_atomically_keeps_the_old_file_when_the_writer_fails(tmp_path):
    from dualview._output import OutputError, write_atomically

    out = tmp_path / "f.bin"
    out.write_bytes(b"old")

    def half_write(tmp):
        tmp.write_bytes(b"ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match=r"^output '.*f.bin' could not be written: No space left on device$"):
        write_atomically(out, half_write)
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_convert_refuses_an_output_that_is_not_a_regular_file(tmp_path):
    source = released_file(tmp_path / "model.safetensors")
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    line = one_line_error(dualview("convert-inf-llava", source, "-o", fifo, ok=False), "convert-inf-llava")
    assert f"-o {str(fifo)!r} is not a regular file" in line
    assert fifo.is_fifo()


def test_convert_writes_through_a_symlink_to_another_file(tmp_path):
    source = released_file(tmp_path / "model.safetensors")
    real = tmp_path / "real.safetensors"
    real.write_bytes(b"old")
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    dualview("convert-inf-llava", source, "-o", link)
    assert link.is_symlink() and "spatial_embed.ln_fuse.weight" in load_file(real)


def test_convert_refuses_a_non_safetensors_output_name(tmp_path):
    source = released_file(tmp_path / "model.safetensors")
    result = dualview("convert-inf-llava", source, "-o", tmp_path / "dem.bin", ok=False)
    assert result.returncode == 2 and "must be a .safetensors file" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "dem.bin").exists()
    from dualview.tools.convert import convert_inf_llava

    with pytest.raises(ValueError, match=r"output must be a \.safetensors file .* got '.*dem\.bin' \(suffix '\.bin'\)"):
        convert_inf_llava(source, tmp_path / "dem.bin")
    assert not (tmp_path / "dem.bin").exists()


def test_a_garbage_bin_never_suggests_weights_only_false(tmp_path):
    (tmp_path / "garbage.bin").write_bytes(b"garbage" * 10)
    line = one_line_error(dualview("convert-inf-llava", tmp_path / "garbage.bin", "-o", tmp_path / "o.safetensors",
                                   ok=False), "convert-inf-llava")
    assert "weights_only=True" in line and "never loads" in line
    assert "False" not in line and "trusted source" not in line and "Re-running" not in line


RUN_WITHOUT = """
import sys
sys.modules[sys.argv[1]] = None  # as if the extra that brings it were not installed
from dualview.tools.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize(
    "module, command, extra",
    [
        ("safetensors", ["convert-inf-llava", "{tmp}/model.safetensors", "-o", "{tmp}/out/dem.safetensors"], "hf"),
        ("transformers", ["bench", "--tower", "tiny", "--llm", "tiny", "--crop", "28", "--out", "{tmp}/out"], "hf"),
    ],
)
def test_a_missing_extra_is_one_line_naming_it_before_any_work(tmp_path, module, command, extra):
    released_file(tmp_path / "model.safetensors")
    args = [a.format(tmp=tmp_path) for a in command]
    result = subprocess.run([sys.executable, "-c", RUN_WITHOUT, module, *args], capture_output=True, text=True,
                            timeout=300)
    line = one_line_error(result, command[0])
    assert f"needs {module}, which is not installed: install dualview[{extra}]" in line
    assert f"pip install '.[{extra}]' in the dualview checkout" in line and f"pip install {module}" in line
    assert not (tmp_path / "out").exists() and not result.stdout


def test_python_m_dualview_bench_without_transformers_is_one_line(tmp_path):
    code = ("import sys; sys.modules['transformers'] = None; import runpy; "
            "runpy.run_module('dualview.bench', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code, "--out", str(tmp_path / "out")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs transformers" in lines[0] and "dualview[hf]" in lines[0]
    assert not (tmp_path / "out").exists()


def test_from_inf_llava_without_safetensors_names_the_extra(tmp_path, monkeypatch):
    from dualview._checks import MissingDependency

    path = released_file(tmp_path / "model.safetensors")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(MissingDependency, match=r"needs safetensors, which is not installed: install dualview\[hf\]"):
        DEM.from_inf_llava(path)
    with pytest.raises(MissingDependency, match=r"dualview\[hf\]"):
        load_converted(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: --device cuda is valid here")
@pytest.mark.parametrize("module", [False, True])
def test_bench_on_a_missing_gpu_is_one_line_before_any_work(tmp_path, module):
    args = ["--device", "cuda", "--tower", "tiny", "--llm", "tiny", "--crop", "28", "--out", str(tmp_path / "out")]
    if module:
        result = subprocess.run([sys.executable, "-m", "dualview.bench", *args], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        line = result.stderr.strip()
        assert line.startswith("python -m dualview.bench: error: --device cuda:") and "\n" not in line
    else:
        line = one_line_error(dualview("bench", *args, ok=False), "bench")
    assert "torch sees no cuda device here" in line and "use --device cpu" in line
    assert not (tmp_path / "out").exists()


def test_bench_refuses_sizes_it_cannot_allocate_before_allocating(tmp_path):
    line = one_line_error(dualview("bench", "--device", "cpu", "--batch", "100000", "--grids", "3x3", "--out",
                                   tmp_path / "out", ok=False), "bench")
    assert "--batch 100000 x 19 crops of grid 3x3 at --crop 336" in line and "lower --batch, --crop or --grids" in line
    (tmp_path / "file").write_text("x")
    line = one_line_error(dualview("bench", "--device", "cpu", "--out", tmp_path / "file", ok=False), "bench")
    assert f"--out {str(tmp_path / 'file')!r} exists and is not a folder" in line


def png_header(width, height):
    """A PNG that claims ``width`` x ``height`` 1-bit pixels: PIL reads the size from the header."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [10_000, 20_000])  # PIL warns from 89 M pixels, refuses from twice that
def test_show_refuses_a_decompression_bomb_in_one_line(tmp_path, side):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(side, side))
    out = tmp_path / "c.png"
    line = one_line_error(dualview("show", bomb, "-o", out, ok=False), "show")
    assert f"is {side}x{side} = {side * side:,} pixels, over PIL's decompression-bomb limit" in line
    assert not out.exists()


def test_show_never_writes_over_its_input_image(tmp_path):
    image = tmp_path / "photo.png"
    Image.new("RGB", (120, 90), (10, 200, 30)).save(image)
    before = image.read_bytes()
    line = one_line_error(dualview("show", image, "--crop-size", "28", "-o", image, ok=False), "show")
    assert "is an input file" in line and image.read_bytes() == before


@pytest.mark.parametrize(
    "given, written, fmt",
    [
        ("{tmp}", "{tmp}/crops.png", "PNG"),
        ("{tmp}/new/", "{tmp}/new/crops.png", "PNG"),
        ("{tmp}/picture", "{tmp}/picture.png", "PNG"),
        ("{tmp}/picture.jpg", "{tmp}/picture.jpg", "JPEG"),
        ("{tmp}/picture.JPEG", "{tmp}/picture.JPEG", "JPEG"),
        ("{tmp}/picture.webp", "{tmp}/picture.webp", "WEBP"),
        ("{tmp}/picture.tiff", "{tmp}/picture.tiff", "TIFF"),
        ("{tmp}/picture.pdf", "{tmp}/picture.pdf", "PDF"),
    ],
)
def test_show_reports_the_file_it_writes_in_the_format_it_says(tmp_path, given, written, fmt):
    result = dualview("show", "--grid", "1x2", "--crop-size", "56", "-o", given.format(tmp=tmp_path))
    path = written.format(tmp=tmp_path)
    what = f"{fmt}, 16x9 in" if fmt == "PDF" else f"1600x900 {fmt}"
    assert result.stdout.strip() == f"wrote {path} ({what})"
    files = sorted(str(p) for p in tmp_path.rglob("*") if p.is_file())
    assert files == [path]  # that file and no other (no 'picture' without suffix, no temporary file)
    if fmt == "PDF":
        assert open(path, "rb").read(5) == b"%PDF-"
    else:
        with Image.open(path) as img:
            assert img.format == fmt and img.size == (1600, 900)


def test_show_draws_a_16_bit_png_from_its_full_range(tmp_path):
    import numpy as np

    ramp = (np.arange(300, dtype=np.float64) / 299 * 65535).round().astype("uint16")
    gradient = np.tile(ramp, (200, 1))  # 200 x 300, dark on the left, white on the right
    path = tmp_path / "g16.png"
    Image.fromarray(gradient).save(path)
    with Image.open(path) as img:
        assert img.mode in ("I;16", "I")
    pixels = load_image(path)
    assert pixels.shape == (3, 200, 300)
    assert torch.allclose(pixels[0, 0], torch.from_numpy(ramp / 65535).float(), atol=1e-6)
    assert float(pixels.mean()) == pytest.approx(0.5, abs=0.01)  # not solid white
    out = tmp_path / "c.png"
    dualview("show", path, "--crop-size", "28", "-o", out)
    with Image.open(out) as shown:  # the panels show the ramp: many mid-grey pixels (a white image: ~1%)
        gray = np.asarray(shown.convert("L"))
    assert ((gray > 60) & (gray < 200)).mean() > 0.08


def test_a_failed_write_of_show_names_the_output(tmp_path):
    from dualview.tools.show import render

    (tmp_path / "file").write_text("x")  # a path under a file: the folder cannot be created
    out = tmp_path / "file" / "crops.png"
    with pytest.raises(OSError) as info:
        render(torch.rand(3, 56, 56), out, crop_size=28, grid=(2, 2), max_tiles=4, title="t", name="-o")
    assert str(info.value).startswith(f"-o {str(out)!r} could not be written: ")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc: a folder that takes no file, root or not")
@pytest.mark.parametrize("command", ["show", "convert-inf-llava"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(command, tmp_path, monkeypatch, capsys):
    from dualview.tools import cli, convert, show

    def no_work(*args, **kwargs):
        raise AssertionError("the work started before the output was checked")

    monkeypatch.setattr(show, "render", no_work)
    monkeypatch.setattr(show, "load_image", no_work)
    monkeypatch.setattr(convert, "read_tensors", no_work)
    Image.new("RGB", (400, 400)).save(tmp_path / "in.png")
    save_file({"model.spatial_embed.x": torch.zeros(2)}, tmp_path / "in.safetensors")
    source, out = ("in.png", "x.png") if command == "show" else ("in.safetensors", "x.safetensors")
    out = f"/proc/dualview-{out}"
    assert cli.main([command, str(tmp_path / source), "-o", out]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"dualview {command}: error: -o {out!r} could not be written: '/proc' takes no new file (")


def test_convert_takes_num_heads_and_marks_the_released_value_as_assumed(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(0)
    trained = DEM(16, num_heads=4).eval()  # four heads: the weights look the same as with eight
    save_file({f"model.spatial_embed.{k}": v for k, v in trained.state_dict().items()}, tmp_path / "ckpt.safetensors")
    local, glob = torch.randn(1, 4, 9, 16), torch.randn(1, 4, 9, 16)
    with torch.no_grad():
        expected = trained(local, glob, (2, 2))

    def metadata(path):
        with safe_open(str(path), framework="pt") as f:
            return f.metadata()

    given = dualview("convert-inf-llava", tmp_path / "ckpt.safetensors", "-o", tmp_path / "four.safetensors",
                     "--num-heads", "4")
    assert given.stdout.strip().endswith("; num_heads 4")
    assert (metadata(tmp_path / "four.safetensors")["num_heads"], metadata(tmp_path / "four.safetensors")["num_heads_from"]) == ("4", "given")
    dem = load_converted(tmp_path / "four.safetensors")[0]
    assert dem.num_heads == 4
    with torch.no_grad():
        torch.testing.assert_close(dem(local, glob, (2, 2)), expected, atol=0, rtol=0)

    assumed = dualview("convert-inf-llava", tmp_path / "ckpt.safetensors", "-o", tmp_path / "eight.safetensors")
    assert "num_heads 8 assumed (the released value; the weights cannot tell it: pass --num-heads" in assumed.stdout
    assert (metadata(tmp_path / "eight.safetensors")["num_heads"], metadata(tmp_path / "eight.safetensors")["num_heads_from"]) == ("8", "assumed")

    line = one_line_error(dualview("convert-inf-llava", tmp_path / "ckpt.safetensors", "-o", tmp_path / "three.safetensors",
                                   "--num-heads", "3", ok=False), "convert-inf-llava")
    assert "--num-heads 3 does not divide the DEM's dim 16 (" in line and not (tmp_path / "three.safetensors").exists()
