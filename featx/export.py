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
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

from featx._version import __version__
from featx.backbone.plan import BackbonePlan, resolve
from featx.code_location import in_torch_or_featx, path_from_cwd
from featx.compare import Tolerance, compare
from featx.config import ARTIFACT_SUFFIXES, BackboneConfig, exported_config
from featx.errors import FeatxError, FeatxWarning, did_you_mean, listing, one_line
from featx.files import replacing
from featx.models import source_of, torch_device
from featx.render.text import diff_text, shape_text, table

FORMATS = ("safetensors", "onnx", "pt2")
SUFFIXES = {fmt: suffix for suffix, fmt in ARTIFACT_SUFFIXES.items()}
# Default (atol, rtol) per format, judged per element as verify judges (``featx.compare.Tolerance``).
# safetensors rebuilds the same modules from the same tensors: exact. pt2 runs the same aten kernels, but
# export may decompose ops (measured: exact on ResNets). onnxruntime runs its own float32 kernels (other
# conv algorithms, BatchNorm folded into the conv); their rounding grows with the magnitude of what a map
# accumulates, not with each element, so an element near zero carries its neighbours' absolute error and
# atol has to cover it: measured max |a - b| / max |b| is ~1.5e-6 on ResNet-18/50 (+FPN) maps.
TOLERANCES = {"safetensors": (0.0, 0.0), "pt2": (1e-5, 1e-5), "onnx": (1e-4, 1e-4)}
CHECK_SIZES = ((1, 97, 131), (3, 160, 128))  # (batch, height, width) the artifact is checked at
INPUT_NAME = "input"
METADATA_FILE = "featx.json"  # the pt2 archive's extra file holding the metadata
# What an artifact's `tolerance` metadata says its atol/rtol mean: ELEMENTWISE, ``|a - b| <= atol + rtol * |b|``
# per element (written since this key exists); MAX_SCALED, ``max |a - b| <= atol + rtol * max |b|`` per output
# (the rule of artifacts written before it, which carry no `tolerance` key: they are checked as written).
ELEMENTWISE, MAX_SCALED = "elementwise", "max-scaled"
TOLERANCE_RULES = (ELEMENTWISE, MAX_SCALED)
_DYNAMIC = ("batch", "height", "width")

if TYPE_CHECKING:
    import onnx

_T = TypeVar("_T")


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
        }


class ArtifactMismatch(FeatxError):
    """The artifact just made does not match the PyTorch backbone; nothing was written. ``check`` holds
    the diffs."""

    def __init__(self, message: str, check: ArtifactCheck) -> None:
        super().__init__(message)
        self.check = check


def export(
    config: str | os.PathLike[str] | Mapping[str, object] | BackboneConfig,
    out: str | os.PathLike[str],
    *,
    format: str | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    random_weights: bool = False,
    device: str | torch.device = "cpu",
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
        _require_onnx()
    tolerance = Tolerance(
        TOLERANCES[fmt][0] if atol is None else atol, TOLERANCES[fmt][1] if rtol is None else rtol
    )
    atol, rtol = tolerance.atol, tolerance.rtol
    device = torch_device(str(device)) if not isinstance(device, torch.device) else device
    with torch.random.fork_rng():
        # no weights: the model's and the FPN's init come from this seed, as load_model(seed=) does
        torch.manual_seed(seed)
        plan = resolve(config)
        _refuse_random(plan.config, random_weights)
        backbone = plan.build()  # a config that cannot build says so before an export format is refused
    random = plan.config.model_source.weights.kind == "random"
    if random and plan.fpn == "random":  # with a weights file, building said so already
        warnings.warn(
            FeatxWarning(f"{plan.config.source}: the FPN stays at random init: {plan.fpn_source}"),
            stacklevel=2,
        )
    backbone.to(device)
    fixed = _fixed_size(plan)
    shapes = _check_shapes(plan.input_shape, fmt, fixed)
    metadata = _metadata(plan, fmt, out, atol, rtol, shapes, fixed, seed if random else None)
    start = time.perf_counter()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        with replacing(out, suffix=out.suffix) as tmp:
            save_file(plan.tensors(), tmp, metadata=metadata)
            seconds = time.perf_counter() - start
            runner = _open_safetensors(tmp, device)
            check = _compare(str(out), fmt, runner, plan, shapes, tolerance, ELEMENTWISE, seed)
            _refuse(check, out)
        return replace(check, seconds=seconds, size=out.stat().st_size, metadata=metadata)
    example = _example(plan.input_shape, 2, seed).to(device)
    with _quiet():
        data = (_onnx if fmt == "onnx" else _pt2)(plan, example, metadata, fixed)
    seconds = time.perf_counter() - start
    runner = _open_onnx(data) if fmt == "onnx" else _open_pt2(io.BytesIO(data))
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
        _require_onnx()
    try:
        openers: dict[str, Callable[[str], _Runner]] = {
            "safetensors": lambda p: _open_safetensors(p, _device_of(plan.model)),  # where the plan runs
            "onnx": _open_onnx,
            "pt2": _open_pt2,
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


def _require_onnx() -> None:
    missing = []
    for package in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise FeatxError(
            f"ONNX export needs the packages onnx, onnxruntime and onnxscript ({listing(missing)} not "
            "installed): pip install 'featx[onnx]'"
        )


class _Outputs(nn.Module):
    """The plan's backbone with its dict of feature maps returned as a tuple, in ``plan.maps`` order: an
    artifact's outputs."""

    def __init__(self, plan: BackbonePlan) -> None:
        super().__init__()
        self.backbone = plan.build()
        self.names = [name for name, _, _ in plan.maps]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.backbone(x)
        return tuple(out[name] for name in self.names)


def _dynamic_shapes(fixed: bool) -> dict[str, dict[int, object]]:
    """Batch dynamic; height and width too unless the model runs at its own size only."""
    auto = torch.export.Dim.AUTO  # the exporter finds each size's valid range (a ResNet+FPN needs >= 33)
    return {"x": {0: auto} if fixed else {0: auto, 2: auto, 3: auto}}


def _pt2(plan: BackbonePlan, example: torch.Tensor, metadata: Mapping[str, str], fixed: bool) -> bytes:
    program = _trace(
        "pt2", plan, lambda m: torch.export.export(m, (example,), dynamic_shapes=_dynamic_shapes(fixed))
    )
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA_FILE: json.dumps(dict(metadata))})
    return buffer.getvalue()


