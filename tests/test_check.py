"""``featx check``: every config and every cut it declares, one row each, in a table, JSON, JUnit XML and
Markdown; bad items are reported per item and the exit code is the worst outcome."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
import torch
import torchvision
import yaml
from safetensors.torch import save_file

import featx
from featx.checks import check_config
from featx.cli import main
from featx.render.markdown import render_markdown

BROKEN = "examples/broken/resnet50_through_fc.yaml"
SMALL = {"input_shape": [2, 3, 64, 64]}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write(path: Path, config: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
    return path


def resnet18(upto: str, outputs: list, **extra: object) -> dict:
    return {"model": "torchvision/resnet18", "upto": upto, "outputs": outputs, "verify": SMALL, **extra}


def row(table: str, config: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(config))


def test_shipped_configs_are_all_faithful(capsys):
    code, out, err = run(capsys, "check", "configs/", "--json")
    assert code == 0, err
    result = json.loads(out)
    shipped = sorted(str(p) for p in Path("configs").glob("*.yaml"))
    assert [c["config"] for c in result["configs"]] == shipped
    assert {c["outcome"] for c in result["configs"]} == {"faithful"}
    assert {c["max_abs_diff"] for c in result["configs"]} == {0.0}
    assert result["summary"] == {
        "configs": len(shipped),
        "faithful": len(shipped),
        "not_faithful": 0,
        "error": 0,
    }
    # every tap is a cut of its own: the Faster R-CNN config declares four
    fpn = next(c for c in result["configs"] if c["config"].endswith("fasterrcnn_resnet50_fpn.yaml"))
    assert [c["upto"] for c in fpn["cuts"]] == ["layer1", "layer2", "layer3", "layer4"]
    assert fpn["outputs"] == {"0": "layer1", "1": "layer2", "2": "layer3", "3": "layer4"}


def test_resnet50_through_fc_fails_with_flatten_in_table_json_junit_and_markdown(capsys, tmp_path):
    junit, markdown = tmp_path / "featx.xml", tmp_path / "featx.md"
    argv = ["check", BROKEN, "--junit", str(junit), "--markdown", str(markdown)]
    code, out, _ = run(capsys, *argv)
    assert code == 1
    line = row(out, BROKEN)
    assert "NOT faithful" in line and "`flatten` (torchvision/models/resnet.py:" in line
    assert f"{BROKEN}: at `fc`: glue `flatten` (torchvision/models/resnet.py:" in out

    code, out, _ = run(capsys, *argv, "--json")
    item = json.loads(out)["configs"][0]
    assert code == 1 and item["outcome"] == "not_faithful" and item["faithful"] is False
    assert [(g["op"], g["status"], g["before"]) for g in item["lost_glue"]] == [("flatten", "lost", "fc")]
    # the tap at layer4 is faithful, the cut at fc is not: fc is handed a 4-D tensor and raises
    assert [(c["upto"], c["faithful"]) for c in item["cuts"]] == [("layer4", True), ("fc", False)]
    assert item["cuts"][1]["modes"]["eval"]["error"].startswith("RuntimeError")
    assert item["max_abs_diff"] is None  # fc's output could not be compared
    assert item["report"]["upto"] == "fc" and item["report"]["faithful"] is False

    suite = ET.parse(junit).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("1", "1", "0")
    failure = suite.find("testcase").find("failure")
    assert "flatten" in failure.get("message") and "max abs diff n/a" in failure.get("message")
    assert "glue `flatten`" in failure.text and "is lost" in failure.text

    md = markdown.read_text()
    table_row = next(line for line in md.splitlines() if line.startswith(f"| `{BROKEN}`"))
    assert "❌ NOT faithful" in table_row and "`flatten` (torchvision/models/resnet.py:" in table_row
    assert f"### `{BROKEN}`: ❌ NOT faithful" in md
    diagram = re.search(r"```mermaid\n(.*?)```", md, re.S).group(1)
    assert re.search(r'g\d+\{\{"glue flatten · lost<br/>torchvision/models/resnet.py:\d+"\}\}', diagram)
    assert '-. "✂ cut: keeps 10 of 10" .-> output' in diagram


def test_seed_toy_config_differs_by_exactly_five(capsys, tmp_path):
    config = write(
        tmp_path / "toy.yaml",
        {
            "model": "examples.seed_toy:ResN",
            "upto": "blk",
            "outputs": ["blk"],
            "verify": {"input_shape": [5, 5]},
        },
    )
    code, out, _ = run(capsys, "check", str(config), "--json")
    item = json.loads(out)["configs"][0]
    assert code == 1
    # random float32 input: (x + 5 + 2) - (x + 2) is 5 up to one rounding step
    assert item["max_abs_diff"] == pytest.approx(5.0, abs=1e-5)
    assert [g["op"] for g in item["lost_glue"]] == ["add"]
    line = Path("examples/seed_toy.py").read_text().splitlines().index("        return x + 5") + 1
    assert (
        item["message"]
        .splitlines()[0]
        .endswith(f"max abs diff 5; lost glue: `add` (examples/seed_toy.py:{line}) before `blk`")
    )


def test_bad_items_are_reported_one_by_one_and_the_run_goes_on(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    good = write(tmp_path / "a_good.yaml", resnet18("layer2", ["layer1", "layer2"]))
    workflow = write(tmp_path / "b_workflow.yaml", {"name": "ci", "on": ["push"], "jobs": {}})
    broken_yaml = write(tmp_path / "c_broken.yaml", "model: [unclosed\n")
    unknown = write(
        tmp_path / "d_unknown.yaml", {"model": "torchvision/resnet5O", "upto": "layer1", "outputs": [0]}
    )
    cannot_run = write(
        tmp_path / "e_cannot_run.yaml", resnet18("layer2", ["layer2"], verify={"input_shape": [2, 3]})
    )
    not_faithful = write(tmp_path / "f_fc.yaml", resnet18("fc", ["fc"]))
    missing = tmp_path / "missing.yaml"
    paths = [str(empty), str(good), str(workflow), str(broken_yaml), str(unknown)]
    paths += [str(cannot_run), str(not_faithful), str(missing)]

    code, out, _ = run(capsys, "check", *paths, "--json")
    items = {Path(c["config"]).name: c for c in json.loads(out)["configs"]}
    assert code == 2  # the worst outcome: some item could not be checked
    assert list(items) == ["empty", "a_good.yaml", "b_workflow.yaml", "c_broken.yaml", "d_unknown.yaml",
                           "e_cannot_run.yaml", "f_fc.yaml", "missing.yaml"]  # fmt: skip
    outcomes = {name: c["outcome"] for name, c in items.items()}
    assert outcomes == {
        **dict.fromkeys(items, "error"),
        "a_good.yaml": "faithful",
        "f_fc.yaml": "not_faithful",
    }
    errors = {name: c["error"] for name, c in items.items()}
    assert errors["empty"] == f"folder `{empty}` holds no config files (*.yaml or *.yml)"
    assert errors["b_workflow.yaml"] == (
        "not a featx backbone config: it has none of the keys `model`, `upto`, `outputs` "
        "(it has `name`, `on`, `jobs`)"
    )
    assert errors["c_broken.yaml"].startswith(f"{broken_yaml}:2:1: not valid YAML: expected ',' or ']'")
    assert errors["d_unknown.yaml"].startswith(
        "unknown torchvision model `resnet5O` (did you mean `resnet50`"
    )
    assert errors["e_cannot_run.yaml"] == (
        "key `verify.input_shape` [2, 3] has 2 dimensions; `torchvision/resnet18` takes 4, batch included "
        "(e.g. [2, 3, 224, 224])"
    )
    assert errors["missing.yaml"] == f"`{missing}` does not exist"

    code, out, _ = run(capsys, "check", *paths)
    assert code == 2
    assert "1 of 8 configs faithful, 1 not faithful, 6 errors" in out.splitlines()
    assert row(out, str(good)).split()[3:6] == ["layer1,", "layer2", "faithful"]
    assert f"  {missing}: error: `{missing}` does not exist" in out

    code, _, _ = run(capsys, "check", str(good), str(not_faithful))
    assert code == 1  # not faithful, but everything could be checked


def test_a_path_that_is_neither_file_nor_folder_is_not_a_config(capsys):
    code, out, _ = run(capsys, "check", "/dev/null")
    assert code == 2
    assert (
        "  /dev/null: error: `/dev/null` is not a config file or folder; accepted: *.yaml or *.yml files and folders"
        in out
    )


def test_folders_are_searched_recursively_skipping_hidden_and_other_files(tmp_path):
    write(tmp_path / "nested" / "deeper" / "r18.yml", resnet18("layer1", ["layer1"]))
    write(tmp_path / "top.yaml", resnet18("layer1", ["maxpool"]))
    write(tmp_path / ".github" / "workflows" / "ci.yml", {"on": "push"})
    (tmp_path / "notes.txt").write_text("not a config")
    result = featx.check([tmp_path, tmp_path / "top.yaml"])  # the same file twice is checked once
    assert [Path(i.config).relative_to(tmp_path).as_posix() for i in result.items] == [
        "nested/deeper/r18.yml",
        "top.yaml",
    ]
    assert result.exit_code == 0
    assert [r.upto for r in result.items[1].reports] == ["maxpool", "layer1"]  # the tap, then the cut


def test_integer_outputs_are_an_error_not_a_faithful_check_of_the_stem(tmp_path):
    # as child indices, `out_indices: [0, 1, 2, 3]` would check conv1, bn1, relu, maxpool and call it faithful
    config = write(tmp_path / "c.yaml", resnet18("layer4", [0, 1, 2, 3]))
    (item,) = featx.check([config]).items
    assert item.outcome == "error" and item.reports == ()
    assert item.error.startswith("key `outputs[0]` is the integer 0; outputs are module names, not indices")


def test_no_paths_or_only_bad_flags_exit_2_with_one_line(capsys, tmp_path):
    code, out, err = run(capsys, "check")
    assert code == 2 and out == "" and err.count("\n") == 1 and "PATH" in err
    code, out, err = run(capsys, "check", "configs/", "--junit", str(tmp_path / "no" / "such" / "x.xml"))
    assert code == 2 and out == ""
    assert (
        err == f"featx: error: --junit {tmp_path}/no/such/x.xml: folder `{tmp_path}/no/such` does not exist\n"
    )
    code, _, err = run(capsys, "check", "configs/", "--markdown", str(tmp_path))
    assert code == 2 and err == f"featx: error: --markdown {tmp_path} is a folder; give a file name\n"


def test_a_config_that_cannot_build_is_an_error_even_when_its_cuts_are_faithful(tmp_path):
    frozen = write(tmp_path / "a_freeze.yaml", resnet18("layer2", ["layer2"], freeze="layer4"))
    tuple_tap = write(
        tmp_path / "b_tuple.yaml",
        {"model": "tests.toy_models:ReturnsPair", "upto": "merge", "outputs": ["split", "merge"],
         "verify": {"input_shape": [2, 3]}},
    )  # fmt: skip
    result = featx.check([tmp_path])
    assert [i.outcome for i in result.items] == ["error", "error"] and result.exit_code == 2
    assert result.items[0].error == "key `freeze` freezes through `layer4`, past the cut at `layer2`"
    assert "output `split` is not a feature map (got tuple, expected N, C, H, W)" in result.items[1].error
    assert str(frozen) == result.items[0].config and str(tuple_tap) == result.items[1].config


def test_control_characters_in_errors_never_reach_the_terminal_or_break_the_xml(capsys, tmp_path):
    config = write(
        tmp_path / "noisy.yaml",
        {
            "model": "tests.toy_models:Noisy",
            "upto": "child",
            "outputs": ["child"],
            "verify": {"input_shape": [2, 3]},
        },
    )
    junit, markdown = tmp_path / "j.xml", tmp_path / "m.md"
    code, out, _ = run(capsys, "check", str(config), "--junit", str(junit), "--markdown", str(markdown))
    assert code == 2
    assert "\x1b" not in out and "\x00" not in out
    assert "bad \\x1b[31mred\\x1b[0m thing \\x00 and \\x07 bell" in out
    error = ET.parse(junit).getroot().find("testsuite/testcase/error")
    assert "bad \\x1b[31mred" in error.text
    # in Markdown, `<stream end>` is text, not an HTML tag for GitHub to strip
    assert "&lt;stream end&gt;" in markdown.read_text() and "<stream end>" not in markdown.read_text()


def test_a_file_name_that_is_not_utf8_is_checked_and_shown_with_a_replacement_character(capsys, tmp_path):
    folder = os.fsencode(tmp_path / "configs")
    os.mkdir(folder)
    with open(os.path.join(folder, b"caf\xe9.yaml"), "w") as f:
        f.write(yaml.safe_dump(resnet18("layer1", ["layer1"])))
    junit = tmp_path / "j.xml"
    code, out, err = run(capsys, "check", str(tmp_path / "configs"), "--junit", str(junit))
    assert code == 0, err
    assert f"{tmp_path}/configs/caf\ufffd.yaml" in out
    assert ET.parse(junit).getroot().find("testsuite/testcase").get("name").endswith("caf\ufffd.yaml")


def test_reports_go_through_symlinks_and_keep_the_file_mode(capsys, tmp_path):
    config = write(tmp_path / "c.yaml", resnet18("layer1", ["layer1"]))
    target = tmp_path / "summary.md"
    target.write_text("old")
    target.chmod(0o600)
    link = tmp_path / "link.md"
    link.symlink_to(target)
    code, _, _ = run(capsys, "check", str(config), "--markdown", str(link))
    assert code == 0
    assert link.is_symlink() and target.read_text().startswith("## ✅ featx check")
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_junit_has_an_error_element_for_items_that_cannot_be_checked(capsys, tmp_path):
    good = write(tmp_path / "good.yaml", resnet18("layer1", ["layer1"]))
    bad = write(
        tmp_path / "bad.yaml", {"model": "torchvision/resnet18", "upto": "layer9", "outputs": ["layer1"]}
    )
    junit = tmp_path / "out.xml"
    code, _, _ = run(capsys, "check", str(good), str(bad), "--junit", str(junit))
    assert code == 2
    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    assert cases[str(good)].find("failure") is None and cases[str(good)].find("error") is None
    error = cases[str(bad)].find("error")
    assert error.get("type") == "error" and "key `upto`: upto `layer9`" in error.get("message")


def _check_in_a_terminal(*argv: str, columns: int = 250) -> tuple[int, str]:
    """Run ``featx check`` with stderr on a pseudo-terminal ``columns`` wide; return its exit code and what
    it drew."""
    main_fd, child_fd = pty.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "featx.cli", "check", *argv], stdout=subprocess.DEVNULL, stderr=child_fd
    )
    os.close(child_fd)
    drawn = b""
    while True:
        try:
            chunk = os.read(main_fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        drawn += chunk
    os.close(main_fd)
    return proc.wait(), drawn.decode()


def test_progress_bar_is_drawn_on_a_terminal_and_cleared(tmp_path):
    a = write(tmp_path / "a.yaml", resnet18("layer1", ["layer1"]))
    b = write(tmp_path / "b.yaml", resnet18("layer1", ["layer1"]))
    code, drawn = _check_in_a_terminal(str(tmp_path))
    assert code == 0
    # tqdm redraws in place, a carriage return before each frame; closing blanks the line and returns
    *frames, blank, end = drawn.split("\r")[1:]
    assert [re.search(r"\| (\d+/\d+) \[", f).group(1) for f in frames] == ["0/2", "1/2", "2/2"]
    assert frames[0].startswith("featx check:   0%|") and frames[2].startswith("featx check: 100%|")
    # the config being checked follows the counts; at the end there is none left to name
    assert frames[0].endswith(f", {a}]") and frames[1].endswith(f", {b}]")
    assert frames[2].endswith("]") and ".yaml" not in frames[2]
    assert all(len(f) <= 250 for f in frames)  # within the terminal's width
    assert blank.strip() == "" and len(blank) > 0 and end == ""  # nothing of the bar is left on the screen


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path):
    write(tmp_path / "a.yaml", resnet18("layer1", ["layer1"]))
    proc = subprocess.run(
        [sys.executable, "-m", "featx.cli", "check", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and proc.stderr == ""
    assert json.loads(proc.stdout)["summary"]["faithful"] == 1


def test_markdown_folds_the_faithful_configs_and_keeps_their_picture(tmp_path):
    config = write(tmp_path / "c.yaml", resnet18("layer2", {"C2": "layer1", "C3": "layer2"}))
    md = render_markdown(featx.check([config]))
    assert md.startswith("## ✅ featx check: all 1 configs faithful\n")
    assert f"<summary><code>{config}</code>: ✅ faithful, the cut</summary>" in md
    diagram = re.search(r"```mermaid\n(.*?)```", md, re.S).group(1)
    assert 'c4["4 layer1 · Sequential<br/>2 residuals · output C2"]' in diagram
    assert '  c5 -. "✂ cut: keeps 6 of 10" .-> c6' in diagram
    assert "  class c0,c1,c2,c3,c4,c5 kept" in diagram and "  class c6,c7,c8,c9 dropped" in diagram


def _ci_page_yaml(key: str) -> dict:
    """docs/ci.md's YAML example that has ``key`` at its top."""
    blocks = re.findall(r"```yaml\n(.*?)```", Path("docs/ci.md").read_text(), re.S)
    return next(doc for doc in map(yaml.safe_load, blocks) if isinstance(doc, dict) and key in doc)


