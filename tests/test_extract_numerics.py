"""featx extract in a numeric setting: --compile and --autocast --channels-last give float32's features within
their tolerance, and every store records the numeric environment that computed it; a resume accepts another
thread count and refuses what changes the numbers.

The dataset and the seeded CNN are in tests/extract_support.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import featx
from featx.cli import main
from featx.errors import FeatxError
from featx.numerics import Numerics, environment
from tests.extract_support import cli, run


def _rows(out: Path, name: str) -> torch.Tensor:
    return featx.open_features(out).tensor(name).float()


@pytest.mark.slow  # torch.compile on CPU: a C++ build of the tiny net, twice (a shard's smaller last batch)
def test_compile_extracts_the_eager_features_within_float32_tolerance(
    data: Path, weights: Path, tmp_path: Path
) -> None:
    run(data, tmp_path / "eager", weights)
    compiled = run(data, tmp_path / "compiled", weights, compile=True)
    assert compiled.environment["compile"] is True
    rtol, atol = Numerics(compile=True).tolerance(torch.device("cpu"))  # float32's: assert_close's
    for name in ("act", "block"):
        torch.testing.assert_close(
            _rows(tmp_path / "compiled", name), _rows(tmp_path / "eager", name), rtol=rtol, atol=atol
        )


def test_autocast_channels_last_features_are_at_cosine_0999_of_float32_on_resnet18(
    images: Path, tmp_path: Path
) -> None:
    options = {"upto": "layer4", "pool": "avg", "random_weights": True, "workers": 0, "progress": False}
    featx.extract("torchvision/resnet18", images, tmp_path / "fp32", **options)
    low = featx.extract(
        "torchvision/resnet18", images, tmp_path / "bf16", autocast=True, channels_last=True, **options
    )
    assert (low.environment["autocast"], low.environment["channels_last"]) == ("bfloat16", True)
    fp32, bf16 = _rows(tmp_path / "fp32", "layer4"), _rows(tmp_path / "bf16", "layer4")
    assert not torch.equal(fp32, bf16)  # autocast ran: bfloat16 rounds
    assert torch.nn.functional.cosine_similarity(fp32, bf16, dim=1).min() >= 0.999


def test_the_manifest_each_done_marker_and_the_fingerprint_file_record_the_numeric_environment(
    data: Path, weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = run(data, out, weights, channels_last=True)
    expected = environment(torch.device("cpu"), Numerics(channels_last=True))
    assert result.environment == expected
    assert result.to_dict()["environment"] == expected
    assert json.loads((out / "manifest.json").read_text())["environment"] == expected
    assert json.loads((out / "shard-00000.done").read_text())["environment"] == expected
    assert json.loads((out / "fingerprint.json").read_text())["environment"] == expected


def test_a_store_resumes_under_another_thread_count_and_each_shard_records_its_own(
    data: Path, weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    run(data, out, weights)
    (out / "shard-00001.done").unlink()
    torch.set_num_threads(threads + 1)
    try:
        again = run(data, out, weights)
    finally:
        torch.set_num_threads(threads)
    assert (again.computed, again.resumed) == (1, 3)
    assert json.loads((out / "fingerprint.json").read_text())["environment"]["threads"] == threads
    assert json.loads((out / "shard-00000.done").read_text())["environment"]["threads"] == threads
    assert json.loads((out / "shard-00001.done").read_text())["environment"]["threads"] == threads + 1
    assert json.loads((out / "manifest.json").read_text())["environment"]["threads"] == threads + 1


def test_a_store_started_with_another_timm_version_is_not_resumed(
    data: Path, weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run(data, out, weights)
    recorded = json.loads((out / "fingerprint.json").read_text())
    recorded["environment"]["timm"] = "0.0.1"
    (out / "fingerprint.json").write_text(json.dumps(recorded))
    with pytest.raises(FeatxError) as refused:
        run(data, out, weights)
    assert str(refused.value) == (
        f"--out `{out}` was extracted with timm 0.0.1 and this run has timm {environment()['timm']}, which can "
        "change the features; pass --overwrite to start over, choose another --out, or resume with the "
        "versions it was started with"
    )


@pytest.mark.parametrize(("flag", "key"), [("--compile", "compile"), ("--autocast", "autocast")])
def test_a_store_is_not_resumed_in_another_numeric_setting(
    flag: str, key: str, data: Path, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    run(data, out, weights)
    assert main([*cli(data, out, weights), flag]) == 2
    assert capsys.readouterr().err == (
        f"featx: error: --out `{out}` holds another extraction (its fingerprint differs in `{key}`); "
        "pass --overwrite to start over, or choose another --out\n"
    )


def test_a_storage_dtype_is_read_by_the_one_dtype_parser(data: Path, weights: Path, tmp_path: Path) -> None:
    result = run(data, tmp_path / "out", weights, dtype={"act": "bf16"})
    assert result.outputs["act"]["dtype"] == "bfloat16"
    with pytest.raises(FeatxError) as refused:
        run(data, tmp_path / "other", weights, dtype={"block": "float64"})
    assert str(refused.value) == (
        "--dtype (output `block`) 'float64' is not a dtype featx runs in; accepted: `float32`, `bfloat16`, `float16`"
    )


def test_a_device_torch_does_not_know_is_one_line_from_the_library_too(
    data: Path, weights: Path, tmp_path: Path
) -> None:
    with pytest.raises(FeatxError) as caught:
        run(data, tmp_path / "out", weights, device="gpu")
    assert str(caught.value) == "--device `gpu` is not a torch device; accepted: cpu, cuda, cuda:N, mps"
