"""The pytest plugin (``pytest --featx-configs DIR``) and ``featx.testing.assert_faithful``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from examples.seed_toy import ResN
from featx.testing import assert_faithful

SMALL = {"input_shape": [2, 3, 64, 64]}


def configs(folder: Path, **configs: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, config in configs.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return folder


def resnet18(upto: str, outputs: list) -> dict:
    return {"model": "torchvision/resnet18", "upto": upto, "outputs": outputs, "verify": SMALL}


def test_one_item_per_config_passing_or_failing_with_the_lost_glue_and_max_diff(pytester):
    folder = configs(
        pytester.path / "backbones",
        c4=resnet18("layer3", ["layer3"]),
        through_fc=resnet18("fc", ["fc"]),
    )
    # a subprocess: the plugin must come from the installed `pytest11` entry point, nothing else
    result = pytester.runpytest_subprocess("--featx-configs", str(folder), "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*backbones/c4.yaml::faithful PASSED*",
            "*backbones/through_fc.yaml::faithful FAILED*",
        ]
    )
    out = result.stdout.str()
    assert "collected 2 items" in out
    failure = out[out.index("= FAILURES =") :]
    assert re.search(
        r"through_fc\.yaml: `torchvision/resnet18` cut at `fc` \(checked at `fc`\) is NOT faithful; "
        r"max abs diff n/a; lost glue: `flatten` \(torchvision/models/resnet\.py:\d+\) before `fc`",
        failure,
    )
    assert "  - glue `flatten` (torchvision/models/resnet.py:" in failure
    assert "Traceback" not in failure and "raise ConfigNotFaithful" not in failure


def test_items_can_be_selected_with_k_and_m(pytester):
    folder = configs(pytester.path / "c", good=resnet18("layer1", ["layer1"]), bad=resnet18("fc", ["fc"]))
    pytester.makepyfile(test_other="def test_other():\n    pass\n")
    args = ["--featx-configs", str(folder), "-p", "no:cacheprovider"]
    pytester.runpytest_subprocess(*args, "-k", "good").assert_outcomes(passed=1, deselected=2)
    pytester.runpytest_subprocess(*args, "-m", "featx").assert_outcomes(passed=1, failed=1, deselected=1)
    pytester.runpytest_subprocess(*args, "-m", "not featx").assert_outcomes(passed=1, deselected=2)


def test_an_empty_folder_and_a_broken_config_are_failing_items(pytester):
    empty = pytester.path / "empty"
    empty.mkdir()
    broken = configs(
        pytester.path / "broken", unknown={"model": "torchvision/resnet18", "upto": "layer9", "outputs": [0]}
    )
    result = pytester.runpytest_subprocess(
        "--featx-configs", str(empty), "--featx-configs", str(broken), "-p", "no:cacheprovider"
    )
    result.assert_outcomes(failed=2)
    out = result.stdout.str()
    assert f"cannot be checked: folder `{empty}` holds no config files (*.yaml or *.yml)" in out
    assert "unknown.yaml: cannot be checked: " in out and "key `upto`: upto `layer9`" in out


def test_configs_outside_the_rootdir_with_the_same_name_get_distinct_ids(pytester, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    first = configs(outside / "a", c=resnet18("layer1", ["layer1"]))
    second = configs(outside / "b", c=resnet18("fc", ["fc"]))
    rootdir = pytester.mkdir("project") / "deeper"
    rootdir.mkdir()
    result = pytester.runpytest_subprocess(
        "--featx-configs", str(first), "--featx-configs", str(second), "--rootdir", str(rootdir), "-v",
        "-p", "no:cacheprovider",
    )  # fmt: skip
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*/outside*/a/c.yaml::faithful PASSED*", "*/outside*/b/c.yaml::faithful FAILED*"]
    )


def test_without_the_option_the_plugin_adds_no_items_and_imports_no_torch(pytester):
    pytester.makepyfile(
        test_plain="""
        import sys

        def test_plain():
            assert "torch" not in sys.modules and "featx.checks" not in sys.modules
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    help_text = pytester.runpytest_subprocess("--help").stdout.str()
    assert "--featx-configs=DIR" in help_text


def test_assert_faithful_returns_the_report_for_a_faithful_cut():
    model = torchvision.models.resnet18()
    report = assert_faithful(model, "layer2", torch.randn(2, 3, 64, 64))
    assert report.faithful and report.upto == "layer2" and report.kept == 6


def test_assert_faithful_names_the_lost_glue_and_the_max_diff():
    line = Path("examples/seed_toy.py").read_text().splitlines().index("        return x + 5") + 1
    with pytest.raises(AssertionError) as info:
        assert_faithful(ResN(), "blk", torch.ones(5, 5))
    message = str(info.value)
    # on ones the full model gives 8 and the Sequential 3: exactly 5 apart
    assert message.splitlines()[0] == (
        "cut at `blk` of examples.seed_toy.ResN is NOT faithful (max abs diff: eval 5, train 5)"
    )
    assert (
        f"  - glue `add` (examples/seed_toy.py:{line}) runs before `blk` in the full model and is lost"
        in message
    )
    assert "NOT faithful: the cut at `blk` does not match the full model" in message  # the verify table


def test_assert_faithful_passes_tolerances_and_modes_through():
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(AssertionError, match="max abs diff: eval n/a"):
        assert_faithful(model, "fc", x, modes=["eval"])
    with pytest.raises(AssertionError, match=r"is NOT faithful \(max abs diff: train 5\)"):
        assert_faithful(ResN(), "blk", torch.ones(5, 5), modes=["train"], atol=4.9)
    assert assert_faithful(ResN(), "blk", torch.ones(5, 5), atol=5.0).faithful


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_said_as_the_command_line_says_it(pytester):
    folder = configs(pytester.path / "c", good=resnet18("layer1", ["layer1"]))
    result = pytester.runpytest_subprocess(
        "--featx-configs", str(folder), "--featx-device", "cuda", "-p", "no:cacheprovider"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert (
        "--featx-device `cuda`: CUDA is not available on this machine; use --featx-device cpu"
        in result.stderr.str()
    )
    assert "Traceback" not in result.stderr.str() + result.stdout.str()


def test_assert_faithful_takes_a_config_and_returns_its_check(tmp_path):
    folder = configs(tmp_path, c3=resnet18("layer3", ["layer2", "layer3"]))
    result = assert_faithful(folder / "c3.yaml")
    assert result.faithful and result.upto == "layer3"
    assert [r.upto for r in result.reports] == ["layer2", "layer3"]


def test_assert_faithful_on_a_config_names_what_failed_as_featx_check_does(tmp_path):
    folder = configs(tmp_path, through_fc=resnet18("fc", ["fc"]))
    with pytest.raises(AssertionError) as info:
        assert_faithful(str(folder / "through_fc.yaml"))
    assert re.match(
        r".*through_fc\.yaml: `torchvision/resnet18` cut at `fc` \(checked at `fc`\) is NOT faithful; "
        r"max abs diff n/a; lost glue: `flatten` \(torchvision/models/resnet\.py:\d+\) before `fc`",
        str(info.value),
    )


def test_assert_faithful_on_a_config_refuses_the_settings_the_config_declares(tmp_path):
    from featx.errors import FeatxError

    config = configs(tmp_path, c3=resnet18("layer3", ["layer3"])) / "c3.yaml"
    with pytest.raises(FeatxError) as info:
        assert_faithful(config, "layer2", atol=1e-3)
    assert str(info.value) == (
        f"assert_faithful({str(config)!r}): the config declares its cut and check settings; drop `upto`, "
        "`atol` (or edit the config)"
    )
