"""Where a model is cut, and the ``nn.Sequential`` of what the cut keeps."""

from __future__ import annotations

import contextlib
import operator
from collections import OrderedDict

from torch import nn

from featx.errors import FeatxError, did_you_mean, listing


def child_names(model: nn.Module) -> list[str]:
    """The model's direct children, in registration order."""
    return [name for name, _ in model.named_children()]


def resolve_cut(model: nn.Module, upto: str | int) -> int:
    """How many children the cut ``upto`` keeps, from 1 to the number of children.

    ``upto`` is a child name (kept, inclusive), a count N (the first N children), or a negative count -N
    (all but the last N, as in ``list(model.children())[:-N]``). A string of digits counts as a count,
    so ``"6"`` from a command line means the first six children.

    Raises:
        FeatxError: unknown name (with close matches), a count that keeps no child or more than there are.
    """
    names = child_names(model)
    if not names:
        raise FeatxError(
            f"`{type(model).__name__}` has no children to cut between; featx cuts between direct "
            "children (model.named_children())"
        )
    n = len(names)
    # A name first: nn.Sequential's children are named "0", "1", ...; a string of digits that names no
    # child is a count.
    if isinstance(upto, str) and upto not in names and upto.lstrip("-").isdigit():
        upto = int(upto)
    if not isinstance(upto, (str, bool)):
        with contextlib.suppress(TypeError):
            upto = operator.index(upto)  # numpy and torch integers too
    if isinstance(upto, bool) or not isinstance(upto, (int, str)):
        raise FeatxError(f"upto {upto!r} is neither a child name nor an int; children: {listing(names)}")
    if isinstance(upto, str):
        if upto not in names:
            raise FeatxError(
                f"upto `{upto}` is not a child of `{type(model).__name__}`{did_you_mean(upto, names)}; "
                f"children: {listing(names, n)}"
            )
        return names.index(upto) + 1
    kept = upto if upto >= 0 else n + upto
    if not 1 <= kept <= n:
        # -N past the first child says what it asks for, not a negative count of kept children
        what = f"keeps {kept} of {n} children" if kept >= 0 else f"drops the last {-upto} of {n} children"
        raise FeatxError(
            f"upto {upto} {what}; accepted: 1..{n}, -1..-{n - 1}, or a child name: {listing(names, n)}"
        )
    return kept


def truncate(model: nn.Module, upto: str | int, keep_glue: bool = False) -> nn.Module:
    """An ``nn.Sequential`` of the first children of ``model`` up to and including the cut ``upto``.

    The Sequential holds the *same* module objects under their original names, so its ``state_dict()``
    keys are a prefix subset of the model's and training one trains the other. It assumes what
    ``nn.Sequential(*list(model.children())[:k])`` assumes: the model's ``forward()`` calls each kept
    child once, in registration order, on exactly what the previous child returned, and does nothing
    else in between. ``featx.verify`` checks that assumption; this function does not.

    With ``keep_glue=True`` it returns a ``featx.glue.KeepGlue`` instead: the same kept children, run by
    the root's own forward traced with ``torch.fx`` up to the cut, so the root's glue (``torch.flatten``,
    ViT's class token and position embedding) is kept and the module returns what the full model computes
    at the cut (for the last child, the model's output). It raises ``FeatxError`` where it cannot (the root
    does not trace, the data flow is not a chain at the cut); a model without glue gives the same values as
    the Sequential. See ``featx.glue``.
    """
    if keep_glue:
        from featx.glue import keep_glue as _keep_glue  # glue builds on this module's cut resolution

        return _keep_glue(model, upto)
    kept = resolve_cut(model, upto)
    return nn.Sequential(OrderedDict(list(model.named_children())[:kept]))
