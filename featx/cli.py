"""``featx verify | sweep | inspect | check | build | export | extract``: argument parsing only; the work is
done by the API.

Exit codes: 0 faithful (verify, check) or analysis done (sweep, inspect) or every sample extracted
(extract); 1 not faithful, or extract finished with failed samples (listed); 2 bad usage or input, with
one line on stderr and no traceback; 3 extract did not finish (SIGINT or SIGTERM, its torchrun launcher
died, another rank failed): one line saying how many shards are done, and the same command resumes.
``check`` exits with its worst config's code; a reader that closes the pipe early
(``featx verify ... | head``) ends the run quietly with 141, as SIGPIPE does.
``featx extract --verify DIR``: 0 the store is intact, 1 damaged (each problem named), 2 not a store or bad
usage, 3 not finished (no manifest yet).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from featx._version import __version__
from featx.errors import FeatxError, FeatxWarning, Interrupted, Unfinished, did_you_mean, one_line

# torch and the engine are imported inside the commands, once the arguments are parsed: `--help` and
# `--version` never import them
if TYPE_CHECKING:
    import torch
    from tqdm import tqdm

    from featx.config import BackboneConfig


_KEEP_GLUE_HELP = (
    "cut with the root's glue kept (featx.truncate(..., keep_glue=True)) instead of the Sequential"
)
_WEIGHTS_HELP = (
    "a .safetensors file or torch checkpoint, or pretrained weights: DEFAULT, IMAGENET1K_V2 "
    "(torchvision), a timm tag (a1_in1k) or hf-hub:org/name, read from torch's / the hub's cache"
)
_WEIGHTS_PREFIX_HELP = "strip this dotted prefix from the checkpoint's keys (module., backbone.body.)"
_DEVICE_HELP = "torch device, e.g. cpu or cuda:0 (default: cpu)"
# featx.export.TOLERANCES, written out: --help never imports torch (a test holds the two together)
_EXPORT_TOLERANCE = "per format: safetensors 0 (exact), pt2 1e-05, onnx 0.0001"
_MODES = {"eval": ("eval",), "train": ("train",), "both": ("eval", "train")}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage block
        raise FeatxError(f"{message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="featx", description="Truncate vision backbones and prove what the cut keeps.")
    parser.add_argument("--version", action="version", version=f"featx {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    common = _Parser(add_help=False)
    common.add_argument("spec", help="torchvision/<name>, timm/<name> or package.module:callable")
    common.add_argument(
        "--input-shape",
        type=_shape,
        default=None,
        help="the whole input shape, batch included (default: 2 and the model's own size)",
    )
    common.add_argument("--weights", default=None, help=_WEIGHTS_HELP)
    common.add_argument("--weights-prefix", default=None, metavar="PREFIX", help=_WEIGHTS_PREFIX_HELP)
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
    common.add_argument("--device", default="cpu", help=_DEVICE_HELP)
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
    p.add_argument("--keep-glue", action="store_true", help=_KEEP_GLUE_HELP)
    p = commands.add_parser("sweep", parents=[common, tolerance], help="verify every cut point")
    p.add_argument("--literal", action="store_true", help="run every cut's Sequential instead of deriving")
    p.add_argument("--keep-glue", action="store_true", help=_KEEP_GLUE_HELP)
    p.add_argument(
        "--depth",
        type=_depth,
        default=1,
        help="also cut inside children down to this depth (default 1: between the root's children)",
    )
    commands.add_parser("inspect", parents=[common], help="children, glue and residuals; no cut")
    p = commands.add_parser(
        "export",
        help="export a config's backbone (or SPEC --upto X) as safetensors, ONNX or pt2, checked before written",
    )
    p.add_argument(
        "target", metavar="CONFIG|SPEC", help="a backbone config (.yaml), or a model spec with --upto"
    )
    p.add_argument("--out", required=True, help="the file to write (.safetensors, .onnx or .pt2)")
    p.add_argument(
        "--format", default=None, help="safetensors, onnx or pt2 (default: the one --out's suffix names)"
    )
    p.add_argument(
        "--upto",
        default=None,
        help="with a SPEC: the cut: child name, a count N / -N, or a dotted path into a child (stages.2)",
    )
    p.add_argument("--outputs", default=None, help="with a SPEC: the children to tap, a,b (default: the cut)")
    p.add_argument("--keep-glue", action="store_true", help="with a SPEC: " + _KEEP_GLUE_HELP)
    p.add_argument("--weights", default=None, help="with a SPEC: " + _WEIGHTS_HELP)
    p.add_argument(
        "--weights-prefix", default=None, metavar="PREFIX", help="with a SPEC: " + _WEIGHTS_PREFIX_HELP
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="export a model without weights (a SPEC without --weights, a config's `weights: null`) at its "
        "random init, seeded by --seed; refused without this flag",
    )
    p.add_argument(
        "--model-kwarg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=_kwarg,
        help="with a SPEC: constructor keyword argument, VALUE parsed as YAML (repeatable)",
    )
    p.add_argument(
        "--input-shape",
        type=_shape,
        default=None,
        help="with a SPEC: the input shape the backbone is measured at (default: the model's own)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="RNG seed for the check inputs and a random init (default 0)"
    )
    p.add_argument("--device", default="cpu", help="run and check the backbone on this " + _DEVICE_HELP)
    p.add_argument(
        "--atol", type=_non_negative, default=None, help=f"absolute tolerance (default {_EXPORT_TOLERANCE})"
    )
    p.add_argument(
        "--rtol",
        type=_non_negative,
        default=None,
        help=f"tolerance relative to each output's largest magnitude (default {_EXPORT_TOLERANCE})",
    )
    p.add_argument("--json", action="store_true", help="print the check as JSON instead of the table")
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
    p.add_argument("config", help="a backbone config (.yaml) or a .safetensors file featx export wrote")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _extract_parser(commands)
    return parser


def _extract_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "extract",
        help="run a dataset through a verified cut into shards + manifest (resumable; torchrun for ranks)",
        description="Run a dataset through a verified cut into shards and a manifest. Exit codes: 0 every "
        "sample extracted; 1 finished with failed samples (listed; manifest status complete_with_failures); "
        "2 bad usage or input; 3 did not finish (SIGINT/SIGTERM, another rank died, a full disk): rerun the same "
        "command to resume. Under torchrun, which exits 1 for any failed rank, manifest.json exists only "
        "when the run finished.",
    )
    p.add_argument(
        "spec",
        nargs="?",
        metavar="SPEC|CONFIG",
        help="a model spec (with --upto) or a backbone config (.yaml); not with --verify",
    )
    p.add_argument("--data", help="a folder of images, a .txt list of paths, or .tar shards (required)")
    p.add_argument("--out", help="the output folder (new, empty, or a run to resume) (required)")
    p.add_argument(
        "--verify",
        metavar="DIR",
        default=None,
        help="check the store in DIR (sizes, sha256, indexes) without computing anything; exit 0 intact, "
        "1 damaged, 3 not finished",
    )
    p.add_argument(
        "--upto",
        default=None,
        help="the cut: child name (kept, inclusive), a dotted path into one (layer3.1), or a count N / -N",
    )
    p.add_argument("--keep-glue", action="store_true", help="keep the root's glue up to the cut")
    p.add_argument(
        "--outputs",
        type=_names,
        default=None,
        metavar="A,B",
        help="modules to tap: children or dotted paths (default: the cut)",
    )
    p.add_argument(
        "--pool",
        type=_per_output,
        default="none",
        metavar="none|avg|max|cls",
        help="pooling for every output, or OUTPUT=POOL,... (default: none)",
    )
    p.add_argument(
        "--dtype",
        type=_per_output,
        default="float32",
        metavar="float32|float16|bfloat16",
        help="storage dtype for every output, or OUTPUT=DTYPE,... (default: float32)",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="a .safetensors file or torch checkpoint, or pretrained weights: DEFAULT, IMAGENET1K_V2 "
        "(torchvision), a timm tag (a1_in1k) or hf-hub:org/name, read from torch's / the hub's cache",
    )
    p.add_argument(
        "--weights-prefix",
        default=None,
        metavar="PREFIX",
        help="strip this dotted prefix from the checkpoint's keys (module., backbone.body.)",
    )
    p.add_argument(
        "--model-kwarg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=_kwarg,
        help="constructor keyword argument, VALUE parsed as YAML (repeatable)",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="extract a model that gets no weights, its init seeded by --seed (refused without this flag)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="RNG seed of the random init with --random-weights (default 0)"
    )
    p.add_argument("--batch-size", type=_positive, default=32, help="images per forward (default: 32)")
    p.add_argument("--shard-size", type=_positive, default=1024, help="samples per shard (default: 1024)")
    p.add_argument(
        "--workers", type=_count, default=None, help="DataLoader worker processes (default: min(4, cores))"
    )
    p.add_argument("--format", choices=["safetensors", "npy"], default="safetensors", help="shard format")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (each torchrun rank on its local GPU)")
    p.add_argument(
        "--channels-last", action="store_true", help="run the model in channels_last memory format"
    )
    p.add_argument("--autocast", action="store_true", help="autocast (bfloat16 on CPU, float16 on CUDA)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: remove featx's own files from --out (never anyone else's) and extract everything",
    )
    p.add_argument("--allow-unfaithful", action="store_true", help="extract even if the cut is not faithful")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def main(argv: Sequence[str] | None = None) -> int:
    with warnings.catch_warnings():
        show = warnings.showwarning
        warnings.showwarning = functools.partial(_show_warning, show)
        return _run(argv)


def _show_warning(
    show: Callable[..., None], message: Warning | str, category: type[Warning], *args: object
) -> None:
    """A ``FeatxWarning`` as one ``featx: warning:`` line on stderr; any other warning as Python shows it."""
    if issubclass(category, FeatxWarning):
        print(f"featx: warning: {message}", file=sys.stderr)
    else:
        show(message, category, *args)


def _run(argv: Sequence[str] | None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
        return code
    except Unfinished as err:  # a full disk mid-run: the input was fine, and the same command resumes
        print(f"featx: error: {err}", file=sys.stderr)
        return 3
    except FeatxError as err:
        print(f"featx: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:  # a run that did not finish and can be resumed
        print(f"featx: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("featx: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): not an error. Point stdout at /dev/null so the interpreter's
        # final flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    except Exception as err:  # not featx's verdict, so never exit 1; the traceback on request
        if os.environ.get("FEATX_DEBUG"):
            raise
        print(
            f"featx: error: {type(err).__name__}: {one_line(err)} (FEATX_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 2


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments; an unknown one is refused naming the command, with a "did you mean" over that
    command's own options (argparse names neither)."""
    parser = _parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        options = list(commands.choices[args.command]._option_string_actions)
        flag = next((e.partition("=")[0] for e in extras if e.startswith("-")), "")
        raise FeatxError(
            f"featx {args.command}: unrecognized argument{'s' if len(extras) > 1 else ''} "
            f"{' '.join(f'`{e}`' for e in extras)}{did_you_mean(flag, options) if flag else ''}; "
            f"see `featx {args.command} --help`"
        )
    return args


