"""The words featx's values are made of (the vocabulary in docs/design.md), as the types a checker can hold
code to.

Config, record, report and checks all speak these; a status is one of its ``Literal`` values, never any
string.
"""

from __future__ import annotations

from typing import Final, Literal

MODES: Final = ("eval", "train")

GlueStatus = Literal["lost", "at_cut", "dropped", "kept"]
"""Where a glue op stands at a cut: ``lost`` before the last kept child, ``at_cut`` applied to its output,
``dropped`` with the tail, ``kept`` carried by a keep_glue cut (or inside a kept child)."""

ResidualStatus = Literal["kept", "dropped", "lost"]
"""A residual merge is ``kept`` inside a kept child, ``dropped`` inside a dropped one, ``lost`` when the
root (or a container a nested cut replaces) performs it."""

Shortcut = Literal["identity", "projection", "other"]
"""What the residual adds to: the merging module's input, a sub-module's output (``downsample``), else."""

Outcome = Literal["faithful", "not_faithful", "error"]
"""``featx check``'s verdict on one config."""
FAITHFUL: Final = "faithful"
NOT_FAITHFUL: Final = "not_faithful"
ERROR: Final = "error"

NumericVerdict = Literal["faithful", "differs", "below_resolution", "beyond_factor", "no_float64"]
"""A cut in a numeric setting other than float32 eager (``featx.numeric_check``): ``faithful``; ``differs``
from the full model in the setting beyond the dtype's tolerance; ``below_resolution``: equal within that
tolerance, but float64 shows a difference the dtype cannot; ``beyond_factor``: equal within the tolerance,
but further from float64 than the stated factor times the full model's own error."""

Method = Literal["run", "derived"]
"""How a mode's verdict was reached: the truncated model was run, or it follows from the recorded forward."""

KEPT: Final = "kept"
DROPPED: Final = "dropped"
LOST: Final = "lost"
AT_CUT: Final = "at_cut"