def _onnx(plan: BackbonePlan, example: torch.Tensor, metadata: Mapping[str, str], fixed: bool) -> bytes:
    import onnx

    names = json.loads(metadata["output_names"])
    program = _trace(
        "onnx",
        plan,
        lambda m: torch.onnx.export(
            m,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_shapes=_dynamic_shapes(fixed),
            verbose=False,
        ),
    )
    assert program is not None, "torch.onnx.export(dynamo=True) returns the ONNXProgram"
    proto = program.model_proto
    _name_dynamic_dims(proto)
    onnx.helper.set_model_props(proto, dict(metadata))
    return proto.SerializeToString()


def _name_dynamic_dims(proto: onnx.ModelProto) -> None:
    """Rename the exporter's size symbols (``s77``) of the input to ``batch``, ``height``, ``width``
    everywhere they appear, so the graph's shapes read as what they are."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    renames = {
        dims[i].dim_param: name
        for i, name in zip((0, 2, 3), _DYNAMIC, strict=True)
        if i < len(dims) and dims[i].dim_param
    }
    if not renames:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")\b")
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: renames[m.group()], dim.dim_param)


def _trace(fmt: str, plan: BackbonePlan, run: Callable[[nn.Module], _T]) -> _T:
    """``run(wrapped backbone)``, an exporter's failure turned into one line naming where it stopped."""
    wrapped = _Outputs(plan).eval()  # on the device the backbone is on
    try:
        return run(wrapped)
    except Exception as err:
        where = _where(err, wrapped)
        cause: BaseException = err
        while cause.__cause__ is not None:  # the ONNX exporter wraps torch.export's error in its own
            cause = cause.__cause__
        exporter = "torch.onnx.export (dynamo)" if fmt == "onnx" else "torch.export"
        raise FeatxError(
            f"{exporter} cannot export the backbone{where}: {type(cause).__name__}: {_first_line(cause)}"
        ) from None


def _where(err: BaseException, root: nn.Module) -> str:
    """`` in `layer2.0` (Toy) at toy.py:12`` — the innermost module the exporter was running when it
    stopped, and the last line of code outside torch and featx it was on."""
    names = {id(m): name.removeprefix("backbone.").removeprefix("body.") for name, m in root.named_modules()}
    module, line = None, None
    chain: BaseException | None = err
    while chain is not None:
        for frame, lineno in traceback.walk_tb(chain.__traceback__):
            owner = frame.f_locals.get("self")
            if frame.f_code.co_name == "_call_impl" and isinstance(owner, nn.Module) and id(owner) in names:
                module = owner
            filename = frame.f_code.co_filename
            if not in_torch_or_featx(filename):
                line = f"{path_from_cwd(filename)}:{lineno}"
        chain = chain.__cause__ or chain.__context__
    parts = []
    if module is not None and names[id(module)] not in ("", "backbone", "body"):
        parts.append(f" in `{names[id(module)]}` ({type(module).__name__})")
    if line is not None:
        parts.append(f" at {line}")
    return "".join(parts)


