"""The dualview command, run as a subprocess: outputs, numbers, conversion, and clean failures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dualview import DCM, DEM, DualViewEncoder
from dualview.convert import load_converted
from dualview.show import load_image

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
        (["show", "--grid", "3by3"], "grid must be 'auto' or RxC"),
        (["show", "--grid", "0x3"], "grid must be (rows, cols)"),
        (["budget", "--size", "10by3"], "--size must be HxW"),
        (["convert-inf-llava", "{tmp}/nothing", "-o", "{tmp}/o.safetensors"], "does not exist"),
        (["convert-inf-llava", "{tmp}/plain.safetensors", "-o", "{tmp}/o.safetensors"], "holds no 'spatial_embed.' keys"),
        (["convert-inf-llava", "{tmp}/broken.safetensors", "-o", "{tmp}/o.safetensors"], "not a readable safetensors file"),
        (["convert-inf-llava", "{tmp}/pickle.bin", "-o", "{tmp}/o.safetensors"], "weights_only=True"),
        (["convert-inf-llava", "{tmp}/plain.safetensors", "-o", "{tmp}"], "is a folder: give the file to write"),
        (["convert-inf-llava", "{tmp}/noindex", "-o", "{tmp}/o.safetensors"], "has no 'weight_map'"),
        (["convert-inf-llava", "{tmp}/int.safetensors", "-o", "{tmp}/o.safetensors"], "key 'model.spatial_embed.ln_fuse.weight': dtype int32"),
    ],
)
def test_failures_are_one_line_with_a_non_zero_exit(tmp_path, args, message):
    (tmp_path / "text.png").write_text("not an image")
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
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith(f"dualview {args[0]}: error:")


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
        (["bench", "--repeats", "0"], "--repeats"),
    ],
)
def test_a_bad_number_is_a_usage_error_naming_the_option(args, option):
    result = dualview(*args, ok=False)
    assert result.returncode == 2
    assert f"dualview {args[0]}: error: argument {option}:" in result.stderr.strip().splitlines()[-1]


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
from dualview.cli import main
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
