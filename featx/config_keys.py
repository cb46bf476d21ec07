"""A config's keys and sections checked as written, one checker each (``outputs``, ``out_indices`` /
``strides``, ``leaf_functions``, ``artifacts``, ``fpn``, ``verify``, ``data``, and the typed and known-key
checks they share): every error names the file (or ``<dict>``), the key path and what is accepted, with a
"did you mean" for unknown keys. ``featx.config._parse`` calls them; ``FpnSpec`` and ``VerifySpec`` are
the checked ``fpn:`` and ``verify:`` sections.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, overload

from featx.errors import FeatxError, FeatxWarning, a_or_an, did_you_mean, listing
from featx.function_names import _FUNCTION_NAMES, resolve_function
from featx.vocab import MODES

ARTIFACT_SUFFIXES = {".safetensors": "safetensors", ".onnx": "onnx", ".pt2": "pt2"}  # suffix -> format
_FPN_KEYS = ("out_channels", "extra_blocks", "extra_pool")
# the levels torchvision's FPN adds after the taps (`extra_blocks=`): `pool` LastLevelMaxPool (Faster R-CNN),
# `p6p7` LastLevelP6P7 from P5 (retinanet_resnet50_fpn, fcos_resnet50_fpn), `p6p7_c5` from the last tap
# (retinanet_resnet50_fpn_v2), `none`
EXTRA_BLOCKS = ("pool", "p6p7", "p6p7_c5", "none")
_VERIFY_KEYS = ("input_shape", "modes", "atol", "rtol")
# Preprocessing for `featx extract`, in timm's data-config vocabulary (timm.data.resolve_data_config).
DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
_CROP_MODES = ("center", "squash", "border")

_T = TypeVar("_T")


@dataclass(frozen=True)
class FpnSpec:
    out_channels: int = 256
    extra_blocks: str = "pool"  # one of EXTRA_BLOCKS; `pool`: the extra "pool" level Faster R-CNN expects

    @property
    def extra_pool(self) -> bool:
        """Whether the FPN adds torchvision's ``LastLevelMaxPool`` (``extra_blocks: pool``): the old key."""
        return self.extra_blocks == "pool"


@dataclass(frozen=True)
class VerifySpec:
    input_shape: tuple[int, ...] | None = None  # None: batch 2 at the model's own input size
    modes: tuple[str, ...] = MODES
    atol: float = 0.0
    rtol: float = 0.0


def _relative_to(path: str, source: str) -> str:
    if source == "<dict>" or os.path.isabs(path):
        return path
    return str(Path(source).parent / path)


def _leaf_functions(value: object, source: str, keep_glue: bool) -> tuple[Callable[..., Any], ...]:
    """``leaf_functions``: the dotted names of functions keep_glue's trace keeps whole, each resolved to
    the function here, once (``resolve_function``); a mapping given in Python may hold the functions."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise FeatxError(
            f"{source}: key `leaf_functions` must be a list of function names ({_FUNCTION_NAMES}), got {value!r}"
        )
    if value and not keep_glue:
        raise FeatxError(
            f"{source}: key `leaf_functions` names functions keep_glue's trace keeps whole, and this config "
            "does not keep the glue; set `keep_glue: true` or drop `leaf_functions`"
        )
    return tuple(
        name if callable(name) else resolve_function(name, f"{source}: key `leaf_functions[{i}]`")
        for i, name in enumerate(value)
    )


def _artifacts(value: object, source: str) -> tuple[str, ...]:
    """``artifacts``: exported files (``.safetensors``, ``.onnx``, ``.pt2``), relative to the config file."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise FeatxError(f"{source}: key `artifacts` must be a list of exported files, got {value!r}")
    paths = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or Path(item).suffix not in ARTIFACT_SUFFIXES:
            raise FeatxError(
                f"{source}: key `artifacts[{i}]` is {item!r}; accepted: files ending in "
                f"{listing(ARTIFACT_SUFFIXES)} (what `featx export` writes)"
            )
        paths.append(_relative_to(item, source))
    return tuple(paths)


