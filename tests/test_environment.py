"""Every document featx writes records the numeric environment it was computed in (``environment``: versions,
device, dtype, threads, ...; docs/json.md), every text report ends with it in one line, and every verb takes
``--device``."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from xml.etree import ElementTree as ET

import pytest
import torch
import yaml
from safetensors import safe_open

import featx
from featx import numerics
from featx.cli import main
from featx.numerics import environment

TOY = ["examples.seed_toy:ResN", "--input-shape", "5,5"]
R18 = {"model": "torchvision/resnet18", "verify": {"input_shape": [1, 3, 32, 32], "modes": ["eval"]}}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def document(capsys, *argv: str) -> dict:
    _, out, err = run(capsys, *argv, "--json")
    assert out, err
    return json.loads(out)


def config(tmp_path, name: str = "r18.yaml", **keys: object) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**R18, "upto": "layer2", "outputs": ["layer1", "layer2"], **keys}))
    return str(path)


def assert_cpu_float32(env: dict) -> None:
    """The environment of a run on this machine's CPU in float32 eager, value by value."""
    assert env == {
        "featx": featx.__version__,
        "torch": torch.__version__,
        "torchvision": metadata.version("torchvision"),
        "timm": metadata.version("timm"),
        "python": platform.python_version(),
        "device": "cpu",
        "device_name": env["device_name"],  # the CPU's model name: the machine's own
        "dtype": "float32",
        "autocast": None,
        "compile": False,
        "channels_last": False,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "threads": torch.get_num_threads(),
    }
    assert env["device_name"]


def test_the_environment_reads_package_metadata_and_the_cpu_name_once_per_process(monkeypatch):
    # every report records it: reading them each time was 4% of a sweep of a small model at 64 px
    first = environment()
    read: list[str] = []
    version, opened = metadata.version, open

    def counted_version(package: str) -> str:
        read.append(package)
        return version(package)

    def counted_open(file, *args, **kwargs):
        read.append(str(file))
        return opened(file, *args, **kwargs)

    monkeypatch.setattr(metadata, "version", counted_version)
    monkeypatch.setattr(numerics, "open", counted_open, raising=False)
    assert environment() == environment() == first
    assert read == []
    assert_cpu_float32(first)


@pytest.mark.parametrize("verb", ["verify", "sweep", "inspect"])
def test_verify_sweep_and_inspect_json_record_the_environment_of_the_cpu_in_float32(verb, capsys):
    upto = ["--upto", "blk"] if verb == "verify" else []
    assert_cpu_float32(document(capsys, verb, *TOY, *upto)["environment"])


def test_the_report_value_carries_the_environment_its_to_dict_writes():
    report = featx.verify(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU()), 1, torch.randn(2, 3))
    assert_cpu_float32(report.environment)
    assert report.to_dict()["environment"] == report.environment


@pytest.mark.parametrize(
    "argv",
    [
        ["verify", *TOY, "--upto", "blk"],
        ["sweep", *TOY],
        ["inspect", *TOY],
        ["taps", "torchvision/resnet18", "--input-shape", "1,3,32,32", "--depth", "1", "--no-check"],
    ],
    ids=["verify", "sweep", "inspect", "taps"],
)
def test_a_text_report_says_the_environment_in_one_line_under_its_heading(argv, capsys):
    _, out, _ = run(capsys, *argv)
    lines = out.splitlines()
    threads = torch.get_num_threads()
    assert lines[1].startswith(f"environment: torch {torch.__version__}, cpu (")
    assert lines[1].endswith(f"), float32, threads {threads}")
    assert lines[2] == ""


def test_the_text_line_names_autocast_compile_and_channels_last_when_used():
    from featx.numerics import Numerics
    from featx.render.text import environment_text

    env = environment("cpu", Numerics("float32", autocast=True, compile=True, channels_last=True))
    assert ", float32, autocast bfloat16, compiled, channels-last, " in environment_text(env)


def test_check_records_the_environment_of_the_run_and_of_each_config(capsys, tmp_path):
    check = document(capsys, "check", config(tmp_path))
    assert_cpu_float32(check["environment"])
    assert_cpu_float32(check["configs"][0]["environment"])
    assert check["configs"][0]["report"]["environment"] == check["configs"][0]["environment"]


