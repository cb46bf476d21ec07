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
    if not whole:
        leaves = [_probe(leaf) for leaf in leaves]
        reference = pytree.tree_unflatten(leaves, spec)
    found = _largest(reference)
    if found is None:
        return "the value at the cut holds no element a difference could show in (no tensor, or an empty one)"
    at, leaf, index = found
    moved, why = _moved(leaf, index, tolerance)
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


def _largest(tree: Any) -> tuple[int, torch.Tensor, int] | None:
    """The leaf (its position among the tree's leaves) and flat index of the finite element of largest
    magnitude over every tensor of ``tree``; None when there is none."""
    best: tuple[float, int, torch.Tensor, int] | None = None
    for at, leaf in enumerate(pytree.tree_leaves(tree)):
        found = _largest_in(leaf) if isinstance(leaf, torch.Tensor) else None
        if found is not None and (best is None or found[0] > best[0]):
            best = (found[0], at, leaf, found[1])
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
    index = int(magnitude.argmax())
    largest = float(magnitude[index])
    return None if largest < 0 else (largest, index)


def _probe(leaf: Any) -> Any:
    """A tensor as its largest finite element, 1-D (an empty one, or one without a finite element, as it
    is); anything else as it is."""
    if not isinstance(leaf, torch.Tensor):
        return leaf
    found = _largest_in(leaf)
    if found is None:
        return leaf
    return leaf.detach().reshape(-1)[found[1] : found[1] + 1]


def _moved(leaf: torch.Tensor, index: int, tolerance: Tolerance) -> tuple[torch.Tensor | None, str]:
    """A copy of ``leaf`` with element ``index`` moved just beyond the tolerance from its value, toward
    zero and past it (away from the dtype's largest values); (None, why) when the dtype cannot hold such
    a value."""
    flat = leaf.detach().reshape(-1)
    value = flat[index : index + 1]
    if value.is_complex():
        value = value.real
    r = float(value.to(torch.float64))
    bound = tolerance.atol + tolerance.rtol * abs(r)
    direction = -1.0 if r > 0 else 1.0
    if leaf.dtype == torch.bool:
        new = ~value
    elif leaf.is_floating_point() or leaf.is_complex():
        new = torch.tensor([r + direction * bound], dtype=torch.float64).to(value.dtype)
        limit = torch.tensor([direction * float("inf")], dtype=value.dtype)
        for _ in range(_MOST_STEPS):
            if not bool(new.isfinite().all()) or abs(float(new.to(torch.float64)) - r) > bound:
                break
            new = torch.nextafter(new, limit)
        if not bool(new.isfinite().all()) or abs(float(new.to(torch.float64)) - r) <= bound:
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
    copy = leaf.detach().clone()
    at = tuple(int(i) for i in torch.unravel_index(torch.tensor(index), leaf.shape))  # row-major, as reshape
    if copy.is_complex():
        copy.real[at] = new.to(device=copy.device, dtype=copy.real.dtype)[0]
    else:
        copy[at] = new.to(device=copy.device)[0]
    return copy, ""


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
