"""Ship the proven backbone: safetensors, ONNX and torch.export (``.pt2``) artifacts, each verified before
it is written.

``export(config, out)`` builds the config's backbone (FPN included), makes the artifact, runs it — the
safetensors file rebuilt into a backbone, the ONNX model in onnxruntime, the ``.pt2`` reloaded as an
``ExportedProgram`` — against the PyTorch backbone at ``CHECK_SIZES`` (batch 1 and 3, sizes that are not
multiples of 32; a model that runs at its own input size only, such as a timm ViT, at that size),
compares every output, and writes the file only when every output is within the
tolerance, which the artifact records in its metadata. A config without weights (``weights: null``) is
exported only when asked (``random_weights=True``): its init is then seeded and the seed recorded. ``check_artifact`` repeats that comparison later,
against a backbone built anew from the config, so CI notices an artifact gone stale.

ONNX and pt2 artifacts take one input (``input``, N x C x H x W, batch, height and width dynamic) and
return a tuple of feature maps in the config's output order, named by the output names (an FPN adds its
``pool`` level last); height and width are static for a model of a fixed input size. Assumed: the backbone is traceable by ``torch.export`` (no data-dependent control
flow) and its input is one image batch.

Each format is made in ``featx.artifact_writing`` and opened to run in ``featx.artifact_running``; what
an artifact records about itself and the input shapes it is checked at are ``featx.artifact_metadata``'s.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from featx.artifact_metadata import (
    ELEMENTWISE,
    MAX_SCALED,
    TOLERANCE_RULES,
    check_shapes,
    example_input,
    fixed_size,
    metadata_for,
)
from featx.artifact_running import Runner, device_of, no_grad, open_onnx, open_pt2, open_safetensors
from featx.artifact_writing import Outputs, first_line, onnx_bytes, pt2_bytes, quiet, require_onnx
from featx.backbone import backbone_config
from featx.backbone.plan import BackbonePlan, resolve
from featx.compare import Tolerance, compare
from featx.config import BackboneConfig
from featx.config_keys import ARTIFACT_SUFFIXES
from featx.devices import torch_device
from featx.errors import FeatxError, FeatxWarning, did_you_mean, listing, one_line
from featx.files import replacing
from featx.model_sources import ModelSource
from featx.numerics import environment
from featx.render.text import diff_text, shape_text, table

FORMATS = ("safetensors", "onnx", "pt2")
SUFFIXES = {fmt: suffix for suffix, fmt in ARTIFACT_SUFFIXES.items()}
# Default (atol, rtol) per format, judged per element as verify judges (``featx.compare.Tolerance``).
# safetensors rebuilds the same modules from the same tensors: exact. pt2 runs the same aten kernels, but
# export may decompose ops (measured: exact on ResNets). onnxruntime runs its own float32 kernels (other
# conv algorithms, BatchNorm folded into the conv); their rounding grows with the magnitude of what a map
# accumulates, not with each element, so an element near zero carries its neighbours' absolute error and
# atol has to cover it: measured max |a - b| / max |b| is ~1.5e-6 on ResNet-18/50 (+FPN) maps, and max |a - b|
# 3.1e-4 on the Faster R-CNN ResNet-50 FPN (maps up to ~200), on elements of every size.
TOLERANCES = {"safetensors": (0.0, 0.0), "pt2": (1e-5, 1e-5), "onnx": (1e-3, 1e-4)}
ROUNDING = 1e-5  # a worst difference this small against an output's largest magnitude: float32 rounding


@dataclass(frozen=True)
class OutputDiff:
    """One output of the artifact against the PyTorch backbone at one input shape.

    ``max_rel_diff`` is ``max |a - b| / max |b|``: the worst difference relative to the output's largest
    value. ``within``: every element finite and within the tolerance, by the artifact's rule: per element
    (``featx.compare.compare``, as verify judges), or for an artifact written before the rule was recorded,
    ``max |a - b| <= atol + rtol * max |b|``.
    """

    input_shape: tuple[int, ...]
    output: str
    shape: tuple[int, ...] | None
    max_abs_diff: float | None
    max_rel_diff: float | None
    within: bool
    mismatch: str | None = None  # why the values could not be compared (shape, an exception)

    def to_dict(self) -> dict[str, object]:
        return {
            "input_shape": list(self.input_shape),
            "output": self.output,
            "shape": list(self.shape) if self.shape is not None else None,
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "within": self.within,
            "mismatch": self.mismatch,
        }


@dataclass(frozen=True)
class ArtifactCheck:
    """An artifact run against the PyTorch backbone: one ``OutputDiff`` per input shape and output.

    ``ok`` when its outputs are the backbone's, by name and order, and every diff is within
    ``atol``/``rtol``, read by ``tolerance`` (``elementwise``, or ``max-scaled`` for an artifact written
    before the rule was recorded). ``stale`` holds why not, when the outputs themselves differ (names, count).
    """

    path: str
    format: str
    atol: float
    rtol: float
    outputs: tuple[str, ...] = ()
    diffs: tuple[OutputDiff, ...] = ()
    stale: str | None = None
    seconds: float = 0.0  # making the artifact (export), or 0 when checking an existing one
    size: int | None = None  # bytes written
    metadata: Mapping[str, str] = field(default_factory=dict)
    tolerance: str = ELEMENTWISE  # how atol/rtol are read: ELEMENTWISE or MAX_SCALED
    # featx.numerics.environment() where the PyTorch backbone ran for this check (docs/json.md)
    environment: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.stale is None and bool(self.diffs) and all(d.within for d in self.diffs)

    @property
    def max_abs_diff(self) -> float | None:
        values = [d.max_abs_diff for d in self.diffs]
        compared = [v for v in values if v is not None]
        return max(compared) if compared and len(compared) == len(values) else None

    @property
    def max_rel_diff(self) -> float | None:
        values = [d.max_rel_diff for d in self.diffs]
        compared = [v for v in values if v is not None]
        return max(compared) if compared and len(compared) == len(values) else None

    @property
    def reasons(self) -> tuple[str, ...]:
        """One sentence per output that does not match, or why the outputs cannot be compared."""
        name = Path(self.path).name
        if self.stale is not None:
            return (f"artifact `{name}` no longer matches: {self.stale}",)
        reasons = [
            f"artifact `{name}` at input {shape_text(d.input_shape)}: {d.mismatch}"
            for d in self.diffs
            if d.mismatch is not None
        ]
        off = [d for d in self.diffs if d.mismatch is None and not d.within]
        if off:
            worst = max(off, key=lambda d: d.max_abs_diff or 0.0)
            outputs = listing(dict.fromkeys(d.output for d in off))
            inputs = ", ".join(dict.fromkeys(shape_text(d.input_shape) for d in off))
            reasons.append(
                f"artifact `{name}` differs from the PyTorch backbone by up to {diff_text(worst.max_abs_diff)} "
                f"(rel {diff_text(worst.max_rel_diff)}) at output {outputs} (input {inputs}); tolerance "
                f"atol {self.atol:g}, rtol {self.rtol:g}"
                + (
                    " (rtol of each output's largest magnitude, as the artifact was written)"
                    if self.tolerance == MAX_SCALED
                    else ""
                )
                + (
                    f"; that is {diff_text(worst.max_rel_diff)} of the output's largest magnitude, the size of "
                    f"float32 rounding in another runtime: pass --atol {_above(worst.max_abs_diff or 0.0)} "
                    "(API atol=) if these maps are that large"
                    if worst.max_rel_diff is not None and worst.max_rel_diff <= ROUNDING
                    else ""
                )
            )
        return tuple(reasons)

    def lines(self) -> list[str]:
        """The diff table: one row per input shape and output."""
        rows = [
            [
                shape_text(d.input_shape),
                d.output,
                shape_text(d.shape),
                diff_text(d.max_abs_diff),
                diff_text(d.max_rel_diff),
                "yes" if d.within else "NO",
            ]
            for d in self.diffs
        ]
        return table(["input", "output", "shape", "max abs diff", "max rel diff", "within"], rows)

    def __str__(self) -> str:
        lines = self.lines() if self.diffs else []
        verdict = (
            f"{self.format} artifact matches the PyTorch backbone within atol {self.atol:g}, rtol "
            f"{self.rtol:g} (max abs diff {diff_text(self.max_abs_diff)})"
            if self.ok
            else f"{self.format} artifact does NOT match the PyTorch backbone"
        )
        return "\n".join([*lines, "", verdict, *(f"  - {r}" for r in self.reasons)]).lstrip("\n")

    def to_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "format": self.format,
            "ok": self.ok,
            "atol": self.atol,
            "rtol": self.rtol,
            "tolerance": self.tolerance,
            "outputs": list(self.outputs),
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "stale": self.stale,
            "reasons": list(self.reasons),
            "diffs": [d.to_dict() for d in self.diffs],
            "seconds": round(self.seconds, 3),
            "size": self.size,
            "environment": dict(self.environment),
        }


class ArtifactMismatch(FeatxError):
    """The artifact just made does not match the PyTorch backbone; nothing was written. ``check`` holds
    the diffs."""

    def __init__(self, message: str, check: ArtifactCheck) -> None:
        super().__init__(message)
        self.check = check


def export(
    config: str | os.PathLike[str] | Mapping[str, object] | BackboneConfig | ModelSource,
    out: str | os.PathLike[str],
    *,
    format: str | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    random_weights: bool = False,
    device: str | torch.device = "cpu",
    upto: str | int | None = None,
    outputs: Sequence[str | int] | None = None,
    keep_glue: bool | None = None,
    leaf_functions: Sequence[Callable[..., Any]] | None = None,
    weights: str | os.PathLike[str] | None = None,
    weights_prefix: str | None = None,
    model_kwargs: Mapping[str, object] | None = None,
    input_shape: Sequence[int] | None = None,
) -> ArtifactCheck:
    """Export the configured backbone to ``out`` and return the check it passed before being written.

    ``format`` is ``safetensors``, ``onnx`` or ``pt2``; by default the one ``out``'s suffix names. The
    artifact is compared with the PyTorch backbone at ``CHECK_SIZES`` (a model of a fixed input size at
    that size) and written (atomically) only when every output is within ``atol``/``rtol`` (default:
    ``TOLERANCES[format]``). ``seed`` seeds the check inputs and the model's (and FPN's) init.

    A config without weights (``weights: null``) builds the model at its random init: refused unless
    ``random_weights``; then the init runs under ``torch.manual_seed(seed)`` in a forked RNG (the caller's
    RNG untouched) and the metadata records ``random_weights`` and ``seed``. An FPN at its own init
    (no weights, or a weights file without FPN tensors) is said in one ``FeatxWarning``. The backbone (and
    a rebuilt safetensors or reloaded pt2 artifact) runs on ``device``; onnxruntime on the CPU.

    ``config`` is a backbone config (a ``.yaml`` path, a mapping, a ``BackboneConfig``, a featx
    ``.safetensors`` export), or a model as ``featx export SPEC --upto X`` takes it: a spec or a
    ``featx.models.ModelSource``, cut at ``upto`` (required then) with the taps ``outputs`` (default: the
    cut). ``upto``, ``outputs``, ``keep_glue``, ``leaf_functions``, ``weights``, ``weights_prefix``,
    ``model_kwargs`` and ``input_shape`` are the command line's ``--upto``, ``--outputs``, ``--keep-glue``,
    ``--leaf-function``, ``--weights``, ``--weights-prefix``, ``--model-kwarg`` and ``--input-shape``: over a
    config's keys, or the SPEC's cut and source, by the one rule of every verb
    (``featx.backbone.backbone_config``).

    - safetensors: the kept children's tensors under the full model's keys (and the FPN's under ``fpn.``),
      with the config in the metadata: ``featx.build_backbone(out)`` rebuilds the backbone bit-exactly.
    - onnx: ``torch.onnx.export(..., dynamo=True)``; metadata in the model's ``metadata_props``.
    - pt2: ``torch.export.export`` then ``torch.export.save``; metadata in the extra file ``featx.json``.

    Raises:
        FeatxError: a bad format or suffix, a config without weights and no ``random_weights``, a
            backbone the exporter cannot trace (naming the module and the line it stopped at), the ONNX
            packages missing.
        ArtifactMismatch: the artifact does not match (its ``check`` holds the diffs); nothing is written.
    """
    out = Path(out)
    fmt = _format(format, out)
    if fmt == "onnx":
        require_onnx()
    tolerance = Tolerance(
        TOLERANCES[fmt][0] if atol is None else atol, TOLERANCES[fmt][1] if rtol is None else rtol
    )
    atol, rtol = tolerance.atol, tolerance.rtol
    device = torch_device(str(device)) if not isinstance(device, torch.device) else device
    with torch.random.fork_rng():
        # no weights: the model's and the FPN's init come from this seed, as load_model(seed=) does
        torch.manual_seed(seed)
        cfg = backbone_config(
            config,
            upto=upto,
            outputs=outputs,
            keep_glue=keep_glue,
            leaf_functions=leaf_functions,
            weights=weights,
            weights_prefix=weights_prefix,
            model_kwargs=model_kwargs,
            input_shape=input_shape,
        )
        plan = resolve(cfg)
        _refuse_random(plan.config, random_weights)
        backbone = plan.build()  # a config that cannot build says so before an export format is refused
    random = plan.config.model_source.weights.kind == "random"
    if random and plan.fpn == "random":  # with a weights file, building said so already
        warnings.warn(
            FeatxWarning(f"{plan.config.source}: the FPN stays at random init: {plan.fpn_source}"),
            stacklevel=2,
        )
    backbone.to(device)
    fixed = fixed_size(plan)
    shapes = check_shapes(plan.input_shape, fmt, fixed)
    metadata = metadata_for(plan, fmt, out, atol, rtol, shapes, fixed, seed if random else None)
    start = time.perf_counter()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        with replacing(out, suffix=out.suffix) as tmp:
            save_file(plan.tensors(), tmp, metadata=metadata)
            seconds = time.perf_counter() - start
            runner = open_safetensors(tmp, device)
            check = _compare(str(out), fmt, runner, plan, shapes, tolerance, ELEMENTWISE, seed)
            _refuse(check, out)
        return replace(check, seconds=seconds, size=out.stat().st_size, metadata=metadata)
    example = example_input(plan.input_shape, 2, seed).to(device)
    with quiet():
        data = (onnx_bytes if fmt == "onnx" else pt2_bytes)(plan, example, metadata, fixed)
    seconds = time.perf_counter() - start
    runner = open_onnx(data) if fmt == "onnx" else open_pt2(io.BytesIO(data))
    check = _compare(str(out), fmt, runner, plan, shapes, tolerance, ELEMENTWISE, seed)
    _refuse(check, out)
    with replacing(out) as tmp:
        Path(tmp).write_bytes(data)
    return replace(check, seconds=seconds, size=len(data), metadata=metadata)


def check_artifact(path: str | os.PathLike[str], plan: BackbonePlan, *, seed: int = 0) -> ArtifactCheck:
    """Run an artifact ``export`` wrote against the backbone ``plan`` builds (its config resolved anew), at
    the input shapes and within the tolerance the artifact's metadata records.

    Raises:
        FeatxError: the file does not exist, is not a featx export, or cannot be read.
    """
    path = Path(path)
    fmt = ARTIFACT_SUFFIXES.get(path.suffix)
    if fmt is None:
        raise FeatxError(
            f"artifact `{path}` is not an export; accepted: files ending in {listing(SUFFIXES.values())}"
        )
    if not path.is_file():
        raise FeatxError(
            f"artifact `{path}` does not exist; write it with `featx export CONFIG --out {path}`"
        )
    if fmt == "onnx":
        require_onnx()
    try:
        openers: dict[str, Callable[[str], Runner]] = {
            "safetensors": lambda p: open_safetensors(p, device_of(plan.model)),  # where the plan runs
            "onnx": open_onnx,
            "pt2": open_pt2,
        }
        runner = openers[fmt](str(path))
    except FeatxError:
        raise
    except Exception as err:
        raise FeatxError(
            f"artifact `{path}` cannot be read as {fmt}: {type(err).__name__}: {one_line(err)}"
        ) from None
    metadata = runner.metadata
    try:
        atol, rtol = float(metadata["atol"]), float(metadata["rtol"])
        shapes = [tuple(s) for s in json.loads(metadata["check_shapes"])]
    except (KeyError, ValueError, TypeError):
        raise FeatxError(
            f"artifact `{path}` carries no featx metadata (not written by `featx export`)"
        ) from None
    rule = metadata.get("tolerance", MAX_SCALED)  # written before the rule was recorded: max-scaled
    if rule not in TOLERANCE_RULES:
        raise FeatxError(
            f"artifact `{path}` records tolerance `{rule}` (metadata key `tolerance`); accepted: "
            f"{listing(TOLERANCE_RULES)}"
        )
    try:
        tolerance = Tolerance(atol, rtol)
    except FeatxError as err:
        raise FeatxError(f"artifact `{path}` metadata: {err}") from None
    check = _compare(str(path), fmt, runner, plan, shapes, tolerance, rule, seed)
    return replace(check, metadata=metadata)


# -- formats ------------------------------------------------------------------------------------------
def _format(fmt: str | None, out: Path) -> str:
    if fmt is not None and fmt not in FORMATS:
        raise FeatxError(
            f"--format `{fmt}` is not an export format{did_you_mean(fmt, FORMATS)}; accepted: {listing(FORMATS)}"
        )
    by_suffix = ARTIFACT_SUFFIXES.get(out.suffix)
    if fmt is None:
        if by_suffix is None:
            raise FeatxError(
                f"--out `{out}` must end in {listing(SUFFIXES.values())} (the suffix names the format), or pass --format"
            )
        return by_suffix
    if out.suffix != SUFFIXES[fmt]:
        raise FeatxError(f"--out `{out}` must end in {SUFFIXES[fmt]} for --format {fmt}")
    return fmt


# -- running artifacts --------------------------------------------------------------------------------
def _compare(
    path: str,
    fmt: str,
    runner: Runner,
    plan: BackbonePlan,
    shapes: Sequence[tuple[int, ...]],
    tolerance: Tolerance,
    rule: str,
    seed: int,
) -> ArtifactCheck:
    wrapped = Outputs(plan).eval()
    device = device_of(wrapped)
    check = ArtifactCheck(
        path,
        fmt,
        tolerance.atol,
        tolerance.rtol,
        tuple(runner.outputs),
        tolerance=rule,
        environment=environment(device),
    )
    if wrapped.names != runner.outputs:
        return replace(
            check,
            stale=f"its outputs are {listing(runner.outputs)}; the config's backbone returns "
            f"{listing(wrapped.names)}",
        )
    diffs = []
    for shape in shapes:
        x = example_input(shape, None, seed).to(device)
        reference = dict(zip(wrapped.names, no_grad(wrapped, x), strict=True))
        try:
            got = runner.run(x)
        except Exception as err:
            diffs.append(
                OutputDiff(
                    shape, "-", None, None, None, False, f"it raised {type(err).__name__}: {first_line(err)}"
                )
            )
            continue
        for name, a in zip(reference, got, strict=True):
            diffs.append(_diff(shape, name, a, reference[name], tolerance, rule))
    return replace(check, diffs=tuple(diffs))


def _diff(
    shape: tuple[int, ...],
    name: str,
    got: torch.Tensor,
    ref: torch.Tensor,
    tolerance: Tolerance,
    rule: str = ELEMENTWISE,
) -> OutputDiff:
    if tuple(got.shape) != tuple(ref.shape):
        return OutputDiff(
            shape,
            name,
            tuple(ref.shape),
            None,
            None,
            False,
            f"output `{name}` has shape {shape_text(got.shape)}, the PyTorch backbone's {shape_text(ref.shape)}",
        )
    a, b = got.detach().cpu().double(), ref.detach().cpu().double()
    finite = a.isfinite() & b.isfinite()
    diff = torch.where(finite, (a - b).abs(), torch.zeros_like(a))
    worst = float(diff.max()) if diff.numel() else 0.0
    scale = float(b.abs().max()) if b.numel() else 0.0
    if rule == MAX_SCALED:  # an artifact written before the rule was recorded, checked as it was written
        within = bool(finite.all()) and worst <= tolerance.atol + tolerance.rtol * scale
    else:
        judged = compare(got, ref, tolerance)
        if judged.mismatch is not None:  # same shape, yet not comparable (dtype)
            return OutputDiff(
                shape, name, tuple(ref.shape), worst, None, False, f"output `{name}`: {judged.mismatch}"
            )
        within = judged.equal
    return OutputDiff(shape, name, tuple(ref.shape), worst, worst / scale if scale else worst, within)


def _refuse(check: ArtifactCheck, out: Path) -> None:
    if not check.ok:
        raise ArtifactMismatch(
            f"{check.format} export does not match the PyTorch backbone; `{out}` was not written: "
            + (check.reasons[0] if check.reasons else "nothing was compared"),
            check,
        )


# -- what goes in ---------------------------------------------------------------------------------------
def _refuse_random(cfg: BackboneConfig, random_weights: bool) -> None:
    """No weights means the model's random init: exported only when asked for (a silent random artifact
    is the worst outcome)."""
    if cfg.model_source.weights.kind != "random" or random_weights:  # pretrained=True counts as weights
        return
    accepted = "a .safetensors file or torch checkpoint, DEFAULT, IMAGENET1K_V1, a timm tag, hf-hub:org/name"
    if cfg.source.startswith("the command line"):  # a SPEC and its flags
        raise FeatxError(
            f"`{cfg.model}` has no --weights, so the export would hold its random init; give --weights "
            f"({accepted}) or pass --random-weights (seeded by --seed)"
        )
    raise FeatxError(
        f"{cfg.source}: key `weights` is null, so the export would hold `{cfg.model}`'s random init; set "
        f"`weights` ({accepted}) or pass --random-weights (API: random_weights=True; seeded by --seed)"
    )


def _above(value: float) -> str:
    """A round tolerance just above ``value`` (``3.06e-4`` -> ``0.0004``)."""
    exponent = math.floor(math.log10(value)) if value > 0 else -8
    return f"{math.ceil(value / 10**exponent) * 10**exponent:.{max(0, -exponent)}f}"
