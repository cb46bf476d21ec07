"""Assertions for people's own tests: ``assert_faithful(model, upto, example_input)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from featx.render.text import diff_text
from featx.report import Report
from featx.verification import verify
from featx.vocab import MODES


def assert_faithful(
    model: nn.Module | str,
    upto: str | int,
    example_input: Any = None,
    *,
    modes: Sequence[str] = MODES,
    atol: float = 0.0,
    rtol: float = 0.0,
    seed: int = 0,
    keep_glue: bool = False,
) -> Report:
    """Raise ``AssertionError`` unless ``featx.verify(model, upto, ...)`` finds the cut faithful.

    The message names each lost glue op with its source line and where it runs, and the max abs diff per
    mode; the full verify table follows. Returns the ``Report`` when the cut is faithful. ``keep_glue``
    checks ``featx.truncate(model, upto, keep_glue=True)`` instead of the Sequential.

    Example:
        >>> def test_backbone_cut():
        ...     assert_faithful(torchvision.models.resnet50(), "layer4", torch.randn(2, 3, 224, 224))
    """
    __tracebackhide__ = True
    report = verify(
        model, upto, example_input, modes=modes, atol=atol, rtol=rtol, seed=seed, keep_glue=keep_glue
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
