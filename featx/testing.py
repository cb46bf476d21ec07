"""Assertions for people's own tests: ``assert_faithful(model, upto, example_input)``, or
``assert_faithful("configs/backbone.yaml")``."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from featx.checks import ConfigCheck, check_config
from featx.config import is_config_path
from featx.errors import FeatxError
from featx.model_sources import ModelSource
from featx.render.text import diff_text
from featx.report import Report
from featx.verification import verify
from featx.vocab import MODES


def assert_faithful(
    model: nn.Module | str | os.PathLike[str] | ModelSource,
    upto: str | int | None = None,
    example_input: Any = None,
    *,
    modes: Sequence[str] = MODES,
    atol: float = 0.0,
    rtol: float = 0.0,
    seed: int = 0,
    keep_glue: bool = False,
    leaf_functions: Sequence[Callable[..., Any]] = (),
    weights: str | os.PathLike[str] | None = None,
    weights_prefix: str | None = None,
    model_kwargs: Mapping[str, object] | None = None,
) -> Report | ConfigCheck:
    """Raise ``AssertionError`` unless ``featx.verify(model, upto, ...)`` finds the cut faithful.

    The message names each lost glue op with its source line and where it runs, and the max abs diff per
    mode; the full verify table follows. Returns the ``Report`` when the cut is faithful. ``keep_glue``
    checks ``featx.truncate(model, upto, keep_glue=True)`` instead of the Sequential, with the
    ``leaf_functions`` its trace keeps whole. The model is taken as ``verify`` takes it: a module, or a spec
    or ``featx.models.ModelSource`` with ``weights``, ``weights_prefix`` and ``model_kwargs``.

    ``model`` may also be a backbone config (a ``.yaml`` path, or a featx ``.safetensors`` export): it is
    checked as ``featx check`` checks it — every cut it declares, in its own ``verify`` modes, input shape
    and tolerances, and that it builds — and its ``ConfigCheck`` is returned; the config sets the cut and
    the check settings, so ``upto``, ``example_input``, ``modes``, ``atol``, ``rtol``, ``keep_glue`` and
    ``leaf_functions`` are refused with it; ``weights``, ``weights_prefix`` and ``model_kwargs`` replace the
    config's, as ``featx check CONFIG --weights`` does.

    Example:
        >>> def test_backbone_cut():
        ...     assert_faithful(torchvision.models.resnet50(), "layer4", torch.randn(2, 3, 224, 224))
        >>> def test_shipped_config():
        ...     assert_faithful("configs/resnet50_fpn.yaml")

    Raises:
        FeatxError: no ``upto`` with a model or spec; a config given settings it declares itself.
    """
    __tracebackhide__ = True
    if isinstance(model, (str, os.PathLike)) and is_config_path(os.fspath(model)):
        return _assert_config_faithful(
            os.fspath(model),
            seed,
            upto=upto,
            example_input=example_input,
            modes=None if tuple(modes) == tuple(MODES) else modes,
            atol=atol or None,
            rtol=rtol or None,
            keep_glue=keep_glue or None,
            leaf_functions=tuple(leaf_functions) or None,
            source={"weights": weights, "weights_prefix": weights_prefix, "model_kwargs": model_kwargs},
        )
    if upto is None:
        raise FeatxError("assert_faithful(model) needs `upto` (the cut); only a config file declares its own")
    report = verify(
        model if isinstance(model, (nn.Module, str, ModelSource)) else os.fspath(model),
        upto,
        example_input,
        modes=modes,
        atol=atol,
        rtol=rtol,
        seed=seed,
        keep_glue=keep_glue,
        leaf_functions=leaf_functions,
        weights=weights,
        weights_prefix=weights_prefix,
        model_kwargs=model_kwargs,
    )
    if report.faithful:
        return report
    diffs = ", ".join(f"{mode} {diff_text(r.max_abs_diff)}" for mode, r in report.modes.items())
    lines = [
        f"cut at `{report.upto}` of {report.anatomy.model} is NOT faithful (max abs diff: {diffs})",
        *(f"  - {reason}" for reason in report.reasons),
        "",
        str(report),
    ]
    raise AssertionError("\n".join(lines))


def _assert_config_faithful(
    path: str, seed: int, source: Mapping[str, Any], **settings: object
) -> ConfigCheck:
    __tracebackhide__ = True
    given = [name for name, value in settings.items() if value is not None]
    if given:
        raise FeatxError(
            f"assert_faithful({path!r}): the config declares its cut and check settings; drop "
            + ", ".join(f"`{name}`" for name in given)
            + " (or edit the config)"
        )
    result = check_config(path, seed=seed, **source)  # the source keywords over the config's
    if not result.faithful:
        raise AssertionError(result.message())
    return result
