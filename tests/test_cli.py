"""The command line: flags, exit codes, JSON on stdout, one-line errors on stderr."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import pytest
from safetensors.torch import save_file

import featx
from featx.cli import main

SMALL = ["--input-shape", "2,3,64,64"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_verify_faithful_cut_exits_0_with_a_table(capsys):
    code, out, err = run(capsys, "verify", "torchvision/resnet18", "--upto", "layer2", *SMALL)
    assert code == 0, err
    assert "cut: keeps 6 of 10 children" in out
    assert out.rstrip().splitlines()[-1].startswith("faithful: the cut at `layer2`")


def test_verify_unfaithful_cut_exits_1_and_names_the_lost_glue(capsys):
    code, out, _ = run(capsys, "verify", "torchvision/resnet18", "--upto", "fc", *SMALL, "--json")
    assert code == 1
    report = json.loads(out)
    assert report["faithful"] is False
    assert [(g["op"], g["status"]) for g in report["glue"]] == [("flatten", "lost")]
    assert report["modes"]["eval"]["error"].startswith("RuntimeError")


def test_seed_toy_from_the_command_line(capsys):
    code, out, _ = run(
        capsys, "verify", "examples.seed_toy:ResN", "--upto", "blk", "--input-shape", "5,5", "--json"
    )
    report = json.loads(out)
    assert code == 1
    # random float32 input: (x + 5 + 2) - (x + 2) is 5 up to one rounding step
    assert {m: r["max_abs_diff"] for m, r in report["modes"].items()} == pytest.approx(
        {"eval": 5.0, "train": 5.0}, abs=1e-5
    )


def test_mode_flag_limits_the_modes_and_model_kwargs_are_yaml(capsys):
    argv = ["verify", "timm/resnet18", "--upto", "fc", *SMALL, "--model-kwarg", "drop_rate=0.5", "--json"]
    code, out, _ = run(capsys, *argv, "--mode", "eval")
    assert code == 0 and list(json.loads(out)["modes"]) == ["eval"]
    code, out, _ = run(capsys, *argv, "--mode", "train")
    assert code == 1 and [g["op"] for g in json.loads(out)["glue"]] == ["dropout"]


def test_reports_name_the_model_by_the_spec_given(capsys, tmp_path):
    for command in (["verify", "--upto", "layer2"], ["sweep"], ["inspect"]):
        code, out, _ = run(capsys, command[0], "torchvision/resnet18", *command[1:], *SMALL, "--json")
        assert code == 0 and json.loads(out)["model"] == "torchvision/resnet18"
    code, out, _ = run(capsys, "verify", "torchvision/resnet18", "--upto", "layer2", *SMALL)
    assert out.startswith("featx verify  torchvision/resnet18  cut at `layer2`")
    config = tmp_path / "r18.yaml"
    config.write_text(
        json.dumps(
            {
                "model": "torchvision/resnet18",
                "upto": "layer1",
                "outputs": ["layer1"],
                "verify": {"input_shape": [2, 3, 64, 64]},
            }
        )
    )
    code, out, _ = run(capsys, "verify", str(config), "--json")
    assert code == 0 and json.loads(out)["model"] == "torchvision/resnet18"
    code, out, _ = run(capsys, "check", str(config), "--json")
    assert json.loads(out)["configs"][0]["report"]["model"] == "torchvision/resnet18"


def test_sweep_json_has_one_entry_per_cut(capsys):
    code, out, _ = run(capsys, "sweep", "torchvision/resnet18", *SMALL, "--json")
    assert code == 0
    sweep = json.loads(out)
    assert [c["upto"] for c in sweep["cuts"]][-2:] == ["avgpool", "fc"]
    assert [c["kept"] for c in sweep["cuts"]] == list(range(1, 11))
    assert [c["faithful"] for c in sweep["cuts"]] == [True] * 9 + [False]
    assert [g["op"] for g in sweep["cuts"][-1]["lost_glue"]] == ["flatten"]


def test_inspect_lists_children_glue_and_residuals(capsys):
    code, out, _ = run(capsys, "inspect", "torchvision/resnet50", *SMALL, "--json")
    assert code == 0
    anatomy = json.loads(out)
    assert len(anatomy["children"]) == 10 and len(anatomy["residuals"]) == 16
    assert [g["op"] for g in anatomy["glue"]] == ["flatten"]
    code, out, _ = run(capsys, "inspect", "torchvision/resnet50", *SMALL)
    assert "16 residuals (4 projection shortcuts)" in out


def test_weights_flag_loads_a_local_file(capsys, tmp_path):
    model = featx.load_model("torchvision/resnet18")
    path = tmp_path / "r18.safetensors"
    save_file(model.state_dict(), str(path))
    code, _, err = run(
        capsys, "verify", "torchvision/resnet18", "--upto", "layer1", *SMALL, "--weights", str(path)
    )
    assert code == 0, err


def test_console_script_shows_no_traceback_for_user_mistakes():
    result = subprocess.run(
        [sys.executable, "-m", "featx.cli", "verify", "torchvision/resnet18", "--upto", "layer9"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("featx: error: --upto `layer9`")


def test_version_answers_without_importing_torch():
    code = (
        "import sys\n"
        "from featx.cli import main\n"
        "for argv in (['--version'], ['--help'], ['verify', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as done:\n"
        "        assert done.code == 0, done.code\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[0] == f"featx {featx.__version__}"
    assert "usage: featx verify" in result.stdout
    assert result.stdout.splitlines()[-1] == "False"


def _version_with_metadata(version: str | None) -> str:
    """``featx --version`` in a fresh interpreter whose package metadata says ``version`` for featx (None:
    featx has no metadata, as in a source tree that was never installed)."""
    code = (
        "import importlib.metadata as metadata, sys\n"
        "def version(name):\n"
        f"    if name != 'featx' or {version!r} is None:\n"
        "        raise metadata.PackageNotFoundError(name)\n"
        f"    return {version!r}\n"
        "metadata.version = version\n"
        "from featx.cli import main\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, torch_imported = result.stdout.splitlines()
    assert torch_imported == "False"
    return first


def test_version_is_the_installed_distributions():
    assert featx.__version__ == importlib.metadata.version("featx")
    assert _version_with_metadata("9.8.7rc1") == "featx 9.8.7rc1"


def test_version_without_package_metadata_says_it_is_unknown():
    assert _version_with_metadata(None) == "featx 0+unknown"


def test_python_dash_m_featx_is_the_command():
    result = subprocess.run(
        [sys.executable, "-m", "featx", "--version"], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, f"featx {featx.__version__}\n", "")


def test_a_reader_that_closes_the_pipe_ends_the_run_quietly():
    # `python -m featx verify ... | head -1`: the reader is gone before featx writes (it still imports torch)
    argv = ["verify", "examples.seed_toy:ResN", "--upto", "blk", "--input-shape", "5,5"]
    process = subprocess.Popen(
        [sys.executable, "-m", "featx", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait() == 141
    assert stderr == ""
