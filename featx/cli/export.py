"""``featx export CONFIG|SPEC --out FILE``: the backbone as safetensors, ONNX or pt2, checked before written."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from featx.cli.flags import EXPORT_TOLERANCE, check_flags, cut_flags, model_flags
from featx.cli.model import config_with_flags, device, is_config, overridden, overrides_text, spec_config
from featx.cli.output import writable

if TYPE_CHECKING:
    from featx.config import BackboneConfig


def add_parser(commands: argparse._SubParsersAction) -> None:
    model = model_flags(
        seed="the check inputs and a random init",
        random_weights="export a model without weights (a SPEC without --weights, a config's `weights: null`) "
        "at its random init, seeded by --seed; refused without this flag",
        device="run and check the backbone on this torch device, e.g. cpu or cuda:0 (default: cpu)",
    )
    tolerance = check_flags(modes=False, tolerance=EXPORT_TOLERANCE)
    p = commands.add_parser(
        "export",
        parents=[model, cut_flags(outputs=True), tolerance],
        help="export a config's backbone (or SPEC --upto X) as safetensors, ONNX or pt2, checked before written",
    )
    p.add_argument(
        "target", metavar="CONFIG|SPEC", help="a backbone config (.yaml), or a model spec with --upto"
    )
    p.add_argument("--out", required=True, help="the file to write (.safetensors, .onnx or .pt2)")
    p.add_argument(
        "--format", default=None, help="safetensors, onnx or pt2 (default: the one --out's suffix names)"
    )
    p.add_argument("--json", action="store_true", help="print the check as JSON instead of the table")


def run(args: argparse.Namespace) -> int:
    from featx.export import ArtifactMismatch, export
    from featx.render.text import environment_lines

    writable("--out", args.out)
    torch_device = device(args.device)
    config: BackboneConfig | str
    if is_config(args.target):  # the flags given override the config's keys
        config = config_with_flags(args, args.target)
    else:
        config = spec_config(args, args.target)
    try:
        result = export(
            config,
            args.out,
            format=args.format,
            atol=args.atol,
            rtol=args.rtol,
            seed=args.seed,
            random_weights=args.random_weights,
            device=torch_device,
        )
    except ArtifactMismatch as err:
        text = "\n".join([*environment_lines(err.check.environment), str(err.check)])
        print(json.dumps(err.check.to_dict(), indent=2) if args.json else text, flush=True)
        print(f"featx: error: {err}", file=sys.stderr)
        return 1
    if args.json:
        flags = overridden(config)  # in the JSON only when a flag set a key, as `featx build` does
        print(
            json.dumps(
                {**result.to_dict(), "written": True, **({"overridden": flags} if flags else {})}, indent=2
            )
        )
        return 0
    print(f"featx export  {args.target}{overrides_text(config)}  ->  {args.out} ({result.format})")
    print("\n".join(environment_lines(result.environment)))
    print()
    print(str(result))
    print(f"wrote {args.out} ({result.size:,} bytes; exported in {result.seconds:.1f} s)")
    return 0
