"""The ``dualview`` command (also ``python -m dualview``): see the crops, compare budgets, convert
INF-LLaVA checkpoints, run the CPU benchmark.

    dualview show [IMAGE] [--grid auto|RxC] [--crop-size 336] [--max-tiles N] -o crops.png|.jpg|...|DIR
    dualview budget --size HxW [--grid ...] [--json]
    dualview convert-inf-llava SOURCE -o dem.safetensors [--num-heads N]
    dualview bench [--device ...] [--grids 2x2,3x3] [--out DIR] ...   (the options of python -m dualview.bench)
    dualview upstream {llava,llava-next} FORK_DIR [--check]

    dualview --version

Errors are one line on stderr and exit code 1 (2 for a malformed command line: argparse's usage
error, in the user's own words), never a traceback; a missing optional dependency is reported
before any work is done. No command writes over one of its inputs; files are written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from .. import __version__
from .. import grid as G
from .._checks import MAX_GRID_SIDE, MIN_CROP_SIZE, PATCH_SIZE, MissingDependency, crop_size_option, crop_size_rule, require
from .._output import check_not_input, check_writable

EXIT_ERROR = 1
VIZ = ("matplotlib", "PIL")
"""What ``dualview show`` and the benchmark's plot need: the ``viz`` extra."""


class CommandError(Exception):
    """A failure the user can fix; printed as one line."""


def parse_size(text: str) -> G.Size:
    """``HxW`` with positive ints, else a ValueError in the user's words."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"must be HxW with positive ints, like 1000x1800, got {text!r}")
    return int(parts[0]), int(parts[1])


def size_arg(text: str) -> G.Size:
    """An argparse type for ``--size``: a malformed size is a usage error (exit 2)."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def grid_arg(text: str) -> str:
    """An argparse type for ``--grid``: ``auto`` or ``RxC`` with sides in 1..32, kept as the user
    wrote it (for messages and titles), else a usage error in the user's words."""
    try:
        G.parse_grid(text.lower())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be 'auto' or RxC with R and C in 1..{MAX_GRID_SIDE}, like 3x3, got {text!r}"
        ) from None
    return text.lower()