def test_ci_page_github_actions_step_runs_as_written(tmp_path):
    workflow = _ci_page_yaml("jobs")
    steps = next(iter(workflow["jobs"].values()))["steps"]
    (command,) = [s["run"] for s in steps if str(s.get("run", "")).startswith("featx check")]
    write(tmp_path / "configs" / "r18.yaml", resnet18("layer2", ["layer1", "layer2"]))
    proc = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary_step = next(s for s in steps if "GITHUB_STEP_SUMMARY" in str(s.get("run", "")))
    written = re.search(r"cat (\S+) >>", summary_step["run"]).group(1)
    assert (tmp_path / written).read_text().startswith("## ✅ featx check: all 1 configs faithful")
    report = next(s for s in steps if "junit" in str(s.get("uses", "")))["with"]["report_paths"]
    assert ET.parse(tmp_path / report).getroot().find("testsuite").get("tests") == "1"


def test_ci_page_pre_commit_hook_matches_the_configs_and_runs(tmp_path):
    (hook,) = _ci_page_yaml("repos")["repos"][0]["hooks"]
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, check=True).stdout.split()
    matched = sorted(f for f in tracked if re.search(hook["files"], f))
    assert matched == sorted(str(p) for p in Path("configs").glob("*.yaml"))
    # as pre-commit runs it: the entry, then the staged files that match
    changed = write(tmp_path / "configs" / "new.yaml", resnet18("fc", ["fc"]))
    assert re.search(hook["files"], "configs/new.yaml")
    proc = subprocess.run(
        [*hook["entry"].split(), "configs/new.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1 and "`flatten`" in row(proc.stdout, "configs/new.yaml")
    assert changed.exists()


def test_an_input_shape_without_batch_names_the_config_key(tmp_path):
    write(tmp_path / "nobatch.yaml", resnet18("layer2", ["layer2"], verify={"input_shape": [3, 64, 64]}))
    (item,) = featx.check([tmp_path]).items
    assert item.outcome == "error"
    assert item.error == (
        "key `verify.input_shape` [3, 64, 64] has 3 dimensions; `torchvision/resnet18` takes 4, batch "
        "included (e.g. [2, 3, 224, 224])"
    )


def test_check_builds_each_model_once_and_loads_its_weights_once(tmp_path, backbone_calls):
    """A config's model is resolved once (``featx.backbone.resolve``): the cuts are verified on it and the
    backbone is built from its children, not from a second model with the weights read again."""
    from safetensors.torch import save_file

    weights = tmp_path / "r18.safetensors"
    save_file(
        {k: v.contiguous() for k, v in featx.load_model("torchvision/resnet18").state_dict().items()},
        str(weights),
    )
    config = write(tmp_path / "c.yaml", resnet18("layer3", ["layer2", "layer3"], weights=str(weights)))
    (item,) = featx.check([config]).items
    assert item.outcome == "faithful", item.error
    assert backbone_calls == ["build", "load"]


@pytest.mark.parametrize("bug", [TypeError("featx bug: a wrong argument"), AssertionError("featx bug")])
def test_a_bug_in_featx_propagates_instead_of_becoming_the_configs_error(capsys, tmp_path, monkeypatch, bug):
    config = write(tmp_path / "c.yaml", resnet18("layer1", ["layer1"]))

    def broken(*args: object, **kwargs: object) -> None:
        raise bug

    monkeypatch.setattr("featx.backbone.plan.plan", broken)  # an internal step of checking a config
    with pytest.raises(type(bug), match="featx bug"):
        featx.check([config])
    # the command line reports the run's failure, with the way to the traceback, and prints no table
    code, out, err = run(capsys, "check", str(config))
    assert code == 2 and out == ""
    assert err == f"featx: error: {type(bug).__name__}: {bug} (FEATX_DEBUG=1 shows the traceback)\n"


def test_a_model_torch_cannot_run_as_configured_is_the_configs_error(tmp_path):
    """What torch raises when the configured model cannot run (here: an input it cannot allocate) is a bad
    config, not a featx bug: that item is an error and the others are checked."""
    huge = write(
        tmp_path / "a_huge.yaml",
        resnet18("layer1", ["layer1"], verify={"input_shape": [4_000_000_000, 3, 224, 224]}),
    )
    good = write(tmp_path / "b_good.yaml", resnet18("layer1", ["layer1"]))
    result = featx.check([huge, good])
    assert [i.outcome for i in result.items] == ["error", "faithful"]
    assert result.items[0].error.startswith("RuntimeError: ")


def test_featx_check_returns_the_exported_check():
    from featx import Check

    assert "Check" in featx.__all__
    result = featx.check(["no_such_config.yaml"])
    assert isinstance(result, Check) and result.exit_code == 2


@pytest.mark.parametrize("keep_glue", [False, True])
def test_a_configs_cuts_in_the_json_are_the_rows_sweep_gives_the_same_cuts(tmp_path, keep_glue):
    """A cut is one shape: what `featx check --json` says of each declared cut is what `featx sweep --json`
    says of it (a tap inside a container, the cut that loses `flatten`)."""
    taps = ["layer3", "layer4"] if keep_glue else ["layer2.1", "layer4", "fc"]
    config = write(tmp_path / "c.yaml", resnet18(taps[-1], taps, keep_glue=keep_glue))
    item = featx.check([config]).items[0]
    assert item.reports, item.error
    model = featx.load_model("torchvision/resnet18")
    x = torch.randn(*SMALL["input_shape"])
    # check tells what the model's output depends on, as a sweep does when asked
    sweep = featx.sweep(
        model, x, depth=1 if keep_glue else 2, literal=True, keep_glue=keep_glue, dependence=True
    )
    rows = {c["upto"]: c for c in sweep.to_dict()["cuts"]}
    cuts = item.to_dict()["cuts"]
    assert [c["upto"] for c in cuts] == taps
    assert cuts == [rows[upto] for upto in taps]
    if not keep_glue:
        assert [g["op"] for g in cuts[-1]["lost_glue"]] == ["flatten"]


# -- the backbone as built: its taps against the full model's values with the same norm handling ----------
def built_taps(item: featx.Check, mode: str) -> dict[str, tuple[str, float, bool]]:
    taps = item.to_dict()["built"][mode]["taps"]
    return {output: (t["module"], t["max_abs_diff"], t["equal"]) for output, t in taps.items()}


@pytest.mark.parametrize("norm", ["train", "eval", "frozen"])
def test_a_frozen_backbone_is_proven_in_train_mode_with_the_norm_handling_applied_to_the_full_model(
    tmp_path, norm
):
    """``norm: eval``/``frozen`` change what the backbone returns in train mode (BN by its running stats);
    the full model run with the same handling gives exactly those values at the taps."""
    config = write(tmp_path / "c.yaml", resnet18("layer3", ["layer2", "layer3"], freeze="layer1", norm=norm))
    (item,) = featx.check([config]).items
    assert item.outcome == "faithful", item.message()
    assert list(item.to_dict()["built"]) == ["eval", "train"]
    assert built_taps(item, "train") == {"layer2": ("layer2", 0.0, True), "layer3": ("layer3", 0.0, True)}
    assert item.to_dict()["built"]["train"]["faithful"] is True


def test_a_keep_glue_backbone_is_proven_against_the_full_forward_glue_included(tmp_path):
    """The root's ``x * 2 + 1`` and dropout run before ``block``: the built backbone keeps them, so its
    tap is the full model's value at ``block``, in train mode under the same seed too."""
    config = write(
        tmp_path / "glue.yaml",
        {
            "model": "tests.toy_models:GlueBetweenConvs",
            "upto": "block",
            "outputs": {"S": "stem", "B": "block"},
            "keep_glue": True,
            "verify": {"input_shape": [2, 3, 8, 8]},
        },
    )
    (item,) = featx.check([config]).items
    assert item.outcome == "faithful", item.message()
    assert built_taps(item, "eval") == {"S": ("stem", 0.0, True), "B": ("block", 0.0, True)}
    assert built_taps(item, "train") == {"S": ("stem", 0.0, True), "B": ("block", 0.0, True)}


def test_an_fpn_backbone_is_proven_at_its_taps_the_body_before_the_fpn(tmp_path):
    config = write(
        tmp_path / "fpn.yaml",
        resnet18("layer3", {"C3": "layer2", "C4": "layer3"}, norm="frozen", fpn={"out_channels": 8}),
    )
    (item,) = featx.check([config]).items
    assert item.outcome == "faithful", item.message()
    assert item.fpn == "random"
    assert built_taps(item, "train") == {"C3": ("layer2", 0.0, True), "C4": ("layer3", 0.0, True)}


def test_a_built_backbone_whose_tap_differs_from_the_full_model_fails_naming_tap_mode_and_diff(
    capsys, tmp_path
):
    """``norm: frozen`` leaves a BatchNorm subclass as it is, so in train mode it normalises by the batch
    where the config asks for its running statistics: the cut is faithful, the backbone built is not."""
    config = write(
        tmp_path / "own.yaml",
        {
            "model": "tests.toy_models:WithOwnNorm",
            "upto": "norm",
            "outputs": {"P": "norm"},
            "norm": "frozen",
            "verify": {"input_shape": [2, 3, 8, 8]},
        },
    )
    (item,) = featx.check([config]).items
    assert item.outcome == "not_faithful"
    assert all(r.faithful for r in item.reports)  # the plain cut is faithful
    built = item.to_dict()["built"]
    assert built["eval"]["faithful"] is True and built["train"]["faithful"] is False
    diff = built["train"]["max_abs_diff"]
    assert diff > 0.1
    assert item.reasons == (
        "the built backbone's tap `P` (`norm`) differs in train mode from the full model's value with the "
        f"same norm handling (`norm: frozen`, frozen modules in eval): max abs diff {diff:.6g}",
    )
    assert item.message().splitlines()[0] == (
        f"{config}: `tests.toy_models:WithOwnNorm` cut at `norm` is faithful, but the backbone the config "
        f"builds is not (train); max abs diff {diff:.6g}"
    )
    junit, markdown = tmp_path / "featx.xml", tmp_path / "featx.md"
    code, out, _ = run(capsys, "check", str(config), "--junit", str(junit), "--markdown", str(markdown))
    assert code == 1
    assert "NOT faithful" in row(out, str(config)) and "DIFFERS in train" in row(out, str(config))
    case = ET.parse(junit).getroot().find("testsuite").find("testcase")
    # the toy is a new random init on each run: the difference is not the same number twice
    assert re.fullmatch(
        rf"{re.escape(str(config))}: .* is faithful, but the backbone the config builds is not \(train\); "
        r"max abs diff [0-9.]+",
        case.find("failure").get("message"),
    )
    assert re.search(r"train +P +norm +[0-9.]+ +DIFFERS", case.find("system-out").text)
    assert "DIFFERS in train" in next(ln for ln in markdown.read_text().splitlines() if ln.startswith("| `"))


def test_weights_override_each_configs_weights(tmp_path):
    from safetensors.torch import save_file

    config = write(tmp_path / "c.yaml", resnet18("layer2", ["layer2"]))  # `weights` not set: random init
    missing = tmp_path / "missing.safetensors"
    (item,) = featx.check([config], weights=str(missing)).items
    assert item.outcome == "error" and str(missing) in item.error

    weights = tmp_path / "r18.safetensors"
    save_file(
        {k: v.contiguous() for k, v in featx.load_model("torchvision/resnet18").state_dict().items()},
        str(weights),
    )
    (item,) = featx.check([config], weights=str(weights)).items
    assert item.outcome == "faithful", item.message()


def test_a_config_without_weights_is_checked_on_the_same_seeded_init_every_time(tmp_path):
    config = write(
        tmp_path / "lost.yaml",
        {"model": "tests.toy_models:DoublesBetween", "upto": "b", "verify": {"input_shape": [2, 4]}},
    )
    diffs = set()
    for rng in (1, 2):
        torch.manual_seed(rng)  # the caller's RNG does not decide the model's init; `seed` does
        item = check_config(config, seed=0)
        assert item.outcome == "not_faithful"
        diffs.add(item.to_dict()["max_abs_diff"])
    assert len(diffs) == 1 and diffs != {0.0}
    assert check_config(config, seed=1).to_dict()["max_abs_diff"] not in diffs


def test_frozen_norms_with_real_running_statistics_are_proven_as_built(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    for module in model.modules():  # trained statistics, not the init's mean 0 and variance 1
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    weights = tmp_path / "r18.safetensors"
    save_file(model.state_dict(), str(weights))
    config = write(
        tmp_path / "frozen.yaml",
        {
            "model": "torchvision/resnet18",
            "weights": "r18.safetensors",
            "upto": "layer2",
            "outputs": ["layer1", "layer2"],
            "norm": "frozen",
            "verify": {"input_shape": [1, 3, 64, 64]},
        },
    )
    item = check_config(config)
    assert item.outcome == "faithful", item.message()
    assert all(mode.faithful for mode in item.built)
