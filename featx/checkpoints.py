"""Reading weights files: the state dict a local file holds, and loading it into a model by key.

``.safetensors`` files are read lazily (a tensor when its key is looked up, or straight into the model's
memory); anything else is a torch checkpoint read with ``weights_only=True``, so a checkpoint carrying an
arbitrary pickle is refused, never executed. Keys are checked by name: missing, unexpected and mis-shaped
keys are reported, with the prefix that would make them match when there is one.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from featx.errors import FeatxError, FeatxWarning, listing, one_line

# Keys under which training scripts commonly nest the state dict in a checkpoint, most specific first.
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")
# What weights files are called: a name ending so is a path, never a pretrained weights name.
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar")


@dataclass(frozen=True)
class Checkpoint:
    """Where a model's weights come from: the local file, what the user called it, and whether the
    constructor already loaded it (torchvision's builders load their own pretrained weights)."""

    path: Path
    name: str  # as written: a path, `DEFAULT`, `a1_in1k`, `hf-hub:org/name`
    pretrained: bool = False  # named the ecosystem's way and resolved through a cache
    loaded: bool = False
    keys: Mapping[str, str] | None = None  # model key -> file key where the source renames (densenet)


def read_state_dict(path: str | os.PathLike[str]) -> Mapping[str, torch.Tensor]:
    """The tensors of a local weights file, on the CPU, read only when asked for.

    ``.safetensors`` files are opened with ``safe_open`` and a tensor is read when its key is looked up;
    anything else goes through ``torch.load(weights_only=True, mmap=True)``, so untouched tensors stay on
    disk. A checkpoint nesting its state dict under ``state_dict``, ``model``, ``model_state_dict`` or
    ``module`` is unwrapped.
    """
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        raise FeatxError(
            f"weights `{path}` is a folder, not a file; expected a .safetensors file or a torch checkpoint"
            + (f" (it holds {listing(inside, 4)}: name one)" if inside else "")
        )
    if not path.is_file():
        raise FeatxError(
            f"weights file `{path}` does not exist (expected a .safetensors file or a torch checkpoint)"
        )
    if path.suffix == ".safetensors":
        return _LazySafetensors(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr; the error says enough
            warnings.simplefilter("ignore")
            obj = _torch_load(path)
    except pickle.UnpicklingError as err:
        wanted = re.search(r"GLOBAL ([\w.]+)", str(err))
        if wanted is None and not _starts_as_pickle(path):  # text, JSON: no pickle at all
            why = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(err))
            raise _unreadable(path, why.group(1).strip() if why else one_line(err)) from None
        raise FeatxError(
            f"weights file `{path}` holds objects other than tensors and containers"
            + (f" (it asks for `{wanted.group(1)}`)" if wanted else "")
            + "; featx loads checkpoints with weights_only=True and refuses arbitrary pickles"
        ) from None
    except KeyError as err:  # torch's unpickler on bytes that are no pickle: `KeyError: 101`
        raise _unreadable(path, f"no checkpoint torch can unpickle (KeyError {err})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise _unreadable(path, one_line(err)) from None
    return _unwrap_state_dict(obj, path)


def _unreadable(path: Path, why: str) -> FeatxError:
    return FeatxError(f"weights file `{path}` is not a readable torch checkpoint or safetensors file: {why}")


def _starts_as_pickle(path: Path) -> bool:
    """The file begins with a pickle's protocol opcode (what ``pickle.dump`` and old ``torch.save`` write)."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _LazySafetensors(Mapping):
    """A safetensors file as a mapping: keys and shapes from its header, a tensor read on lookup."""

    def __init__(self, path: Path) -> None:
        from safetensors import SafetensorError, safe_open

        self.path = path
        try:
            with safe_open(str(path), "pt") as f:
                self.shapes = {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
                self._handle = safe_open(str(path), "pt")
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise FeatxError(
                f"weights file `{path}` is not a readable safetensors file: {one_line(err)}"
            ) from None
        if not self.shapes:
            raise FeatxError(f"weights file `{path}` holds no tensors")

    def metadata(self) -> dict[str, str]:
        """The file's ``__metadata__`` (featx exports record their config there)."""
        return dict(self._handle.metadata() or {})

    def read_into(self, key: str, target: torch.Tensor) -> None:
        """Read one tensor straight into ``target``'s memory: no mapped pages, no second copy."""
        begin, end, dtype = self._offsets()[key]
        if dtype != target.dtype or not target.is_contiguous() or target.device.type != "cpu":
            target.copy_(self[key])
            return
        view = target.reshape(-1).view(torch.uint8).numpy()
        with open(self.path, "rb") as f:
            f.seek(begin)
            # numpy's stubs give ndarray the buffer protocol (`__buffer__`) for Python >= 3.12 only
            if f.readinto(memoryview(view)) != end - begin:  # type: ignore[arg-type]
                raise FeatxError(f"weights file `{self.path}` is cut short inside tensor `{key}`")

    def _offsets(self) -> dict[str, tuple[int, int, torch.dtype | None]]:
        """Key -> (first byte, end byte, dtype); None for a dtype read through safetensors, never raw."""
        if not hasattr(self, "_offsets_cache"):
            with open(self.path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            start = 8 + size
            self._offsets_cache = {
                key: (
                    start + entry["data_offsets"][0],
                    start + entry["data_offsets"][1],
                    _SAFETENSORS_DTYPES.get(entry["dtype"]),
                )
                for key, entry in header.items()
                if key != "__metadata__"
            }
        return self._offsets_cache

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.shapes:
            raise KeyError(key)
        try:
            return self._handle.get_tensor(key)
        except Exception as err:  # a file cut short after its header
            raise FeatxError(
                f"weights file `{self.path}` is not a readable safetensors file: {one_line(err)}"
            ) from None

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):  # legacy (non-zip) checkpoints cannot be memory-mapped
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # at most a couple of nesting levels in practice
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if not isinstance(obj, Mapping):
            break
        nested = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = nested
    raise FeatxError(
        f"weights file `{path}` holds no state dict: expected a mapping of names to tensors, "
        f"or one nested under {listing(_NESTED_KEYS)}"
    )


def load_weights(
    model: nn.Module,
    path: str | os.PathLike[str] | Checkpoint,
    *,
    prefix: str | None = None,
    children: Collection[str] | None = None,
    strict: bool = True,
    skip: Collection[str] = (),
) -> list[str]:
    """Load a local weights file into ``model``, checking keys by name; returns the keys it lacked.

    ``prefix`` (``"backbone."``, ``"module."``) is stripped from the file's keys, and keys without it
    are ignored. With ``children`` (module names, dotted for modules inside a child: ``stages.0``; or
    tensor names, such as the root's ``cls_token``), only those modules' tensors are expected and loaded,
    and keys of the model's other children are ignored (a classifier head in a backbone's checkpoint, say).
    Mis-shaped keys are always an error; missing and unexpected ones unless ``strict=False``. A
    ``Checkpoint`` from ``build_model`` brings its file and the renames its source makes. Keys whose
    first component is in ``skip`` belong to something else (the FPN of a featx export) and are ignored.
    A file ``featx export`` wrote, or one holding only the first children, is named as such when it does
    not match, with what to do instead.
    """
    renames = path.keys if isinstance(path, Checkpoint) else None
    path = path.path if isinstance(path, Checkpoint) else path
    state = read_state_dict(path)
    shapes = state.shapes if isinstance(state, _LazySafetensors) else {k: v.shape for k, v in state.items()}
    prefix = _dotted(prefix)
    keys = {k: k for k in shapes}  # model key -> file key
    if renames:
        keys = {k: f for k, f in renames.items() if f in shapes}
    own = model.state_dict()
    names = {name for name, _ in model.named_children()}
    wanted = set(children) if children is not None else names

    def under(key: str) -> bool:  # a key of a wanted module: `layer1.0.conv1.weight` under `layer1`
        parts = key.split(".")  # (or the key itself: a root tensor such as `cls_token` may be wanted)
        return any(".".join(parts[:i]) in wanted for i in range(1, len(parts) + 1))

    expected = own if children is None else {k: v for k, v in own.items() if under(k)}
    if prefix:
        keys = {k[len(prefix) :]: k for k in shapes if k.startswith(prefix)}
        if not keys:
            raise FeatxError(
                f"weights file `{path}` has no key starting with prefix `{prefix}` "
                f"(its keys start like {listing(sorted(shapes)[:3])})" + _prefix_hint(shapes, expected)
            )
    if skip:
        keys = {k: v for k, v in keys.items() if k.split(".")[0] not in skip}
    # BN's step counter: torchvision's FrozenBatchNorm2d and many converted checkpoints leave it out.
    missing = [k for k in expected if k not in keys and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in keys if k not in own and (under(k) or k.split(".")[0] not in names)]
    mis_shaped = [
        f"{k} {list(shapes[keys[k]])} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in keys and shapes[keys[k]] != v.shape
    ]
    problems = []
    if missing and strict:
        problems.append(f"{len(missing)} missing: {listing(missing, 5)}")
    if unexpected and strict:
        problems.append(f"{len(unexpected)} unexpected: {listing(unexpected, 5)}")
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} mis-shaped (file vs model): {listing(mis_shaped, 5)}")
    if problems:
        metadata = state.metadata() if isinstance(state, _LazySafetensors) else {}
        if "featx_version" in metadata and children is None:
            raise FeatxError(
                f"weights file `{path}` is a featx export of `{metadata.get('source_model')}` cut at "
                f"`{metadata.get('upto')}` (the kept children"
                + (" and the FPN" if any(k.startswith("fpn.") for k in shapes) else "")
                + f"), not the whole model's weights: rebuild that backbone with "
                f"featx.build_backbone({str(path)!r}) or `featx build {path}`"
            )
        raise FeatxError(
            f"weights file `{path}` does not match the model's state dict: "
            + "; ".join(problems)
            + (_prefix_hint(shapes, expected, prefix) if missing else "")
            + (_truncated_note(path, model, keys) if children is None else "")
        )
    wanted_count = sum(not k.endswith("num_batches_tracked") for k in expected)
    if missing and len(missing) == wanted_count:  # strict=False, and not one tensor matches: all random init
        raise FeatxError(
            f"weights file `{path}` holds none of the model's {wanted_count} tensors it should fill "
            f"(like {listing(missing, 3)}); `strict: false` loads what matches, and nothing does "
            f"(the file's keys start like {listing(sorted(shapes)[:3])})"
            + _prefix_hint(shapes, expected, prefix)
        )
    if missing:  # strict=False: say what stays at its init, never silently
        warnings.warn(
            FeatxWarning(
                f"weights file `{path}` lacks {len(missing)} of the {wanted_count} tensors it should fill; "
                f"they stay at their init (strict: false): {listing(missing, 5)}"
            ),
            stacklevel=2,
        )
    with torch.no_grad():  # one tensor at a time: peak memory is the kept part plus one tensor
        for key, target in expected.items():
            if key in keys and isinstance(state, _LazySafetensors):
                state.read_into(keys[key], target)
            elif key in keys:
                target.copy_(state[keys[key]])
            elif key.endswith("num_batches_tracked"):
                target.zero_()
    return [k for k in missing if not k.endswith("num_batches_tracked")]


def _dotted(prefix: str | None) -> str | None:
    """A prefix is a dotted module path: ``backbone.body`` and ``backbone.body.`` both strip
    ``backbone.body.`` (and never ``backbone.bodyX.``); an empty one is none."""
    if prefix is None:
        return None
    if not isinstance(prefix, str):
        raise FeatxError(f"weights prefix {prefix!r} is not a string; expected a dotted path like `module.`")
    prefix = prefix.strip().rstrip(".")
    return prefix + "." if prefix else None


def _prefix_hint(
    shapes: Mapping[str, object], expected: Mapping[str, object], prefix: str | None = None
) -> str:
    """``; its keys carry the prefix ...`` when stripping one dotted prefix from the file's keys makes most
    of the model's keys match (a DDP ``module.``, a detector's ``backbone.body.``), else an empty string."""
    wanted = [k for k in expected if not k.endswith("num_batches_tracked")]
    if not wanted:
        return ""
    candidates: set[str] = set()
    for key in wanted[:20]:
        candidates.update(f[: -len(key)] for f in shapes if f.endswith("." + key))
    matches = {p: sum(p + k in shapes for k in wanted) for p in candidates}
    if not matches:
        return ""
    best = max(matches, key=lambda p: (matches[p], -len(p)))
    if best == prefix or matches[best] * 2 < len(wanted):
        return ""
    share = "all" if matches[best] == len(wanted) else f"{matches[best]} of the"
    return (
        f"; its keys carry the prefix `{best}` ({share} {len(wanted)} model keys match once it is stripped): "
        f"pass weights_prefix `{best}` (config `weights_prefix: {best}`, command line `--weights-prefix {best}`)"
    )


def _truncated_note(path: str | os.PathLike[str], model: nn.Module, keys: Mapping[str, str]) -> str:
    """What to do when a file holds a truncated model's state dict: the first children's tensors only."""
    names = [name for name, _ in model.named_children()]
    own = model.state_dict()
    present = {k.split(".")[0] for k in keys}
    stateful = [n for n in names if any(k.split(".")[0] == n for k in own)]
    held = [n for n in stateful if n in present]
    if not held or not all(k in own for k in keys):
        return ""
    kept = names.index(held[-1]) + 1
    if held == [n for n in stateful if names.index(n) < kept] and kept < len(names):
        return (
            f". It holds only the first {kept} of {len(names)} children (through `{names[kept - 1]}`): a "
            f"truncated model's state dict; load it into the cut with a backbone config (`upto: "
            f"{names[kept - 1]}`, `weights: {path}`), which reads the kept children only"
        )
    return ""
