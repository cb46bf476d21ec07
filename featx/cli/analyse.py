"""``featx verify | sweep | inspect SPEC|CONFIG``: the model built, one cut (or every cut, or none)
analysed, one answer printed."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from featx.cli.flags import (
    MODES,
    SPEC_HELP,
    _Parser,
    check_flags,
    cut_flags,
    depth,
    model_flags,
    numerics_flags,
    numerics_given,
)
from featx.cli.model import config_with_flags, is_config, leaf_functions, seeded, spec_source
from featx.cli.model import device as torch_device
from featx.cli.output import print_document, writable, write
from featx.errors import FeatxError, one_line

if TYPE_CHECKING:
    import torch

    from featx.numerics import Numerics

_SEEDS = "the input, the train-mode runs and a model's random init without weights"


def add_parsers(commands: argparse._SubParsersAction) -> None:
    common = _Parser(add_help=False)
    common.add_argument("spec", help=SPEC_HELP + ", or a backbone config (.yaml)")
    common.add_argument("--json", action="store_true", help="print JSON instead of tables")
    model = model_flags(seed=_SEEDS)
    p = commands.add_parser(
        "verify",
        parents=[common, model, cut_flags(), check_flags(), numerics_flags()],
        help="verify one cut (SPEC or CONFIG.yaml)",
    )
    p.add_argument("--svg", default=None, metavar="FILE", help="also draw the cut as a self-contained SVG")
    p = commands.add_parser(
        "sweep",
        parents=[common, model, cut_flags(upto=False), check_flags(), numerics_flags()],
        help="verify every cut point",
    )
    p.add_argument("--literal", action="store_true", help="run every cut's Sequential instead of deriving")
    p.add_argument(
        "--depth",
        type=depth,
        default=1,
        help="also cut inside children down to this depth (default 1: between the root's children)",
    )
    p.add_argument(
        "--dependence",
        action="store_true",
        help="also say at which cuts the model's output does not depend on the value (one forward per cut and mode)",
    )
    commands.add_parser(
        "inspect",
        parents=[common, model, check_flags(tolerance=None)],
        help="children, glue and residuals; no cut",
    )


def run(args: argparse.Namespace) -> int:
    """``verify``, ``sweep`` and ``inspect``: a SPEC or a CONFIG, the model built, one answer printed."""
    from featx.backbone import resolve
    from featx.config import load_config
    from featx.cut import resolve_path
    from featx.inspection import inspect
    from featx.render.svg import svg
    from featx.verification import sweep, verify

    writable("--svg", getattr(args, "svg", None))
    # not every command takes them
    for absent in ("upto", "atol", "rtol", "svg", "keep_glue", "leaf_function", "dtype"):
        setattr(args, absent, getattr(args, absent, None))
    device = torch_device(args.device)
    numerics = numerics_of(args)
    if is_config(args.spec):  # featx verify CONFIG: the config supplies what the flags do not
        given = config_with_flags(args, args.spec)  # the flags given override the config's keys
        cfg = load_config(given) if isinstance(given, str) else given
        with seeded(args.seed):  # a config without weights: the model's init from --seed
            plan = resolve(
                cfg,
                upto=args.upto,  # verify checks this cut; the config's taps are not its to check
                modes=MODES[args.mode] if args.mode else None,
                atol=args.atol,
                rtol=args.rtol,
                whole_model=True,
            )
        model, keep_glue, spec = plan.model, plan.keep_glue, cfg.model
        leaves = plan.config.leaf_functions  # with --leaf-function's, by the override
        # the cut as the built backbone runs it (`upto: stages` with taps inside: `stages.3`), as `check` does
        upto = args.upto if args.upto is not None else plan.cut.upto
        taps = {child: list(outputs) for child, outputs in plan.taps.items()}  # drawn on the picture
        shape, modes, atol, rtol = (
            plan.verify.input_shape,
            plan.verify.modes,
            plan.verify.atol,
            plan.verify.rtol,
        )
        source = cfg.key("verify.input_shape")
        numerics = plan.config.numerics  # the config's `numerics:`, the flags given over its keys
    else:
        model_source = spec_source(args, args.spec)
        model = model_source.load()
        upto, shape, modes, spec = args.upto, args.input_shape, MODES[args.mode or "both"], args.spec
        source = None
        atol, rtol, taps = args.atol or 0.0, args.rtol or 0.0, {}
        keep_glue = bool(args.keep_glue)
        leaves = leaf_functions(args, keep_glue)
    model = model.to(device)
    x = example_input(model, spec, shape, device, args.seed, source)
    if args.command == "verify":
        if upto is None:
            raise FeatxError("verify needs --upto with a model spec (or a config file that sets `upto`)")
        if not is_config(args.spec):  # resolved once, here, so its errors name the flag
            upto = resolve_path(model, upto, what="--upto")
        report = verify(
            model,
            upto,
            x,
            modes=modes,
            atol=atol,
            rtol=rtol,
            seed=args.seed,
            keep_glue=keep_glue,
            leaf_functions=leaves,
            label=spec,
            numerics=numerics,
        )
        print_document(report.to_dict() if args.json else str(report))
        if args.svg:
            write("--svg", args.svg, svg(report, taps))
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
            leaf_functions=leaves,
            label=spec,
            numerics=numerics,
            dependence=args.dependence,
        )
        print_document(result.to_dict() if args.json else str(result))
        return 0
    anatomy = inspect(model, x, modes=modes, seed=args.seed, label=spec)
    print_document(anatomy.to_dict() if args.json else str(anatomy))
    return 0


def numerics_of(args: argparse.Namespace) -> Numerics:
    """The numerics flags as one ``Numerics`` (``--dtype`` read by ``dtype_name``, naming the flag)."""
    from featx.numerics import Numerics, dtype_name

    given = numerics_given(args)
    if "dtype" in given:
        given["dtype"] = dtype_name(given["dtype"], "--dtype")
    return Numerics(**given)  # type: ignore[arg-type]


def example_input(
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
    from featx.input_shapes import check_input_shape, default_input_shape
    from featx.inspection import example

    if shape is None:
        shape = default_input_shape(model, label=spec)  # raises: the model declares no input size
    else:
        check_input_shape(model, shape, spec, source)
    if not child_names(model):
        raise FeatxError(f"`{spec}` has no children to cut between")
    try:
        return example(model, None, seed, shape=shape).to(device)
    except RuntimeError as err:
        raise FeatxError(
            f"--input-shape {','.join(map(str, shape))}: cannot make the input: {one_line(err)}"
        ) from None
