"""verify, sweep and check in a numeric setting other than float32 eager (``featx.numeric_check``): the
full model and the cut run the same way in bfloat16 / float16 / autocast / compiled, compared within the
dtype's tolerance and against float64; lost glue is still found, a glue below the dtype's resolution is
said to be so, and faithful cuts pass with their tolerance and float64 errors reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import featx
from examples.seed_toy import ResN
from featx.cli import main
from featx.numerics import Numerics
from featx.verification import sweep, verify

BF16_AUTOCAST = Numerics(autocast=True)
BF16 = Numerics(dtype="bfloat16")
SMALL = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
ONE = SMALL[:1]  # eval only: a batch of one is enough, and bfloat16 convolutions are slow on a CPU


class TinyGlue(nn.Module):
    """Adds 1e-4 between two children to values near 100: float32 sees it, bfloat16 (8 bits of mantissa,
    a step of 0.5 at 100) cannot."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Identity()
        with torch.no_grad():
            self.a.weight.copy_(torch.eye(4))
            self.a.bias.fill_(100.0)

    def forward(self, x):
        return self.b(self.a(x) + 1e-4)


def _numerics(report: featx.Report, mode: str) -> dict[str, object]:
    return report.to_dict()["modes"][mode]["numerics"]  # type: ignore[index]


def test_default_setting_reports_no_numeric_comparison_and_the_float32_setting():
    report = verify(ResN(), "blk", torch.ones(5, 5))
    assert report.to_dict()["numerics"] == {
        "dtype": "float32",
        "autocast": False,
        "compile": False,
        "channels_last": False,
    }
    assert report.to_dict()["modes"]["eval"]["numerics"] is None


def test_seed_toy_lost_add_is_found_at_bfloat16_autocast():
    report = verify(ResN(), "blk", torch.ones(5, 5), numerics=BF16_AUTOCAST)
    assert not report.faithful
    assert report.reasons[0].endswith("seed_toy.py:28) runs before `blk` in the full model and is lost")
    found = _numerics(report, "eval")
    assert found["verdict"] == "differs"
    assert found["tolerance"] == {"rtol": 1.6e-2, "atol": 1e-5}
    assert found["model_error"] == 0.0  # 8 is exact in bfloat16
    assert found["float64_max_abs_diff"] == 5.0
    assert report.to_dict()["numerics"]["autocast"] is True


def test_planted_glue_below_bfloat16_resolution_is_said_so_not_faithful():
    x = torch.zeros(2, 4)
    report = verify(TinyGlue(), "b", x, numerics=BF16)
    assert not report.faithful
    mode = report.to_dict()["modes"]["eval"]
    assert mode["equal"] is True  # bfloat16 cannot tell them apart
    assert mode["numerics"]["verdict"] == "below_resolution"
    assert mode["numerics"]["float64_max_abs_diff"] == pytest.approx(1e-4)
    assert "below what bfloat16 can show" in report.reasons[-1]


def test_planted_glue_below_bfloat16_resolution_is_lost_at_float32():
    report = verify(TinyGlue(), "b", torch.zeros(2, 4))
    assert not report.faithful
    assert report.modes["eval"].max_abs_diff == pytest.approx(1e-4, rel=0.1)
    assert "runs before `b` in the full model and is lost" in report.reasons[0]


def test_user_model_stays_float32_and_contiguous():
    model = torchvision.models.resnet18()
    verify(model, "layer1", ONE, numerics=Numerics(dtype="bfloat16", channels_last=True), modes="eval")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.conv1.weight.is_contiguous()


def test_torchvision_resnet18_faithful_at_bfloat16_autocast_with_tolerance_and_float64_errors():
    report = verify(torchvision.models.resnet18(), "layer4", SMALL, numerics=BF16_AUTOCAST)
    assert report.faithful, report.reasons
    for mode in ("eval", "train"):
        found = _numerics(report, mode)
        assert found["verdict"] == "faithful"
        assert found["tolerance"] == {"rtol": 1.6e-2, "atol": 1e-5}
        assert found["float64_max_abs_diff"] == 0.0
        # the cut runs the very ops the full model ran: the same error against float64, and not none
        assert found["cut_error"] == found["model_error"] > 0


