"""What a verdict checks beyond the comparison itself: that the comparison could have failed, and that the
model's output depends on the value at the cut.

``sensitive`` perturbs the value at the cut once, by a difference just above the tolerance, and compares
again with the same comparator (``featx.compare.compare``): a "faithful" from a comparison that cannot see
such a difference (an empty tensor, a tolerance beyond the largest finite value of the dtype) proves
nothing, so the verdict is withheld (``ModeResult.sensitive`` false, with ``ModeResult.blind`` saying why).
The perturbed element is the one of largest magnitude, the one where ``rtol`` gives most room: it is moved
to ``atol + rtol * |reference|`` away from the reference and then to the next representable value beyond
(one ulp with the exact default). The comparison that passed stands for the truncated output here: it
equals the reference within the tolerance everywhere, and the perturbed element is set against the
reference, as the comparator judges it.

``depends`` runs the full model once more with the value at the cut (what the cut's module returns)
replaced by itself plus noise of its own scale, under the same seed and in the same mode, and says whether
the model's output changed: a cut whose value the model discards (an auxiliary branch, a child whose output
the forward ignores) is legal to tap, but the user should know that nothing the model returns is made from
it. Both run inside the caller's guard (``featx.guard.preserved``): the hook comes off however the forward
ends, and the noise is drawn from a generator of its own, so the RNG the forward draws from is untouched.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from featx.compare import Tolerance, compare, copy_tree
from featx.guard import Snapshot, device_of, seed_rng, set_mode
from featx.mode_result import ModeResult
from featx.recording import Recording
from featx.replay import AsRecorded

_MOST_STEPS = 64  # nextafter steps past atol + rtol * |reference| before the dtype is called too coarse


def checked(
    result: ModeResult, reference: Any, tolerance: Tolerance, fresh_reference: Any = None, whole: bool = True
) -> ModeResult:
    """``result`` with ``sensitive`` set when it passed (a failed comparison needs no proof that it can
    fail): whether ``compare`` sees a difference just above ``tolerance`` at the ``reference``. A keep_glue
    result's ``fresh`` comparison is checked against ``fresh_reference`` the same way; a blind one makes
    the whole result fail, as a failing fresh comparison does (``ModeResult.with_fresh``). ``whole``: as
    ``blind_spot`` takes it."""
    if not result.ok:
        return result
    try:
        blind = blind_spot(reference, tolerance, whole)
        fresh_blind = blind_spot(fresh_reference, tolerance, whole) if result.fresh is not None else None
    except (RuntimeError, NotImplementedError):  # a dtype without the kernels (float8): left unchecked
        return result
    checked_result = replace(result, sensitive=blind is None, blind=blind, fresh=None, fresh_shape=None)
    if result.fresh is None:
        return checked_result
    fresh = replace(result.fresh, sensitive=fresh_blind is None, blind=fresh_blind)
    return checked_result.with_fresh(fresh, result.fresh_shape)


def blind_spot(reference: Any, tolerance: Tolerance, whole: bool = True) -> str | None:
    """None when ``compare`` tells ``reference`` from itself perturbed just beyond ``tolerance`` at its
    largest element; else why it cannot.

    ``whole=False`` compares a probe instead of the whole value, at no cost next to a sweep: the same tree
    with each tensor reduced to its largest element (an empty one kept as it is), so the comparator judges
    the same structure, dtypes, tolerance and value at that element, without its passes over every element.
    """
    leaves, spec = pytree.tree_flatten(reference)
    largest = [_largest_in(leaf) if isinstance(leaf, torch.Tensor) else None for leaf in leaves]
    found = _largest(largest)
    if found is None:
        return "the value at the cut holds no element a difference could show in (no tensor, or an empty one)"
    at, index = found
    if not whole:  # each tensor as its largest element: the chosen one's is at index 0 of its probe
        leaves = [leaf if f is None else _probe(leaf, f[1]) for leaf, f in zip(leaves, largest, strict=True)]
        reference, index = pytree.tree_unflatten(leaves, spec), 0
    moved, why = _moved(leaves[at], index, tolerance)
    if moved is None:
        return why
    leaves = list(leaves)
    leaves[at] = moved
    if compare(pytree.tree_unflatten(leaves, spec), reference, tolerance).ok:
        return (
            f"a difference just above the tolerance ({_tolerance_text(tolerance)}) at the largest element is "
            "not seen"
        )
    return None


def _largest(largest: list[tuple[float, int] | None]) -> tuple[int, int] | None:
    """The leaf (its position among the tree's leaves) and flat index of the finite element of largest
    magnitude over every tensor, from each leaf's ``_largest_in`` (None for a leaf without one); the first
    such leaf on a tie. None when no leaf has one."""
    best: tuple[float, int, int] | None = None
    for at, found in enumerate(largest):
        if found is not None and (best is None or found[0] > best[0]):
            best = (found[0], at, found[1])
    return None if best is None else best[1:]


def _largest_in(leaf: torch.Tensor) -> tuple[float, int] | None:
    """The magnitude and flat (row-major) index of ``leaf``'s finite element of largest magnitude."""
    if not leaf.numel():
        return None
    values = leaf.detach().reshape(-1)
    if values.is_complex():
        values = values.real  # what the comparator looks at
    if values.is_floating_point():  # in its own dtype: no float64 copy
        magnitude = values.abs().nan_to_num_(nan=-1.0, posinf=-1.0)
    else:
        magnitude = values.to(torch.float64).abs()
    index, largest = _first_largest(magnitude)
    return None if largest < 0 else (largest, index)


# dtypes numpy holds: its argmax reads a CPU tensor in place, vectorised (torch's CPU argmax is a scalar loop,
# most of this check's cost on a large value)
_NUMPY_DTYPES = frozenset({torch.float64, torch.float32, torch.float16})


def _first_largest(magnitude: torch.Tensor) -> tuple[int, float]:
    """The index of the first largest element of a 1-D tensor without NaN (``torch.argmax``'s: both return
    the first occurrence), and its value."""
    on_cpu = type(magnitude) is torch.Tensor and magnitude.device.type == "cpu"
    if on_cpu and magnitude.dtype in _NUMPY_DTYPES:
        array = magnitude.numpy()
        index = int(array.argmax())
        return index, float(array[index])
    index = int(magnitude.argmax())
    return index, float(magnitude[index])


def _probe(leaf: torch.Tensor, index: int) -> torch.Tensor:
    """``leaf``'s element ``index`` (flat, row-major) as a 1-D tensor of one element."""
    return leaf.detach().reshape(-1)[index : index + 1]


# dtypes whose 1-element tensors read exactly as a Python float (item()), so the steps past the bound can be
# checked in Python; any other (float8: isfinite and nextafter have no kernels) as torch computes it
_READ_EXACTLY = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})