def _first_line(err: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # the exporters colour their messages
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    text = one_line(RuntimeError(text))
    if "data-dependent" in text:
        text += " (data-dependent control flow: a Python `if`/loop on a tensor's values)"
    return text


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print progress and warnings; featx's stdout is its table, so keep them out of it."""
    loggers = [logging.getLogger(n) for n in ("torch", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# -- running artifacts --------------------------------------------------------------------------------
@dataclass
class _Runner:
    outputs: list[str]
    run: Callable[[torch.Tensor], list[torch.Tensor]]
    metadata: dict[str, str]


def _open_safetensors(path: str, device: torch.device | None = None) -> _Runner:
    rebuilt = resolve(exported_config(path))
    metadata = _safetensors_metadata(path)
    wrapped = _Outputs(rebuilt).eval().to(device or "cpu")
    return _Runner(list(wrapped.names), lambda x: list(_no_grad(wrapped, x)), metadata)


def _safetensors_metadata(path: str) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {})


def _open_onnx(model: bytes | str) -> _Runner:
    import onnx
    import onnxruntime

    proto = (
        onnx.load_model_from_string(model)
        if isinstance(model, bytes)
        else onnx.load(model, load_external_data=False)
    )
    metadata = {p.key: p.value for p in proto.metadata_props}
    session = onnxruntime.InferenceSession(
        model if isinstance(model, bytes) else str(model), providers=["CPUExecutionProvider"]
    )
    input_name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(a) for a in session.run(None, {input_name: x.cpu().numpy()})]

    return _Runner([o.name for o in session.get_outputs()], run, metadata)


def _open_pt2(source: io.BytesIO | str) -> _Runner:
    extra = {METADATA_FILE: ""}
    with _quiet():
        program = torch.export.load(source, extra_files=extra)
    try:
        metadata = json.loads(extra[METADATA_FILE] or "{}")
    except ValueError:
        metadata = {}
    module = program.module()
    tensors = [*module.parameters(), *module.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")  # where it was exported
    outputs = json.loads(metadata.get("output_names", "[]")) or [
        str(i) for i in range(len(program.graph_signature.user_outputs))
    ]
    return _Runner(outputs, lambda x: list(_no_grad(module, x.to(device))), metadata)


def _no_grad(module: Callable, x: torch.Tensor):
    with torch.no_grad():
        return module(x)


def _compare(
    path: str,
    fmt: str,
    runner: _Runner,
    plan: BackbonePlan,
    shapes: Sequence[tuple[int, ...]],
    tolerance: Tolerance,
    rule: str,
    seed: int,
) -> ArtifactCheck:
    wrapped = _Outputs(plan).eval()
    device = _device_of(wrapped)
    check = ArtifactCheck(path, fmt, tolerance.atol, tolerance.rtol, tuple(runner.outputs), tolerance=rule)
    if wrapped.names != runner.outputs:
        return replace(
            check,
            stale=f"its outputs are {listing(runner.outputs)}; the config's backbone returns "
            f"{listing(wrapped.names)}",
        )
    diffs = []
    for shape in shapes:
        x = _example(shape, None, seed).to(device)
        reference = dict(zip(wrapped.names, _no_grad(wrapped, x), strict=True))
        try:
            got = runner.run(x)
        except Exception as err:
            diffs.append(
                OutputDiff(
                    shape, "-", None, None, None, False, f"it raised {type(err).__name__}: {_first_line(err)}"
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


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    return tensor.device if tensor is not None else torch.device("cpu")


# -- what goes in ---------------------------------------------------------------------------------------
def _refuse_random(cfg: BackboneConfig, random_weights: bool) -> None:
    """No weights means the model's random init: exported only when asked for (a silent random artifact
    is the worst outcome)."""
    if cfg.model_source.weights.kind != "random" or random_weights:  # pretrained=True counts as weights
        return
    accepted = "a .safetensors file or torch checkpoint, DEFAULT, IMAGENET1K_V2, a timm tag, hf-hub:org/name"
    if cfg.source.startswith("the command line"):  # a SPEC and its flags
        raise FeatxError(
            f"`{cfg.model}` has no --weights, so the export would hold its random init; give --weights "
            f"({accepted}) or pass --random-weights (seeded by --seed)"
        )
    raise FeatxError(
        f"{cfg.source}: key `weights` is null, so the export would hold `{cfg.model}`'s random init; set "
        f"`weights` ({accepted}) or pass --random-weights (API: random_weights=True; seeded by --seed)"
    )


def _fixed_size(plan: BackbonePlan) -> bool:
    """Whether the backbone runs at its own input size only (a timm ViT or Swin asserts its
    ``img_size``): it is then exported and checked at that size, with static height and width. Found by
    running it once at the first of ``CHECK_SIZES``; the build's dry run already ran it at its own size."""
    shape = plan.input_shape
    if len(shape) != 4:
        return False
    batch, height, width = CHECK_SIZES[0]
    wrapped = _Outputs(plan).eval()
    x = _example((batch, shape[1], height, width), None, 0).to(_device_of(wrapped))
    try:
        with _quiet():
            _no_grad(wrapped, x)
    except Exception:
        return True
    return False


def _check_shapes(input_shape: tuple[int, ...], fmt: str, fixed: bool = False) -> list[tuple[int, ...]]:
    if len(input_shape) != 4:
        if fmt != "safetensors":
            raise FeatxError(
                f"{fmt} export takes an image batch N x C x H x W with dynamic batch, height and width; "
                f"the config's input shape is {shape_text(input_shape)} (`verify.input_shape`)"
            )
        return [tuple(input_shape)]
    if fixed:  # its own size only
        return [(batch, *input_shape[1:]) for batch, _, _ in CHECK_SIZES]
    return [(batch, input_shape[1], h, w) for batch, h, w in CHECK_SIZES]


def _example(shape: Sequence[int], batch: int | None, seed: int) -> torch.Tensor:
    shape = (batch, *shape[1:]) if batch is not None else tuple(shape)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _weights_record(plan: BackbonePlan) -> dict[str, object] | None:
    """The source weights' fingerprint (``WeightsSource.fingerprint()``, as resolved when the model was
    built); None when featx did not build the model."""
    built = source_of(plan.model)
    return None if built is None else built.weights.fingerprint()


def _metadata(
    plan: BackbonePlan,
    fmt: str,
    out: Path,
    atol: float,
    rtol: float,
    shapes: Sequence[tuple[int, ...]],
    fixed: bool = False,
    seed: int | None = None,
) -> dict[str, str]:
    """What the artifact says about itself (string values: safetensors and ONNX metadata are strings).
    ``seed`` is the seed of a random init (no weights), None when the weights came from somewhere."""
    cfg = plan.config
    raw = {k: v for k, v in cfg.raw.items() if k != "artifacts"}
    weights = cfg.model_source.weights
    # the constructor's own download switches (`weights=`, `pretrained=`) are kept only where they are the
    # weights' one record (`pretrained: true`); everywhere else `weights` says it
    raw["model_kwargs"] = dict(cfg.model_source.model_kwargs)
    if fmt == "safetensors":  # the config that rebuilds this backbone from this very file
        raw.update(weights=out.name, weights_prefix=None)
        switches = ("weights", "pretrained")  # torchvision's deprecated `pretrained=True` stays in the kwargs
        raw["model_kwargs"] = {k: v for k, v in cfg.model_source.model_kwargs.items() if k not in switches}
    elif weights.file is not None:  # where the weights are, seen from the artifact's folder
        raw["weights"] = os.path.relpath(os.path.abspath(weights.file), os.path.abspath(out.parent))
    elif weights.text is not None:  # a name is recorded as a name (`IMAGENET1K_V1`, `a1_in1k`, `hf-hub:...`)
        raw["weights"] = weights.text
    else:
        raw["model_kwargs"] = dict(cfg.model_kwargs)
    metadata = {
        "featx_version": __version__,
        "featx_format": fmt,
        "torch_version": torch.__version__,
        "source_model": cfg.model,
        "upto": plan.cut.upto,  # the last module run, dotted for a nested cut
        "outputs": json.dumps(dict(cfg.outputs)),
        "output_names": json.dumps([name for name, _, _ in plan.maps]),
        "channels": json.dumps({name: channels for name, channels, _ in plan.maps}),
        "strides": json.dumps({name: stride for name, _, stride in plan.maps}),
        "fpn": json.dumps(
            None
            if cfg.fpn is None
            else {"out_channels": cfg.fpn.out_channels, "extra_pool": cfg.fpn.extra_pool}
        ),
        "input_name": INPUT_NAME,
        "input_shape": json.dumps(list(plan.input_shape)),
        "dynamic_axes": json.dumps({"0": "batch"} if fixed else {"0": "batch", "2": "height", "3": "width"}),
        "random_weights": json.dumps(seed is not None),
        "seed": json.dumps(seed),
        # what the weights were: a name as a name, with its cache file's sha256; a file by its sha256
        "weights": json.dumps({"random": True, "seed": seed} if seed is not None else _weights_record(plan)),
        "atol": repr(atol),
        "rtol": repr(rtol),
        "tolerance": ELEMENTWISE,  # how atol/rtol are read; artifacts without this key: MAX_SCALED
        "check_shapes": json.dumps([list(s) for s in shapes]),
        "config": json.dumps(raw, default=str),
    }
    if fmt == "safetensors":
        metadata["format"] = "pt"  # safetensors' own key: the tensors are PyTorch's
    return metadata
