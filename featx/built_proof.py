"""The backbone as built against the full model: ``featx check``'s proof that what ``build_backbone``
returns (frozen parameters, the config's norm handling, ``keep_glue``, the body before any FPN) taps the
values the full model computes at the tapped modules.

The reference is the full model itself, run with forward hooks on the tapped modules and the same norm
handling applied: in a train-mode run the frozen modules stay in eval, and with ``norm: eval`` or
``norm: frozen`` so does every BatchNorm (a frozen BatchNorm is a BatchNorm in eval that never updates).
Both run on the same input from the same RNG seed, in each of the config's modes, and each tap is
compared within the config's ``atol``/``rtol``. The reference is taken before the backbone is built,
because building replaces BatchNorms inside the kept children (``norm: frozen``), which the model shares.

Assumed: a tapped module runs once in the full forward (its first call is the reference).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from featx.backbone import BackbonePlan, BuiltBackbone, body_of
from featx.backbone.body import as_map
from featx.backbone.build import frozen_norms
from featx.compare import Tolerance, compare
from featx.errors import one_line
from featx.guard import device_of, preserved, seed_rng, set_mode
from featx.mode_result import ModeResult
from featx.render.text import diff_text

References = dict[str, dict[str, Any]]  # mode -> tapped module -> the full model's value there


@dataclass(frozen=True)
class TapResult:
    """One tap of the built backbone against the full model's value at its module, in one mode."""

    output: str  # the config's output name
    module: str  # the tapped module, dotted
    result: ModeResult

    def to_dict(self) -> dict[str, object]:
        return {
            "module": self.module,
            "max_abs_diff": self.result.max_abs_diff,
            "equal": self.result.ok,
            "error": self.result.error,
            "mismatch": self.result.mismatch,
        }


@dataclass(frozen=True)
class BuiltMode:
    """The built backbone in one mode: every tap compared, in the config's output order."""

    mode: str
    taps: tuple[TapResult, ...]
    norm: str  # the config's `norm`, for the reason

    @property
    def faithful(self) -> bool:
        return all(t.result.ok for t in self.taps)

    @property
    def max_abs_diff(self) -> float | None:
        """Over every tap; None when some tap could not be compared (raised, another shape)."""
        diffs = [t.result.max_abs_diff for t in self.taps]
        return (
            None if any(d is None for d in diffs) else max((d for d in diffs if d is not None), default=0.0)
        )

    @property
    def reasons(self) -> tuple[str, ...]:
        """One sentence per tap that differs, naming the tap, the mode and the max abs diff."""
        reasons = []
        for t in self.taps:
            if t.result.ok:
                continue
            r = t.result
            if r.error is not None:
                why = f"raised {r.error}"
            elif r.mismatch is not None:
                why = f"cannot be compared: {r.mismatch}"
            else:
                why = f"max abs diff {diff_text(r.max_abs_diff)}"
            tap = f"`{t.output}`" if t.output == t.module else f"`{t.output}` (`{t.module}`)"
            reasons.append(
                f"the built backbone's tap {tap} differs in {self.mode} mode from the full model's value "
                f"with the same norm handling (`norm: {self.norm}`, frozen modules in eval): {why}"
            )
        return tuple(reasons)

    def to_dict(self) -> dict[str, object]:
        return {
            "faithful": self.faithful,
            "max_abs_diff": self.max_abs_diff,
            "taps": {t.output: t.to_dict() for t in self.taps},
        }


class _AllTapped(Exception):
    """Raised from the last tap's hook: the rest of the full forward cannot change a tap."""


class _Tap:
    """A forward hook that copies its module's first output into ``values`` under ``name``."""

    def __init__(self, name: str, values: dict[str, Any], taps: int) -> None:
        self.name, self.values, self.taps = name, values, taps

    def __call__(self, module: nn.Module, args: object, output: Any) -> None:
        self.values.setdefault(self.name, pytree.tree_map(_copy, output))
        if len(self.values) == self.taps:
            raise _AllTapped