def test_torchvision_resnet18_lost_flatten_is_found_at_bfloat16():
    report = verify(torchvision.models.resnet18(), "fc", ONE, numerics=BF16, modes="eval")
    assert not report.faithful
    assert report.reasons[0].startswith("glue `flatten` (torchvision/models/resnet.py:")
    assert _numerics(report, "eval")["verdict"] == "differs"


def test_timm_resnet_train_mode_dropout_is_found_at_bfloat16_autocast():
    import timm

    model = timm.create_model("resnet18", drop_rate=0.5)
    report = verify(model, "fc", SMALL, numerics=BF16_AUTOCAST)
    assert not report.faithful
    assert report.reasons[0].startswith("glue `dropout` (timm/models/resnet.py:")
    assert _numerics(report, "eval")["verdict"] == "faithful"
    assert _numerics(report, "train")["verdict"] == "differs"


def test_vit_with_keep_glue_is_faithful_at_bfloat16():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2)
    report = verify(model, "blocks", SMALL, keep_glue=True, numerics=BF16)
    assert report.faithful, report.reasons
    assert _numerics(report, "train")["verdict"] == "faithful"


def test_float16_runs_on_cpu_with_its_tolerance():
    report = verify(
        torchvision.models.resnet18(), "layer1", ONE, numerics=Numerics(dtype="float16"), modes="eval"
    )
    assert report.faithful, report.reasons
    assert _numerics(report, "eval")["tolerance"] == {"rtol": 1e-3, "atol": 1e-5}


class Spectral(nn.Module):
    def forward(self, x):
        return torch.fft.fft(x).abs()  # no float16 kernel on the CPU


def test_an_op_without_a_float16_cpu_kernel_is_refused_in_one_line():
    model = nn.Sequential(Spectral(), nn.Linear(4, 4))
    with pytest.raises(featx.FeatxError) as raised:
        verify(model, 1, torch.randn(2, 4), numerics=Numerics(dtype="float16"))
    assert str(raised.value) == (
        "the full model's forward raised in `0` in eval mode before any child returned: NotImplementedError: "
        "Unsupported dtype Half; check the input shape, or run in another dtype than float16"
    )


def test_sweep_in_bfloat16_finds_the_lost_flatten_and_passes_the_rest():
    result = sweep(torchvision.models.resnet18(), ONE, numerics=BF16, modes="eval")
    verdicts = {c.upto: c.faithful for c in result.cuts}
    assert [u for u, ok in verdicts.items() if not ok] == ["fc"]
    assert result.to_dict()["numerics"]["dtype"] == "bfloat16"
    assert result.cuts[0].modes["eval"].numerics is not None


@pytest.mark.slow
def test_seed_toy_lost_add_is_found_compiled():
    report = verify(ResN(), "blk", torch.ones(5, 5), numerics=Numerics(autocast=True, compile=True))
    assert not report.faithful
    found = _numerics(report, "train")
    assert found["compiled"] is True
    assert found["verdict"] == "differs"


@pytest.mark.slow
def test_timm_resnet_train_mode_dropout_is_found_compiled():
    import timm

    model = timm.create_model("resnet18", drop_rate=0.5)
    report = verify(model, "fc", SMALL, numerics=Numerics(autocast=True, compile=True))
    assert not report.faithful
    assert report.reasons[0].startswith("glue `dropout` (timm/models/resnet.py:")
    assert [_numerics(report, m)["verdict"] for m in ("eval", "train")] == ["faithful", "differs"]
    assert _numerics(report, "train")["compiled"] is True


