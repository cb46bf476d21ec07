"""Tap discovery: every module of a backbone whose output a detection or segmentation head could tap, measured,
and the multi-scale pyramid such heads use (``featx.taps``).

One observed forward per input size (meta or fake tensors where the model allows: shapes only, nothing
runs) records, for every module call, its input and output tensors. From two input sizes each output gets its layout and an
exact stride, as ``featx.backbone.taps`` measures a backbone's outputs: between the runs the input's H and W
grow by multiples of every power-of-two stride up to 128, so a map's size changes by exactly growth / stride.

The **trunk** is read from the same calls. A container is a *chain* when the forward that ran fed its first
child the container's input, each next child the previous child's output, and returned the last child's
output (``nn.Sequential``, timm's ``ConvNeXtStage``; not a ``Bottleneck``, whose residual add is its own
forward's). A *trunk container* is a chain that holds repeated blocks: two children of one class that has
children of its own (``layer1``'s ``Bottleneck`` s, timm's ``stages``, ``blocks``), or a single such block
(``s1`` of a RegNet of depth 1); where a model has no such container (VGG's ``features``: convolutions and
ReLUs), chains of repeated leaf modules count. The trunk blocks are the children of trunk containers, a child
that holds a trunk of its own replaced by its blocks, in the order they ran; a container of stages of one class
(davit's ``stages``, depths 1, 1, 3, 1) keeps a stage of a single block as one block, and a container the parent
iterates without calling it (``for stage in self.stages``) is a chain when its children feed each other. A pyramid level is the last
trunk block whose output is at a stride (Identity modules skipped), named by the outermost chain that ends in
it and holds only blocks at that stride (``layer1``, not ``layer1.2``; ``blocks.6``, not ``blocks``). So the
stem, and the head after the trunk (EfficientNet's ``conv_head``/``bn2``), are never levels. A trunk at one
stride (a ViT's blocks) gives four evenly spaced blocks (12 blocks: 2, 5, 8, 11), as ViTDet and mmsegmentation
tap them.

Whether a cut at each candidate is faithful comes from ``featx.sweep`` at the candidates' depth, plain and with
keep_glue: ``plain`` (a Sequential of the kept children computes the value), ``keep_glue`` (only a keep_glue
cut does), or refused (the reason: the keep_glue sweep's, else the plain one's).

Where each part lives: ``featx.observation`` observes a forward and measures each module's output (the
candidates), ``featx.trunk`` reads the chains, the trunk and the stage names from the observed calls; this
module holds the values, the pyramid, the comparison with timm's ``feature_info`` and the cut verdicts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from featx.errors import FeatxError, one_line
from featx.guard import device_of
from featx.numerics import environment
from featx.observation import (
    Observation,
    TapCandidate,
    growth,
    measure_odd_strides,
    measured,
    observe,
)
from featx.trunk import find_trunk, stage_of

if TYPE_CHECKING:
    from featx.model_sources import ModelSource
    from featx.report import Report


@dataclass(frozen=True)
class Level:
    """One level of the proposed pyramid: the tapped module, its channels and stride, and the trunk block
    whose output it is (``block``; the same as ``name`` unless a stage ends in it)."""

    name: str
    channels: int
    stride: int
    block: str
    faithful: bool | None = (
        None  # a cut there computes the full model's value (plain or keep_glue); None: unchecked
    )
    keep_glue: bool | None = None  # only with keep_glue; None: unchecked
    reason: str | None = None  # why no cut there is faithful

    def to_dict(self) -> dict[str, object]:
        """``{"name", "channels", "stride", "faithful", "keep_glue", "reason"}``: an entry of ``featx taps
        --json``'s ``pyramid``."""
        return {
            "name": self.name,
            "channels": self.channels,
            "stride": self.stride,
            "faithful": self.faithful,
            "keep_glue": self.keep_glue,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Taps:
    """What ``featx.taps`` found: every candidate in execution order, the trunk blocks, the proposed pyramid,
    and, for a timm model that declares them, timm's ``feature_info`` and how the pyramid differs from it."""

    model: str
    input_shape: tuple[int, ...]
    depth: int
    taps: tuple[TapCandidate, ...]
    trunk: tuple[str, ...]
    pyramid: tuple[Level, ...]
    feature_info: tuple[Mapping[str, object], ...] | None = None
    differences: tuple[str, ...] = ()
    checked: bool = True
    notes: tuple[str, ...] = field(default=())
    environment: dict[str, object] = field(default_factory=dict)  # where it was measured (docs/json.md)

    def __getitem__(self, name: str) -> TapCandidate:
        for tap in self.taps:
            if tap.name == name:
                return tap
        raise KeyError(name)

    @property
    def keep_glue(self) -> bool:
        """Whether a backbone tapping the pyramid needs keep_glue (a level plain cuts do not compute)."""
        return any(level.keep_glue for level in self.pyramid)

    def config(self) -> dict[str, object]:
        """A backbone config (the keys of docs/config.md) tapping the pyramid: ``featx build`` builds it and
        ``featx check`` proves it. The model itself, its weights and kwargs are the caller's to add."""
        if not self.pyramid:
            raise FeatxError(f"`{self.model}` has no pyramid to write as a config: {self.why_no_pyramid()}")
        if any(level.faithful is None for level in self.pyramid):  # keep_glue or not: unknown, so no config
            raise FeatxError(
                f"the pyramid of `{self.model}` was not checked (check=False), so whether it needs keep_glue is "
                "not known; featx.taps(..., check='pyramid') checks its levels alone"
            )
        refused = [level for level in self.pyramid if not level.faithful]
        if refused:
            raise FeatxError(
                f"the pyramid of `{self.model}` has a level no cut computes faithfully (`{refused[0].name}`: "
                f"{refused[0].reason}); name the taps yourself"
            )
        largest = max(level.stride for level in self.pyramid)
        height, width = self.input_shape[2:]
        if height % largest or width % largest:
            up = f"{-(-height // largest) * largest}x{-(-width // largest) * largest}"
            raise FeatxError(
                f"input {height}x{width} is not a multiple of {largest}, the pyramid's largest stride: a config "
                f"checked at it would not line up; measure at a multiple (such as {up})"
            )
        strides = [level.stride for level in self.pyramid]
        outputs: object = [level.name for level in self.pyramid]  # a single-stride trunk: named by module
        if len(set(strides)) == len(strides) and all(s & (s - 1) == 0 for s in strides):
            # C2..C5 at strides 4..32, as the FPN paper and detection configs name them
            outputs = {
                f"C{s.bit_length() - 1}": level.name for s, level in zip(strides, self.pyramid, strict=True)
            }
        cfg: dict[str, object] = {"upto": self.pyramid[-1].name, "outputs": outputs}
        if self.keep_glue:
            cfg["keep_glue"] = True
        cfg["verify"] = {"input_shape": list(self.input_shape)}
        return cfg

    def why_no_pyramid(self) -> str:
        if not any(t.stride for t in self.taps):
            return "no module returns a map of the input (an NCHW, NHWC or token map whose size follows it)"
        if not self.trunk:
            return (
                "featx found no trunk (a container whose forward runs repeated blocks one after another); "
                "name the taps yourself"
            )
        return "no trunk block returns a map of the input"

    def to_dict(self) -> dict[str, object]:
        """The ``featx taps --json`` document (docs/json.md)."""
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "depth": self.depth,
            "checked": self.checked,
            "taps": [tap.to_dict() for tap in self.taps],
            "trunk": list(self.trunk),
            "pyramid": [level.to_dict() for level in self.pyramid],
            "feature_info": None if self.feature_info is None else [dict(f) for f in self.feature_info],
            "differences": list(self.differences),
            "environment": dict(self.environment),
        }

    def __str__(self) -> str:
        from featx.render.taps_text import render_taps

        return render_taps(self)


