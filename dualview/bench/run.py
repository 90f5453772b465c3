"""Dual view against plain AnyRes tiling, in one run: cost, tokens, memory, and the LLM side.

    python -m dualview.bench [--device cpu|cuda] [--tower small|vit-l] [--out DIR]

Writes ``bench.json``, ``bench.md`` and ``bench.png`` to ``--out``. Random weights everywhere: the
numbers are costs, not quality.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from dualview import DCM, DEM, DualViewEncoder, layout
from dualview import grid as G
from dualview._checks import MAX_GRID_SIDE, crop_size_option, crop_size_rule
from dualview._output import cannot_create_in
from dualview.budget import anyres_budget
from dualview.encoder import AUTO_CHUNK_TOKENS
from dualview.sample import demo_image

from . import measure, schemes

TOWERS = {  # CLIP ViT-L/14-336 and a small stand-in for CPU runs; both at crop 336, patch 14
    "vit-l": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4),  # tests
}
LLMS = {  # one decoder layer, time scaled by the layer count
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, layers=32),
    "small": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, layers=32),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, layers=32),  # tests
}
TEXT_TOKENS = 64


def build_tower(name: str, crop: int, device: torch.device, dtype: torch.dtype):
    """-> (host_tower, tower, dim): the same CLIP-shaped model called as LLaVA's own tower does (the
    plain forward with every hidden state, penultimate layer, CLS dropped: what the released path
    runs) and as dualview's layer-truncated ``HFVisionTower`` (the same output, bit for bit)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from dualview.adapters.towers import HFVisionTower

    config = CLIPVisionConfig(image_size=crop, patch_size=14, **TOWERS[name])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = CLIPVisionModel(config).to(device=device, dtype=dtype).eval()

    def host_tower(pixels: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]

    return host_tower, HFVisionTower(model, layer=-2), config.hidden_size


def build_llm_layer(name: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    spec = dict(LLMS[name])
    layers = spec.pop("layers")
    config = LlamaConfig(num_key_value_heads=spec["num_attention_heads"], max_position_embeddings=16384, **spec)
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, layer_idx=0).to(device=device, dtype=dtype).eval()
    rope = LlamaRotaryEmbedding(config).to(device)

    def run(batch: int, tokens: int):
        x = torch.randn(batch, tokens, config.hidden_size, device=device, dtype=dtype)
        pos = torch.arange(tokens, device=device).unsqueeze(0)
        emb = rope(x, pos)
        return lambda: layer(x, position_embeddings=emb, position_ids=pos)

    return run, layers


def progress(items, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, file=sys.stderr)
    except ImportError:
        return items


SCHEMES = ("anyres", "dual_576", "dual_full", "released")


