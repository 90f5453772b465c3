"""Correctness on an accelerator, before any timing: the GPU run's first step.

    python -m dualview.bench.device_checks [--device cuda] [--out DIR]

Checks, each on fresh random inputs (never zeros), against the CPU in float64 or bit for bit:

* DCM's crops on the device equal the CPU's bit for bit where no resize is involved, its two views
  reassemble to the same canvas bit for bit, and the device's resize is close to the CPU's;
* DEM on the device (float32, bfloat16, float16) against the float64 CPU reference, as
  ``||out - ref|| / ||ref||``, forward and input gradients; a non-finite element fails the check;
* the INF-LLaVA fixtures (DEM and the whole encode path) reproduced on the device;
* DEM's attention runs under the flash SDPA backend alone in half precision (no fallback to a
  materialised attention matrix), and the compiled DEM matches eager (fullgraph, inductor);
* the layer-truncated tower equals the plain forward's hidden states bit for bit (float32, bf16),
  the benchmark's released-path scheme reproduces the released fixture, and
  ``DualViewEncoder(compile=True)`` matches eager.

Prints a table, writes ``checks.json`` and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dualview import DCM, DEM, DualViewEncoder
from dualview.testing import PatchTower

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "inf_llava"
# ||out - ref|| / ||ref|| bounds by dtype (float32 allows TF32-class matmuls on the device)
REL_BOUNDS = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out - ref).norm() / ref.norm())


def check_dcm(device: torch.device) -> list[dict]:
    """Crops are exact rearrangements: bit-equal to the CPU's where no resize is involved, and the two
    views reassemble to the same canvas bit for bit where the device resized the image itself."""
    exact, views, resized = 0.0, 0.0, 0.0
    for grid, size in (((2, 2), (50, 90)), ((3, 3), (333, 201)), ((1, 4), (77, 300)), ((3, 2), (129, 64))):
        dcm = DCM(28, grid, thumbnail=False)
        canvas = torch.rand(2, 3, 28 * grid[0], 28 * grid[1])  # canvas-sized: no resize, pure copies
        cpu, dev = dcm(canvas), dcm(canvas.to(device))
        for name in ("local_view", "global_view"):
            exact = max(exact, float((getattr(cpu, name) - getattr(dev, name).cpu()).abs().max()))
        images = torch.rand(2, 3, *size)
        cpu, dev = dcm(images), dcm(images.to(device))
        views = max(views, float((dev.local_canvas() - dev.global_canvas()).abs().max()))
        resized = max(resized, rel_err(dev.local_canvas(), cpu.local_canvas()))
    return [
        dict(what="DCM crops on the device == CPU crops, bit for bit (4 grids, no resize)", value=exact, ok=exact == 0.0),
        dict(what="DCM local and global views reassemble to one canvas on the device, bit for bit", value=views, ok=views == 0.0),
        dict(what="DCM resized canvas, device vs CPU, rel err (bound 1e-5)", value=resized, ok=resized <= 1e-5),
    ]


def check_dem(device: torch.device, dtype: torch.dtype) -> dict:
    """Forward and input gradients against the float64 CPU reference."""
    torch.manual_seed(0)
    ref_dem = DEM(64, num_heads=8, out_size=(6, 6)).double()
    dem = DEM(64, num_heads=8, out_size=(6, 6)).to(device=device, dtype=dtype)
    dem.load_state_dict(ref_dem.state_dict())
    local, glob = torch.randn(2, 6, 36, 64, dtype=torch.float64), torch.randn(2, 6, 36, 64, dtype=torch.float64)
    lr, gr = local.clone().requires_grad_(), glob.clone().requires_grad_()
    ref = ref_dem(lr, gr, (2, 3))
    weight = torch.randn_like(ref)
    (ref * weight).sum().backward()
    ld, gd = (x.to(device=device, dtype=dtype).requires_grad_() for x in (local, glob))
    out = dem(ld, gd, (2, 3))
    (out * weight.to(device=device, dtype=dtype)).sum().backward()
    errs = [rel_err(out, ref), rel_err(ld.grad, lr.grad), rel_err(gd.grad, gr.grad)]
    bound = REL_BOUNDS[dtype]
    value = max(errs)
    return dict(
        what=f"DEM {str(dtype)[6:]} vs float64 CPU: rel err forward / grad local / grad global "
        f"{errs[0]:.1e} / {errs[1]:.1e} / {errs[2]:.1e} (bound {bound:.0e})",
        value=value, ok=value == value and value <= bound,
    )


def check_fixtures(device: torch.device) -> list[dict]:
    from safetensors.torch import load_file

    fx = load_file(FIXTURES / "inf_llava_dem_n3_d32.safetensors")
    state = {k[len("state."):]: v for k, v in fx.items() if k.startswith("state.")}
    dem = DEM.from_inf_llava(state).to(device)
    with torch.no_grad():
        out = dem(fx["local_feats"].to(device), fx["global_feats"].to(device), (3, 3))
    dem_err = float((out.cpu() - fx["output"]).abs().max())

    fx = load_file(FIXTURES / "inf_llava_encode_n3_d16.safetensors")
    dem = DEM.from_inf_llava({f"model.spatial_embed.{k[4:]}": v for k, v in fx.items() if k.startswith("dem.")})
    tower = PatchTower(dim=16, patch_size=14)
    tower.proj.load_state_dict({"weight": fx["tower.weight"], "bias": fx["tower.bias"]})
    encoder = DualViewEncoder.inf_llava(tower, dem).to(device)
    with torch.no_grad():
        out = encoder((fx["image_uint8"].float() / 127.5 - 1).to(device))
    enc_err = float((out.cpu() - fx["output"]).abs().max())
    return [
        dict(what="INF-LLaVA DEM fixture on the device, max abs err (bound 1e-4)", value=dem_err, ok=dem_err <= 1e-4),
        dict(what=f"INF-LLaVA encode fixture on the device, max abs err (bound 1e-4), tower calls {tower.calls}",
             value=enc_err, ok=enc_err <= 1e-4 and tower.calls == 1),
    ]


def check_flash(device: torch.device) -> dict:
    """In half precision DEM's attention must run under the flash backend alone (no T x T matrix)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    dem = DEM(1024, num_heads=8, out_size=(24, 24)).to(device=device, dtype=torch.bfloat16).eval()
    local = torch.randn(1, 9, 576, 1024, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = dem(local, torch.randn_like(local), (3, 3))
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                flash = dem(local, torch.randn_like(local), (3, 3))
            ok, note = bool(torch.isfinite(flash).all()) and eager.shape == flash.shape, "runs"
        except RuntimeError as exc:
            ok, note = False, f"refused: {str(exc).splitlines()[0][:120]}"
    return dict(what=f"DEM (dim 1024, 8 heads, 3x3, bf16) under the flash SDPA backend alone: {note}", value=float(ok), ok=ok)


def check_compiled(device: torch.device) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    dem = DEM(64, num_heads=8, out_size=(6, 6)).to(device).eval()
    local, glob = torch.randn(2, 9, 36, 64, device=device), torch.randn(2, 9, 36, 64, device=device)
    compiled = torch.compile(dem, fullgraph=True)
    with torch.no_grad():
        err = rel_err(compiled(local, glob, (3, 3)), dem(local, glob, (3, 3)).double())
    return dict(what="compiled DEM (fullgraph, inductor) vs eager, float32 rel err (bound 1e-5)", value=err, ok=err <= 1e-5)


def tiny_clip(device: torch.device, dtype: torch.dtype):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(image_size=56, patch_size=14, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=3, num_attention_heads=4)
    torch.manual_seed(0)
    return CLIPVisionModel(config).to(device=device, dtype=dtype).eval()


def check_tower(device: torch.device) -> list[dict]:
    """The layer-truncated tower equals the plain forward's hidden states bit for bit on the device."""
    from dualview.adapters.towers import HFVisionTower

    results = []
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_clip(device, dtype)
        pixels = torch.randn(7, 3, 56, 56, device=device, dtype=dtype)
        equal = True
        with torch.no_grad():
            hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
            for layer in (-1, -2, 0, [-2, 0]):
                layers = [layer] if isinstance(layer, int) else layer
                expected = torch.cat([hidden[i] for i in layers], -1)[:, 1:]
                equal &= bool(torch.equal(HFVisionTower(model, layer=layer)(pixels), expected))
        results.append(dict(what=f"layer-truncated HFVisionTower == plain hidden_states[layer], bit for bit ({str(dtype)[6:]}; "
                                 "layers -1, -2, 0, [-2, 0])", value=float(equal), ok=equal))
    return results


def check_released(device: torch.device) -> dict:
    """The benchmark's released-path baseline reproduces the released code's fixture on the device."""
    from safetensors.torch import load_file

    from .released import released

    fx = load_file(FIXTURES / "inf_llava_encode_n3_d16.safetensors")
    dem = DEM.from_inf_llava({f"model.spatial_embed.{k[4:]}": v for k, v in fx.items() if k.startswith("dem.")}).to(device)
    tower = PatchTower(dim=16, patch_size=14)
    tower.proj.load_state_dict({"weight": fx["tower.weight"], "bias": fx["tower.bias"]})
    tower.to(device)
    with torch.no_grad():
        out = torch.stack(released(tower, 336, (3, 3), dem)((fx["image_uint8"].float() / 127.5 - 1).to(device)))
    err = float((out.cpu() - fx["output"]).abs().max())
    return dict(what=f"benchmark's released-path scheme on the released fixture, max abs err (bound 1e-4), "
                     f"tower calls {tower.calls}", value=err, ok=err <= 1e-4 and tower.calls == 19)


def check_compiled_encoder(device: torch.device) -> dict:
    """DualViewEncoder(compile=True): tower calls (in chunks) and DEM under inductor == eager."""
    from dualview.adapters.towers import HFVisionTower

    torch._dynamo.reset()
    tower = HFVisionTower(tiny_clip(device, torch.float32), layer=-2)
    dem = DEM(64, num_heads=8, out_size=(4, 4)).to(device).eval()
    eager = DualViewEncoder(tower, DCM(56, (2, 3)), dem, tower_batch_size=5)
    compiled = DualViewEncoder(tower, DCM(56, (2, 3)), dem, tower_batch_size=5, compile=True)
    images = torch.rand(2, 3, 100, 150, device=device)
    with torch.no_grad():
        err = rel_err(compiled(images), eager(images).double())
    return dict(what="DualViewEncoder(compile=True) (tower chunks + DEM, inductor) vs eager, float32 rel err (bound 1e-5)",
                value=err, ok=err <= 1e-5)


def run_checks(device: torch.device, compile_check: bool = True) -> list[dict]:
    results = check_dcm(device)
    results += [check_dem(device, dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    results += check_tower(device)
    if FIXTURES.is_dir():  # they live in the source tree (tests/fixtures), not in an installed wheel
        results += check_fixtures(device)
        results.append(check_released(device))
    if device.type == "cuda":
        results.append(check_flash(device))
    if compile_check:
        results.append(check_compiled(device))
        results.append(check_compiled_encoder(device))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="dualview correctness on a device, against the CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile check")
    p.add_argument("--out", type=Path, default=None, help="folder for checks.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = run_checks(device, compile_check=not args.no_compile)
    print(f"device checks on {name} (torch {torch.__version__}):")
    for r in results:
        print(f"  [{'ok' if r['ok'] else 'FAIL'}] {r['what']}: {r['value']:.3g}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "checks.json").write_text(json.dumps(dict(device=name, torch=torch.__version__, checks=results), indent=2))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