def _outputs(value: object, source: str) -> tuple[tuple[str, str | int], ...]:
    if isinstance(value, Mapping):
        pairs = [(str(name), _cut(child, source, f"outputs.{name}")) for name, child in value.items()]
    elif isinstance(value, list):
        pairs = [(str(child), _cut(child, source, f"outputs[{i}]")) for i, child in enumerate(value)]
    else:
        raise FeatxError(
            f"{source}: key `outputs` must be a list of module names (child names or dotted paths), or a "
            f"mapping {{output name: module}}, got {value!r}"
        )
    if not pairs:
        raise FeatxError(f"{source}: key `outputs` is empty; name at least one child to tap")
    names = [name for name, _ in pairs]
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated is not None:
        where = source if source.startswith("--") else f"{source}: key `outputs`"  # the flag, or the key
        raise FeatxError(
            f"{where} names the output `{repeated}` twice; "
            "each output needs its own name (a mapping {name: child} can tap one child twice)"
        )
    return tuple(pairs)


def _shorthand(data: Mapping[str, object], source: str) -> tuple[str, tuple[int, ...]] | None:
    """``out_indices`` or ``strides`` as written (the key and its integers), or None: at most one of them
    and ``outputs``, each a non-empty list of distinct integers (``strides`` positive)."""
    given = [key for key in ("outputs", "out_indices", "strides") if data.get(key) is not None]
    if len(given) > 1:
        raise FeatxError(f"{source}: keys {listing(given)} all say what to tap; keep one")
    if not given or given[0] == "outputs":
        return None
    key = given[0]
    value = data[key]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    least = 1 if key == "strides" else None
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or (least is not None and any(v < least for v in value))
    ):
        what = "positive integers (e.g. [8, 16, 32])" if key == "strides" else "integers (e.g. [1, 2, 3, 4])"
        raise FeatxError(f"{source}: key `{key}` must be a list of {what}, got {value!r}")
    repeated = next((v for v in value if value.count(v) > 1), None)
    if repeated is not None:
        raise FeatxError(f"{source}: key `{key}` lists {repeated} twice; each tap once")
    return key, tuple(value)


def _the_cut(upto: str | int) -> tuple[tuple[str, str | int], ...]:
    """The outputs of a config without ``outputs``: the cut, named after it. A count (``upto: 6``) names
    its child only against the model: ``()`` here, filled in by ``featx.backbone.resolve``; so does a count
    written as text (``--upto -3``)."""
    if isinstance(upto, int) or upto.lstrip("-").isdigit():
        return ()
    return ((upto, upto),)


def _fpn(value: object, source: str) -> FpnSpec | None:
    if value is None or value is False:
        return None
    if not isinstance(value, Mapping):
        raise FeatxError(
            f"{source}: key `fpn` must be null or a mapping with {listing(_FPN_KEYS)}, got {value!r}"
        )
    _known(value, _FPN_KEYS, source, "fpn.")
    out_channels = _optional(value, "out_channels", int, source, default=256, prefix="fpn.")
    if out_channels <= 0:
        raise FeatxError(f"{source}: key `fpn.out_channels` must be positive, got {out_channels}")
    extra = value.get("extra_blocks")
    pool = _optional(value, "extra_pool", bool, source, prefix="fpn.")
    if extra is not None and pool is not None:
        raise FeatxError(
            f"{source}: keys `fpn.extra_blocks` and `fpn.extra_pool` both say which levels follow the taps; "
            "keep `extra_blocks`"
        )
    if pool is not None:  # the old spelling: true is `pool`, false `none`
        extra = "pool" if pool else "none"
        warnings.warn(
            FeatxWarning(
                f"{source}: key `fpn.extra_pool: {str(pool).lower()}` is the old spelling of "
                f"`fpn.extra_blocks: {extra}`; it still works, and will be removed"
            ),
            stacklevel=4,
        )
    if extra is None:
        extra = "pool"
    if extra is False:  # YAML's `none` is a string; `extra_blocks: false` / `null`-like spellings of none
        extra = "none"
    if not isinstance(extra, str) or extra not in EXTRA_BLOCKS:
        raise FeatxError(
            f"{source}: key `fpn.extra_blocks` is {extra!r}; accepted: {listing(EXTRA_BLOCKS)} (torchvision's "
            "LastLevelMaxPool, LastLevelP6P7 from P5 or from the last tap, nothing)"
            + did_you_mean(str(extra), EXTRA_BLOCKS)
        )
    return FpnSpec(out_channels, extra)