def bench(args) -> dict:
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    crop = args.crop
    host_tower, tower, dim = build_tower(args.tower, crop, device, dtype)
    h = w = crop // 14
    torch.manual_seed(0)
    dem = DEM(dim, num_heads=8, out_size=(h, w)).to(device=device, dtype=dtype).eval()
    dem_full = DEM(dim, num_heads=8, out_size=None).to(device=device, dtype=dtype).eval()
    dem_full.load_state_dict(dem.state_dict())
    # --compile: the dual encoders compile their tower calls and DEM (static shapes, one
    # specialisation per chunk size and grid: a dynamic-shape DEM ran slower than eager on an H100);
    # AnyRes gets the same tower compiled; the released path runs as released, eager.
    options = dict(tower_batch_size=args.tower_batch_size, compile=args.compile)
    anyres_tower = torch.compile(tower, dynamic=False) if args.compile else tower
    newline = torch.randn(dim, device=device, dtype=dtype)
    image = demo_image().to(device=device, dtype=dtype).unsqueeze(0).expand(args.batch, -1, -1, -1).contiguous()
    size = tuple(image.shape[-2:])
    llm_run, llm_layers = build_llm_layer(args.llm, device, dtype)
    rows, checks = [], {}
    tasks = [(g, s) for g in args.grids for s in SCHEMES]
    with torch.inference_mode():
        for grid, name in progress(tasks, "benchmark"):
            encoder = None
            if name == "anyres":
                fn = schemes.anyres(anyres_tower, crop, grid, newline)
            elif name == "dual_576":
                fn, encoder = schemes.dual_576(tower, crop, grid, dem, **options)
            elif name == "dual_full":
                fn, encoder = schemes.dual_full(tower, crop, grid, dem_full, newline, **options)
            else:
                fn = schemes.released(host_tower, crop, grid, dem)
            for _ in range(max(args.warmup, 1)):  # compiles, if any, happen here
                out = fn(image)
            with measure.PeakMemory(device) as mem:
                fn(image)
            timing = measure.time_it(lambda: fn(image), device, 0, args.repeats)
            crops = 1 + grid[0] * grid[1] if name == "anyres" else 1 + 2 * grid[0] * grid[1]
            pixels = torch.randn(args.batch * crops, 3, crop, crop, device=device, dtype=dtype)
            if encoder is not None:  # the encoder's own tower calls (chunks, compiled or not)
                chunks = encoder.tower_chunks(pixels.shape[0])
                tower_fn = lambda: encoder.run_tower(pixels)  # noqa: E731
            elif name == "anyres":
                chunks = [pixels.shape[0]]
                tower_fn = lambda: anyres_tower(pixels)  # noqa: E731
            else:  # one call per crop position, each over the batch
                chunks = [args.batch] * crops
                tower_fn = lambda: [host_tower(p) for p in pixels.split(args.batch)]  # noqa: E731
            tower_t = measure.time_it(tower_fn, device, args.warmup, args.repeats)
            tokens = out[0].shape[0]
            llm_t = measure.time_it(llm_run(args.batch, tokens + TEXT_TOKENS), device, args.warmup, args.repeats)
            if name == "released":  # the same arithmetic as DualViewEncoder.inf_llava's
                preset = DualViewEncoder(tower, DCM(crop, grid, fit="squash", interpolation="bicubic", antialias=False),
                                         dem, thumbnail_fusion="mean")(image)
                checks[f"released_vs_dualview_squash_max_abs_{grid[0]}x{grid[1]}"] = max(
                    float((a.float() - b.float()).abs().max()) for a, b in zip(out, preset)
                )
            row = {}
            if encoder is not None:  # where the glue goes: DCM and DEM timed alone
                row = phase_times(args, device, dtype, grid, image, crop, encoder._step("dem"), dim, h * w)
            rows.append(dict(
                scheme=name, grid=f"{grid[0]}x{grid[1]}", tower_passes=crops, tower_calls=len(chunks),
                crops_per_call=max(chunks), llm_tokens=tokens,
                latency_ms=dict(median=timing.median_s * 1e3, min=timing.min_s * 1e3, max=timing.max_s * 1e3),
                images_per_s=args.batch / timing.median_s, peak_memory_mb=mem.peak_bytes / 2**20,
                extra_peak_memory_mb=mem.extra_bytes / 2**20,
                tower_ms=tower_t.median_s * 1e3,
                glue_fraction_of_tower=(timing.median_s - tower_t.median_s) / tower_t.median_s,
                llm_ms=llm_t.median_s * 1e3 * llm_layers,
                total_ms=(timing.median_s + llm_t.median_s * llm_layers) * 1e3,
                sm_clock_mhz=measure.sm_clock_mhz(device),
                **row,
            ))
        for grid in args.grids:
            anyres_tokens = anyres_budget(size, grid, crop, (h, w)).tokens
            checks[f"dual_full_tokens_equal_anyres_{grid[0]}x{grid[1]}"] = all(
                r["llm_tokens"] == anyres_tokens for r in rows if r["grid"] == f"{grid[0]}x{grid[1]}" and r["scheme"] in ("anyres", "dual_full")
            )
        compiled_dem = torch.compile(dem, fullgraph=True, dynamic=False) if args.compile else dem
        kernels = kernel_checks(args, device, dtype, compiled_dem, dim, h * w)
        if args.profile:
            grid = args.grids[-1]
            profile(schemes.dual_576(tower, crop, grid, dem, **options)[0], (image,), device, args.out / "profile.txt")
            local = torch.randn(args.batch, grid[0] * grid[1], h * w, dim, device=device, dtype=dtype)
            profile(compiled_dem, (local, torch.randn_like(local), grid), device, args.out / "profile_dem.txt")
    return dict(meta=meta(args, device, dtype), rows=rows, kernels=kernels, checks=checks)


