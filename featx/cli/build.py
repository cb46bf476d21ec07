"""``featx build CONFIG|SPEC``: the backbone built, its outputs shown (channels, stride, shape, frozen)."""

from __future__ import annotations

import argparse
import json
import warnings

from featx.cli.flags import SPEC_HELP, cut_flags, model_flags
from featx.cli.model import (
    config_with_flags,
    device,
    is_config,
    overridden,
    overrides_text,
    seeded,
    spec_config,
)
from featx.errors import FeatxWarning


def add_parser(commands: argparse._SubParsersAction) -> None:
    model = model_flags(
        seed="a model's random init without weights",
        device="build and measure the backbone on this torch device, e.g. cpu or cuda:0 (default: cpu)",
    )
    p = commands.add_parser(
        "build",
        parents=[model, cut_flags(outputs=True)],
        help="build a backbone from a config (or SPEC --upto X) and show its outputs",
    )
    p.add_argument(
        "config",
        metavar="CONFIG|SPEC",
        help="a backbone config (.yaml), a .safetensors file featx export wrote, or "
        + SPEC_HELP
        + " with --upto",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from featx.backbone import resolve
    from featx.render.text import environment_text, shape_text, table

    torch_device = device(args.device)  # a bad --device before the model is built
    if is_config(args.config):  # the flags given override the config's keys
        config = config_with_flags(args, args.config)
    else:
        config = spec_config(args, args.config)
    # in the JSON only when a flag set a key: a plain config's document is unchanged
    flags = overridden(config)
    with seeded(args.seed), warnings.catch_warnings():  # no weights: the init from --seed, as verify's
        # the report's `fpn: random (...)` line (JSON: `fpn`, `fpn_source`) says it: once, not twice
        warnings.filterwarnings("ignore", message=".*the FPN stays at random init", category=FeatxWarning)
        plan = resolve(config)
        plan.build(torch_device)  # measured there; to_dict() reads the built backbone
        summary = {**plan.to_dict(), "config": args.config}
    if flags:
        summary["overridden"] = flags
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
    print(f"featx build  {args.config}{overrides_text(config)}")
    print(environment_text(summary["environment"]))
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
