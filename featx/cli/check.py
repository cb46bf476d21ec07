"""``featx check PATH... [--weights FILE]``: every config under the paths and every cut each declares; for CI."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from featx.cli.flags import add_device, add_seed, add_weights, numerics_flags, numerics_given
from featx.cli.model import device
from featx.cli.output import print_document, writable, write
from featx.errors import FeatxError

if TYPE_CHECKING:
    from tqdm import tqdm


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "check",
        parents=[numerics_flags()],
        help="verify every config (files or folders) and every cut it declares; for CI",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="config files (.yaml, .yml) or folders of them")
    add_weights(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--junit", default=None, metavar="FILE", help="also write JUnit XML")
    p.add_argument("--markdown", default=None, metavar="FILE", help="also write a Markdown job summary")
    add_seed(p, "the inputs and train-mode runs")
    add_device(p)


def run(args: argparse.Namespace) -> int:
    from featx.checks import check, discover
    from featx.numerics import dtype_name
    from featx.render.junit import render_junit
    from featx.render.markdown import render_markdown

    device(args.device)  # a bad --device is the run's error, not every config's
    numerics = numerics_given(args)
    if "dtype" in numerics:  # a bad --dtype too
        numerics["dtype"] = dtype_name(numerics["dtype"], "--dtype")
    writable("--junit", args.junit)
    writable("--markdown", args.markdown)
    if args.weights is not None:
        found = [path for path, _ in discover(args.paths)]
        if len(found) != 1:
            held = ", ".join(f"`{p}`" for p in found[:3]) + (", ..." if len(found) > 3 else "")
            raise FeatxError(
                f"--weights {args.weights} replaces one config's weights; the paths hold {len(found)} configs"
                + (f" ({held})" if found else "")
                + "; check one config with --weights"
            )
    bar = _Progress() if sys.stderr.isatty() else None
    try:
        result = check(
            args.paths,
            device=args.device,
            seed=args.seed,
            progress=bar,
            weights=args.weights,
            numerics=numerics,
        )
    finally:
        if bar is not None:
            bar.close()
    print_document(result.to_dict() if args.json else str(result))
    if args.junit:
        write("--junit", args.junit, render_junit(result))
    if args.markdown:
        write("--markdown", args.markdown, render_markdown(result))
    return result.exit_code


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