def positive_int(text: str) -> int:
    """An argparse type: a positive int, else a usage error that names the option."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return value


def show_output_arg(text: str) -> str:
    """An argparse type for ``show -o``: a suffix ``show`` can write (or none, or a folder)."""
    from .show import FORMATS, output_format

    path = Path(text)
    if path.suffix and not text.endswith(("/", os.sep)) and not path.is_dir():
        try:
            output_format(path)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    elif not text:
        raise argparse.ArgumentTypeError(f"must be a file ({', '.join(FORMATS)}) or a folder, got ''")
    return text


def safetensors_output_arg(text: str) -> str:
    """An argparse type for ``convert-inf-llava -o``: a ``.safetensors`` file name (or a folder,
    refused with a suggestion when the command runs)."""
    from .convert import check_output_name

    if not Path(text).is_dir():
        try:
            check_output_name(text, "")
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return text


def small_image_error(size: G.Size, crop_size: int, what: str, fix: str) -> str | None:
    """Why an image of ``size`` (``what``, as the user gave it) cannot be cut at ``crop_size`` (DCM
    refuses an image smaller than one crop on both sides), with what the user can do on the command
    line: ``fix`` the image, or lower ``--crop-size`` to one the image covers; None when it can."""
    if max(size) >= crop_size:
        return None
    fitting = max(size) // PATCH_SIZE * PATCH_SIZE  # the largest crop size (a multiple of the patch) it covers
    smaller = f", or choose --crop-size {fitting} or less" if fitting >= MIN_CROP_SIZE else ""
    return (
        f"{what} is smaller than --crop-size {crop_size} on both sides (dual view cuts crops from an image "
        f"at least one crop high or wide): {fix} at least {crop_size} pixels high or wide{smaller}"
    )


def check_budget_usage(args) -> str | None:
    """What the parser cannot check alone, as a usage error: --crop-size against --patch-size and --size."""
    if args.crop_size % args.patch_size:
        return (f"argument --crop-size: must be a multiple of --patch-size {args.patch_size}, "
                f"got {args.crop_size}")
    height, width = args.size
    return small_image_error(args.size, args.crop_size, f"--size {height}x{width}", "give a --size")


def cmd_show(args) -> None:
    require(*VIZ, extra="viz", feature="dualview show")
    from ..sample import demo_image
    from .show import check_canvas, describe, load_image, render, resolve_output

    output, fmt = resolve_output(args.output)
    grid = G.parse_grid(args.grid)
    if grid != "auto":  # before the image is read: nothing is allocated for a canvas too large
        check_canvas(grid, args.crop_size, grid_text=args.grid)
    check_writable(output, name="-o")
    if args.image:
        check_not_input(output, [Path(args.image)], name="-o")
    image = load_image(Path(args.image)) if args.image else demo_image()
    name = args.image or "embedded demo image"
    height, width = image.shape[1:]
    problem = small_image_error((height, width), args.crop_size, f"image {name!r} ({height}x{width}, HxW)",
                                "upscale it to")
    if problem:
        raise CommandError(problem)
    render(image, output, crop_size=args.crop_size, grid=grid, max_tiles=args.max_tiles,
           title=f"dual view of {name}: crop {args.crop_size}, grid {args.grid}", fmt=fmt, name="-o")
    print(f"wrote {output} ({describe(fmt)})")


def cmd_budget(args) -> None:
    from ..budget import compare, table

    size = args.size
    budgets = compare(size, crop_size=args.crop_size, patch_size=args.patch_size, grid=G.parse_grid(args.grid),
                      max_tiles=args.max_tiles)
    if args.json:
        print(json.dumps({"image_size": list(size), "budgets": [asdict(b) for b in budgets]}, indent=2))
    else:
        print(f"image {size[0]}x{size[1]}, crop {args.crop_size}, patch {args.patch_size}, grid {args.grid}")
        print(table(budgets))


def cmd_convert(args) -> None:
    require("safetensors", extra="hf", feature="dualview convert-inf-llava")
    from .convert import convert_inf_llava

    summary = convert_inf_llava(Path(args.source), Path(args.output), num_heads=args.num_heads, output_name="-o",
                                num_heads_name="--num-heads")
    heads = (f"num_heads {summary['num_heads']} assumed (the released value; the weights cannot tell it: "
             "pass --num-heads if this DEM was trained with another)" if summary["num_heads_assumed"]
             else f"num_heads {summary['num_heads']}")
    print(f"wrote {args.output}: DEM dim {summary['dim']} ({summary['dem_tensors']} tensors)"
          + (f", projector ({summary['projector_tensors']} tensors)" if summary["projector_tensors"] else "")
          + f"; {heads}")


def cmd_bench(args) -> None:
    from ..bench import run

    require(*VIZ, extra="viz", feature="dualview bench (its plot, bench.png)")
    require("transformers", extra="hf", feature="dualview bench (its CLIP tower and Llama layer)")
    run.check_args(args)
    run.execute(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualview", description="INF-LLaVA's dual-view cropping and enhancement")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def grid_options(p, patch_size=PATCH_SIZE):
        p.add_argument("--grid", default="auto", type=grid_arg,
                       help="'auto' (LLaVA-NeXT's AnyRes choice) or RxC, e.g. 3x3")
        p.add_argument("--crop-size", type=crop_size_option(patch_size), default=336,
                       help=f"vision tower input size s (default 336): {crop_size_rule(patch_size)}"
                            + ("" if patch_size else ", a multiple of --patch-size"))
        p.add_argument("--max-tiles", type=positive_int, default=9, help="largest R*C for --grid auto (default 9)")

    show = sub.add_parser("show", help="draw the image, its grid, the local and the global crops, and the budgets")
    show.add_argument("image", nargs="?", help="any image PIL reads (default: the embedded demo image)")
    grid_options(show)
    show.add_argument("-o", "--output", default="crops.png", type=show_output_arg,
                      help="file to write, its format from its suffix (.png, .jpg, .webp, .tif, .pdf, .svg; none: .png "
                           "is added), or a folder to write crops.png in (default crops.png)")
    show.set_defaults(run=cmd_show)

    budget = sub.add_parser("budget", help="tower passes and LLM tokens per image, scheme by scheme")
    budget.add_argument("--size", required=True, type=size_arg, help="image size HxW, e.g. 1000x1800")
    grid_options(budget, patch_size=None)  # --crop-size against --patch-size: check_budget_usage
    budget.add_argument("--patch-size", type=positive_int, default=14, help="vision tower patch size (default 14)")
    budget.add_argument("--json", action="store_true", help="print JSON")
    budget.set_defaults(run=cmd_budget, usage=check_budget_usage, usage_error=budget.error)

    convert = sub.add_parser("convert-inf-llava", help="extract the DEM (and projector) of an INF-LLaVA checkpoint")
    convert.add_argument("source", help="checkpoint folder (sharded .safetensors / .bin) or one file (mm_projector.bin)")
    convert.add_argument("-o", "--output", required=True, type=safetensors_output_arg,
                         help="the .safetensors file to write (never one of the files read; written atomically)")
    convert.add_argument("--num-heads", type=positive_int, default=None,
                         help="the DEM's attention heads, which its weights cannot tell (default: the released 8, "
                              "marked as assumed in the file's metadata)")
    convert.set_defaults(run=cmd_convert)

    from ..bench.run import DESCRIPTION, add_arguments  # one parser for `dualview bench` and `python -m dualview.bench`

    bench = sub.add_parser("bench", help="the benchmark: dual view vs AnyRes vs the released INF-LLaVA path", description=DESCRIPTION)
    add_arguments(bench)
    bench.set_defaults(run=cmd_bench)

    from .upstream import add_subcommand as add_upstream_subcommand  # dualview upstream: patch a LLaVA fork

    add_upstream_subcommand(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    problem = args.usage(args) if hasattr(args, "usage") else None
    if problem:
        args.usage_error(problem)  # exit 2, as the parser's own errors
    try:
        args.run(args)
    except (CommandError, MissingDependency, ValueError, TypeError, FileNotFoundError, OSError) as e:
        message = " ".join(str(e).split())  # one line, whatever the exception held
        print(f"dualview {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