def _moved(leaf: torch.Tensor, index: int, tolerance: Tolerance) -> tuple[torch.Tensor | None, str]:
    """A copy of ``leaf`` with element ``index`` moved just beyond the tolerance from its value, toward
    zero and past it (away from the dtype's largest values); (None, why) when the dtype cannot hold such
    a value."""
    # a probe (a real tensor of one element, 1-D) is its own element, and the moved value its whole copy
    one = type(leaf) is torch.Tensor and leaf.dim() == 1 and leaf.numel() == 1 and not leaf.is_complex()
    value = leaf.detach() if one else leaf.detach().reshape(-1)[index : index + 1]
    if value.is_complex():
        value = value.real
    r = value.item() if value.dtype in _READ_EXACTLY else float(value.to(torch.float64))
    bound = tolerance.atol + tolerance.rtol * abs(r)
    direction = -1.0 if r > 0 else 1.0
    if leaf.dtype == torch.bool:
        new = ~value
    elif leaf.is_floating_point() or leaf.is_complex():
        new = torch.tensor([r + direction * bound], dtype=torch.float64).to(value.dtype)
        limit = torch.tensor([direction * float("inf")], dtype=value.dtype)
        read = _read if value.dtype in _READ_EXACTLY else _read_in_torch
        finite, at = read(new)
        for _ in range(_MOST_STEPS):
            if not finite or abs(at - r) > bound:
                break
            new = torch.nextafter(new, limit)
            finite, at = read(new)
        if not finite or abs(at - r) <= bound:
            return None, (
                f"no finite {leaf.dtype} value lies just beyond the tolerance ({_tolerance_text(tolerance)}) "
                f"from the largest element {r:.6g}"
            )
    else:  # integers
        info = torch.iinfo(leaf.dtype)
        step = int(bound) + 1
        target = r + direction * step
        if not info.min <= target <= info.max:
            target = r - direction * step
        if not info.min <= target <= info.max:
            return None, f"no {leaf.dtype} value lies beyond the tolerance ({_tolerance_text(tolerance)})"
        new = torch.tensor([target], dtype=torch.float64).to(leaf.dtype)
    if one:  # new is a fresh tensor of leaf's dtype and shape
        return new.to(device=leaf.device), ""
    copy = leaf.detach().clone()
    at_index = _unravel(index, leaf.shape)  # row-major, as reshape
    if copy.is_complex():
        copy.real[at_index] = new.to(device=copy.device, dtype=copy.real.dtype)[0]
    else:
        copy[at_index] = new.to(device=copy.device)[0]
    return copy, ""