def taps(
    model: nn.Module | str | ModelSource,
    input_shape: Sequence[int] | None = None,
    *,
    depth: int | None = None,
    check: bool | str = True,
    seed: int = 0,
    leaf_functions: Sequence[Callable[..., Any]] = (),
    label: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    weights_prefix: str | None = None,
    model_kwargs: Mapping[str, object] | None = None,
) -> Taps:
    """Every tap candidate of ``model`` and its proposed pyramid, measured (``Taps``).

    ``input_shape`` (batch included) defaults to the model's own size; a second run at a larger size gives
    each stride exactly. ``depth`` limits the candidates to modules that many levels below the root (default:
    deep enough to reach every trunk block). With ``check=True`` (default) each candidate's cut is swept plain
    and with keep_glue in eval and train mode (``featx.sweep``) for its verdict, and so is each pyramid level;
    ``check="pyramid"`` checks the levels alone (what ``Taps.config()`` needs), ``check=False`` nothing
    (verdicts are None).
    ``leaf_functions`` are the functions keep_glue's traces keep whole, as ``verify`` takes them, and so is
    the model: a built module, or a spec or ``featx.models.ModelSource`` with ``weights``,
    ``weights_prefix`` and ``model_kwargs`` (``featx taps SPEC --weights ...``), its random init seeded by
    ``seed``.

    Raises:
        FeatxError: the model has no children, does not run at ``input_shape``, or returns no map at all.
    """
    from featx.input_checks import _model
    from featx.inspection import example

    model, label = _model(model, label, seed, weights, weights_prefix, model_kwargs)
    if check not in (True, False, "pyramid"):
        raise FeatxError(f"check {check!r} is not a check; accepted: True, False, 'pyramid'")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise FeatxError(f"depth {depth!r} is not a depth; accepted: an int >= 1 (1: the root's children)")
    x = example(model, None, seed, input_shape, label=label)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise FeatxError(
            f"input shape {list(getattr(x, 'shape', []))} is not an image batch (N, C, H, W); featx measures "
            "each tap's stride against the input's H and W"
        )
    shape = tuple(x.shape)
    first = observe(model, shape, label)
    grow = growth(first, shape[2], shape[3])
    other = (*shape[:2], shape[2] + grow[0], shape[3] + grow[1])
    try:
        second: Observation | None = observe(model, other, label)
    except FeatxError:
        second = None  # a model with a fixed input size: strides from one size and the model's attributes
    candidates = measured(model, first, second, shape, grow)
    if second is not None:
        measure_odd_strides(model, first, second, shape, grow, candidates, label)
    trunk = find_trunk(model, first)
    if depth is None:
        depth = max((name.count(".") + 1 for name in trunk), default=1)
    names = [name for name in candidates if name.count(".") < depth]
    if not any(c.stride for c in candidates.values()):
        raise FeatxError(
            f"`{label}` returns no map of the input at any module (input {list(shape)}): featx taps NCHW, "
            "NHWC and token maps whose size follows the input's H and W"
        )
    verdicts: dict[str, tuple[bool, bool, str | None]] = {}
    if check is True:
        verdicts = _verdicts(model, x, depth, seed, leaf_functions, label)
    by_name = {c.name: c for c in candidates.values()}
    pyramid = _pyramid(model, first, trunk, by_name)
    if check:  # every level, also one the listed depth does not reach
        unchecked = [level.name for level in pyramid if level.name not in verdicts]
        if unchecked:
            verdicts |= _cut_verdicts(model, x, unchecked, seed, leaf_functions, label)
        pyramid = [
            dataclasses.replace(
                level,
                faithful=verdicts[level.name][0],
                keep_glue=verdicts[level.name][1],
                reason=verdicts[level.name][2],
            )
            for level in pyramid
        ]
    listed = []
    for name in names:
        c = candidates[name]
        if name in verdicts:
            faithful, keep_glue, reason = verdicts[name]
            c = TapCandidate(
                c.name, c.shape, c.channels, c.stride, c.layout, faithful, keep_glue, reason, c.calls
            )
        listed.append(c)
    info = _feature_info(model)
    return Taps(
        label,
        shape,
        depth,
        tuple(listed),
        tuple(trunk),
        tuple(pyramid),
        info,
        _differences(pyramid, info),
        check is True,
        environment=environment(device_of(x, model)),
    )