def _verify(value: object, source: str) -> VerifySpec:
    if value is None:
        return VerifySpec()
    if not isinstance(value, Mapping):
        raise FeatxError(
            f"{source}: key `verify` must be a mapping with {listing(_VERIFY_KEYS)}, got {value!r}"
        )
    _known(value, _VERIFY_KEYS, source, "verify.")
    shape = value.get("input_shape")
    if shape is not None and (
        not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d > 0 for d in shape)
    ):
        raise FeatxError(
            f"{source}: key `verify.input_shape` must be a list of positive ints, "
            f"batch included (e.g. [2, 3, 224, 224]), got {shape!r}"
        )
    modes = value.get("modes", list(MODES))
    if isinstance(modes, str):
        modes = [modes]
    if not isinstance(modes, list):
        raise FeatxError(f"{source}: key `verify.modes` must be a list of modes, got {modes!r}")
    bad = [m for m in modes or [] if m not in MODES]
    if not modes or bad:
        raise FeatxError(f"{source}: key `verify.modes` has {bad or modes!r}; accepted: {listing(MODES)}")
    tolerances = {}
    for key in ("atol", "rtol"):
        tol = value.get(key, 0.0)
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0 or tol == float("inf"):
            raise FeatxError(f"{source}: key `verify.{key}` must be a number >= 0, got {tol!r}")
        tolerances[key] = float(tol)
    return VerifySpec(tuple(shape) if shape else None, tuple(dict.fromkeys(modes)), **tolerances)


def _data(value: object, source: str) -> dict[str, object]:
    """The ``data:`` section: what ``featx extract`` changes in the model's own preprocessing."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise FeatxError(f"{source}: key `data` must be a mapping with {listing(DATA_KEYS)}, got {value!r}")
    _known(value, DATA_KEYS, source, "data.")
    out: dict[str, object] = {}
    for key, item in value.items():
        if item is None:
            continue
        if key == "input_size":
            if isinstance(item, int) and not isinstance(item, bool):
                item = [3, item, item]
            if (
                not isinstance(item, list)
                or len(item) != 3
                or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in item)
            ):
                raise FeatxError(
                    f"{source}: key `data.input_size` must be C, H, W (e.g. [3, 224, 224]) or one int, "
                    f"got {item!r}"
                )
            out[key] = tuple(item)
        elif key in ("mean", "std"):
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                item = [item] * 3
            if (
                not isinstance(item, list)
                or not item
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in item)
            ):
                raise FeatxError(f"{source}: key `data.{key}` must be a list of numbers, got {item!r}")
            if key == "std" and any(v <= 0 for v in item):
                raise FeatxError(f"{source}: key `data.std` must be positive, got {item!r}")
            out[key] = tuple(float(v) for v in item)
        elif key == "crop_pct":
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not 0 < item <= 1:
                raise FeatxError(f"{source}: key `data.crop_pct` must be a number in (0, 1], got {item!r}")
            out[key] = float(item)
        else:
            choices = _INTERPOLATIONS if key == "interpolation" else _CROP_MODES
            if item not in choices:
                raise FeatxError(
                    f"{source}: key `data.{key}` is {item!r}; accepted: {listing(choices)}"
                    + did_you_mean(str(item), choices)
                )
            out[key] = item
    return out


def _cut(value: object, source: str, key: str) -> str | int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise FeatxError(f"{source}: key `{key}` must be a child name or an index, got {value!r}")
    return value


def _typed(data: Mapping[str, object], key: str, kind: type[_T], source: str, prefix: str = "") -> _T:
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FeatxError(f"{source}: key `{prefix}{key}` must be {a_or_an(kind.__name__)}, got {value!r}")
    return value


@overload
def _optional(
    data: Mapping[str, object], key: str, kind: type[_T], source: str, default: _T, prefix: str = ""
) -> _T: ...
@overload
def _optional(
    data: Mapping[str, object], key: str, kind: type[_T], source: str, default: None = None, prefix: str = ""
) -> _T | None: ...
def _optional(
    data: Mapping[str, object],
    key: str,
    kind: type[_T],
    source: str,
    default: _T | None = None,
    prefix: str = "",
) -> _T | None:
    """``data[key]`` checked to be a ``kind``, or ``default`` when the key is absent or null."""
    if data.get(key) is None:
        return default
    return _typed(data, key, kind, source, prefix)


def _known(data: Mapping[str, object], keys: tuple[str, ...], source: str, prefix: str) -> None:
    for key in data:
        if key not in keys:
            raise FeatxError(
                f"{source}: unknown key `{prefix}{key}`{did_you_mean(str(key), keys)}; "
                f"accepted: {listing(keys, len(keys))}"
            )
