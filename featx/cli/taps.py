"""``featx taps SPEC|CONFIG``: every tap candidate of a backbone, measured and checked, its proposed pyramid,
and (``--config OUT.yaml``) a backbone config tapping that pyramid."""

from __future__ import annotations

import argparse

from featx.cli.flags import SPEC_HELP, depth, model_flags
from featx.cli.model import config_with_flags, is_config, leaf_functions, seeded, spec_source
from featx.cli.model import device as torch_device
from featx.cli.output import print_document, writable, write


def add_parser(commands: argparse._SubParsersAction) -> None:
    model = model_flags(seed="the input, the train-mode runs and a model's random init without weights")
    p = commands.add_parser(
        "taps",
        parents=[model],
        help="list every module a head can tap (shape, channels, stride, layout, cut) and the pyramid",
    )
    p.add_argument("spec", help=SPEC_HELP + ", or a backbone config (.yaml) for its model")
    p.add_argument(
        "--depth",
        type=depth,
        default=None,
        help="list modules down to this depth (default: deep enough to reach every block of the trunk)",
    )
    p.add_argument(
        "--leaf-function",
        action="append",
        default=[],
        metavar="NAME",
        help="a function keep_glue's traces keep whole (module:function or module.function; repeatable): the "
        "keep_glue verdicts use it, and a written config lists it",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="measure only: do not verify a cut at each candidate (faster on a large model); with --config the "
        "pyramid's levels are still verified",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument(
        "--config",
        default=None,
        metavar="OUT.yaml",
        help="write a backbone config tapping the pyramid (featx build builds it, featx check proves it)",
    )


def run(args: argparse.Namespace) -> int:
    import os

    from featx.config import load_config
    from featx.discovery import taps
    from featx.errors import FeatxError

    writable("--config", args.config)
    if (
        args.config
        and os.path.exists(args.config)
        and os.path.exists(args.spec)
        and os.path.samefile(args.config, args.spec)
    ):
        raise FeatxError(f"--config {args.config} is the config read: write the pyramid to another file")
    if is_config(args.spec):  # the config's model, weights, kwargs and input shape, under the flags given
        given = config_with_flags(args, args.spec)
        cfg = load_config(given) if isinstance(given, str) else given
        source, shape, leaves = cfg.model_source, cfg.verify.input_shape, tuple(cfg.leaf_functions)
    else:
        source = spec_source(args, args.spec)
        shape, leaves = args.input_shape, leaf_functions(args, True)
    with seeded(args.seed):  # without weights the init comes from --seed, as every verb's
        model = source.load()
    model = model.to(torch_device(args.device))
    found = taps(
        model,
        shape,
        depth=args.depth,
        # a written config needs its levels checked: keep_glue or not
        check=("pyramid" if args.config else False) if args.no_check else True,
        seed=args.seed,
        leaf_functions=leaves,
        label=source.spec,
    )
    if args.config:
        write("--config", args.config, config_text(found, source, args.config, leaves, args.seed))
    print_document(found.to_dict() if args.json else str(found))
    return 0


def config_text(found: object, source: object, path: str, leaves: tuple[object, ...], seed: int) -> str:
    """The YAML ``--config`` writes to ``path``: the model as given (a weights file relative to the
    config's folder, as configs read it; its prefix), then the pyramid's cut and taps, with the leaf
    functions keep_glue was checked with."""
    import os

    import yaml

    from featx.discovery import Taps
    from featx.function_names import function_name
    from featx.model_sources import ModelSource

    assert isinstance(found, Taps) and isinstance(source, ModelSource)
    cfg: dict[str, object] = {"model": source.spec}
    if source.weights.file is not None:
        cfg["weights"] = os.path.relpath(
            os.path.abspath(source.weights.file), os.path.dirname(os.path.abspath(path))
        )
    elif source.weights.text is not None:
        cfg["weights"] = source.weights.text
    if source.weights.prefix:
        cfg["weights_prefix"] = source.weights.prefix
    if source.model_kwargs:
        cfg["model_kwargs"] = dict(source.model_kwargs)
    cfg.update(found.config())
    if cfg.get("keep_glue") and leaves:
        cfg["leaf_functions"] = [function_name(f) for f in leaves if callable(f)]
    strides = ", ".join(str(level.stride) for level in found.pyramid)
    header = (
        f"# the pyramid of {source.spec} as `featx taps` found it (strides {strides});\n"
        "# `featx build` builds it, `featx check` proves it against the full model\n"
    )
    if source.weights.kind == "random":
        header += (
            f"# no weights: a random init, the one `--seed {seed}` makes (featx build/check --seed {seed})\n"
        )
    return header + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
