"""Model sources: a spec, its weights and keyword arguments parsed once into a ``ModelSource``, and what each
model featx built was built from.

A spec names where a model comes from:

- ``torchvision/<name>``: ``torchvision.models.get_model(name, weights=None, **model_kwargs)``;
- ``timm/<name>``: ``timm.create_model(name, pretrained=False, **model_kwargs)``;
- ``package.module:callable``: the callable (a class or factory) imported and called with ``model_kwargs``.

``model_source`` is the one way from a verb's model argument (a SPEC or a ``ModelSource``) and its source
keywords (``KEYWORDS``, or the command line's flags, ``COMMAND_LINE``) to the ``ModelSource``;
``given_model`` loads it, or takes a built module. What builds each library's models is ``featx.builders``'s;
what the weights are (a file, a pretrained weights name, random with a seed) is ``featx.weights``'s
``WeightsSource``; reading a file into the model is ``featx.checkpoints``'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from featx.builders import _builder, _construct, _grammar
from featx.checkpoints import Checkpoint, load_weights
from featx.errors import FeatxError
from featx.weights import (
    WeightsSource,
    _Served,
    _torchvision_enum,
    _torchvision_file,
    _weights_label,
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
