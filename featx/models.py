"""Model sources: a spec, its weights and keyword arguments parsed once into a ``ModelSource``, and built.

A spec names where a model comes from:

- ``torchvision/<name>``: ``torchvision.models.get_model(name, weights=None, **model_kwargs)``;
- ``timm/<name>``: ``timm.create_model(name, pretrained=False, **model_kwargs)``;
- ``package.module:callable``: the callable (a class or factory) imported and called with ``model_kwargs``.

What the weights are (a file, a pretrained weights name, random with a seed) is ``featx.weights``'s
``WeightsSource``; reading a file into the model is ``featx.checkpoints``'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import types
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featx.checkpoints import Checkpoint, load_weights
from featx.errors import FeatxError, a_or_an, did_you_mean, listing, one_line
from featx.weights import (
    WeightsSource,
    _Served,
    _torchvision_enum,
    _torchvision_file,
    _weights_label,
    is_weights_name,  # noqa: F401  the cli's "file or name?", until it takes a ModelSource
)

# the source each model was built from (the weights as resolved) and the checkpoint it was loaded from
_BUILT: weakref.WeakKeyDictionary[nn.Module, tuple[ModelSource, Checkpoint | None]] = (
    weakref.WeakKeyDictionary()
)
LIBRARIES = ("torchvision", "timm", "import")


@dataclass(frozen=True)
class ModelSource:
    """A model as the user named it, parsed once (``parse``): the spec, which library builds it
    (``torchvision``, ``timm``, ``import`` for ``package.module:callable``; empty for a spec that is none
    of these, refused by ``build``), the model's name there, the constructor's keyword arguments (its
    download switches, ``weights=``/``pretrained=``, already moved to ``weights``) and the weights.

    ``build()`` makes the model (``build_model``), ``load()`` makes it and loads its weights
    (``load_model``); ``fingerprint()`` and ``to_dict()`` say what it is. ``kwargs_from`` says where each
    of ``model_kwargs`` came from (``--model-kwarg``, ``c.yaml: key `model_kwargs```; a Python argument
    when absent), so a constructor's refusal names it as the user gave it; it is not part of the value.
    """

    spec: str
    library: str  # one of LIBRARIES, or "" for a spec of no known form (``build`` refuses it)
    name: str
    model_kwargs: Mapping[str, object]
    weights: WeightsSource
    kwargs_from: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def parse(
        cls,
        spec: str,
        weights: str | os.PathLike[str] | None = None,
        *,
        weights_prefix: str | None = None,
        model_kwargs: Mapping[str, object] | None = None,
        seed: int | None = None,
        where: str = "model_kwargs",
        origin: str = "weights",
        base_dir: str | os.PathLike[str] | None = None,
    ) -> ModelSource:
        """The one parser of a model source: ``spec``'s grammar, the download switches in ``model_kwargs``
        (``download_switches``; ``where`` and ``origin`` name the kwargs and the weights in its errors),
        and what ``weights`` is (``WeightsSource.parse``: a relative file resolves against ``base_dir``).
        Nothing is imported, built or downloaded here. ``where`` is also where the kwargs came from
        (``kwargs_from``): a flag (``--model-kwarg``), a config's key, or ``model_kwargs`` (Python).

        Raises:
            FeatxError: both the kwargs and ``weights`` say which weights to load, a switch that is not a
                bool, a weights name with a prefix or for a spec that is not torchvision's or timm's.
        """
        text, kwargs = download_switches(spec, weights, model_kwargs or {}, where, origin)
        library, name = _grammar(spec)
        if kwargs.get("pretrained") and library == "torchvision":  # torchvision's builder loads its own
            source = WeightsSource("torchvision", None, f"{where} `pretrained`", spec, weights_prefix)
        else:
            source = WeightsSource.parse(
                text, spec, prefix=weights_prefix, seed=seed, origin=origin, base_dir=base_dir
            )
        return cls(spec, library, name, kwargs, source, {key: where for key in kwargs})

    def with_overrides(
        self,
        *,
        weights: str | os.PathLike[str] | None = None,
        weights_prefix: str | None = None,
        model_kwargs: Mapping[str, object] | None = None,
        where: str = "--model-kwarg",
        origin: str = "--weights",
    ) -> ModelSource:
        """This source with the command line's overrides, parsed as one: ``weights`` (or a download switch
        in ``model_kwargs``) replaces the weights, ``model_kwargs`` merge into the constructor's,
        ``weights_prefix`` replaces the prefix."""
        if weights is None and weights_prefix is None and not model_kwargs:
            return self
        kwargs = dict(model_kwargs or {})
        own = self.weights
        switched = kwargs.get("weights") is not None or bool(kwargs.get("pretrained"))
        if weights is None and not switched:  # the source's own weights stay
            weights = str(own.file) if own.file is not None else own.text
            origin = own.origin
        changed = ModelSource.parse(
            self.spec,
            weights,
            weights_prefix=weights_prefix if weights_prefix is not None else own.prefix,
            model_kwargs={**self.model_kwargs, **kwargs},
            seed=own.seed,
            where=where,
            origin=origin,
        )
        # the source's own kwargs keep where they came from; the overrides come from `where`
        kept = {key: self.kwargs_from.get(key, where) for key in self.model_kwargs if key not in kwargs}
        return dataclasses.replace(
            changed, kwargs_from={key: kept.get(key, where) for key in changed.model_kwargs}
        )

    def build(self) -> tuple[nn.Module, Checkpoint | None]:
        """The model, and the checkpoint its weights resolve to (None without weights); see ``build_model``."""
        build = _builder(self.spec)
        weights, member = self.weights, None
        checkpoint = weights.checkpoint if weights.kind in ("file", "timm", "hf-hub") else None
        if weights.kind == "torchvision" and weights.text is not None:
            member = weights.member
        torchvision = self.library == "torchvision"
        served = _Served(_torchvision_enum(self.name) if torchvision else None)
        seeded = weights.kind == "random" and weights.seed is not None
        with (
            served if torchvision else contextlib.nullcontext(),
            torch.random.fork_rng() if seeded else contextlib.nullcontext(),
            warnings.catch_warnings(),
        ):
            if seeded:
                torch.manual_seed(weights.seed)
            # loading into a model built on the meta device copies nothing, which torch warns about
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
            model = _construct(self.spec, build, self.model_kwargs, member, self.kwargs_from)
        built = self
        if served.member is not None and served.state is not None:
            keys = {key: served.origin[id(t)] for key, t in served.state.items() if id(t) in served.origin}
            loaded = not any(p.is_meta for p in model.parameters())
            label = _weights_label(served.member)
            checkpoint = Checkpoint(_torchvision_file(served.member), label, True, loaded, keys or None)
            # a constructor's own switch (`pretrained=True`) is known by name once built
            built = dataclasses.replace(
                self, weights=dataclasses.replace(weights, kind="torchvision", text=label)
            )
        model.eval()
        _BUILT[model] = (built, checkpoint)
        return model, checkpoint

    def load(self) -> nn.Module:
        """The model with its weights loaded; see ``load_model``."""
        model, checkpoint = self.build()
        if checkpoint is not None and not checkpoint.loaded:
            load_weights(model, checkpoint, prefix=self.weights.prefix)
        return model

    def fingerprint(self) -> dict[str, object]:
        """What the model is, to compare runs by: the spec, the constructor's kwargs, and the weights'
        ``WeightsSource.fingerprint()`` (a named weights' cache file is hashed)."""
        return {
            "model": self.spec,
            "model_kwargs": {k: repr(v) for k, v in self.model_kwargs.items()},
            "weights": self.weights.fingerprint(),
        }

    def to_dict(self) -> dict[str, object]:
        """The source as parsed, nothing resolved."""
        return {
            "model": self.spec,
            "library": self.library,
            "name": self.name,
            "model_kwargs": {k: repr(v) for k, v in self.model_kwargs.items()},
            "weights": self.weights.to_dict(),
        }


def _grammar(spec: object) -> tuple[str, str]:
    """``(library, name)`` of a spec: ``("torchvision", "resnet18")``, ``("import", "pkg.mod:fn")``;
    ``("", spec)`` for anything else (``_builder`` says what is wrong with it)."""
    if not isinstance(spec, str):
        return "", ""
    library, sep, name = spec.partition("/")
    if sep and library in ("torchvision", "timm"):
        return library, name
    return ("import", spec) if ":" in spec else ("", spec)


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

    source = ModelSource.parse(
        spec, weights, weights_prefix=weights_prefix, model_kwargs=model_kwargs, seed=seed
    )
    return source.load()


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

    source = ModelSource.parse(
        spec, weights, weights_prefix=weights_prefix, model_kwargs=model_kwargs, seed=seed
    )
    return source.build()


@dataclass(frozen=True)
class SourceNames:
    """What errors call the source keywords: the Python API's keywords (``KEYWORDS``) or the command
    line's flags (``COMMAND_LINE``), so one helper (``model_source``) speaks to both."""

    weights: str
    weights_prefix: str
    model_kwargs: str
    flags: bool

    def given(self, key: str, value: object) -> str:
        """``--weights-prefix module.`` on the command line, ``weights_prefix='module.'`` in Python."""
        name = getattr(self, key)
        return f"{name} {value}" if self.flags else f"{name}={value!r}"


KEYWORDS = SourceNames("weights", "weights_prefix", "model_kwargs", flags=False)
COMMAND_LINE = SourceNames("--weights", "--weights-prefix", "--model-kwarg", flags=True)


def model_source(
    model: str | ModelSource,
    *,
    weights: str | os.PathLike[str] | None = None,
    weights_prefix: str | None = None,
    model_kwargs: Mapping[str, object] | None = None,
    seed: int | None = None,
    names: SourceNames = KEYWORDS,
) -> ModelSource:
    """The one value every verb builds from a model SPEC or a ``ModelSource`` and the source keywords
    (the command line's ``--weights``, ``--weights-prefix``, ``--model-kwarg``; ``names`` says which the
    errors name): a SPEC is parsed once (``ModelSource.parse``); a ``ModelSource`` gets the keywords over
    its own (``ModelSource.with_overrides``: ``weights`` or a download switch in ``model_kwargs`` replaces
    its weights, ``model_kwargs`` merge into its kwargs, ``weights_prefix`` replaces its prefix). ``seed``
    seeds what no weights cover (a random init: one seed, one model in every verb and process), kept as the
    weights' ``seed``; a ``ModelSource`` that has a seed keeps its own. Nothing is built here.

    Raises:
        FeatxError: ``model`` is neither, ``weights_prefix`` without weights to strip it from, what
            ``ModelSource.parse`` refuses (both ``weights`` and a download switch, a bad switch).
    """
    if isinstance(seed, bool) or not (seed is None or isinstance(seed, int)):
        raise FeatxError(f"seed {seed!r} is not an integer")
    if isinstance(model, ModelSource):
        source = model.with_overrides(
            weights=weights,
            weights_prefix=weights_prefix,
            model_kwargs=model_kwargs,
            where=names.model_kwargs,
            origin=names.weights,
        )
    elif isinstance(model, str):
        source = ModelSource.parse(
            model,
            weights,
            weights_prefix=weights_prefix,
            model_kwargs=model_kwargs,
            where=names.model_kwargs,
            origin=names.weights,
        )
    else:
        raise FeatxError(
            f"model is a {type(model).__name__}; expected a torch.nn.Module or a spec (a string such as "
            "`torchvision/resnet50`, or a featx.models.ModelSource)"
        )
    if weights_prefix is not None and source.weights.text is None:
        raise FeatxError(
            f"{names.given('weights_prefix', weights_prefix)} needs {names.weights} (the file to strip it from)"
        )
    if seed is not None and source.weights.seed is None:
        source = dataclasses.replace(source, weights=dataclasses.replace(source.weights, seed=seed))
    return source


def given_model(
    model: nn.Module | str | ModelSource,
    *,
    weights: str | os.PathLike[str] | None = None,
    weights_prefix: str | None = None,
    model_kwargs: Mapping[str, object] | None = None,
    seed: int | None = None,
) -> tuple[nn.Module, ModelSource | None]:
    """The model a verb runs: ``model`` itself when it is a built ``nn.Module`` (the source keywords then
    refused: its weights are in it), else the model ``model_source`` names, built with its weights loaded
    (``ModelSource.load``), and that source.

    Raises:
        FeatxError: source keywords with a built module; what ``model_source`` and ``ModelSource.load``
            raise.
    """
    if isinstance(model, nn.Module):
        given = {"weights": weights, "weights_prefix": weights_prefix, "model_kwargs": model_kwargs or None}
        key = next((k for k, v in given.items() if v is not None), None)
        if key is not None:
            raise FeatxError(
                f"{KEYWORDS.given(key, given[key])} is for a model spec or a featx.models.ModelSource, and "
                f"model is a built {type(model).__name__}: load the weights into it, or pass its spec"
            )
        return model, None
    source = model_source(
        model, weights=weights, weights_prefix=weights_prefix, model_kwargs=model_kwargs, seed=seed
    )
    return source.load(), source


def weights_of(model: nn.Module) -> Checkpoint | None:
    """The checkpoint ``build_model`` resolved for ``model`` (a file, or pretrained weights' cache file),
    or None: built with its own init, or not built by featx."""
    built = _BUILT.get(model)
    return None if built is None else built[1]


def source_of(model: nn.Module) -> ModelSource | None:
    """The ``ModelSource`` ``model`` was built from, its weights as resolved (a constructor's
    ``pretrained=True`` by the name it loaded), or None: not built by featx."""
    built = _BUILT.get(model)
    return None if built is None else built[0]


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
        source = source_of(model)
        kwargs = dict(source.model_kwargs) if source is not None else {}
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
    (``"key `verify.input_shape`"``); None (or ``"--input-shape"``) is the command line's ``--input-shape``.

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
    if key is None or key == "--input-shape":
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


def _builder(spec: str) -> Callable[..., Any]:
    """What builds ``spec``'s model (the torchvision or timm builder, the imported callable).

    Raises:
        FeatxError: a spec of no known form (with a did-you-mean), an unknown model, an import that fails.
    """
    if not isinstance(spec, str) or not spec:
        raise FeatxError(
            f"model spec {spec!r} is not a string; expected `torchvision/<name>`, `timm/<name>` "
            "or `package.module:callable`"
        )
    library, name = _grammar(spec)
    if library == "torchvision":
        build = _torchvision_builder(name)
    elif library == "timm":
        build = _timm_builder(name)
    elif library == "import":
        build = _import_builder(spec)
    else:
        refusal = spec_form_error(spec)
        assert refusal is not None  # a spec of no library
        raise refusal
    return build


def spec_form_error(spec: str) -> FeatxError | None:
    """The refusal of a spec of no known form (``tv/resnet18``, ``resnet50``, ``/dev/null``), with a
    did-you-mean where one is close; None for a spec of a known form (nothing is imported to tell)."""
    if _grammar(spec)[0]:
        return None
    source, sep, name = spec.partition("/")
    hint = ""
    if ":" not in spec and "/" not in spec:
        hint = f" (did you mean `torchvision/{spec}` or `timm/{spec}`?)"
    elif sep and ":" not in spec:  # `timn/resnet18`, `torchvison/resnet18`
        close = difflib.get_close_matches(source, ["torchvision", "timm"], n=1, cutoff=0.6)
        hint = f" (did you mean `{close[0]}/{name}`?)" if close else ""
    return FeatxError(
        f"model spec `{spec}` is not one of `torchvision/<name>`, `timm/<name>`, `package.module:callable`"
        + hint
    )


class BuildFailed(FeatxError):
    """A constructor's refusal of the model's kwargs (or of nothing: a model that does not build), naming
    each kwarg where it came from (``ModelSource.kwargs_from``): the caller adds no flag or key to it."""


def _construct(
    spec: str,
    build: Callable[..., Any],
    model_kwargs: Mapping[str, object],
    weights: object = None,
    kwargs_from: Mapping[str, str] | None = None,
) -> nn.Module:
    """``build(**model_kwargs)`` (with torchvision's ``weights`` member), a constructor's complaint
    turned into one line naming the kwargs as they were given (``--model-kwarg num_classes=x``, a config's
    ``model_kwargs``, a Python argument: ``kwargs_from``), the accepted ones when it can tell, and the type
    a kwarg's default has where the value given is of another."""
    try:
        model = build(**model_kwargs) if weights is None else build(weights=weights, **model_kwargs)
    except FeatxError:
        raise
    except Exception as err:  # a constructor's complaint about model_kwargs is the user's input error
        where, kwargs = _given(model_kwargs, kwargs_from or {})
        failed = f"{where}building `{spec}` with {kwargs or 'no keyword arguments'} failed"
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        parameters = _parameters(spec, build) if model_kwargs else None
        accepted = None if parameters is None else list(parameters)
        if isinstance(err, TypeError) and unexpected and accepted == []:
            raise BuildFailed(f"{failed}: it takes no keyword arguments") from None
        if isinstance(err, TypeError) and unexpected and accepted:
            bad = unexpected.group(1)
            raise BuildFailed(
                f"{failed}: it takes no keyword argument `{bad}`"
                f"{did_you_mean(bad, accepted)}; accepted: {listing(accepted, len(accepted))}"
            ) from None
        raise BuildFailed(
            f"{failed}: {type(err).__name__}: {one_line(err)}{_mistyped(model_kwargs, parameters or {})}"
        ) from None
    if not isinstance(model, nn.Module):
        raise FeatxError(f"`{spec}` returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _given(model_kwargs: Mapping[str, object], kwargs_from: Mapping[str, str]) -> tuple[str, str]:
    """The kwargs as the user gave them: ``--model-kwarg num_classes=x`` for a flag's (its value as YAML,
    as it was typed), ``num_classes='x'`` for a config's or a Python argument; and, when they all came from
    one config key, that key (``c.yaml: key `model_kwargs`: ``) to start the message with."""
    import yaml

    parts = []
    for key, value in model_kwargs.items():
        origin = kwargs_from.get(key, "model_kwargs")
        if origin.startswith("--"):
            text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip().removesuffix("\n...")
            parts.append(f"{origin} {key}={text}")
        else:
            parts.append(f"{key}={value!r}")
    origins = {kwargs_from.get(key, "model_kwargs") for key in model_kwargs}
    (origin,) = origins if len(origins) == 1 else ("",)
    keyed = ": key `" in origin  # a config's key, not a flag or a Python argument
    return (f"{origin}: " if keyed else ""), ", ".join(parts)


def _mistyped(model_kwargs: Mapping[str, object], parameters: Mapping[str, inspect.Parameter]) -> str:
    """``; `num_classes` defaults to 1000, an int, not a str`` for each kwarg whose value is not of the
    type of the constructor's default (a hint: the constructor's own message rarely names the kwarg)."""
    # the types a value given as YAML can have, and what each default's type takes
    takes = {bool: (bool,), int: (int,), float: (int, float), str: (str,), list: (list, tuple)}
    takes[tuple] = takes[list]
    hints = []
    for key, value in model_kwargs.items():
        p = parameters.get(key)
        default = p.default if p is not None else None
        if type(default) not in takes or value is None:  # no default, None, a class: no type to compare
            continue
        if isinstance(value, bool) != isinstance(default, bool) or not isinstance(
            value, takes[type(default)]
        ):
            hints.append(
                f"`{key}` defaults to {default!r}, {a_or_an(type(default).__name__)}, not "
                f"{a_or_an(type(value).__name__)}"
            )
    return "".join(f"; {hint}" for hint in hints)


def _parameters(spec: str, build: Any) -> dict[str, inspect.Parameter] | None:
    """The keyword arguments a model spec takes, by name: those of its builder (the torchvision builder,
    the timm model function, the imported callable) and of the model class's ``__init__``, in that order
    (the first one of a name wins); None when they cannot be read. The class is found by building the
    model on the meta device (no memory, no init)."""
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
    found: dict[str, inspect.Parameter] = {}
    for fn in callables:
        try:
            parameters = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            continue
        for p in parameters:
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                found.setdefault(p.name, p)
    return found


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


class MissingAttribute(LookupError):
    """``attribute``: the object has no ``part``; ``public`` is what it has, for a did-you-mean."""

    def __init__(self, part: str, public: list[str]) -> None:
        super().__init__(part)
        self.part, self.public = part, public


def import_module(module_name: str) -> object:
    """``module_name`` imported the way a spec names it: like ``python -m``, relative to the working
    directory too (a model spec's ``package.module:callable``, a config's ``leaf_functions``)."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    return importlib.import_module(module_name)


def attribute(obj: object, attr_path: str) -> object:
    """``obj``'s dotted attribute ``attr_path`` (``Outer.build``).

    Raises:
        MissingAttribute: the first part that is not there, with the public names where it was looked for.
    """
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise MissingAttribute(part, [n for n in dir(obj) if not n.startswith("_")])
        obj = getattr(obj, part)
    return obj


def _import_builder(spec: str):
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise FeatxError(f"model spec `{spec}` must be `package.module:callable`")
    try:
        obj = import_module(module_name)
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
    try:
        obj = attribute(obj, attr_path)
    except MissingAttribute as missing:
        raise FeatxError(
            f"`{module_name}` has no attribute `{attr_path}` (spec `{spec}`)"
            f"{did_you_mean(missing.part, missing.public)}"
        ) from None
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
