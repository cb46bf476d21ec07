"""Model specs to modules, and local weight files to state dicts.

A spec names where a model comes from:

- ``torchvision/<name>``: ``torchvision.models.get_model(name, weights=None, **model_kwargs)``;
- ``timm/<name>``: ``timm.create_model(name, pretrained=False, **model_kwargs)``;
- ``package.module:callable``: the callable (a class or factory) imported and called with ``model_kwargs``.

Weights come from a local ``.safetensors`` file or a torch checkpoint read with ``weights_only=True``, so a
checkpoint carrying an arbitrary pickle is refused, never executed. Pretrained weights named the way
torchvision and timm name them are such files too, found in (or downloaded to) those libraries' caches.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import inspect
import json
import os
import pickle
import re
import sys
import types
import urllib.parse
import warnings
import weakref
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from featx.errors import FeatxError, did_you_mean, listing, one_line

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum  # a member names torchvision weights: `.name`, `.url`

# the keyword arguments load_model built each model with: its input size may be among them
_KWARGS: weakref.WeakKeyDictionary[nn.Module, dict[str, object]] = weakref.WeakKeyDictionary()
# the weights build_model resolved for each model it built: what extract records in its fingerprint
_CHECKPOINTS: weakref.WeakKeyDictionary[nn.Module, Checkpoint | None] = weakref.WeakKeyDictionary()

# Keys under which training scripts commonly nest the state dict in a checkpoint, most specific first.
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")
# What weights files are called: a name ending so is a path, never a pretrained weights name.
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar")


def load_model(
    spec: str,
    weights: str | os.PathLike[str] | None = None,
    *,
    weights_prefix: str | None = None,
    seed: int | None = None,
    **model_kwargs: object,
) -> nn.Module:
    """Build the model named by ``spec`` with its own initialisation, then load ``weights`` if given.

    ``weights`` is a local ``.safetensors`` file or a torch checkpoint (a state dict, or a dict holding
    one under ``state_dict``/``model``); it must match the model's state dict exactly: missing,
    unexpected and mis-shaped keys are reported by name. ``weights_prefix`` (``module.``,
    ``backbone.body``: a dotted path) is stripped from the file's keys first; when the keys do not match
    and one prefix would make them, the error names it. The returned model is in eval mode.

    ``weights`` may also name pretrained weights the way torchvision and timm do, read from their caches
    (see ``build_model``): ``DEFAULT``, ``IMAGENET1K_V2`` or ``ResNet50_Weights.IMAGENET1K_V2`` for a
    torchvision spec; ``DEFAULT`` (the spec's tag, else timm's default), a tag such as ``a1_in1k``, or
    ``hf-hub:org/name`` for a timm spec. The constructors' own switches in ``model_kwargs``
    (``pretrained=True``; torchvision's ``weights_backbone``) are read the same way.

    Without weights, ``seed`` (when not None) seeds the model's random init, under
    ``torch.random.fork_rng()``: the same seed builds the same model in every process, and the caller's
    RNG is left as it was (see ``build_model``).

    Raises:
        FeatxError: unknown spec (with close matches), a constructor that rejects ``model_kwargs``,
            a missing, corrupt or mismatched weights file, pretrained weights that are not cached and
            cannot be downloaded (naming the file and where it belongs).
    """
    weights, model_kwargs = download_switches(spec, weights, model_kwargs, "model_kwargs", "weights")
    model, checkpoint = build_model(spec, weights, model_kwargs, weights_prefix=weights_prefix, seed=seed)
    if checkpoint is not None and not checkpoint.loaded:
        load_weights(model, checkpoint, prefix=weights_prefix)
    return model


@dataclass(frozen=True)
class Checkpoint:
    """Where a model's weights come from: the local file, what the user called it, and whether the
    constructor already loaded it (torchvision's builders load their own pretrained weights)."""

    path: Path
    name: str  # as written: a path, `DEFAULT`, `a1_in1k`, `hf-hub:org/name`
    pretrained: bool = False  # named the ecosystem's way and resolved through a cache
    loaded: bool = False
    keys: Mapping[str, str] | None = None  # model key -> file key where the source renames (densenet)


def build_model(
    spec: str,
    weights: str | os.PathLike[str] | None,
    model_kwargs: Mapping[str, object],
    *,
    weights_prefix: str | None = None,
    seed: int | None = None,
) -> tuple[nn.Module, Checkpoint | None]:
    """The model ``spec`` names, and the checkpoint ``weights`` resolves to (None without weights).

    A local file is only located here; ``load_weights`` reads it. Pretrained weights named as torchvision
    names them are looked up where torchvision keeps them (``torch.hub.get_dir()/checkpoints/`` under
    ``TORCH_HOME``, the file named by the weights' URL) and handed to torchvision's own builder, so the
    model is exactly ``get_model(name, weights=...)`` — its kwargs adjustments (inception's
    ``transform_input``) and key renames (densenet) included; built under ``torch.device("meta")`` nothing
    is read, and ``Checkpoint.keys`` tells ``load_weights`` which file key feeds each model key. timm tags
    and ``hf-hub:`` ids are looked up in the Hugging Face hub cache (``HF_HUB_CACHE``, ``HF_HOME``) as
    timm does, ``model.safetensors`` first, then ``pytorch_model.bin``; the model is built with
    ``pretrained=False`` and ``load_weights`` reads the file (timm's ``filter_fn`` conversions are not
    applied: weights published by timm match its models as they are). Missing files are downloaded as
    torchvision (``download_url_to_file``, hash checked) and ``huggingface_hub`` would, unless
    ``HF_HUB_OFFLINE`` is set; then, or when the download fails, the error names the file and its path.

    When ``weights`` is None and ``seed`` is not None, the constructor runs under
    ``torch.random.fork_rng()`` after ``torch.manual_seed(seed)``: its random init is the same in every
    process and every run, and the caller's RNG state is untouched.
    """
    weights, model_kwargs = download_switches(spec, weights, model_kwargs, "model_kwargs", "weights")
    path = _local_path(weights) if weights is not None else None
    if weights is not None and path is None and weights_prefix:
        raise FeatxError(
            f"weights_prefix `{weights_prefix}` applies to a weights file; `{weights}` names pretrained "
            "weights, whose keys are the model's own"
        )
    source, sep, name = spec.partition("/") if isinstance(spec, str) else ("", "", "")
    member = None
    checkpoint = Checkpoint(path, str(weights)) if path is not None else None
    if weights is not None and path is None:
        if sep and source == "torchvision":
            member = _torchvision_weights(name, str(weights))
        elif sep and source == "timm":
            checkpoint = _timm_checkpoint(name, str(weights))
        else:
            raise FeatxError(
                f"weights file `{weights}` does not exist (a pretrained weights name such as `DEFAULT` "
                f"needs a `torchvision/<name>` or `timm/<name>` spec, not `{spec}`)"
            )
    torchvision = bool(sep) and source == "torchvision"
    served = _Served(_torchvision_enum(name) if torchvision else None)
    seeded = weights is None and seed is not None
    with (
        served if torchvision else contextlib.nullcontext(),
        torch.random.fork_rng() if seeded else contextlib.nullcontext(),
        warnings.catch_warnings(),
    ):
        if seeded:
            torch.manual_seed(seed)
        # loading into a model built on the meta device copies nothing, which torch warns about
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
        model = _build(spec, model_kwargs, member)
    if served.member is not None and served.state is not None:
        keys = {key: served.origin[id(t)] for key, t in served.state.items() if id(t) in served.origin}
        loaded = not any(p.is_meta for p in model.parameters())
        label = _weights_label(served.member)
        checkpoint = Checkpoint(_torchvision_file(served.member), label, True, loaded, keys or None)
    model.eval()
    _KWARGS[model] = dict(model_kwargs)
    _CHECKPOINTS[model] = checkpoint
    return model, checkpoint


def weights_of(model: nn.Module) -> Checkpoint | None:
    """The checkpoint ``build_model`` resolved for ``model`` (a file, or pretrained weights' cache file),
    or None: built with its own init, or not built by featx."""
    return _CHECKPOINTS.get(model)


def download_switches(
    spec: str,
    weights: str | os.PathLike[str] | None,
    model_kwargs: Mapping[str, object],
    where: str,
    weights_label: str,
) -> tuple[str | os.PathLike[str] | None, dict[str, object]]:
    """Read the constructors' own download switches in ``model_kwargs`` the way their library does.

    ``weights=X`` becomes featx's weights. ``pretrained=True`` means timm's default tag for a timm spec
    (``DEFAULT``), and for a torchvision spec what torchvision's deprecated switch meant (the builder's
    legacy weights, ``IMAGENET1K_V1`` for resnet50), as does ``pretrained_backbone``; both are read from
    the cache like ``weights``. ``False`` is dropped: featx builds without weights anyway. ``where`` and
    ``weights_label`` name the two places in the error when both say which weights to load. Only for
    ``torchvision/`` and ``timm/`` specs: a ``package.module:callable`` gets its kwargs as they are.
    """
    kwargs = dict(model_kwargs)
    if not isinstance(spec, str) or not spec.startswith(("torchvision/", "timm/")):
        return weights, kwargs
    for key in ("pretrained", "pretrained_backbone"):
        if key in kwargs and not isinstance(kwargs[key], bool):
            raise FeatxError(f"{where} `{key}` is {kwargs[key]!r}; accepted: true or false")
        if key in kwargs and not kwargs[key]:
            del kwargs[key]
    if "weights" in kwargs:
        value = kwargs.pop("weights")
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise FeatxError(
                f"{where} `weights` is {value!r}; expected a weights name (DEFAULT, IMAGENET1K_V2, a timm "
                "tag, hf-hub:org/name) or a weights file"
            )
        if value is not None and weights is not None and str(weights) != str(value):
            raise FeatxError(
                f"{where} `weights` and {weights_label} `{weights}` both say which weights to load; keep one"
            )
        weights = value if value is not None else weights
    if kwargs.get("pretrained"):
        if weights is not None:
            raise FeatxError(
                f"{where} `pretrained` and {weights_label} `{weights}` both say which weights to load; keep one"
            )
        if spec.startswith("timm/"):
            del kwargs["pretrained"]
            weights = "DEFAULT"
    return weights, kwargs


def is_weights_name(text: str | os.PathLike[str]) -> bool:
    """Whether ``text`` names pretrained weights (``DEFAULT``, ``a1_in1k``, ``hf-hub:...``) rather than a
    file: it is not an existing path, has no folder part and no weights-file suffix."""
    return _local_path(text) is None


def _local_path(weights: str | os.PathLike[str]) -> Path | None:
    if not isinstance(weights, str):
        return Path(weights)
    if weights.startswith(("hf-hub:", "hf_hub:")):
        return None
    path = Path(weights)
    if path.exists() or "/" in weights or os.sep in weights or weights.endswith(_WEIGHT_SUFFIXES):
        return path
    return None


def default_input_shape(model: nn.Module, batch: int = 2, *, label: str | None = None) -> tuple[int, ...]:
    """Batch ``batch`` at the model's own input size: timm's ``pretrained_cfg``, torchvision's 224 (299 for
    Inception v3), overridden by the size ``load_model`` built it for (``img_size`` and ``in_chans`` in
    timm, ``image_size`` in torchvision's ViTs; an int or (height, width)). ``label`` (a spec) names the
    model in the error; by default its class does.

    Raises:
        FeatxError: the model declares no input size (pass an example input / ``--input-shape``).
    """
    shape: tuple[int, ...] | None = None
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, Mapping) and cfg.get("input_size"):
            shape = tuple(int(d) for d in cfg["input_size"])
            break
    if shape is None and type(model).__module__.startswith("torchvision.models"):
        shape = (3, 299, 299) if type(model).__name__ == "Inception3" else (3, 224, 224)
    if shape is not None and len(shape) == 3:
        kwargs = _KWARGS.get(model, {})
        channels, height, width = shape
        size = next((kwargs[k] for k in ("img_size", "image_size") if kwargs.get(k) is not None), None)
        if isinstance(size, int) and not isinstance(size, bool):
            height = width = size
        elif isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(d, int) for d in size):
            height, width = size
        in_chans = kwargs.get("in_chans")
        if isinstance(in_chans, int):
            channels = in_chans
        shape = (channels, height, width)
    if shape is not None:
        return (batch, *shape)
    name = label if label is not None else type(model).__qualname__
    raise FeatxError(
        f"`{name}` declares no input size (no timm pretrained_cfg, not a torchvision model); "
        "pass an example input (command line: --input-shape, e.g. 2,3,224,224)"
    )


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The one (height, width) ``model`` runs at, or None when it takes other sizes too: timm's patch
    embedding with ``strict_img_size`` (ViT, DeiT, Swin: it asserts the size), torchvision's
    VisionTransformer (it asserts ``image_size``)."""
    patch = getattr(model, "patch_embed", None)
    size = getattr(patch, "img_size", None)
    if getattr(patch, "strict_img_size", False) and isinstance(size, (tuple, list)) and len(size) == 2:
        return int(size[0]), int(size[1])
    image_size = getattr(model, "image_size", None)
    if (
        type(model).__module__.startswith("torchvision.models")
        and type(model).__name__ == "VisionTransformer"
        and isinstance(image_size, int)
    ):
        return image_size, image_size
    return None


def check_input_shape(model: nn.Module, shape: tuple[int, ...], spec: str, key: str | None = None) -> None:
    """Refuse, before anything runs, an input shape ``model`` cannot take: the wrong number of dimensions
    (against its own input size, when it declares one) or, for a model that runs at one size only
    (``fixed_input_size``), another height and width. ``key`` names where the shape came from in a config
    (``"key `verify.input_shape`"``); None is the command line's ``--input-shape``.

    Raises:
        FeatxError: one sentence, the same from every command: what was given, what the model takes.
    """
    try:
        expected: tuple[int, ...] | None = default_input_shape(model)
    except FeatxError:
        expected = None
    fixed = fixed_input_size(model)
    if expected is not None and fixed is not None and len(expected) == 4:
        expected = (*expected[:2], *fixed)
    if key is None:
        given, example = f"--input-shape {','.join(map(str, shape))}", ",".join(map(str, expected or ()))
    else:
        given, example = f"{key} {list(shape)}", str(list(expected or ()))
    if expected is not None and len(shape) != len(expected):
        raise FeatxError(
            f"{given} has {len(shape)} dimensions; `{spec}` takes {len(expected)}, batch included "
            f"(e.g. {example})"
        )
    if fixed is not None and len(shape) == 4 and tuple(shape[2:]) != fixed:
        raise FeatxError(
            f"{given} is {shape[2]}x{shape[3]}; `{spec}` runs at {fixed[0]}x{fixed[1]} only"
            + (f" (e.g. {example})" if expected is not None else "")
        )


def read_state_dict(path: str | os.PathLike[str]) -> Mapping[str, torch.Tensor]:
    """The tensors of a local weights file, on the CPU, read only when asked for.

    ``.safetensors`` files are opened with ``safe_open`` and a tensor is read when its key is looked up;
    anything else goes through ``torch.load(weights_only=True, mmap=True)``, so untouched tensors stay on
    disk. A checkpoint nesting its state dict under ``state_dict``, ``model``, ``model_state_dict`` or
    ``module`` is unwrapped.
    """
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
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
    with torch.no_grad():  # one tensor at a time: peak memory is the kept part plus one tensor
        for key, target in expected.items():
            if key in keys and isinstance(state, _LazySafetensors):
                state.read_into(keys[key], target)
            elif key in keys:
                target.copy_(state[keys[key]])
            elif key.endswith("num_batches_tracked"):
                target.zero_()
    return [k for k in missing if not k.endswith("num_batches_tracked")]


_HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm looks for in a hub repo, in order


class _Served:
    """While active, torchvision's weights enums read their state dicts from the local cache (or download
    them there) instead of ``load_state_dict_from_url``. The model's own weights (a member of ``enum``) are
    kept as ``member`` and ``state``, with the file key each tensor came from, so renames the builder makes
    (densenet) can be followed; a backbone's (``weights_backbone``) are only served."""

    def __init__(self, enum: type[WeightsEnum] | None) -> None:
        self.enum = enum
        self.member: WeightsEnum | None = None
        self.state: dict[str, torch.Tensor] | None = None
        self.origin: dict[int, str] = {}

    def __enter__(self) -> _Served:
        from torchvision.models._api import WeightsEnum

        self._original = WeightsEnum.get_state_dict
        served = self

        def get_state_dict(member: WeightsEnum, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
            state = dict(read_state_dict(_torchvision_file(member)))
            if served.enum is not None and isinstance(member, served.enum):
                served.member, served.state = member, state
                served.origin = {id(tensor): key for key, tensor in state.items()}
            return state

        WeightsEnum.get_state_dict = get_state_dict
        return self

    def __exit__(self, *exc: object) -> None:
        from torchvision.models._api import WeightsEnum

        WeightsEnum.get_state_dict = self._original


def _torchvision_enum(name: str) -> type[WeightsEnum] | None:
    from torchvision.models import get_model_weights

    try:
        return get_model_weights(name)
    except (KeyError, ValueError):
        return None


def _torchvision_weights(name: str, text: str) -> WeightsEnum:
    """The torchvision weights enum member ``text`` names for model ``name``."""
    from torchvision.models import get_weight

    _torchvision_builder(name)  # an unknown model is reported as such
    enum = _torchvision_enum(name)
    if enum is None or not enum.__members__:
        raise FeatxError(
            f"weights `{text}`: torchvision `{name}` has no pretrained weights, and no such file"
        )
    members = list(enum.__members__)
    short = text[len(enum.__name__) + 1 :] if text.startswith(enum.__name__ + ".") else text
    if short in enum.__members__:
        return enum[short]
    if "." in text:
        try:
            other = get_weight(text)
        except (KeyError, ValueError, AttributeError):
            other = None
        if other is not None:
            raise FeatxError(
                f"weights `{text}` are another model's, not torchvision `{name}`'s; accepted: "
                f"{listing(members)} ({enum.__name__})"
            )
    raise FeatxError(
        f"weights `{text}` is not a file, nor a weights name of torchvision `{name}`"
        f"{did_you_mean(short, members)}; accepted: {listing(members)} ({enum.__name__}), or a "
        ".safetensors file or torch checkpoint"
    )


def _weights_label(member: WeightsEnum) -> str:
    return f"{type(member).__name__}.{member.name}"


def _torchvision_file(member: WeightsEnum) -> Path:
    return _torch_hub_file(member.url, f"torchvision weights `{_weights_label(member)}`")


def _torch_hub_file(url: str, label: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps ``url``'s file, downloaded there if missing."""
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if path.is_file():
        return path
    where = f"put `{filename}` (from {url}) at `{path}`"
    if _offline():
        raise FeatxError(
            f"{label} are not in torch's cache and HF_HUB_OFFLINE is set, so none is fetched: {where}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(filename)
    try:
        torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None, sys.stderr.isatty())
    except (OSError, RuntimeError, ValueError) as err:  # no network is an URLError; a bad hash a RuntimeError
        raise FeatxError(
            f"{label} are not in torch's cache and cannot be downloaded "
            f"({type(err).__name__}: {one_line(err)}): {where}"
        ) from None
    return path


def _timm_checkpoint(name: str, text: str) -> Checkpoint:
    """The cached file of the timm weights ``text`` names for ``timm/<name>``."""
    import timm
    from timm.models import get_pretrained_cfg
    from timm.models._registry import get_arch_pretrained_cfgs, split_model_name_tag

    _timm_builder(name)  # an unknown model is reported as such
    if text.startswith(("hf-hub:", "hf_hub:")):
        repo, _, revision = text[len("hf-hub:") :].partition("@")
        return Checkpoint(_hub_file(repo, revision or None, _HUB_FILES, f"hub weights `{text}`"), text, True)
    arch, spec_tag = split_model_name_tag(name)
    tags = [cfg.tag for cfg in get_arch_pretrained_cfgs(arch).values() if cfg.tag]
    head, dot, rest = text.partition(".")
    if text == "DEFAULT":
        default = get_pretrained_cfg(arch)
        tag = spec_tag or (default.tag if default is not None and default.tag else "")
    elif dot and head == arch:
        tag = rest
    elif dot and timm.is_model(head):
        raise FeatxError(
            f"weights `{text}` are another model's, not timm `{arch}`'s; accepted: {listing(tags)}"
        )
    else:
        tag = text
    if spec_tag and tag != spec_tag:
        raise FeatxError(
            f"spec `timm/{name}` names the tag `{spec_tag}` and weights `{text}` the tag `{tag}`; name it once"
        )
    if tag not in tags:
        raise FeatxError(
            f"weights `{text}` is not a file, nor a pretrained tag of timm `{arch}`{did_you_mean(tag, tags)}; "
            f"accepted: `DEFAULT`, {listing(tags, 8)}, `hf-hub:<org>/<name>`, or a .safetensors file or "
            "torch checkpoint"
        )
    cfg = get_pretrained_cfg(f"{arch}.{tag}")
    assert cfg is not None, "a tag timm lists for the arch has its pretrained cfg"
    label = f"timm weights `{arch}.{tag}`"
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HUB_FILES
        return Checkpoint(_hub_file(repo, revision or None, files, label), f"{arch}.{tag}", True)
    url = cfg.url[0] if isinstance(cfg.url, tuple) else cfg.url  # timm also takes (url, file name)
    if url:
        return Checkpoint(_torch_hub_file(url, label), f"{arch}.{tag}", True)
    raise FeatxError(f"{label} name no file to download (no hub id, no URL); pass a weights file")


def _hub_file(repo: str, revision: str | None, files: tuple[str, ...], label: str) -> Path:
    """The first of ``files`` in hub repo ``repo`` that the Hugging Face cache holds, downloaded if none."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    cache = _hub_cache()
    for filename in files:
        hit = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision)
        if isinstance(hit, str):
            return Path(hit)
    folder = Path(cache) / ("models--" + repo.replace("/", "--"))
    where = (
        f"expected `{files[0]}` of hub repo `{repo}` at `{folder}/snapshots/<commit>/{files[0]}` "
        f"(and `refs/{revision or 'main'}` there holding <commit>, as huggingface_hub leaves it)"
    )
    if _offline():
        raise FeatxError(f"{label} are not in the Hugging Face cache and HF_HUB_OFFLINE is set: {where}")
    for filename in files:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache))
        except EntryNotFoundError:
            continue
        except Exception as err:  # no network, no such repo, no access: the one line says which
            raise FeatxError(
                f"{label} are not in the Hugging Face cache and cannot be downloaded "
                f"({type(err).__name__}: {one_line(err)}): {where}"
            ) from None
    raise FeatxError(f"{label}: hub repo `{repo}` has none of {listing(files)}")


def _hub_cache() -> str:
    """The Hugging Face hub cache as huggingface_hub finds it, read from the environment now (so a cache
    set after import is honoured): ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    cache = (
        os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    )
    return os.path.expandvars(os.path.expanduser(cache))


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set, now or when huggingface_hub was imported."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if value.upper() in ("1", "ON", "YES", "TRUE"):
        return True
    hub = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(hub, "HF_HUB_OFFLINE", False))


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


def _build(spec: str, model_kwargs: Mapping[str, object], weights: object = None) -> nn.Module:
    if not isinstance(spec, str) or not spec:
        raise FeatxError(
            f"model spec {spec!r} is not a string; expected `torchvision/<name>`, `timm/<name>` "
            "or `package.module:callable`"
        )
    source, sep, name = spec.partition("/")
    if sep and source == "torchvision":
        build = _torchvision_builder(name)
    elif sep and source == "timm":
        build = _timm_builder(name)
    elif ":" in spec:
        build = _import_builder(spec)
    else:
        hint = ""
        if ":" not in spec and "/" not in spec:
            hint = f" (did you mean `torchvision/{spec}` or `timm/{spec}`?)"
        elif sep and ":" not in spec:  # `timn/resnet18`, `torchvison/resnet18`
            close = difflib.get_close_matches(source, ["torchvision", "timm"], n=1, cutoff=0.6)
            hint = f" (did you mean `{close[0]}/{name}`?)" if close else ""
        raise FeatxError(
            f"model spec `{spec}` is not one of `torchvision/<name>`, `timm/<name>`, `package.module:callable`"
            + hint
        )
    try:
        model = build(**model_kwargs) if weights is None else build(weights=weights, **model_kwargs)
    except FeatxError:
        raise
    except Exception as err:  # a constructor's complaint about model_kwargs is the user's input error
        kwargs = ", ".join(f"{k}={v!r}" for k, v in model_kwargs.items()) or "no keyword arguments"
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        accepted = _accepted_kwargs(spec, build) if isinstance(err, TypeError) and unexpected else None
        if unexpected and accepted == []:
            raise FeatxError(
                f"building `{spec}` with {kwargs} failed: it takes no keyword arguments"
            ) from None
        if unexpected and accepted:
            bad = unexpected.group(1)
            raise FeatxError(
                f"building `{spec}` with {kwargs} failed: it takes no keyword argument `{bad}`"
                f"{did_you_mean(bad, accepted)}; accepted: {listing(accepted, len(accepted))}"
            ) from None
        raise FeatxError(
            f"building `{spec}` with {kwargs} failed: {type(err).__name__}: {one_line(err)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise FeatxError(f"`{spec}` returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _accepted_kwargs(spec: str, build: Any) -> list[str] | None:
    """The keyword arguments a model spec takes: those of its builder (the torchvision builder, the timm
    model function, the imported callable) and of the model class's ``__init__``, in that order; None
    when they cannot be read. The class is found by building the model on the meta device (no memory,
    no init)."""
    source, _, name = spec.partition("/")
    try:
        if source == "torchvision":
            import torchvision

            entry = torchvision.models.get_model_builder(name)
        elif source == "timm":
            from timm.models import model_entrypoint

            entry = model_entrypoint(name.split(".")[0])
        else:
            module_name, _, attr_path = spec.partition(":")
            entry = importlib.import_module(module_name)
            for part in attr_path.split("."):
                entry = getattr(entry, part)
        callables = [entry]
        if not isinstance(entry, type):
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                callables.append(type(build()).__init__)
    except Exception:  # the list is a hint: without it the constructor's own message stands
        return None
    names: dict[str, None] = {}
    for fn in callables:
        try:
            parameters = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            continue
        for p in parameters:
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                names[p.name] = None
    return list(names)


def _torchvision_builder(name: str):
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        raise FeatxError(
            f"unknown torchvision model `{name}`{did_you_mean(name, known)}; "
            "see torchvision.models.list_models()"
        )

    def build(weights: object = None, **kwargs: object) -> nn.Module:
        # Detection and segmentation builders default to a pretrained backbone: only when asked for.
        builder = torchvision.models.get_model_builder(name)
        if (
            "weights_backbone" in inspect.signature(builder).parameters
            and "pretrained_backbone" not in kwargs
        ):
            kwargs.setdefault("weights_backbone", None)
        with warnings.catch_warnings():  # featx asked for the legacy switches deliberately
            warnings.filterwarnings("ignore", message=".*(deprecated since 0.13|other than a weight enum)")
            if kwargs.get("pretrained"):  # torchvision picks its legacy weights
                return builder(**kwargs)
            return builder(weights=weights, **kwargs)

    return build


def _timm_builder(name: str):
    import timm

    if name.startswith(("hf-hub:", "hf_hub:")) or not timm.is_model(name.split(".")[0]):
        raise FeatxError(
            f"unknown timm model `{name}`{did_you_mean(name, timm.list_models())}; see timm.list_models()"
        )

    def build(**kwargs: Any) -> nn.Module:  # the user's model_kwargs: the constructor checks them
        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def _repository_example(module_name: str, spec: str) -> types.ModuleType:
    """``examples.<module>`` (the docs' ``examples.seed_toy:ResN``) from any folder: the ``examples``
    package of the repository featx is installed from, when there is one (an editable install or a
    checkout on the path). The package is imported under its own name and nothing else of the repository
    goes on ``sys.path``.

    Raises:
        FeatxError: featx was installed without the repository (a wheel): there are no examples to import.
    """
    package = Path(__file__).resolve().parent.parent / "examples"
    if not (package / "__init__.py").is_file():
        raise FeatxError(
            f"cannot import module `{module_name}` from spec `{spec}`: no `examples` package here or beside "
            f"featx ({package.parent}); the examples come with a checkout of the featx repository: run from "
            "its root or put it on PYTHONPATH"
        )
    found = importlib.util.spec_from_file_location(
        "examples", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    assert found is not None and found.loader is not None
    examples = importlib.util.module_from_spec(found)
    sys.modules["examples"] = examples
    try:
        found.loader.exec_module(examples)
    except Exception:
        del sys.modules["examples"]
        raise
    try:
        return importlib.import_module(module_name)
    except Exception as err:
        raise FeatxError(
            f"cannot import module `{module_name}` from spec `{spec}` (the repository's examples, {package}): "
            f"{type(err).__name__}: {one_line(err)}"
        ) from None


def _import_builder(spec: str):
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise FeatxError(f"model spec `{spec}` must be `package.module:callable`")
    # Like `python -m`, a spec names modules relative to the working directory too.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != "examples":
            raise FeatxError(
                f"cannot import module `{module_name}` from spec `{spec}`: {type(err).__name__}: {one_line(err)}"
            ) from None
        obj = _repository_example(module_name, spec)
    except Exception as err:
        raise FeatxError(
            f"cannot import module `{module_name}` from spec `{spec}`: {type(err).__name__}: {one_line(err)}"
        ) from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            raise FeatxError(
                f"`{module_name}` has no attribute `{attr_path}` (spec `{spec}`){did_you_mean(part, public)}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise FeatxError(
            f"`{attr_path}` in `{module_name}` is a {type(obj).__name__}, not a class or function "
            f"that returns a model (spec `{spec}`)"
        )
    return obj


def torch_device(text: str, flag: str = "--device") -> torch.device:
    """``text`` as a torch device this machine has, for the command line (``flag``) and the pytest plugin.

    Raises:
        FeatxError: not a device name, a device type featx does not run on, or CUDA asked for where there
            is none ("CUDA is not available on this machine; use --device cpu").
    """
    try:
        device = torch.device(text)
    except RuntimeError:
        raise FeatxError(f"{flag} `{text}` is not a torch device; accepted: cpu, cuda, cuda:N, mps") from None
    if device.type == "cpu" and device.index is not None:  # torch accepts `cpu:1` and runs on the one CPU
        raise FeatxError(f"{flag} `{text}`: the CPU has no index; use {flag} cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FeatxError(f"{flag} `{text}`: CUDA is not available on this machine; use {flag} cpu")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise FeatxError(
            f"{flag} `{text}` is not supported; accepted: {listing(['cpu', 'cuda', 'mps', 'xpu'])}"
        )
    return device
