"""Making an artifact in a format: the backbone wrapped to return its feature maps as a tuple
(``Outputs``, an artifact's outputs), traced by ``torch.export`` into ``.pt2`` bytes or by the ONNX
exporter (dynamo) into an ONNX model whose dynamic dims are named, the metadata stored inside each.

An exporter's failure is said in one line naming the module and the line of code it stopped at
(``first_line``); the exporters' own printing and warnings are kept off featx's stdout (``quiet``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

from featx.backbone.plan import BackbonePlan
from featx.code_location import in_torch_or_featx, path_from_cwd
from featx.errors import FeatxError, listing, one_line

INPUT_NAME = "input"
METADATA_FILE = "featx.json"  # the pt2 archive's extra file holding the metadata
_DYNAMIC = ("batch", "height", "width")

if TYPE_CHECKING:
    import onnx

_T = TypeVar("_T")


def require_onnx() -> None:
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


class Outputs(nn.Module):
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


def pt2_bytes(plan: BackbonePlan, example: torch.Tensor, metadata: Mapping[str, str], fixed: bool) -> bytes:
    program = _trace(
        "pt2", plan, lambda m: torch.export.export(m, (example,), dynamic_shapes=_dynamic_shapes(fixed))
    )
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA_FILE: json.dumps(dict(metadata))})
    return buffer.getvalue()


def onnx_bytes(plan: BackbonePlan, example: torch.Tensor, metadata: Mapping[str, str], fixed: bool) -> bytes:
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
    wrapped = Outputs(plan).eval()  # on the device the backbone is on
    try:
        return run(wrapped)
    except Exception as err:
        where = _where(err, wrapped)
        cause: BaseException = err
        while cause.__cause__ is not None:  # the ONNX exporter wraps torch.export's error in its own
            cause = cause.__cause__
        exporter = "torch.onnx.export (dynamo)" if fmt == "onnx" else "torch.export"
        raise FeatxError(
            f"{exporter} cannot export the backbone{where}: {type(cause).__name__}: {first_line(cause)}"
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


def first_line(err: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # the exporters colour their messages
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    text = one_line(RuntimeError(text))
    if "data-dependent" in text:
        text += " (data-dependent control flow: a Python `if`/loop on a tensor's values)"
    return text


@contextlib.contextmanager
def quiet() -> Iterator[None]:
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
