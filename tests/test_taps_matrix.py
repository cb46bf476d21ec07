"""The support matrix's row (benchmarks/taps.py): its keys, and its verdict against timm's feature_info or a
torchvision detection body's return_layers (agree, differ, timm-has-none, refused), on tiny models."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

import featx

ROOT = Path(__file__).resolve().parent.parent
KEYS = [
    "model",
    "input_shape",
    "params",
    "pyramid",
    "feature_info",
    "reference",
    "verdict",
    "reason",
    "differences",
    "seconds",
    "forward_seconds",
]
SHAPE = (1, 3, 64, 64)
TEST_RESNET = [
    {"name": "layer1", "channels": 32, "stride": 4},
    {"name": "layer2", "channels": 48, "stride": 8},
    {"name": "layer3", "channels": 192, "stride": 16},
    {"name": "layer4", "channels": 96, "stride": 32},
]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_taps", ROOT / "benchmarks" / "taps.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_taps"] = module
    spec.loader.exec_module(module)
    return module


def _test_resnet() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False)


def test_a_timm_model_whose_feature_info_is_the_pyramid_agrees(bench):
    row = bench.row("timm/test_resnet", _test_resnet(), SHAPE)
    assert list(row) == KEYS
    assert (row["verdict"], row["reason"], row["differences"], row["reference"]) == (
        "agree",
        None,
        [],
        "timm",
    )
    assert row["pyramid"] == TEST_RESNET
    assert row["feature_info"][1] == {"module": "layer1", "channels": 32, "stride": 4}
    assert row["seconds"] > 0 and row["forward_seconds"] > 0


def test_a_feature_info_naming_another_module_with_the_same_output_agrees(bench):
    model = _test_resnet()
    model.feature_info[1]["module"] = "layer1.0.act2"  # the block's last op: its output is the block's
    row = bench.row("timm/test_resnet", model, SHAPE)
    assert (row["verdict"], row["differences"]) == ("agree", [])


def test_a_feature_info_naming_a_module_with_other_values_differs(bench):
    model = _test_resnet()
    model.feature_info[1]["module"] = "layer1.0.bn2"  # 32 channels at stride 4, before the residual add
    row = bench.row("timm/test_resnet", model, SHAPE)
    assert row["verdict"] == "differ"
    assert row["differences"] == [
        "stride 4: featx taps `layer1.0`, timm `layer1.0.bn2`: same channels, different values in a real forward"
    ]


def test_a_feature_info_with_wrong_channels_differs(bench):
    model = _test_resnet()
    model.feature_info[3]["num_chs"] = 96  # a hand-written number that is not what the forward returns
    row = bench.row("timm/test_resnet", model, SHAPE)
    assert row["verdict"] == "differ"
    assert row["differences"] == [
        "stride 16: featx taps `layer3` (192 channels, measured); timm lists `layer3` with 96 channels"
    ]


def test_a_model_without_feature_info_has_none(bench):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1),
        nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU()),
    )
    row = bench.row("toy/convs", model, SHAPE)
    assert (row["verdict"], row["reference"], row["feature_info"], row["differences"]) == (
        "timm-has-none",
        None,
        None,
        [],
    )
    assert row["pyramid"] == [
        {"name": "0", "channels": 8, "stride": 2},
        {"name": "1", "channels": 8, "stride": 4},
        {"name": "2", "channels": 16, "stride": 8},
    ]


def test_a_model_featx_refuses_is_a_refused_row_with_its_line(bench):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4), nn.ReLU(), nn.Linear(4, 2))
    row = bench.row("toy/mlp", model, (1, 3, 8, 8))
    assert row["verdict"] == "refused"
    assert row["reason"] == (
        "`toy/mlp` returns no map of the input at any module (input [1, 3, 8, 8]): featx taps NCHW, NHWC and "
        "token maps whose size follows the input's H and W"
    )
    assert row["pyramid"] == []


def test_a_torchvision_detection_body_is_compared_at_the_strides_it_returns(bench):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None)
    body = IntermediateLayerGetter(resnet, {"layer2": "0", "layer3": "1", "layer4": "2"})
    row = bench.row("torchvision-detection/toy", body, SHAPE)
    assert (row["verdict"], row["reference"], row["differences"]) == ("agree", "torchvision", [])
    assert row["feature_info"] == [
        {"module": "layer2", "channels": 128, "stride": 8},
        {"module": "layer3", "channels": 256, "stride": 16},
        {"module": "layer4", "channels": 512, "stride": 32},
    ]


def test_discovery_observes_the_forward_on_meta_tensors():
    seen: list[str] = []

    class Record(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.device.type)
            return super().forward(x)

    model = nn.Sequential(
        Record(3, 4, 3, 2, 1), nn.Sequential(nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(4, 8, 3, 2, 1))
    )
    found = featx.taps(model, SHAPE, check=False)
    assert seen == ["meta", "meta"]  # one per input size: no kernel ran
    assert next(model.parameters()).device.type == "cpu"
    assert [(level.name, level.channels, level.stride) for level in found.pyramid] == [
        ("1.0", 4, 4),
        ("1.1", 8, 8),
    ]


def test_a_tensor_attribute_that_is_not_a_buffer_falls_back_from_meta():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, 2, 1)
            self.scale = torch.ones(1, 4, 1, 1)  # a plain attribute: stays on the CPU under meta

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) * self.scale

    model = nn.Sequential(Scaled(), nn.Sequential(nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(4, 8, 3, 2, 1)))
    found = featx.taps(model, SHAPE, check=False)
    assert [(level.name, level.channels, level.stride) for level in found.pyramid] == [
        ("1.0", 4, 4),
        ("1.1", 8, 8),
    ]