def test_a_config_that_cannot_be_checked_still_records_where_it_was_tried(capsys, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: torchvision/resnet18\nupto: nowhere\n")
    assert_cpu_float32(document(capsys, "check", str(broken))["configs"][0]["environment"])


def test_check_says_the_environment_in_its_text_markdown_and_junit_properties(capsys, tmp_path):
    junit, markdown = tmp_path / "featx.xml", tmp_path / "featx.md"
    code, out, _ = run(capsys, "check", config(tmp_path), "--junit", str(junit), "--markdown", str(markdown))
    assert code == 0
    assert out.splitlines()[1].startswith(f"environment: torch {torch.__version__}, cpu (")
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite[0].tag == "properties"  # before the test cases, as JUnit has it
    properties = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert properties == {
        key: value if isinstance(value, str) else json.dumps(value)
        for key, value in environment("cpu").items()
    }
    assert suite.find("testcase").find("properties") is None  # the config ran in the run's environment
    last = markdown.read_text().rstrip("\n").splitlines()[-1]
    assert last.startswith(f"<sub>environment: torch {torch.__version__}, cpu (") and last.endswith("</sub>")


def test_taps_json_records_the_environment(capsys):
    found = document(
        capsys, "taps", "torchvision/resnet18", "--input-shape", "1,3,32,32", "--depth", "1", "--no-check"
    )
    assert_cpu_float32(found["environment"])


def test_build_json_records_the_environment_its_dry_run_measured_in_and_its_text_says_it(capsys, tmp_path):
    built = document(capsys, "build", config(tmp_path), "--device", "cpu")
    assert_cpu_float32(built["environment"])
    _, out, _ = run(capsys, "build", config(tmp_path), "--device", "cpu")
    assert out.splitlines()[1].startswith(f"environment: torch {torch.__version__}, cpu (")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_build_takes_device_and_refuses_cuda_where_there_is_none(capsys, tmp_path):
    code, out, err = run(capsys, "build", config(tmp_path), "--device", "cuda")
    assert (code, out) == (2, "")
    assert err == "featx: error: --device `cuda`: CUDA is not available on this machine; use --device cpu\n"


def test_build_on_a_device_moves_the_backbone_and_measures_it_there(tmp_path):
    """The device reaches the built backbone: its parameters and the dry run's input are on it (the CPU here;
    on CUDA in the test below)."""
    plan = featx.resolve(config(tmp_path))
    backbone = plan.build(torch.device("cpu"))
    assert {p.device for p in backbone.parameters()} == {torch.device("cpu")}
    assert plan.to_dict()["environment"]["device"] == "cpu"


@CUDA
@pytest.mark.parametrize("verb", ["verify", "build", "taps"])
def test_on_cuda_the_environment_names_the_gpu(verb, capsys, tmp_path):
    argv = {
        "verify": ["verify", *TOY, "--upto", "blk"],
        "build": ["build", config(tmp_path)],
        "taps": ["taps", "torchvision/resnet18", "--input-shape", "1,3,32,32", "--depth", "1", "--no-check"],
    }[verb]
    env = document(capsys, *argv, "--device", "cuda:0")["environment"]
    assert (env["device"], env["device_name"]) == ("cuda:0", torch.cuda.get_device_name(0))


def test_export_records_the_environment_in_its_text_its_metadata_and_each_check_of_it(capsys, tmp_path):
    from featx.export import check_artifact

    out = tmp_path / "r18.safetensors"
    _, text, _ = run(capsys, "export", config(tmp_path), "--random-weights", "--out", str(out))
    assert text.splitlines()[1].startswith(f"environment: torch {torch.__version__}, cpu (")
    with safe_open(str(out), "pt") as f:
        assert_cpu_float32(json.loads(f.metadata()["environment"]))
    # `featx check`'s `artifacts:` run it again, as export ran it before writing (`--json` is its to_dict())
    assert_cpu_float32(check_artifact(out, featx.resolve(str(out))).to_dict()["environment"])


@pytest.mark.parametrize(
    "verb", ["verify", "sweep", "inspect", "check", "build", "export", "extract", "taps"]
)
def test_every_verb_takes_device(verb, capsys):
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    assert "--device" in capsys.readouterr().out


def test_the_pytest_plugin_reports_the_environment_as_properties_and_under_a_failure(pytester):
    folder = pytester.path / "backbones"
    folder.mkdir()
    (folder / "through_fc.yaml").write_text(yaml.safe_dump({**R18, "upto": "fc", "outputs": ["fc"]}))
    # in this process: torch is imported already (tests/test_plugin.py runs the installed entry point)
    result = pytester.runpytest(
        "--featx-configs", str(folder), "--junitxml", "junit.xml", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(failed=1)
    case = ET.parse(pytester.path / "junit.xml").getroot().find(".//testcase")
    properties = {p.get("name"): p.get("value") for p in case.find("properties")}
    assert (properties["torch"], properties["device"], properties["dtype"]) == (
        torch.__version__,
        "cpu",
        "float32",
    )
    assert f"environment: torch {torch.__version__}, cpu (" in result.stdout.str()
