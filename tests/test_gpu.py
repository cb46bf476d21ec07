"""On a CUDA device, where users run: verify in float16 autocast and compiled, the environment naming the GPU
and its TF32 flags, extract with pinned memory. Marked ``gpu``: skipped on a machine without CUDA (the
conftest), run as part of the default suite on one that has it."""

from __future__ import annotations

import json

import pytest
import torch

import featx
from examples.seed_toy import ResN
from featx.cli import main
from featx.numerics import Numerics

pytestmark = pytest.mark.gpu


def test_seed_toy_on_cuda_in_float16_autocast_still_loses_the_plus_5():
    model = ResN().cuda()
    report = featx.verify(model, "blk", torch.ones(5, 5, device="cuda"), numerics=Numerics(autocast=True))
    assert not report.faithful
    assert report.modes["eval"].max_abs_diff == pytest.approx(5.0, abs=0.01)
    assert report.environment["device"].startswith("cuda")
    assert report.environment["autocast"] == "float16"


def test_resnet18_on_cuda_in_bfloat16_is_faithful_at_layer3_with_its_float64_errors():
    report = featx.verify(
        featx.load_model("torchvision/resnet18").cuda(),
        "layer3",
        torch.rand(2, 3, 64, 64, device="cuda"),
        numerics=Numerics(dtype="bfloat16"),
    )
    assert report.faithful
    for mode in ("eval", "train"):
        numeric = report.modes[mode].numerics
        assert numeric is not None and numeric.verdict == "faithful"


def test_the_environment_names_the_gpu_and_its_tf32_flags(capsys):
    assert (
        main(
            [
                "verify",
                "torchvision/resnet18",
                "--upto",
                "layer2",
                "--input-shape",
                "1,3,64,64",
                "--device",
                "cuda",
                "--json",
            ]
        )
        == 0
    )
    env = json.loads(capsys.readouterr().out)["environment"]
    assert env["device_name"] == torch.cuda.get_device_name(0)
    assert env["tf32_cudnn"] is torch.backends.cudnn.allow_tf32
    assert env["tf32_matmul"] is torch.backends.cuda.matmul.allow_tf32


def test_a_compiled_cut_on_cuda_is_judged_against_float64():
    report = featx.verify(
        featx.load_model("torchvision/resnet18").cuda(),
        "layer2",
        torch.rand(2, 3, 64, 64, device="cuda"),
        modes=["eval"],
        numerics=Numerics(autocast=True, compile=True),
    )
    assert report.faithful
    assert report.modes["eval"].numerics.compiled