def _main(argv: Sequence[str] | None) -> int:
    args = _parse(argv)
    if args.command == "build":
        return _build(args)
    if args.command == "check":
        return _check(args)
    if args.command == "extract":
        return _extract(args)
    if args.command == "export":
        return _export(args)
    return _analyse(args)


def _analyse(args: argparse.Namespace) -> int:
    """``verify``, ``sweep`` and ``inspect``: a SPEC or a CONFIG, the model built, one answer printed."""
    from featx.backbone import resolve
    from featx.config import load_config
    from featx.models import download_switches, load_model
    from featx.render.svg import svg
    from featx.verification import inspect, sweep, verify

    _writable("--svg", getattr(args, "svg", None))
    for absent in ("upto", "atol", "rtol", "svg", "keep_glue"):  # not every command takes them
        setattr(args, absent, getattr(args, absent, None))
    device = _device(args.device)
    if _is_config(args.spec):  # featx verify CONFIG: the config supplies what the flags do not
        cfg = load_config(args.spec)
        weights, kwargs = download_switches(
            cfg.model, args.weights, dict(args.model_kwarg), "--model-kwarg", "--weights"
        )
        plan = resolve(
            cfg,
            upto=args.upto,
            weights=weights,
            weights_prefix=args.weights_prefix,
            model_kwargs=kwargs,
            keep_glue=args.keep_glue or None,
            input_shape=args.input_shape,
            modes=_MODES[args.mode] if args.mode else None,
            atol=args.atol,
            rtol=args.rtol,
            whole_model=True,
        )
        model, keep_glue, spec = plan.model, plan.keep_glue, cfg.model
        # the cut as the built backbone runs it (`upto: stages` with taps inside: `stages.3`), as `check` does
        upto = args.upto if args.upto is not None else plan.cut.upto
        taps = {child: list(outputs) for child, outputs in plan.taps.items()}  # drawn on the picture
        shape, modes, atol, rtol = (
            plan.verify.input_shape,
            plan.verify.modes,
            plan.verify.atol,
            plan.verify.rtol,
        )
        source = cfg.source if args.input_shape is None else None
    else:
        weights, kwargs = download_switches(
            args.spec, args.weights, dict(args.model_kwarg), "--model-kwarg", "--weights"
        )
        if args.weights_prefix is not None and weights is None:
            raise FeatxError(
                f"--weights-prefix {args.weights_prefix} needs --weights (the file to strip it from)"
            )
        # verify's random init is the process's (only extract and export seed theirs, issue 25)
        model = load_model(args.spec, weights, weights_prefix=args.weights_prefix, seed=None, **kwargs)
        upto, shape, modes, spec = args.upto, args.input_shape, _MODES[args.mode or "both"], args.spec
        source = None
        atol, rtol, taps = args.atol or 0.0, args.rtol or 0.0, {}
        keep_glue = bool(args.keep_glue)
    model = model.to(device)
    x = _input(model, spec, shape, device, args.seed, source)
    if args.command == "verify":
        if upto is None:
            raise FeatxError("verify needs --upto with a model spec (or a config file that sets `upto`)")
        report = verify(
            model,
            upto,
            x,
            modes=modes,
            atol=atol,
            rtol=rtol,
            seed=args.seed,
            keep_glue=keep_glue,
            label=spec,
        )
        _print(report.to_dict() if args.json else str(report))
        if args.svg:
            _write("--svg", args.svg, svg(report, taps))
        return 0 if report.faithful else 1
    if args.command == "sweep":
        result = sweep(
            model,
            x,
            modes=modes,
            atol=atol,
            rtol=rtol,
            seed=args.seed,
            literal=args.literal,
            keep_glue=keep_glue,
            depth=args.depth,
            label=spec,
        )
        _print(result.to_dict() if args.json else str(result))
        return 0
    anatomy = inspect(model, x, modes=modes, seed=args.seed, label=spec)
    _print(anatomy.to_dict() if args.json else str(anatomy))
    return 0


