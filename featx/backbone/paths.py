"""A config's cut and taps resolved against its model (``featx.cut.resolve_path``), once per model, with
errors naming the config key."""

from __future__ import annotations

import weakref

from torch import nn

from featx.config import BackboneConfig
from featx.cut import CutPath, resolve_path
from featx.errors import FeatxError

# The source of a "config" made of a SPEC's command-line flags (`featx extract SPEC --upto X --outputs a,b`):
# its errors name the flag (`--outputs `a` ...`) rather than a config key.
FLAGS = "the command line"

# The paths `_path` resolved, per model: the model's loading resolves the cut (to read the kept children's
# weights) before `resolve` plans with it, and both get the one CutPath.
_RESOLVED: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, str | int], CutPath]] = (
    weakref.WeakKeyDictionary()
)


def _path(model: nn.Module, upto: str | int, cfg: BackboneConfig, key: str) -> CutPath:
    """``upto`` (the config's ``key``) resolved against ``model``, once per model; an error names the key."""
    flag = cfg.key(key) if key.split(".")[0] in cfg.overridden else None  # `--upto` over `upto`
    if cfg.source == FLAGS:  # `featx extract SPEC`'s flags
        what = "--upto" if key == "upto" else "--outputs"
    else:
        what = "upto" if key == "upto" else "output"
    what = flag or what
    known = _RESOLVED.setdefault(model, {})
    if (what, upto) not in known:
        try:
            known[(what, upto)] = resolve_path(model, upto, what=what)
        except FeatxError as err:
            if cfg.source == FLAGS or flag is not None:  # the error names the flag
                raise
            raise FeatxError(f"{cfg.source}: key `{key}`: {err}") from None
    return known[(what, upto)]