def _read(one: torch.Tensor) -> tuple[bool, float]:
    """Whether the one element of ``one`` is finite, and its value as a float64 (exact for ``_READ_EXACTLY``)."""
    value = one.item()
    return math.isfinite(value), value


def _read_in_torch(one: torch.Tensor) -> tuple[bool, float]:
    """``_read`` by torch's own kernels, for a dtype a Python float may not read exactly."""
    return bool(one.isfinite().all()), float(one.to(torch.float64))


def _unravel(index: int, shape: torch.Size) -> tuple[int, ...]:
    """The row-major position of flat ``index`` in ``shape`` (``torch.unravel_index``'s, in Python)."""
    at = []
    for size in reversed(shape):
        index, i = divmod(index, size)
        at.append(i)
    return tuple(reversed(at))


def _tolerance_text(tolerance: Tolerance) -> str:
    if not tolerance.atol and not tolerance.rtol:
        return "exact"
    return f"atol {tolerance.atol:g}, rtol {tolerance.rtol:g}"


# -- does the model's output depend on the value at the cut ----------------------------------------------
def depends(
    model: nn.Module, module: str, x: Any, mode: str, seed: int, snapshot: Snapshot, rec: Recording
) -> bool | None:
    """Whether the full model's output in ``mode`` changes when the output of ``module`` (a dotted name)
    is replaced by itself plus noise of its own scale, on a copy of ``x`` under ``seed``, against the
    recorded forward's output. None when that cannot be told: the recorded forward raised, the module was
    never called, or it returns no floating-point tensor to perturb. A perturbed forward that raises
    depends on the value."""
    if rec.error is not None:
        return None
    snapshot.restore()
    set_mode(model, mode == "train")
    seed_rng(seed, device_of(x, model))
    perturbed: list[bool] = []

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        noisy, changed = _noisy(output, seed + len(perturbed))
        perturbed.append(changed)
        return noisy

    handle = snapshot.by_name[module].register_forward_hook(hook)
    try:
        with AsRecorded():
            out = model(copy_tree(x))
    except Exception:
        return True if any(perturbed) else None
    finally:
        handle.remove()
    if not any(perturbed):
        return None
    return not _same(out, rec.output)


def _noisy(tree: Any, seed: int) -> tuple[Any, bool]:
    """``tree`` with every floating-point tensor plus normal noise of its own spread (its standard
    deviation, else its largest magnitude, else 1), drawn from a generator seeded with ``seed``; and
    whether any tensor was perturbed."""
    generator = torch.Generator().manual_seed(seed)
    changed = False

    def perturb(t: Any) -> Any:
        nonlocal changed
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or not t.numel():
            return t
        values = t.detach().to(torch.float64)
        finite = values[values.isfinite()]
        scale = float(finite.std()) if finite.numel() > 1 else 0.0
        if not scale > 0:
            scale = float(finite.abs().max()) if finite.numel() else 0.0
        scale = scale if scale > 0 else 1.0
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float64) * scale
        changed = True
        return t + noise.to(device=t.device, dtype=t.dtype)

    return pytree.tree_map(perturb, tree), changed


def _same(a: Any, b: Any) -> bool:
    """``a`` and ``b`` hold the same values in the same structure (NaN equal to NaN)."""
    leaves_a, spec_a = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    if spec_a != spec_b:
        return False
    return all(_same_leaf(x, y) for x, y in zip(leaves_a, leaves_b, strict=True))


def _same_leaf(x: Any, y: Any) -> bool:
    if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
        return False
    if not isinstance(x, torch.Tensor):
        try:
            return bool(x == y)
        except Exception:
            return x is y
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    return bool(torch.equal(x, y)) or bool(((x == y) | (x.isnan() & y.isnan())).all())
