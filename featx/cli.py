"""``featx verify | sweep | inspect | check | build | export``: argument parsing only; the work is done by the API.

Exit codes: 0 faithful (verify, check) or analysis done (sweep, inspect); 1 not faithful; 2 bad usage or
input, with one line on stderr and no traceback. ``check`` exits with its worst config's code.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from featx.backbone import build_backbone, export, resolve_taps, source_model
from featx.checks import check
from featx.config import load_config
from featx.errors import FeatxError, listing, one_line
from featx.files import write_text
from featx.models import default_input_shape, load_model
from featx.picture import svg
from featx.report import shape_text
from featx.report import table as _table
from featx.truncate import child_names
from featx.verify import example, inspect, sweep, verify

_MODES = {"eval": ("eval",), "train": ("train",), "both": ("eval", "train")}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        raise FeatxError(f"{message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="featx", description="Truncate vision backbones and prove what the cut keeps.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    common = _Parser(add_help=False)
    common.add_argument("spec", help="torchvision/<name>, timm/<name> or package.module:callable")
    common.add_argument(
        "--input-shape",
        type=_shape,
        default=None,
        help="the whole input shape, batch included (default: 2 and the model's own size)",
    )
    common.add_argument("--weights", default=None, help="local .safetensors file or torch checkpoint")
    common.add_argument(
        "--model-kwarg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=_kwarg,
        help="constructor keyword argument, VALUE parsed as YAML (repeatable)",
    )
    common.add_argument(
        "--mode", choices=sorted(_MODES), default=None, help="modes to check (default: both, or the config's)"
    )
    common.add_argument("--seed", type=int, default=0, help="RNG seed for the input and train-mode runs")
    common.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    common.add_argument("--json", action="store_true", help="print JSON instead of tables")
    tolerance = _Parser(add_help=False)
    tolerance.add_argument(
        "--atol", type=_non_negative, default=None, help="absolute tolerance (default 0: exact)"
    )
    tolerance.add_argument(
        "--rtol", type=_non_negative, default=None, help="relative tolerance (default 0: exact)"
    )

    p = commands.add_parser(
        "verify", parents=[common, tolerance], help="verify one cut (SPEC or CONFIG.yaml)"
    )
    p.add_argument(
        "--upto",
        default=None,
        help="child name (kept, inclusive), a count N / -N, or a dotted path into a child (stages.2)",
    )
    p.add_argument("--svg", default=None, metavar="FILE", help="also draw the cut as a self-contained SVG")
    p = commands.add_parser("sweep", parents=[common, tolerance], help="verify every cut point")
    p.add_argument("--literal", action="store_true", help="run every cut's Sequential instead of deriving")
    p.add_argument(
        "--depth",
        type=_depth,
        default=1,
        help="also cut inside children down to this depth (default 1: between the root's children)",
    )
    commands.add_parser("inspect", parents=[common], help="children, glue and residuals; no cut")
    p = commands.add_parser("export", help="write the kept weights of a config's backbone to safetensors")
    p.add_argument("config", help="a backbone config (.yaml)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p = commands.add_parser(
        "check", help="verify every config (files or folders) and every cut it declares; for CI"
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="config files (.yaml, .yml) or folders of them")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--junit", default=None, metavar="FILE", help="also write JUnit XML")
    p.add_argument("--markdown", default=None, metavar="FILE", help="also write a Markdown job summary")
    p.add_argument("--seed", type=int, default=0, help="RNG seed for the inputs and train-mode runs")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    p = commands.add_parser("build", help="build a backbone from a config and show its outputs")
    p.add_argument("config", help="a backbone config (.yaml)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except FeatxError as err:
        print(f"featx: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("featx: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # not featx's verdict, so never exit 1; the traceback on request
        if os.environ.get("FEATX_DEBUG"):
            raise
        print(
            f"featx: error: {type(err).__name__}: {one_line(err)} (FEATX_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 2


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "build":
        return _build(args)
    if args.command == "check":
        return _check(args)
    if args.command == "export":
        _writable("--out", args.out)
        path = export(args.config, args.out)
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
        return 0
    _writable("--svg", getattr(args, "svg", None))
    for absent in ("upto", "atol", "rtol", "svg"):  # not every command takes them
        setattr(args, absent, getattr(args, absent, None))
    device = _device(args.device)
    if _is_config(args.spec):  # featx verify CONFIG: the config supplies what the flags do not
        cfg = load_config(args.spec)
        model, kept = source_model(
            cfg, upto=args.upto, weights=args.weights, model_kwargs=dict(args.model_kwarg)
        )
        upto = args.upto if args.upto is not None else cfg.upto
        taps = resolve_taps(model, kept, cfg) if args.upto is None else {}  # drawn on the picture
        shape = args.input_shape or cfg.verify.input_shape
        modes = _MODES[args.mode] if args.mode else cfg.verify.modes
        atol = args.atol if args.atol is not None else cfg.verify.atol
        rtol = args.rtol if args.rtol is not None else cfg.verify.rtol
        spec = cfg.model
    else:
        model = load_model(args.spec, weights=args.weights, **dict(args.model_kwarg))
        upto, shape, modes, spec = args.upto, args.input_shape, _MODES[args.mode or "both"], args.spec
        atol, rtol, taps = args.atol or 0.0, args.rtol or 0.0, {}
    model = model.to(device)
    x = _input(model, spec, shape, device, args.seed)
    if args.command == "verify":
        if upto is None:
            raise FeatxError("verify needs --upto with a model spec (or a config file that sets `upto`)")
        result = verify(model, upto, x, modes=modes, atol=atol, rtol=rtol, seed=args.seed)
        code = 0 if result.faithful else 1
    elif args.command == "sweep":
        result = sweep(
            model,
            x,
            modes=modes,
            atol=atol,
            rtol=rtol,
            seed=args.seed,
            literal=args.literal,
            depth=args.depth,
        )
        code = 0
    else:
        result = inspect(model, x, modes=modes, seed=args.seed)
        code = 0
    print(json.dumps(result.to_dict(), indent=2) if args.json else str(result), flush=True)
    if args.svg:
        _write("--svg", args.svg, svg(result, taps))
    return code


def _check(args: argparse.Namespace) -> int:
    _device(args.device)  # a bad --device is the run's error, not every config's
    _writable("--junit", args.junit)
    _writable("--markdown", args.markdown)
    bar = _Progress() if sys.stderr.isatty() else None
    try:
        result = check(args.paths, device=args.device, seed=args.seed, progress=bar)
    finally:
        if bar is not None:
            bar.clear()
    print(json.dumps(result.to_dict(), indent=2) if args.json else str(result), flush=True)
    if args.junit:
        _write("--junit", args.junit, result.junit())
    if args.markdown:
        _write("--markdown", args.markdown, result.markdown())
    return result.exit_code


class _Progress:
    """``[#####.....] 3/5 configs/c4.yaml`` redrawn in place on stderr; only made for a terminal."""

    def __init__(self, width: int = 24) -> None:
        self.width = width

    def __call__(self, done: int, total: int, item: str) -> None:
        filled = self.width * done // max(total, 1)
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {item}"
        columns = shutil.get_terminal_size().columns
        sys.stderr.write("\r\033[K" + line[: max(columns - 1, 10)])
        sys.stderr.flush()

    def clear(self) -> None:
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()


def _build(args: argparse.Namespace) -> int:
    backbone = build_backbone(args.config)
    body = getattr(backbone, "body", backbone)
    frozen = set(body.frozen)
    kept = sum(p.numel() for p in body.parameters())
    rows = [
        {
            "name": output,
            "child": child,
            "channels": body.out_channels[output],
            "stride": body.strides[output],
            "shape": body.shapes[output],
            "frozen": child.split(".")[0] in frozen,  # a tap inside a child is frozen with it
        }
        for child, outputs in body.taps.items()
        for output in outputs
    ]
    summary = {
        "config": args.config,
        "outputs": rows,
        "params_kept": kept,
        "params_total": body.source_params,
        "frozen": sorted(frozen, key=list(body.keys()).index),
        "fpn_out_channels": backbone.out_channels if backbone is not body else None,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    table = _table(
        ["output", "child", "channels", "stride", "shape", "frozen"],
        [
            [
                r["name"],
                r["child"],
                str(r["channels"]),
                str(r["stride"]),
                shape_text(r["shape"]),
                "yes" if r["frozen"] else "no",
            ]
            for r in rows
        ],
    )
    print(f"featx build  {args.config}")
    print()
    print("\n".join(table))
    print()
    share = kept / body.source_params if body.source_params else 0.0
    print(
        f"params kept {kept:,} of {body.source_params:,} ({share:.0%}); frozen: "
        + (", ".join(f"`{n}`" for n in summary["frozen"]) or "none")
        + (f"; FPN out_channels {summary['fpn_out_channels']}" if summary["fpn_out_channels"] else "")
    )
    return 0


def _writable(flag: str, path: str | None) -> None:
    """Refuse an output file that cannot be written before the work, not after it."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise FeatxError(f"{flag} {path} is a folder; give a file name")
    folder = Path(os.path.realpath(target)).parent
    if not folder.is_dir():
        raise FeatxError(f"{flag} {path}: folder `{target.parent}` does not exist")
    if target.exists() and not target.is_file():
        if not os.access(target, os.W_OK):
            raise FeatxError(f"{flag} {path} cannot be written")
    elif not os.access(folder, os.W_OK | os.X_OK):
        raise FeatxError(f"{flag} {path}: folder `{folder}` is not writable")


def _write(flag: str, path: str, text: str) -> None:
    try:
        write_text(path, text)
    except OSError as err:
        raise FeatxError(f"{flag} {path} cannot be written: {err.strerror or err}") from None


def _is_config(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


def _input(
    model: torch.nn.Module, spec: str, shape: tuple[int, ...] | None, device: torch.device, seed: int
) -> torch.Tensor:
    try:
        expected = default_input_shape(model)
    except FeatxError:
        if shape is None:
            raise
        expected = None
    if shape is None:
        shape = expected
    elif expected is not None and len(shape) != len(expected):
        raise FeatxError(
            f"--input-shape {','.join(map(str, shape))} has {len(shape)} dimensions; `{spec}` takes "
            f"{len(expected)}, batch included (e.g. {','.join(map(str, expected))})"
        )
    if not child_names(model):
        raise FeatxError(f"`{spec}` has no children to cut between")
    try:
        return example(model, None, seed, shape=shape).to(device)
    except RuntimeError as err:
        raise FeatxError(
            f"--input-shape {','.join(map(str, shape))}: cannot make the input: {one_line(err)}"
        ) from None


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"`{text}` is not comma-separated integers, e.g. 2,3,224,224"
        ) from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"`{text}` has a dimension that is not a positive integer")
    return dims


def _kwarg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"`{text}` is not KEY=VALUE with KEY a Python identifier")
    try:
        return key, yaml.safe_load(value) if value else None
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0]
        raise argparse.ArgumentTypeError(
            f"`{text}`: the value is not a YAML scalar or list ({first})"
        ) from None


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{text}` is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"`{text}` is negative; tolerances are >= 0")
    return value


def _depth(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{text}` is not an int; accepted: 1, 2, 3, ...") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"`{text}` is below 1; accepted: 1 (the root's children), 2, 3, ...")
    return value


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise FeatxError(
            f"--device `{text}` is not a torch device; accepted: cpu, cuda, cuda:N, mps"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FeatxError(f"--device `{text}`: CUDA is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise FeatxError(
            f"--device `{text}` is not supported; accepted: {listing(['cpu', 'cuda', 'mps', 'xpu'])}"
        )
    return device


if __name__ == "__main__":
    sys.exit(main())