# --- the pyramid ---------------------------------------------------------------------------------------


def _pyramid(
    model: nn.Module, obs: Observation, trunk: list[str], candidates: Mapping[str, TapCandidate]
) -> list[Level]:
    """One level per stride: the last trunk block at it, named by the stage that ends in it."""
    at: dict[int, str] = {}
    for block in trunk:
        c = candidates.get(block)
        if c is None or c.stride is None or c.channels is None:
            continue
        if isinstance(model.get_submodule(block), nn.Identity):
            continue
        at.pop(c.stride, None)  # dicts keep insertion order: a stride seen again moves to the end
        at[c.stride] = block
    strides = list(at)
    if strides != sorted(strides):  # a trunk whose stride goes down again (a decoder) has no one pyramid
        return []
    if len(at) == 1:
        blocks = [b for b in trunk if candidates.get(b) is not None and candidates[b].stride is not None]
        picks = (
            [blocks[round((i + 1) * len(blocks) / 4) - 1] for i in range(4)] if len(blocks) >= 4 else blocks
        )
        return [_level(candidates[b], b) for b in picks]
    levels = []
    for stride, block in at.items():
        name = stage_of(model, obs, block, trunk, candidates, stride)
        levels.append(_level(candidates[block], block, name))
    return levels


def _level(candidate: TapCandidate, block: str, name: str | None = None) -> Level:
    assert candidate.channels is not None and candidate.stride is not None
    return Level(name or block, candidate.channels, candidate.stride, block)


