"""Functions named in text: ``resolve_function`` reads a dotted name (``module.function``,
``module:function``, a builtin) as the function it names, with one line naming where it was written when it
does not; ``function_name`` writes a function back as that name. Config ``leaf_functions`` and
``--leaf-function`` name keep_glue's leaf functions so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from featx.builders import MissingAttribute, attribute, import_module
from featx.errors import FeatxError, did_you_mean, one_line

_FUNCTION_NAMES = "`module.function` or `module:function` (a builtin as `int` or `builtins.int`)"


def function_name(function: Callable[..., Any]) -> str:
    """The name ``resolve_function`` reads back as ``function``: ``module:qualified.name`` (``builtins:int``)."""
    return f"{function.__module__}:{function.__qualname__}"


def resolve_function(name: object, where: str) -> Callable[..., Any]:
    """The function a dotted name names: ``module.function`` or ``module:function`` (the module imported,
    relative to the working directory too, as a model spec's is; a dotted attribute path after ``:``), or
    a builtin as ``int`` or ``builtins.int``. ``where`` says where the name was written, for the error.

    Raises:
        FeatxError: one line naming ``where``, the name, what is wrong (no such module, no such function,
            not callable) and what is accepted.
    """
    if not isinstance(name, str) or not name.strip(".:") or name.count(":") > 1:
        raise FeatxError(f"{where} is {name!r}, which is not a function name; accepted: {_FUNCTION_NAMES}")
    if ":" in name:
        module_name, _, attr_path = name.partition(":")
    elif "." in name:
        module_name, _, attr_path = name.rpartition(".")
    else:
        module_name, attr_path = "builtins", name
    if not module_name or not attr_path:
        raise FeatxError(f"{where} is `{name}`, which is not a function name; accepted: {_FUNCTION_NAMES}")
    try:
        found = import_module(module_name)  # relative to the working directory too, as a model spec's
    except Exception as err:
        raise FeatxError(
            f"{where} is `{name}`: cannot import module `{module_name}` ({type(err).__name__}: "
            f"{one_line(err)}); accepted: {_FUNCTION_NAMES}"
        ) from None
    try:
        found = attribute(found, attr_path)
    except MissingAttribute as missing:
        raise FeatxError(
            f"{where} is `{name}`: `{module_name}` has no `{attr_path}`"
            f"{did_you_mean(missing.part, missing.public)}; accepted: {_FUNCTION_NAMES}"
        ) from None
    if not callable(found) or (isinstance(found, type) and issubclass(found, BaseException)):
        raise FeatxError(
            f"{where} is `{name}`: a {type(found).__name__}, not a function; accepted: {_FUNCTION_NAMES}"
        )
    return found
