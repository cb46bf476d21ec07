"""The flags every verb shares, each defined once: the model flags (what model, which weights, where it
runs), the cut flags and the check flags, as argparse parent parsers, and the value parsers behind them.

A verb takes a group with ``parents=[model_flags(...), cut_flags(...)]``; the few words that differ by verb
(what ``--seed`` seeds, the default tolerance) are arguments, so the help says the truth for each verb.
Nothing here imports torch: ``--help`` never does.
"""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from featx.errors import FeatxError, long_integer, shortened, too_many_digits


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--out` never means `--outputs`: no flag by its prefix
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # one line, no usage block
        raise FeatxError(f"{message} (see `{self.prog} --help`)")


WEIGHTS_HELP = (
    "a .safetensors file or torch checkpoint, or pretrained weights: DEFAULT, IMAGENET1K_V2 "
    "(torchvision), a timm tag (a1_in1k) or hf-hub:org/name, read from torch's / the hub's cache"
)
CONFIG_WEIGHTS_HELP = "; with a CONFIG: used instead of the config's `weights`"
WEIGHTS_PREFIX_HELP = "strip this dotted prefix from the checkpoint's keys (module., backbone.body.)"
DEVICE_HELP = "torch device, e.g. cpu or cuda:0 (default: cpu)"
KEEP_GLUE_HELP = (
    "cut with the root's glue kept (featx.truncate(..., keep_glue=True)) instead of the Sequential; with a "
    "CONFIG: sets its `keep_glue: true`"
)
UPTO_HELP = (
    "the cut: a child name (kept, inclusive), a count N / -N, or a dotted path into a child (layer3.1, "
    "stages.2); with a CONFIG: in place of its `upto`"
)
LEAF_FUNCTION_HELP = (
    "with --keep-glue: a function the root's forward calls that the trace keeps whole (leaf_functions), as "
    "module.function or module:function, a builtin as int (repeatable)"
)
SPEC_HELP = "torchvision/<name>, timm/<name> or package.module:callable"
# export's defaults per format for --atol and --rtol (featx.export.TOLERANCES; this module stays torch-free)
EXPORT_TOLERANCE = (
    "per format: safetensors 0 (exact), pt2 1e-05, onnx 0.001",
    "per format: safetensors 0 (exact), pt2 1e-05, onnx 0.0001",
)
MODES = {"eval": ("eval",), "train": ("train",), "both": ("eval", "train")}


def model_flags(
    *,
    seed: str,
    random_weights: str | None = None,
    device: str | None = DEVICE_HELP,
    input_shape: bool = True,
    config_weights: bool = True,
) -> _Parser:
    """``--weights``, ``--weights-prefix``, ``--model-kwarg``, ``--seed`` and, where the verb has them,
    ``--random-weights``, ``--device`` and ``--input-shape``. ``seed`` says what the seed seeds;
    ``random_weights`` is the help of ``--random-weights`` for a verb that refuses random weights without
    it; ``config_weights`` says ``--weights`` replaces a config's."""
    p = _Parser(add_help=False)
    if input_shape:
        p.add_argument(
            "--input-shape",
            type=shape,
            default=None,
            help="the whole input shape, batch included (default: 2 and the model's own size, or a config's "
            "`verify.input_shape`)",
        )
    add_weights(p, config_weights)
    p.add_argument("--weights-prefix", default=None, metavar="PREFIX", help=WEIGHTS_PREFIX_HELP)
    p.add_argument(
        "--model-kwarg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=kwarg,
        help="constructor keyword argument, VALUE parsed as YAML (repeatable); with a CONFIG: merged into "
        "its `model_kwargs`",
    )
    if random_weights is not None:
        p.add_argument("--random-weights", action="store_true", help=random_weights)
    add_seed(p, seed)
    if device is not None:
        add_device(p, device)
    return p


def add_weights(p: argparse.ArgumentParser, config_weights: bool = True) -> None:
    p.add_argument(
        "--weights", default=None, help=WEIGHTS_HELP + (CONFIG_WEIGHTS_HELP if config_weights else "")
    )


def add_seed(p: argparse.ArgumentParser, seeds: str) -> None:
    p.add_argument("--seed", type=seed, default=0, help=f"RNG seed for {seeds}: 0..{SEED_MAX} (default 0)")


def add_device(p: argparse.ArgumentParser, text: str = DEVICE_HELP) -> None:
    p.add_argument("--device", default="cpu", help=text)


def cut_flags(*, upto: bool = True, outputs: bool = False) -> _Parser:
    """``--upto`` (the verb has one cut), ``--keep-glue`` with its ``--leaf-function`` and, for a verb that
    taps, ``--outputs``."""
    p = _Parser(add_help=False)
    if upto:
        p.add_argument("--upto", default=None, help=UPTO_HELP)
    p.add_argument("--keep-glue", action="store_true", help=KEEP_GLUE_HELP)
    p.add_argument("--leaf-function", action="append", default=[], metavar="NAME", help=LEAF_FUNCTION_HELP)
    if outputs:
        p.add_argument(
            "--outputs",
            type=names,
            default=None,
            metavar="A,B",
            help="modules to tap: child names or dotted paths (layer3.1), comma-separated (default: the cut; "
            "with a CONFIG: its `outputs`, which this replaces)",
        )
    return p


def check_flags(
    *,
    modes: bool = True,
    tolerance: str | tuple[str, str] | None = "0: exact, or a config's",
    rtol: str = "relative tolerance, per element: |a - b| <= atol + rtol * |b|",
) -> _Parser:
    """``--mode`` and ``--atol``/``--rtol``; ``tolerance`` is the default the help gives, one for both or
    (atol's, rtol's) (None: the verb compares nothing within a tolerance)."""
    p = _Parser(add_help=False)
    if modes:
        p.add_argument(
            "--mode",
            choices=sorted(MODES),
            default=None,
            help="modes to check (default: both, or a config's)",
        )
    if tolerance is not None:
        atol_default, rtol_default = (tolerance, tolerance) if isinstance(tolerance, str) else tolerance
        p.add_argument(
            "--atol", type=non_negative, default=None, help=f"absolute tolerance (default {atol_default})"
        )
        p.add_argument(
            "--rtol",
            type=non_negative,
            default=None,
            help=f"{rtol} (default {rtol_default})",
        )
    return p


def numerics_flags() -> _Parser:
    """``--dtype``, ``--autocast``, ``--compile`` and ``--channels-last``: the numeric setting the full model
    and the cut run in (``featx.numerics.Numerics``); with a CONFIG each sets its key of ``numerics:``.
    ``--dtype`` is read by ``featx.numerics.dtype_name`` where it is used (this module stays torch-free)."""
    p = _Parser(add_help=False)
    p.add_argument(
        "--dtype",
        default=None,
        metavar="DTYPE",
        help="run the full model and the cut in float32, bfloat16 or float16, compared within that dtype's "
        "torch.testing.assert_close tolerance and against float64 (default float32, or a config's "
        "`numerics.dtype`)",
    )
    p.add_argument(
        "--autocast",
        action="store_true",
        help="run each forward under torch.autocast (bfloat16 on CPU, float16 on CUDA)",
    )
    p.add_argument(
        "--compile", action="store_true", help="compile the cut with torch.compile; the full model runs eager"
    )
    p.add_argument(
        "--channels-last", action="store_true", help="model and 4-d inputs in channels-last memory format"
    )
    return p


def numerics_given(args: argparse.Namespace) -> dict[str, object]:
    """The numerics flags given, as the keys of a config's ``numerics:`` (absent ones left out)."""
    given = {
        "dtype": getattr(args, "dtype", None),
        "autocast": getattr(args, "autocast", False) or None,
        "compile": getattr(args, "compile", False) or None,
        "channels_last": getattr(args, "channels_last", False) or None,
    }
    return {key: value for key, value in given.items() if value is not None}


SEED_MAX = 2**32 - 1  # numpy's range, which torch's takes too: one seed, one spelling, every RNG


def integer(text: str) -> int:
    """``int(text)``; an integer past Python's digit limit refused as a config's is (``long_integer``).

    Raises:
        ValueError: not an integer.
        argparse.ArgumentTypeError: too many digits.
    """
    try:
        return int(text)
    except ValueError as err:
        if too_many_digits(err):
            raise argparse.ArgumentTypeError(f"`{shortened(text)}` is {long_integer()}") from None
        raise


def seed(text: str) -> int:
    try:
        value = integer(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{text}` is not an integer; accepted: 0..{SEED_MAX}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"`{text}` is out of range; accepted: 0..{SEED_MAX}")
    return value


def shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(integer(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"`{text}` is not comma-separated integers, e.g. 2,3,224,224"
        ) from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"`{text}` has a dimension that is not a positive integer")
    return dims


def kwarg(text: str) -> tuple[str, object]:
    import yaml

    from featx.yaml_numbers import safe_load

    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"`{text}` is not KEY=VALUE with KEY a Python identifier")
    try:
        return key, safe_load(value) if value else None
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0]
        raise argparse.ArgumentTypeError(
            f"`{text}`: the value is not a YAML scalar or list ({first})"
        ) from None
    except ValueError as err:  # YAML's int() of a value past Python's digit limit
        if not too_many_digits(err):
            raise
        raise argparse.ArgumentTypeError(
            f"`{key}={shortened(value)}`: the value is {long_integer()}"
        ) from None


def names(text: str) -> list[str]:
    found = [n.strip() for n in text.split(",")]
    if not all(found):
        raise argparse.ArgumentTypeError(f"`{text}` is not comma-separated child names, e.g. layer3,layer4")
    return found


def per_output(text: str) -> str | dict[str, str]:
    """``avg`` for every output, or ``layer3=avg,layer4=none``."""
    if "=" not in text:
        return text
    pairs = [part.partition("=") for part in text.split(",")]
    if not all(name and sep and value for name, sep, value in pairs):
        raise argparse.ArgumentTypeError(f"`{text}` is neither one value nor OUTPUT=VALUE,... pairs")
    return {name.strip(): value.strip() for name, _, value in pairs}


def positive(text: str) -> int:
    value = count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"`{text}` is not a positive integer")
    return value


def count(text: str) -> int:
    try:
        value = integer(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{text}` is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"`{text}` is negative")
    return value


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{text}` is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"`{text}` is negative; tolerances are >= 0")
    return value


def depth(text: str) -> int:
    try:
        value = integer(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{text}` is not an int; accepted: 1, 2, 3, ...") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"`{text}` is below 1; accepted: 1 (the root's children), 2, 3, ...")
    return value
