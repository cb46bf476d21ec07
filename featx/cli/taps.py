"""``featx taps SPEC|CONFIG``: every tap candidate of a backbone, measured and checked, its proposed pyramid,
and (``--config OUT.yaml``) a backbone config tapping that pyramid."""

from __future__ import annotations

import argparse

from featx.cli.flags import LEAF_FUNCTION_HELP, SPEC_HELP, depth, model_flags
from featx.cli.model import config_with_flags, is_config, leaf_functions, seeded
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
    p.add_argument("--leaf-function", action="append", default=[], metavar="NAME", help=LEAF_FUNCTION_HELP)
    p.add_argument(
        "--no-check",
        action="store_true",
        help="measure only: do not verify a cut at each candidate (faster on a large model)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument(
        "--config",
        default=None,
        metavar="OUT.yaml",
        help="write a backbone config tapping the pyramid (featx build builds it, featx check proves it)",
    )


def run(args: argparse.Namespace) -> int:
    from featx.config import load_config
    from featx.discovery import taps
    from featx.models import ModelSource

    writable("--config", args.config)
    if is_config(args.spec):  # the config's model, weights, kwargs and input shape, under the flags given
        given = config_with_flags(args, args.spec)
        cfg = load_config(given) if isinstance(given, str) else given
        source, shape = cfg.model_source, cfg.verify.input_shape
    else:
        source = ModelSource.parse(
            args.spec,
            args.weights,
            weights_prefix=args.weights_prefix,
            model_kwargs=dict(args.model_kwarg),
            seed=args.seed,
            where="--model-kwarg",
            origin="--weights",
        )
        shape = args.input_shape
    with seeded(args.seed):  # without weights the init comes from --seed, as every verb's
        model = source.load()
    model = model.to(torch_device(args.device))
    found = taps(
        model,
        shape,
        depth=args.depth,
        check=not args.no_check,
        seed=args.seed,
        leaf_functions=leaf_functions(args, True),
        label=source.spec,
    )
    if args.config:
        write("--config", args.config, config_text(found, source, args.config))
    print_document(found.to_dict() if args.json else str(found))
    return 0


def config_text(found: object, source: object, path: str) -> str:
    """The YAML ``--config`` writes to ``path``: the model as given (a weights file relative to the
    config's folder, as configs read it), then the pyramid's cut and taps."""
    import os

    import yaml

    from featx.discovery import Taps
    from featx.models import ModelSource

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
    strides = ", ".join(str(level.stride) for level in found.pyramid)
    header = (
        f"# the pyramid of {source.spec} as `featx taps` found it (strides {strides});\n"
        "# `featx build` builds it, `featx check` proves it against the full model\n"
    )
    return header + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