def reference_taps(plan: BackbonePlan, x: Any, modes: Iterable[str], seed: int) -> References:
    """The full model's value at each tapped module, per mode, with the config's norm handling applied;
    the model is left as found. Run it before ``plan.build()`` (see the module's docstring)."""
    model = plan.model
    if plan.config.norm == "frozen":  # FrozenBatchNorm2d's arithmetic, as built, on a copy of the full model
        model = frozen_norms(copy.deepcopy(model))
    tapped = list(plan.taps)
    references: References = {}
    with preserved(model) as snapshot:
        for mode in modes:
            snapshot.restore()
            values: dict[str, Any] = {}
            handles = [
                model.get_submodule(name).register_forward_hook(_Tap(name, values, len(tapped)))
                for name in tapped
            ]
            try:
                _set_norm_handling(model, mode == "train", plan.frozen, plan.config.norm)
                seed_rng(seed, device_of(x))
                with contextlib.suppress(_AllTapped):  # the tail after the last tap is not run
                    model(x)
            finally:
                for handle in handles:
                    handle.remove()
            references[mode] = values
    return references


def prove_built(
    plan: BackbonePlan,
    backbone: BuiltBackbone,
    x: Any,
    references: References,
    seed: int,
    device: str,
) -> tuple[BuiltMode, ...]:
    """Run ``backbone``'s body (the taps, before any FPN) on ``x`` in each mode of ``references`` as it
    runs itself (its ``train()`` keeps frozen modules and norms in eval) and compare each tap with the
    full model's value there. The body runs on ``device`` and is left on the CPU, as found."""
    body = body_of(backbone)
    verify = plan.verify
    results = []
    body.to(device)
    try:
        with preserved(body) as snapshot:
            for mode, reference in references.items():
                snapshot.restore()
                body.train(mode == "train")
                seed_rng(seed, device_of(x))
                try:
                    out: Any = body(x)
                except (RuntimeError, MemoryError) as err:  # what torch raises: this backbone cannot run
                    error = f"{type(err).__name__}: {one_line(err)}"
                    results.append(_raised(plan, mode, error))
                    continue
                taps = tuple(
                    TapResult(
                        output,
                        module,
                        _compare(out[output], _as_built(body, output, reference, module, x), module, verify),
                    )
                    for output, module in plan.outputs
                )
                results.append(BuiltMode(mode, taps, plan.config.norm))
    finally:
        body.to("cpu")
    return tuple(results)


def _as_built(body: Any, output: str, reference: dict[str, Any], module: str, x: Any) -> dict[str, Any]:
    """The full model's value at ``module`` as the backbone returns output ``output``: a ViT's tokens or a
    Swin stage made into the NCHW map by the same code (``featx.backbone.body.as_map``), the same final
    norm module applied where configured."""
    if module not in reference or not body.token_maps.get(output):
        return reference
    with torch.no_grad():
        return {module: as_map(body, output, reference[module], x)}


def _compare(out: Any, reference: dict[str, Any], module: str, verify: Any) -> ModeResult:
    if module not in reference:
        return ModeResult(None, False, mismatch=f"the full model's forward never ran `{module}`")
    return compare(out, reference[module], Tolerance(verify.atol, verify.rtol))


def _raised(plan: BackbonePlan, mode: str, error: str) -> BuiltMode:
    taps = tuple(
        TapResult(output, module, ModeResult(None, False, error=error)) for output, module in plan.outputs
    )
    return BuiltMode(mode, taps, plan.config.norm)


def _set_norm_handling(model: nn.Module, training: bool, frozen: Sequence[str], norm: str) -> None:
    """``model`` in train or eval mode as the built backbone sets itself: frozen modules in eval, and with
    ``norm: eval``/``norm: frozen`` every BatchNorm in eval."""
    set_mode(model, training)
    if not training:
        return
    for name in frozen:
        model.get_submodule(name).eval()
    if norm in ("eval", "frozen"):
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _copy(value: Any) -> Any:
    """A tensor's value as it is now: a later module may write to it in place."""
    return value.detach().clone() if isinstance(value, torch.Tensor) else value