def phase_times(args, device, dtype, grid, image, crop: int, dem, dim: int, tokens: int) -> dict:
    """DCM (canvas and both views, thumbnail included) and DEM alone, at the scheme's shapes, in ms."""
    dcm = DCM(crop, grid, fit="pad")
    t_dcm = measure.time_it(lambda: dcm(image), device, args.warmup, args.repeats)
    local = torch.randn(args.batch, grid[0] * grid[1], tokens, dim, device=device, dtype=dtype)
    glob = torch.randn_like(local)
    t_dem = measure.time_it(lambda: dem(local, glob, grid), device, args.warmup, args.repeats)
    return dict(dcm_ms=t_dcm.median_s * 1e3, dem_ms=t_dem.median_s * 1e3)


def profile(fn, inputs: tuple, device: torch.device, path: Path) -> None:
    """The operators of one call by self time on the device (torch.profiler), for the write-up."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn(*inputs)
    measure.sync(device)
    with torch_profile(activities=activities) as prof:
        fn(*inputs)
        measure.sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=30))


def kernel_checks(args, device, dtype, dem, dim: int, tokens: int) -> dict:
    """DEM's FLOP/s against a plain matmul, and DCM's crop copy against a plain copy, at the last
    of ``--grids`` (3x3 by default)."""
    grid = args.grids[-1]
    tiles = grid[0] * grid[1]
    local = torch.randn(args.batch, tiles, tokens, dim, device=device, dtype=dtype)
    glob = torch.randn_like(local)
    t_dem = measure.time_it(lambda: dem(local, glob, grid), device, args.warmup, args.repeats)
    side = math.isqrt(tokens)
    flops = measure.dem_flops(args.batch, grid, tokens, dim, fused_tokens=dem.fused_tokens(grid, (side, side)))
    matmul = measure.matmul_flops_per_s(2 * args.batch * tiles * tokens, dim, dim, device, dtype, args.repeats)
    parts = dem_parts(args, device, dtype, dem, dim, tokens, tiles)
    canvas = torch.randn(args.batch, 3, grid[0] * args.crop, grid[1] * args.crop, device=device, dtype=dtype)
    nbytes = canvas.numel() * canvas.element_size()

    def crops(c: torch.Tensor):
        return layout.split_local(c, *grid).contiguous(), layout.split_global(c, *grid).contiguous()

    # compiled run: the crop copy as one generated kernel (what compiling the whole encoder gives)
    crop_fn = torch.compile(crops, fullgraph=True, dynamic=False) if args.compile else crops
    crop_bw = measure.copy_bandwidth(lambda: crop_fn(canvas), 2 * nbytes, device, args.repeats)
    copy_bw = measure.copy_bandwidth(lambda: (canvas.clone(), canvas.clone()), 2 * nbytes, device, args.repeats)
    return dict(
        grid=f"{grid[0]}x{grid[1]}", dem_ms=t_dem.median_s * 1e3, dem_gflop=flops / 1e9, dem_tflops=flops / t_dem.median_s / 1e12,
        matmul_tflops=matmul / 1e12, dem_fraction_of_matmul=flops / t_dem.median_s / matmul, **parts,
        dcm_crop_gbps=crop_bw / 1e9, plain_copy_gbps=copy_bw / 1e9, dcm_fraction_of_copy=crop_bw / copy_bw,
        dcm_crop_compiled=args.compile,
    )


def dem_parts(args, device, dtype, dem: DEM, dim: int, tokens: int, tiles: int) -> dict:
    """Where DEM's time goes at a grid of ``tiles`` sub-images: its shared attention block over both
    directions' sequences, and inside it the attention core (SDPA) alone; the rest of DEM is
    gathers, fusion and resampling."""
    seqs, heads = 2 * args.batch * tiles, dem.num_heads
    q = torch.randn(seqs, tokens, dim, device=device, dtype=dtype)
    kv = torch.randn_like(q)
    attention = dem.attention
    t_block = measure.time_it(lambda: attention(q, kv), device, args.warmup, args.repeats)
    qh, kh, vh = (torch.randn(seqs, heads, tokens, dim // heads, device=device, dtype=dtype) for _ in range(3))
    t_sdpa = measure.time_it(lambda: F.scaled_dot_product_attention(qh, kh, vh), device, args.warmup, args.repeats)
    sdpa_flops = 4 * seqs * tokens * tokens * dim
    block_flops = sdpa_flops + 8 * seqs * tokens * dim * dim
    backends = {}  # the SDPA backend choice: each one alone, where the device has it
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            def call(backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(qh, kh, vh)
            try:
                t = measure.time_it(call, device, args.warmup, args.repeats)
                backends[backend.name.lower()] = sdpa_flops / t.median_s / 1e12
            except RuntimeError:  # not available for this shape / dtype / device
                backends[backend.name.lower()] = None
    return dict(
        dem_attention_block_ms=t_block.median_s * 1e3, dem_attention_block_tflops=block_flops / t_block.median_s / 1e12,
        dem_sdpa_ms=t_sdpa.median_s * 1e3, dem_sdpa_tflops=sdpa_flops / t_sdpa.median_s / 1e12,
        dem_sdpa_tflops_by_backend=backends,
    )


def meta(args, device, dtype) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return dict(
        date=dt.date.today().isoformat(), device=str(device), device_name=name, dtype=str(dtype).replace("torch.", ""),
        torch=torch.__version__, threads=torch.get_num_threads(), batch=args.batch, tower=args.tower, llm=args.llm,
        compiled=args.compile, tower_batch_size=args.tower_batch_size, auto_chunk_tokens=AUTO_CHUNK_TOKENS,
        crop=args.crop, image=list(demo_image().shape[1:]), warmup=args.warmup, repeats=args.repeats,
        llm_text_tokens=TEXT_TOKENS,
    )


JUDGED_REPEATS = 5
"""Fewer timed runs than this are too noisy to say whether a target is met."""


def not_judged(meta: dict) -> Optional[str]:
    """Why the targets cannot be judged from this run (they are set for a GPU), or None."""
    if not str(meta["device"]).startswith("cuda"):
        return f"not judged: {meta['device']} run, the targets are set for a GPU"
    if meta["repeats"] < JUDGED_REPEATS:
        return f"not judged: {meta['repeats']} timed run(s), fewer than {JUDGED_REPEATS}"
    return None


def targets(result: dict) -> list[tuple[str, str, bool]]:
    """The issues' targets, as (what, measured, met). Issue 13's speed target is 2.0x at batch 8
    and 8x at batch 1; its memory target compares whole-process peaks (weights included)."""
    rows = {(r["scheme"], r["grid"]): r for r in result["rows"]}
    k = result["kernels"]
    batch = result["meta"]["batch"]
    out = []
    if ("dual_576", "3x3") in rows:
        dual, released = rows[("dual_576", "3x3")], rows.get(("released", "3x3"))
        glue = dual["glue_fraction_of_tower"]
        out.append(("DCM + DEM + glue <= 5% of tower time at 3x3", f"{glue:.1%}", glue <= 0.05))
        if released is not None:
            want = 8.0 if batch == 1 else 2.0
            speedup = dual["images_per_s"] / released["images_per_s"]
            out.append((f"dual_576 >= {want:.0f}x the released path's throughput (3x3, batch {batch})",
                        f"{speedup:.2f}x", speedup >= want))
            memory = dual["peak_memory_mb"] / released["peak_memory_mb"]
            out.append((f"dual_576 peak memory <= 1.5x the released path's (3x3, batch {batch})",
                        f"{memory:.2f}x ({dual['peak_memory_mb']:.0f} vs {released['peak_memory_mb']:.0f} MB)",
                        memory <= 1.5))
    if ("dual_full", "3x3") in rows and ("anyres", "3x3") in rows:
        full, anyres = rows[("dual_full", "3x3")], rows[("anyres", "3x3")]
        bound = full["tower_passes"] / anyres["tower_passes"] * anyres["latency_ms"]["median"]
        ratio = full["latency_ms"]["median"] / bound
        out.append(("dual_full <= (dual / AnyRes tower passes) x AnyRes latency + 3% (3x3)",
                    f"{ratio:.3f} of the bound ({full['latency_ms']['median']:.1f} vs {bound:.1f} ms)", ratio <= 1.03))
    out.append(("DEM >= 70% of plain-matmul FLOP/s", f"{k['dem_fraction_of_matmul']:.0%}", k["dem_fraction_of_matmul"] >= 0.7))
    out.append(("DCM crop copy >= 50% of plain copy bandwidth", f"{k['dcm_fraction_of_copy']:.0%}", k["dcm_fraction_of_copy"] >= 0.5))
    return out


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        f"Device: {m['device_name']} ({m['device']}, {m['dtype']}, {m['threads']} threads), torch {m['torch']}, "
        f"{m['date']}. Tower: {m['tower']} (crop {m['crop']}; dual view and AnyRes: the layer-truncated HFVisionTower, "
        f"tower_batch_size {m.get('tower_batch_size') or 'auto'}{', compiled with the DEM' if m.get('compiled') else ''}; "
        f"released: the host's plain forward), batch {m['batch']}, image {m['image'][0]}x{m['image'][1]}, "
        f"median of {m['repeats']} runs after {m['warmup']} warm-up. LLM: {m['llm']} layer x 32 on image + {m['llm_text_tokens']} text tokens.",
        "",
        "| grid | scheme | tower passes (calls x crops) | LLM tokens | latency ms median [min, max] | images/s | peak MB (extra) | tower ms | glue / tower | DCM, DEM alone ms | LLM ms | total ms | SM MHz |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lat = r["latency_ms"]
        phases = f"{r['dcm_ms']:.1f}, {r['dem_ms']:.1f}" if "dem_ms" in r else "-"
        lines.append(
            f"| {r['grid']} | {r['scheme']} | {r['tower_passes']} ({r['tower_calls']} x {r['crops_per_call']}) | {r['llm_tokens']} | "
            f"{lat['median']:.1f} [{lat['min']:.1f}, {lat['max']:.1f}] | {r['images_per_s']:.2f} | "
            f"{r['peak_memory_mb']:.0f} ({r['extra_peak_memory_mb']:.0f}) | "
            f"{r['tower_ms']:.1f} | {r['glue_fraction_of_tower']:.1%} | {phases} | {r['llm_ms']:.1f} | {r['total_ms']:.1f} | {r.get('sm_clock_mhz') or '-'} |"
        )
    k = result["kernels"]
    rest = k["dem_ms"] - k["dem_attention_block_ms"]
    lines += [
        "",
        f"DEM at {k.get('grid', '3x3')}: {k['dem_ms']:.2f} ms, {k['dem_gflop']:.2f} GFLOP, {k['dem_tflops']:.3f} TFLOP/s = "
        f"{k['dem_fraction_of_matmul']:.0%} of a plain matmul's {k['matmul_tflops']:.3f} TFLOP/s. "
        f"Inside it: the attention block (both directions, projections + SDPA + LayerNorm) {k['dem_attention_block_ms']:.2f} ms "
        f"at {k['dem_attention_block_tflops']:.1f} TFLOP/s, of which SDPA alone {k['dem_sdpa_ms']:.2f} ms at {k['dem_sdpa_tflops']:.1f} TFLOP/s; "
        + (f"the rest ({rest:.2f} ms) is gathers, fusion and resampling." if rest > 0 else
           f"the rest is within the timing noise ({rest:.2f} ms).")
        + ("" if not k["dem_sdpa_tflops_by_backend"] else " SDPA by backend (TFLOP/s): " + ", ".join(
            f"{name} {'n/a' if v is None else f'{v:.1f}'}" for name, v in k["dem_sdpa_tflops_by_backend"].items())),
        "",
        f"DCM crop copy at {k.get('grid', '3x3')}{' (compiled)' if k['dcm_crop_compiled'] else ''} {k['dcm_crop_gbps']:.1f} GB/s = "
        f"{k['dcm_fraction_of_copy']:.0%} of a plain copy's {k['plain_copy_gbps']:.1f} GB/s.",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    reason = not_judged(result["meta"])
    lines += [f"| {what} | {got} | {reason or ('yes' if ok else 'no')} |" for what, got, ok in targets(result)]
    lines += ["", "Checks: " + ", ".join(f"{k} = {v}" for k, v in result["checks"].items())]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['scheme']}\n{r['grid']}" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    axes[0].bar(labels, [r["latency_ms"]["median"] for r in rows], color="tab:blue")
    axes[0].set_title("vision side: latency per batch (ms)")
    axes[1].bar(labels, [r["llm_tokens"] for r in rows], color="tab:orange")
    axes[1].set_title("LLM image tokens per image")
    axes[2].bar(labels, [r["total_ms"] for r in rows], color="tab:green")
    axes[2].set_title("vision + LLM prefill (ms)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7, rotation=90)
    m = result["meta"]
    fig.suptitle(f"dualview vs AnyRes: {m['device_name']}, {m['dtype']}, tower {m['tower']}, batch {m['batch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


DESCRIPTION = "Dual view against plain AnyRes tiling: cost, tokens, memory, and the LLM side (random weights)."


def _grids(text: str) -> list[G.Grid]:
    """``--grids``: comma-separated RxC (no "auto": the benchmark times fixed grids)."""
    grids = []
    for part in text.split(","):
        try:
            grids.append(G.parse_grid(part.strip().lower()))
        except ValueError:
            grids.append(None)
        if grids[-1] in (None, "auto"):
            raise argparse.ArgumentTypeError(
                f"must be comma-separated RxC grids with R and C in 1..{MAX_GRID_SIDE}, like 2x2,3x3 (not 'auto'), "
                f"got {part.strip()!r} in {text!r}"
            )
    return grids


def _device(text: str) -> torch.device:
    """``--device``: a torch device string (cpu, cuda, cuda:1, ...), else a usage error."""
    try:
        return torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a torch device like cpu, cuda or cuda:1, got {text!r}") from None


MAX_PIXELS = 2**28
"""Largest number of crop pixels one scheme sends through the tower (``batch * (1 + 2*R*C) * crop^2``,
about 3 GB in float32): checked before anything is allocated."""


class BenchError(ValueError):
    """A benchmark that cannot run as asked; the message is one line."""


def device_unavailable(device: torch.device) -> Optional[str]:
    """Why ``device`` cannot run here (no such backend, no device, an index past the count), or None."""
    if device.type == "cpu":
        return None
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None:
        return f"the benchmark runs on cpu or an accelerator torch supports (cuda, ...), not {device.type}"
    if not available():
        return f"torch sees no {device.type} device here (torch.{device.type}.is_available() is False): use --device cpu"
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        return f"torch sees {count} {device.type} device(s) here, numbered from 0"
    return None


def check_args(args) -> None:
    """What can be known wrong before any work: the device, the size, the output folder. One
    :class:`BenchError` line naming the option."""
    reason = device_unavailable(torch.device(args.device))
    if reason:
        raise BenchError(f"--device {args.device}: {reason}")
    for rows, cols in args.grids:
        pixels = args.batch * (1 + 2 * rows * cols) * args.crop**2
        if pixels > MAX_PIXELS:
            raise BenchError(
                f"--batch {args.batch} x {1 + 2 * rows * cols} crops of grid {rows}x{cols} at --crop {args.crop} is "
                f"{pixels:,} crop pixels per call, more than the benchmark's {MAX_PIXELS:,}: lower --batch, --crop or --grids"
            )
    out = args.out
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {str(out)!r} exists and is not a folder: give a folder for bench.json, bench.md, bench.png")
    if out.exists() and cannot_create_in(out):
        raise BenchError(f"--out {str(out)!r} is not writable: {cannot_create_in(out)}")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if not out.exists() and (parent is None or not parent.is_dir() or cannot_create_in(parent)):
        raise BenchError(f"--out {str(out)!r} cannot be created: {str(parent)!r} is not a writable folder")


def _count(minimum: int, maximum: Optional[int] = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum or (maximum is not None and value > maximum):
            within = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
            raise argparse.ArgumentTypeError(f"must be an int {within}, got {text!r}")
        return value

    return parse


def _tower_batch_size(text: str):
    """``--tower-batch-size``: ``auto`` (None), ``all`` or a positive int, else a usage error naming all three."""
    if text in ("auto", "all"):
        return None if text == "auto" else "all"
    try:
        return _count(1)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be 'auto', 'all' or an int >= 1, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options, shared by ``python -m dualview.bench`` and ``dualview bench``."""
    gpu = torch.cuda.is_available()
    p.add_argument("--device", type=_device, default=torch.device("cuda" if gpu else "cpu"),
                   help="cpu, cuda, cuda:1, ... (default: cuda when torch sees a GPU)")
    p.add_argument("--dtype", default="bfloat16" if gpu else "float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--tower", default="vit-l" if gpu else "small", choices=sorted(TOWERS))
    p.add_argument("--llm", default="llama-7b" if gpu else "small", choices=sorted(LLMS))
    p.add_argument("--batch", type=_count(1), default=8 if gpu else 1)
    p.add_argument("--crop", type=crop_size_option(), default=336, help=f"crop size s: {crop_size_rule()}")
    p.add_argument("--grids", type=_grids, default=_grids("2x2,3x3"), help="comma-separated RxC (default 2x2,3x3)")
    p.add_argument("--warmup", type=_count(0), default=3 if gpu else 2)
    p.add_argument("--repeats", type=_count(1), default=10 if gpu else 5)
    p.add_argument("--compile", action="store_true",
                   help="DualViewEncoder(compile=True): tower calls and DEM compiled; AnyRes's tower too")
    p.add_argument("--tower-batch-size", type=_tower_batch_size, default=None,
                   help="the encoders' tower_batch_size: 'auto' (default), 'all' (one call) or crops per call")
    p.add_argument("--profile", action="store_true", help="also write profile.txt: torch.profiler of dual_576 at the last grid")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for bench.json, bench.md, bench.png")


def build_parser(prog: str = "python -m dualview.bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(p)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def execute(args) -> dict:
    """Run the benchmark for parsed ``args`` and write bench.json, bench.md and bench.png."""
    result = bench(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (args.out / "bench.md").write_text(table)
    plot(result, args.out / "bench.png")
    print(table)
    print(f"written: {args.out}/bench.json, bench.md, bench.png")
    return result


def main(argv=None) -> dict:
    from dualview._checks import MissingDependency, require

    args = parse_args(argv)
    try:  # before any work: the plot needs matplotlib, the models transformers; the device, the size, --out
        require("matplotlib", extra="viz", feature="python -m dualview.bench (its plot, bench.png)")
        require("transformers", extra="hf", feature="python -m dualview.bench (its CLIP tower and Llama layer)")
        check_args(args)
    except (MissingDependency, BenchError) as e:
        sys.exit(f"python -m dualview.bench: error: {e}")
    return execute(args)