def _print(document: dict[str, object] | str) -> None:
    """A JSON document or the text for people, on stdout."""
    print(json.dumps(document, indent=2) if isinstance(document, dict) else document, flush=True)


def _check(args: argparse.Namespace) -> int:
    from featx.checks import check
    from featx.render.junit import render_junit
    from featx.render.markdown import render_markdown

    _device(args.device)  # a bad --device is the run's error, not every config's
    _writable("--junit", args.junit)
    _writable("--markdown", args.markdown)
    bar = _Progress() if sys.stderr.isatty() else None
    try:
        result = check(args.paths, device=args.device, seed=args.seed, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    _print(result.to_dict() if args.json else str(result))
    if args.junit:
        _write("--junit", args.junit, render_junit(result))
    if args.markdown:
        _write("--markdown", args.markdown, render_markdown(result))
    return result.exit_code


def _extract(args: argparse.Namespace) -> int:
    try:
        from featx.extraction import extract
    except KeyboardInterrupt:  # Ctrl-C while torch loads: nothing started, and still "did not finish"
        raise Interrupted(
            "interrupted by SIGINT before it wrote anything; rerun the same command to start it"
        ) from None

    if args.verify is not None:
        return _verify_store(args)
    absent = [
        flag
        for flag, value in (("SPEC|CONFIG", args.spec), ("--data", args.data), ("--out", args.out))
        if value is None
    ]
    if absent:
        raise FeatxError(f"featx extract needs {', '.join(absent)} (or --verify DIR to check a store)")
    result = extract(
        args.spec,
        args.data,
        args.out,
        upto=args.upto,
        keep_glue=args.keep_glue,
        outputs=args.outputs,
        pool=args.pool,
        dtype=args.dtype,
        weights=args.weights,
        weights_prefix=args.weights_prefix,
        model_kwargs=dict(args.model_kwarg),
        random_weights=args.random_weights,
        seed=args.seed,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        workers=args.workers,
        format=args.format,
        device=args.device,
        overwrite=args.overwrite,
        allow_unfaithful=args.allow_unfaithful,
        channels_last=args.channels_last,
        autocast=args.autocast,
        progress=False if args.no_progress else None,
    )
    if result.rank == 0:  # under torchrun, one summary
        _print(result.to_dict() if args.json else str(result))
    return result.exit_code


def _verify_store(args: argparse.Namespace) -> int:
    """``featx extract --verify DIR``: one line per problem and a summary; nothing computed or written."""
    from featx.extraction.features import check_store

    given = [
        flag
        for flag, value in (("SPEC|CONFIG", args.spec), ("--data", args.data), ("--out", args.out))
        if value is not None
    ]
    if given:
        raise FeatxError(f"--verify checks a store on its own; drop {', '.join(given)}")
    check = check_store(args.verify)
    _print(check.to_dict() if args.json else "\n".join(check.lines()))
    return check.exit_code


class _Progress:
    """``featx check:  50%|█████     | 1/2 [00:03<00:03, 3.10s/config, configs/b.yaml]``: a tqdm bar on
    stderr over the configs, the one being checked after the counts; only made for a terminal, and cleared
    when the run ends (the table follows on stdout)."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None  # made at the first call, when the total is known

    def __call__(self, done: int, total: int, item: str) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(  # draws its first frame
                total=total,
                initial=done,
                postfix=item,
                desc="featx check",
                unit="config",
                file=sys.stderr,
                leave=False,
                dynamic_ncols=True,
            )
            return
        self.bar.n = done
        self.bar.set_postfix_str(item, refresh=False)
        self.bar.refresh()  # every step drawn: a config takes seconds, tqdm's rate limit would skip some

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _export(args: argparse.Namespace) -> int:
    import dataclasses

    from featx.config import load_config
    from featx.export import ArtifactMismatch, export
    from featx.models import is_weights_name, torch_device

    _writable("--out", args.out)
    device = torch_device(args.device)
    if _is_config(args.target):
        spec_flags = ("upto", "outputs", "weights", "weights_prefix", "input_shape")
        given = [f for f in spec_flags if getattr(args, f) is not None]
        given += ["keep_glue"] * args.keep_glue + ["model_kwarg"] * bool(args.model_kwarg)
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise FeatxError(
                f"{flag} goes with a model spec; the config `{args.target}` sets it (edit the config)"
            )
        config: str | BackboneConfig = args.target
    else:
        if args.upto is None:
            raise FeatxError(f"export {args.target} needs --upto (the cut), or a config file (.yaml)")
        weights = args.weights
        if weights is not None and not is_weights_name(weights):  # a file: the metadata names it relatively
            weights = os.path.abspath(weights)
        flags = {
            "model": args.target,
            "model_kwargs": dict(args.model_kwarg),
            "weights": weights,
            "weights_prefix": args.weights_prefix,
            "keep_glue": args.keep_glue,
            "upto": args.upto,
            "outputs": args.outputs.split(",") if args.outputs else [args.upto],
            "verify": {"input_shape": list(args.input_shape)} if args.input_shape else {},
        }
        # errors then name the flags (`--upto`, `--outputs`), not a file
        config = dataclasses.replace(load_config(flags), source="the command line (--upto, --outputs)")
    try:
        result = export(
            config,
            args.out,
            format=args.format,
            atol=args.atol,
            rtol=args.rtol,
            seed=args.seed,
            random_weights=args.random_weights,
            device=device,
        )
    except ArtifactMismatch as err:
        print(json.dumps(err.check.to_dict(), indent=2) if args.json else str(err.check), flush=True)
        print(f"featx: error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**result.to_dict(), "written": True}, indent=2))
        return 0
    print(f"featx export  {args.target}  ->  {args.out} ({result.format})")
    print()
    print(str(result))
    print(f"wrote {args.out} ({result.size:,} bytes; exported in {result.seconds:.1f} s)")
    return 0


def _build(args: argparse.Namespace) -> int:
    from featx.backbone import resolve
    from featx.render.text import shape_text, table

    summary = {**resolve(args.config).to_dict(), "config": args.config}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    outputs: list[dict] = summary["outputs"]
    lines = table(
        ["output", "child", "channels", "stride", "shape", "frozen"],
        [
            [
                o["name"],
                o["child"],
                str(o["channels"]),
                str(o["stride"]),
                shape_text(o["shape"]),
                "yes" if o["frozen"] else "no",
            ]
            for o in outputs
        ],
    )
    kept, total, frozen, fpn = (
        summary[k] for k in ("params_kept", "params_total", "frozen", "fpn_out_channels")
    )
    print(f"featx build  {args.config}")
    print()
    print("\n".join(lines))
    print()
    share = kept / total if total else 0.0
    print(
        f"params kept {kept:,} of {total:,} ({share:.0%}); frozen: "
        + (", ".join(f"`{n}`" for n in frozen) or "none")
        + (f"; FPN out_channels {fpn}" if fpn else "")
    )
    if summary["fpn"] is not None:  # loaded | random: a random FPN beside a loaded body is no surprise then
        print(f"fpn: {summary['fpn']} ({summary['fpn_source']})")
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
    from featx.files import write_text

    try:
        write_text(path, text)
    except OSError as err:
        raise FeatxError(f"{flag} {path} cannot be written: {err.strerror or err}") from None


def _is_config(spec: str) -> bool:
    """A config file, or a featx export (``config.is_config_path``; imported here, not at start-up)."""
    from featx.config import is_config_path

    return is_config_path(spec)


def _input(
    model: torch.nn.Module,
    spec: str,
    shape: tuple[int, ...] | None,
    device: torch.device,
    seed: int,
    source: str | None = None,
) -> torch.Tensor:
    """The example input; ``source`` names where ``shape`` came from when not ``--input-shape`` (a
    config's ``verify.input_shape``)."""
    from featx.cut import child_names
    from featx.models import check_input_shape, default_input_shape
    from featx.verification import example

    if shape is None:
        shape = default_input_shape(model, label=spec)  # raises: the model declares no input size
    else:
        check_input_shape(model, shape, spec, f"{source}: key `verify.input_shape`" if source else None)
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
    import yaml

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


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"`{text}` is not comma-separated child names, e.g. layer3,layer4")
    return names


def _per_output(text: str) -> str | dict[str, str]:
    """``avg`` for every output, or ``layer3=avg,layer4=none``."""
    if "=" not in text:
        return text
    pairs = [part.partition("=") for part in text.split(",")]
    if not all(name and sep and value for name, sep, value in pairs):
        raise argparse.ArgumentTypeError(f"`{text}` is neither one value nor OUTPUT=VALUE,... pairs")
    return {name.strip(): value.strip() for name, _, value in pairs}


def _positive(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"`{text}` is not a positive integer")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{text}` is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"`{text}` is negative")
    return value


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
    from featx.models import torch_device

    return torch_device(text, "--device")


if __name__ == "__main__":
    sys.exit(main())
