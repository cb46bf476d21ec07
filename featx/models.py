"""Model specs to modules, and local weight files to state dicts.

A spec names where a model comes from:

- ``torchvision/<name>``: ``torchvision.models.get_model(name, weights=None, **model_kwargs)``;
- ``timm/<name>``: ``timm.create_model(name, pretrained=False, **model_kwargs)``;
- ``package.module:callable``: the callable (a class or factory) imported and called with ``model_kwargs``.

Nothing here downloads: weights come only from a local ``.safetensors`` file or a torch checkpoint read
with ``weights_only=True``, so a checkpoint carrying an arbitrary pickle is refused, never executed.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pickle
import re
import sys
import warnings
import weakref
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from torch import nn

from featx.errors import FeatxError, did_you_mean, listing, one_line

_SPECS: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()

# Keys under which training scripts commonly nest the state dict in a checkpoint, most specific first.
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")


def load_model(spec: str, weights: str | os.PathLike[str] | None = None, **model_kwargs: object) -> nn.Module:
    """Build the model named by ``spec`` with its own initialisation, then load ``weights`` if given.

    ``weights`` is a local ``.safetensors`` file or a torch checkpoint (a state dict, or a dict holding
    one under ``state_dict``/``model``); it must match the model's state dict exactly: missing,
    unexpected and mis-shaped keys are reported by name. The returned model is in eval mode.

    Raises:
        FeatxError: unknown spec (with close matches), a constructor that rejects ``model_kwargs``,
            a missing, corrupt or mismatched weights file.
    """
    model = _build(spec, model_kwargs)
    if weights is not None:
        load_weights(model, weights)
    model.eval()
    _SPECS[model] = spec
    return model


def spec_of(model: nn.Module) -> str | None:
    """The spec ``load_model`` built ``model`` from, or None for a model built elsewhere."""
    return _SPECS.get(model)


def default_input_shape(model: nn.Module, batch: int = 2) -> tuple[int, ...]:
    """Batch ``batch`` at the model's own input size: timm's ``pretrained_cfg``, torchvision's 224.

    Raises:
        FeatxError: the model declares no input size (pass an example input / ``--input-shape``).
    """
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, Mapping) and cfg.get("input_size"):
            return (batch, *(int(d) for d in cfg["input_size"]))
    if type(model).__module__.startswith("torchvision.models"):
        return (batch, 3, 224, 224)
    name = spec_of(model) or type(model).__qualname__
    raise FeatxError(
        f"`{name}` declares no input size (no timm pretrained_cfg, not a torchvision model); "
        "pass an example input (command line: --input-shape, e.g. 2,3,224,224)"
    )


def read_state_dict(path: str | os.PathLike[str]) -> Mapping[str, torch.Tensor]:
    """The tensors of a local weights file, on the CPU, read only when asked for.

    ``.safetensors`` files are opened with ``safe_open`` and a tensor is read when its key is looked up;
    anything else goes through ``torch.load(weights_only=True, mmap=True)``, so untouched tensors stay on
    disk. A checkpoint nesting its state dict under ``state_dict``, ``model``, ``model_state_dict`` or
    ``module`` is unwrapped.
    """
    path = Path(path)
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
        raise FeatxError(
            f"weights file `{path}` holds objects other than tensors and containers"
            + (f" (it asks for `{wanted.group(1)}`)" if wanted else "")
            + "; featx loads checkpoints with weights_only=True and refuses arbitrary pickles"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise FeatxError(
            f"weights file `{path}` is not a readable torch checkpoint or safetensors file: {one_line(err)}"
        ) from None
    return _unwrap_state_dict(obj, path)


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

    def read_into(self, key: str, target: torch.Tensor) -> None:
        """Read one tensor straight into ``target``'s memory: no mapped pages, no second copy."""
        begin, end, dtype = self._offsets()[key]
        if dtype != target.dtype or not target.is_contiguous() or target.device.type != "cpu":
            target.copy_(self[key])
            return
        view = target.reshape(-1).view(torch.uint8).numpy()
        with open(self.path, "rb") as f:
            f.seek(begin)
            if f.readinto(memoryview(view)) != end - begin:
                raise FeatxError(f"weights file `{self.path}` is cut short inside tensor `{key}`")

    def _offsets(self) -> dict[str, tuple[int, int, torch.dtype]]:
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
    path: str | os.PathLike[str],
    *,
    prefix: str | None = None,
    children: Collection[str] | None = None,
    strict: bool = True,
) -> list[str]:
    """Load a local weights file into ``model``, checking keys by name; returns the keys it lacked.

    ``prefix`` (``"backbone."``, ``"module."``) is stripped from the file's keys, and keys without it
    are ignored. With ``children`` (module names, dotted for modules inside a child), only those modules' tensors are
    expected and loaded, and keys of the model's other children are ignored (a classifier head in a backbone's checkpoint, say).
    Mis-shaped keys are always an error; missing and unexpected ones unless ``strict=False``.
    """
    state = read_state_dict(path)
    shapes = state.shapes if isinstance(state, _LazySafetensors) else {k: v.shape for k, v in state.items()}
    keys = {k: k for k in shapes}  # model key -> file key
    if prefix:
        keys = {k[len(prefix) :]: k for k in shapes if k.startswith(prefix)}
        if not keys:
            raise FeatxError(
                f"weights file `{path}` has no key starting with prefix `{prefix}` "
                f"(its keys start like {listing(sorted(shapes)[:3])})"
            )
    own = model.state_dict()
    names = {name for name, _ in model.named_children()}
    wanted = set(children) if children is not None else names

    def under(key: str) -> bool:  # a key of a wanted module: `layer1.0.conv1.weight` under `layer1`
        parts = key.split(".")
        return any(".".join(parts[:i]) in wanted for i in range(1, len(parts)))

    expected = own if children is None else {k: v for k, v in own.items() if under(k)}
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
        raise FeatxError(
            f"weights file `{path}` does not match the model's state dict: " + "; ".join(problems)
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


def _build(spec: str, model_kwargs: Mapping[str, object]) -> nn.Module:
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
        raise FeatxError(
            f"model spec `{spec}` is not one of `torchvision/<name>`, `timm/<name>`, `package.module:callable`"
            + hint
        )
    try:
        model = build(**model_kwargs)
    except FeatxError:
        raise
    except Exception as err:  # a constructor's complaint about model_kwargs is the user's input error
        kwargs = ", ".join(f"{k}={v!r}" for k, v in model_kwargs.items()) or "no keyword arguments"
        raise FeatxError(
            f"building `{spec}` with {kwargs} failed: {type(err).__name__}: {one_line(err)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise FeatxError(f"`{spec}` returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _torchvision_builder(name: str):
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        raise FeatxError(
            f"unknown torchvision model `{name}`{did_you_mean(name, known)}; "
            "see torchvision.models.list_models()"
        )

    def build(**kwargs: object) -> nn.Module:
        # Detection and segmentation builders default to a pretrained backbone, which would download.
        builder = torchvision.models.get_model_builder(name)
        if "weights_backbone" in inspect.signature(builder).parameters:
            kwargs.setdefault("weights_backbone", None)
        return builder(weights=None, **kwargs)

    return build


def _timm_builder(name: str):
    import timm

    if name.startswith(("hf-hub:", "hf_hub:")) or not timm.is_model(name.split(".")[0]):
        raise FeatxError(
            f"unknown timm model `{name}`{did_you_mean(name, timm.list_models())}; see timm.list_models()"
        )

    def build(**kwargs: object) -> nn.Module:
        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def _import_builder(spec: str):
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise FeatxError(f"model spec `{spec}` must be `package.module:callable`")
    # Like `python -m`, a spec names modules relative to the working directory too.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
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