# --- timm's feature_info ------------------------------------------------------------------------------


def _feature_info(model: nn.Module) -> tuple[Mapping[str, object], ...] | None:
    """timm's ``feature_info`` of the model, as ``{"module", "channels", "stride"}`` entries, or None."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, (list, tuple)) or not info:
        return None
    entries = []
    for entry in info:
        if not isinstance(entry, Mapping) or "module" not in entry:
            return None
        entries.append(
            {
                "module": str(entry["module"]),
                "channels": entry.get("num_chs"),
                "stride": entry.get("reduction"),
            }
        )
    return tuple(entries)


def _differences(pyramid: Sequence[Level], info: Sequence[Mapping[str, object]] | None) -> tuple[str, ...]:
    """How the pyramid differs from timm's ``feature_info`` at strides 4 to 32, one line each."""
    if info is None:
        return ()
    lines, renamed = level_differences(pyramid, info)
    return tuple(
        lines
        + [
            f"stride {stride}: featx taps `{level.name}`, timm `{entry['module']}` (both {level.channels} channels)"
            for stride, level, entry in renamed
        ]
    )


def level_differences(
    pyramid: Sequence[Level],
    reference: Sequence[Mapping[str, object]],
    source: str = "timm",
    reference_strides_only: bool = False,
) -> tuple[list[str], list[tuple[int, Level, Mapping[str, object]]]]:
    """The pyramid against a reference list of levels (``{"module", "channels", "stride"}``: timm's
    ``feature_info``, a detector's ``return_layers``) at strides 4 to 32: a line per missing level, extra
    level or channel count that differs, and apart, the levels with the same channels under another module
    name (``(stride, level, entry)``; the same value or not, only a forward can tell). The reference's last
    entry at a stride is compared, as featx takes the last block; ``reference_strides_only`` compares only
    the strides the reference has (a detector that returns three levels)."""
    ours = {level.stride: level for level in pyramid if 4 <= level.stride <= 32}
    theirs: dict[int, Mapping[str, object]] = {}
    for item in reference:
        stride = item.get("stride")
        if isinstance(stride, int) and 4 <= stride <= 32:
            theirs[stride] = item
    strides = sorted(theirs) if reference_strides_only else sorted(set(ours) | set(theirs))
    lines: list[str] = []
    renamed: list[tuple[int, Level, Mapping[str, object]]] = []
    for stride in strides:
        level, entry = ours.get(stride), theirs.get(stride)
        if level is None and entry is not None:
            lines.append(
                f"stride {stride}: {source} taps `{entry['module']}` ({entry['channels']} channels); "
                "featx found no trunk block at this stride"
            )
        elif level is not None and entry is None:
            lines.append(
                f"stride {stride}: featx taps `{level.name}` ({level.channels} channels); {source} lists nothing"
            )
        elif level is not None and entry is not None and entry["channels"] != level.channels:
            lines.append(
                f"stride {stride}: featx taps `{level.name}` ({level.channels} channels, measured); {source} "
                f"lists `{entry['module']}` with {entry['channels']} channels"
            )
        elif level is not None and entry is not None and entry["module"] not in (level.name, level.block):
            renamed.append((stride, level, entry))
    return lines, renamed