@pytest.mark.slow
def test_compiled_vit_keep_glue_cut_is_faithful_at_bfloat16():
    # compiled and eager bfloat16 outputs part by more than one op's tolerance here; float64 judges the cut
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2)
    numerics = Numerics(dtype="bfloat16", compile=True)
    report = verify(model, "blocks", SMALL, keep_glue=True, numerics=numerics, modes="eval")
    assert report.faithful, report.reasons
    found = _numerics(report, "eval")
    assert found["compiled"] is True
    assert found["cut_relative_error"] <= 2 * max(
        found["model_relative_error"], torch.finfo(torch.bfloat16).eps
    )


def test_compiled_keep_glue_module_is_proven():
    report = verify(
        TinyGlue(), "b", torch.zeros(2, 4), keep_glue=True, numerics=Numerics(compile=True), modes="eval"
    )
    assert report.faithful, report.reasons
    assert _numerics(report, "eval")["compiled"] is True


def test_cli_verify_dtype_json(capsys):
    args = ["--upto", "fc", "--input-shape", "1,3,32,32", "--mode", "eval", "--dtype", "bf16", "--json"]
    code = main(["verify", "torchvision/resnet18", *args])
    out = json.loads(capsys.readouterr().out)
    assert code == 1
    assert out["numerics"] == {
        "dtype": "bfloat16",
        "autocast": False,
        "compile": False,
        "channels_last": False,
    }
    assert out["modes"]["eval"]["numerics"]["verdict"] == "differs"


def _config(tmp_path: Path, numerics: dict[str, object]) -> Path:
    path = tmp_path / "r18.yaml"
    path.write_text(
        "model: torchvision/resnet18\nupto: layer2\n"
        "verify: {input_shape: [1, 3, 32, 32], modes: [eval]}\n"
        f"numerics: {json.dumps(numerics)}\n"
    )
    return path


def test_check_reads_a_config_numerics_section(tmp_path):
    result = featx.check([str(_config(tmp_path, {"dtype": "bf16"}))])
    item = result.items[0]
    assert item.outcome == "faithful", item.message
    assert item.reports[0].modes["eval"].numerics.dtype == "bfloat16"  # type: ignore[union-attr]


def test_dtype_flag_overrides_the_config_key(tmp_path, capsys):
    code = main(["verify", str(_config(tmp_path, {"dtype": "bf16"})), "--dtype", "float16", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["numerics"]["dtype"] == "float16"


def test_check_records_the_setting_of_its_flags_and_of_each_config(tmp_path, capsys):
    config = _config(tmp_path, {"dtype": "bf16"})
    assert main(["check", str(config), "--autocast", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["environment"]["dtype"] == "float32" and out["environment"]["autocast"] == "bfloat16"
    assert out["configs"][0]["environment"]["dtype"] == "bfloat16"
    assert out["configs"][0]["environment"]["autocast"] == "bfloat16"


class _NoFloat64(nn.Module):
    """A kernel with no float64 version: the float64 reference cannot be made."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float64:
            raise RuntimeError("kernel has no float64")
        return x * 2


class _ThroughNoFloat64(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), _NoFloat64(), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)))


def test_a_model_without_a_float64_run_is_not_faithful_and_says_why():
    torch.manual_seed(0)
    report = featx.verify(
        _ThroughNoFloat64(), "b", torch.randn(2, 4), numerics=Numerics(dtype="bfloat16"), modes=["eval"]
    )
    assert not report.faithful
    assert report.modes["eval"].numerics.verdict == "no_float64"
    assert report.reasons == (
        "in eval mode the model or the cut does not run in float64, so there is no float64 reference to judge by",
    )
    assert "no float64" in str(report)


def test_cpu_autocast_computes_float16_parameters_in_bfloat16_and_takes_its_tolerance():
    numerics = Numerics(dtype="float16", autocast=True)
    with numerics.running(torch.device("cpu")):
        out = nn.Linear(4, 4).half()(torch.ones(2, 4, dtype=torch.float16))
    assert out.dtype == numerics.compute_dtype(torch.device("cpu")) == torch.bfloat16
    assert numerics.tolerance(torch.device("cpu")) == (1.6e-2, 1e-5)


def test_a_torch_dtype_is_read_as_its_name():
    assert Numerics(dtype=torch.bfloat16) == Numerics(dtype="bfloat16")
