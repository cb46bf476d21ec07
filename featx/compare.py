"""One comparator of tensor trees, and the exact identity check of the recorder.

``compare`` judges a truncated model's value against the full model's at a cut, and an exported artifact's
outputs against the PyTorch backbone's: tuples, lists and dicts of tensors and other values, leaf by leaf,
within one ``Tolerance`` whose ``rtol`` is relative to each element (``|a - b| <= atol + rtol * |b|``, as
``torch.isclose``). It returns a ``ModeResult``: the largest absolute difference, whether every element is
within the tolerance, and, when the two cannot be compared (structure, shape, dtype, a non-tensor value),
the first place they differ.

``differs`` is another job: whether a child was fed *exactly* what its predecessor returned (values, dtype,
device and strides), the recorder's feed check; it has no tolerance.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from featx.errors import FeatxError, a_or_an
from featx.mode_result import ModeResult


@dataclass(frozen=True)
class Tolerance:
    """How far a value may be from the reference and still count as equal, per element:
    ``|a - b| <= atol + rtol * |b|`` (``torch.isclose``'s rule). The default is exact. NaN and Inf never
    count as equal, not even to themselves.

    Raises:
        FeatxError: ``atol`` or ``rtol`` is not a finite number >= 0 (the message names which and its value).
    """

    atol: float = 0.0
    rtol: float = 0.0

    def __post_init__(self) -> None:
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not math.isfinite(value)
                or value < 0
            ):
                raise FeatxError(f"{name} {value!r} is not a tolerance; accepted: a finite number >= 0")
            object.__setattr__(self, name, float(value))


EXACT = Tolerance()
_WIDE = (torch.float64, torch.complex128)  # read as float64 as they are: a difference can overflow


def compare(out: Any, reference: Any, tolerance: Tolerance = EXACT) -> ModeResult:
    """``out`` against ``reference`` leaf by leaf: max abs difference and equality within ``tolerance``,
    element by element (``Tolerance``).

    When they differ in structure, shape, dtype or a non-tensor value, the mismatch names the first element
    that differs (``element [1]``, ``element [0]['a']``) and both sides of it; when values differ in a tree
    of several tensors, ``ModeResult.element`` names the one with the largest difference.
    """
    if isinstance(reference, Missing):
        return ModeResult(None, False, mismatch=reference.why)
    if not holds_tensor(reference):
        return ModeResult(
            None,
            False,
            mismatch=f"the full model's value at the cut is {describe(reference)}, "
            "not a tensor, so there is nothing to compare",
        )
    leaves_out, spec_out = pytree.tree_flatten_with_path(out)
    leaves_ref, spec_ref = pytree.tree_flatten(reference)
    if spec_out != spec_ref:
        found = _structure_difference(out, reference)
        if found is None or not found[0]:  # the outermost container itself differs
            return ModeResult(
                None,
                False,
                mismatch=f"the truncated model returns {_show(out)}, the full model has {_show(reference)} at the cut",
            )
        at, a, b = found
        return ModeResult(
            None,
            False,
            mismatch=f"the truncated model's output differs in structure from the full model's at the cut: "
            f"element {at} is {_show(a)} where the full model has {_show(b)}",
        )
    worst, worst_at, equal, nonfinite = 0.0, "", True, 0
    for (path, a), b in zip(leaves_out, leaves_ref, strict=True):
        at = pytree.keystr(path)
        element = f" element {at}" if at else ""
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or (a is not b and a != b):
                return ModeResult(None, False, mismatch=_value_difference(out, reference, path))
            continue
        if a.shape != b.shape:
            return ModeResult(
                None,
                False,
                mismatch=f"output{element} shape {list(a.shape)} differs from the full model's "
                f"{list(b.shape)} at the cut",
            )
        if a.dtype != b.dtype:
            return ModeResult(
                None,
                False,
                mismatch=f"output{element} dtype {a.dtype} differs from the full model's {b.dtype}",
            )
        if (a is b or (a.device == b.device and torch.equal(a, b))) and _finite(a):  # the usual case, cheaply
            continue
        a64, b64 = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
        # NaN and Inf never count as equal, not even to themselves: a cut that yields them is reported.
        delta = a64 - b64
        # narrower values than float64 differ by a finite float64 exactly where both are finite; two finite
        # float64 values can differ by more than float64 holds (1e308 - -1e308), so each side is checked
        finite = a64.isfinite() & b64.isfinite() if a.dtype in _WIDE else delta.isfinite()
        diff = torch.where(finite, delta.abs(), 0.0)
        largest = float(diff.max()) if diff.numel() else 0.0
        if largest > worst:
            worst, worst_at = largest, at
        missing = finite.numel() - int(finite.sum())
        nonfinite += missing
        # rtol 0 (the exact default): atol alone, which atol + 0 * |b| is wherever both are finite
        bound = tolerance.atol + tolerance.rtol * b64.abs() if tolerance.rtol else tolerance.atol
        equal = equal and not missing and bool((diff <= bound).all())
    # the element is worth naming only where the output holds more than one tensor
    several = sum(isinstance(leaf, torch.Tensor) for _, leaf in leaves_out) > 1
    return ModeResult(worst, equal, nonfinite=nonfinite, element=worst_at if several and worst > 0 else None)


def _structure_difference(a: Any, b: Any, at: str = "") -> tuple[str, Any, Any] | None:
    """The first element (by key path, ``""`` for the trees themselves) where ``a`` and ``b`` differ in
    container type, length or keys, with both sides there; None when they are built alike (their leaves
    may still differ)."""
    children_a, spec_a = pytree.tree_flatten_with_path(a, is_leaf=lambda node: node is not a)
    children_b, spec_b = pytree.tree_flatten_with_path(b, is_leaf=lambda node: node is not b)
    if spec_a.is_leaf() and spec_b.is_leaf():
        return None
    if (
        spec_a.is_leaf()
        or spec_b.is_leaf()
        or spec_a.type is not spec_b.type
        or spec_a.context != spec_b.context
    ):
        return at, a, b
    if spec_a.num_children != spec_b.num_children:
        return at, a, b
    for (path, x), (_, y) in zip(children_a, children_b, strict=True):
        found = _structure_difference(x, y, at + pytree.keystr(path))
        if found is not None:
            return found
    return None


def _value_difference(out: Any, reference: Any, path: tuple) -> str:
    """Both sides of the non-tensor value at ``path`` that differs, shown as the largest container around
    it that holds no tensor: ``element [1] is (14, 14) where the full model has (7, 7)``."""
    depth = len(path)
    while depth > 1 and not holds_tensor(_at(out, path[: depth - 1])):
        depth -= 1
    at = pytree.keystr(path[:depth])
    where = f"element {at} is" if at else "the truncated model returns"
    return f"{where} {_show(_at(out, path[:depth]))} where the full model has {_show(_at(reference, path[:depth]))}"


def _at(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = key.get(tree)
    return tree


def _show(x: Any) -> str:
    """``x`` as a reader can tell it from another: a tensor by its shape, a small value as written
    (``torch.Size([56, 56])``, ``(7, 7)``), a dict by its keys, else what it is."""
    if isinstance(x, torch.Tensor):
        return describe(x)
    if isinstance(x, dict) and len(repr(list(x))) <= 80:
        return f"{a_or_an(type(x).__name__)} with keys {list(x)}"
    if not holds_tensor(x) and len(repr(x)) <= 80:
        return repr(x)
    return describe(x)


def _finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``, in one reduction: a float64 sum of float32 (or narrower) values can overflow
    only if one of them is infinite, and is NaN if one is."""
    if t.is_complex():
        return bool(t.isfinite().all())
    if not t.is_floating_point():
        return True
    if t.dtype != torch.float64:
        try:
            return bool(t.sum(dtype=torch.float64).isfinite())
        except (RuntimeError, NotImplementedError):  # dtypes without a sum kernel (float8)
            pass
    return bool(t.isfinite().all())


def describe(x: Any) -> str:
    """``x`` in a few words: ``a tensor of shape [2, 3]``, ``a tuple of 2``, ``an int``."""
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {list(x.shape)}"
    if isinstance(x, (tuple, list, dict)):
        return f"{a_or_an(type(x).__name__)} of {len(x)}"
    return a_or_an(type(x).__name__)


def holds_tensor(tree: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(tree))


class Missing:
    """Stands in for the full model's value at a cut it never produced."""

    def __init__(self, why: str) -> None:
        self.why = why


# -- the exact check of what a child was fed ------------------------------------------------------------
def copy_tree(tree: Any) -> Any:
    """``tree`` with every tensor replaced by a detached copy (strides preserved), every container of the
    same type as before."""
    # A torch.Size is a pytree node that tree_map rebuilds as a plain tuple: mvitv2's patch_embed returns
    # (tokens, x.shape[-2:]), and its copy must stay the torch.Size the truncated model returns.
    return pytree.tree_map(
        lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x,
        tree,
        is_leaf=lambda x: isinstance(x, torch.Size),
    )


def differs(a: Any, b: Any) -> str | None:
    """None when ``a`` and ``b`` are the same values in the same layout, else what differs."""
    leaves_a, spec_a = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    if spec_a != spec_b:
        return f"{a_or_an(_layout(a))} instead of {a_or_an(_layout(b))}"
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return "a tensor where there was none"
        if not isinstance(x, torch.Tensor):
            try:
                if bool(x != y):
                    return f"{x!r} instead of {y!r}"
            except Exception:
                return f"{x!r} instead of {y!r}"
            continue
        if x.shape != y.shape:
            return f"shape {list(x.shape)} instead of {list(y.shape)}"
        if x.dtype != y.dtype or x.device != y.device:
            return f"{x.dtype} on {x.device} instead of {y.dtype} on {y.device}"
        if x.stride() != y.stride():
            return f"strides {x.stride()} instead of {y.stride()}"
        if not torch.equal(x, y):
            return "other values"
    return None


def _layout(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return "tensor"
    if isinstance(x, (tuple, list, dict)):
        return f"{type(x).__name__} of {len(x)}"
    return type(x).__name__