# --- verdicts ------------------------------------------------------------------------------------------


def _verdicts(
    model: nn.Module,
    x: torch.Tensor,
    depth: int,
    seed: int,
    leaf_functions: Sequence[Callable[..., Any]],
    label: str,
) -> dict[str, tuple[bool, bool, str | None]]:
    """Each cut's verdict: faithful plain, faithful with keep_glue, or refused with the reason."""
    from featx.verification import sweep

    plain = sweep(model, x, depth=depth, seed=seed, label=label)
    return _settled(
        model, x, [(c.upto, c.faithful, c.reasons) for c in plain.cuts], seed, leaf_functions, label
    )


def _cut_verdicts(
    model: nn.Module,
    x: torch.Tensor,
    names: list[str],
    seed: int,
    leaf_functions: Sequence[Callable[..., Any]],
    label: str,
) -> dict[str, tuple[bool, bool, str | None]]:
    """The verdicts of a few cuts (the pyramid's levels): one recording for the plain cuts, then keep_glue
    for those a plain cut does not compute."""
    from featx.verification import verify_cuts

    try:
        plain = [
            (r.upto, r.faithful, r.reasons)
            for r in verify_cuts(model, names, x, seed=seed, label=label, dependence=False)
        ]
    except FeatxError:  # a cut verify refuses: each on its own
        plain = []
        for name in names:
            try:
                (r,) = verify_cuts(model, [name], x, seed=seed, label=label, dependence=False)
                plain.append((r.upto, r.faithful, r.reasons))
            except FeatxError as err:
                plain.append((name, False, (one_line(err),)))
    return _settled(model, x, plain, seed, leaf_functions, label)


def _settled(
    model: nn.Module,
    x: torch.Tensor,
    plain: list[tuple[str, bool, tuple[str, ...]]],
    seed: int,
    leaf_functions: Sequence[Callable[..., Any]],
    label: str,
) -> dict[str, tuple[bool, bool, str | None]]:
    """Plain verdicts (cut, faithful, reasons) settled: faithful plain, else faithful with keep_glue, else
    refused with the reason (keep_glue's, else the plain cut's)."""
    from featx.verification import verify_cuts

    verdicts: dict[str, tuple[bool, bool, str | None]] = {}
    pending = []
    for upto, faithful, reasons in plain:
        if faithful:
            verdicts[upto] = (True, False, None)
        else:
            pending.append((upto, reasons))
    if not pending:
        return verdicts

    def glue_cuts(cuts: list[str]) -> tuple[Report, ...]:
        return verify_cuts(
            model,
            cuts,
            x,
            seed=seed,
            keep_glue=True,
            leaf_functions=leaf_functions,
            label=label,
            dependence=False,  # the verdicts only: no forward per cut to tell what the output depends on
        )

    glued: dict[str, tuple[bool, str | None]] = {}
    try:  # one recording for every cut keep_glue makes
        reports = glue_cuts([upto for upto, _ in pending])
        glued = {r.upto: (r.faithful, r.reasons[0] if r.reasons else None) for r in reports}
    except FeatxError:  # some cut is refused: each on its own, for its own reason
        for upto, _ in pending:
            try:
                (report,) = glue_cuts([upto])
                glued[upto] = (report.faithful, report.reasons[0] if report.reasons else None)
            except FeatxError as err:
                glued[upto] = (False, one_line(err))
    for upto, reasons in pending:
        faithful, reason = glued.get(upto, (False, None))
        if faithful:
            verdicts[upto] = (True, True, None)
        else:
            verdicts[upto] = (False, False, reason or (reasons[0] if reasons else "not faithful"))
    return verdicts
