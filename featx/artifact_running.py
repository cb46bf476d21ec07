"""Opening an artifact to run it: a ``Runner`` (its output names, a function of the input batch, its
metadata) for a safetensors file rebuilt into a backbone from the config it holds, an ONNX model in
onnxruntime (on the CPU), a ``.pt2`` archive reloaded as an ``ExportedProgram`` (on the device it was
exported on).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from featx.artifact_writing import METADATA_FILE, Outputs, quiet
from featx.backbone.plan import resolve
from featx.config import exported_config


@dataclass
class Runner:
    outputs: list[str]
    run: Callable[[torch.Tensor], list[torch.Tensor]]
    metadata: dict[str, str]


def open_safetensors(path: str, device: torch.device | None = None) -> Runner:
    rebuilt = resolve(exported_config(path))
    metadata = _safetensors_metadata(path)
    wrapped = Outputs(rebuilt).eval().to(device or "cpu")
    return Runner(list(wrapped.names), lambda x: list(no_grad(wrapped, x)), metadata)


def _safetensors_metadata(path: str) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {})


def open_onnx(model: bytes | str) -> Runner:
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

    return Runner([o.name for o in session.get_outputs()], run, metadata)


def open_pt2(source: io.BytesIO | str) -> Runner:
    extra = {METADATA_FILE: ""}
    with quiet():
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
    return Runner(outputs, lambda x: list(no_grad(module, x.to(device))), metadata)


def no_grad(module: Callable, x: torch.Tensor):
    with torch.no_grad():
        return module(x)


def device_of(module: nn.Module) -> torch.device:
    tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    return tensor.device if tensor is not None else torch.device("cpu")
