"""What builds a spec's model, by library: torchvision's builder for ``torchvision/<name>``, timm's
``create_model`` for ``timm/<name>``, the imported callable for ``package.module:callable`` (``_builder``, by
the spec grammar ``_grammar``; a spec of no known form refused with a did-you-mean, ``spec_form_error``).

``_construct`` calls the builder with the model's kwargs and turns a constructor's complaint into one line
naming each kwarg where it was given (``BuildFailed``). ``import_module`` and ``attribute`` import a module
and a dotted attribute the way a spec names them (a config's ``leaf_functions`` too); the repository's
``examples`` package is found beside featx from any folder.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import types
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featx.errors import FeatxError, a_or_an, did_you_mean, listing, one_line


def _grammar(spec: object) -> tuple[str, str]:
    """``(library, name)`` of a spec: ``("torchvision", "resnet18")``, ``("import", "pkg.mod:fn")``;
    ``("", spec)`` for anything else (``_builder`` says what is wrong with it)."""
    if not isinstance(spec, str):
        return "", ""
    library, sep, name = spec.partition("/")
    if sep and library in ("torchvision", "timm"):
        return library, name
    return ("import", spec) if ":" in spec else ("", spec)


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
