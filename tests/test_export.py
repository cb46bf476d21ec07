"""``featx export``: safetensors, ONNX and pt2 artifacts of a config's backbone (FPN included), each run
against the PyTorch backbone before it is written; loading exports back; ``featx check`` on artifacts."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
import torch
import torchvision
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

import featx
from featx import FeatxError
from featx.artifact_metadata import CHECK_SIZES
from featx.cli import main
from featx.errors import FeatxWarning
from featx.export import TOLERANCES, ArtifactMismatch, check_artifact, export

SMALL = {"input_shape": [1, 3, 64, 64], "modes": ["eval"]}


class Tiny(nn.Module):
    """Three children, no glue: a backbone whose exports take a second."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.stage = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x):
        return self.stage(self.act(self.stem(x)))


class Gate(nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # data-dependent control flow: no exporter can trace it
            return x * 2
        return x


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


class EvenWidth(nn.Module):
    def forward(self, x):
        return x + 1 if x.shape[-1] % 2 == 0 else x  # a Python branch on a size: the trace specialises it


class Specialised(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.even = EvenWidth()

    def forward(self, x):
        return self.even(self.conv(x))


class OffWhereSmall(nn.Module):
    """1000 in the first row, 0 elsewhere; run eagerly (the PyTorch backbone, not the exported graph) it adds
    0.001 everywhere: off by 0.001 at elements of magnitude 0, within 1e-5 + 1e-5 * |b| at 1000 only."""

    def forward(self, x):
        y = torch.nn.functional.pad(torch.zeros_like(x[:, :1, 1:]), (0, 0, 1, 0), value=1000.0)
        if not torch.compiler.is_exporting():
            y = y + 0.001
        return y


class SmallOff(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.off = OffWhereSmall()

    def forward(self, x):
        return self.off(x)


SMALL_OFF = {"model": "tests.test_export:SmallOff", "upto": "off", "outputs": ["off"], "verify": SMALL}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def seeded(tmp_path: Path, spec: str = "torchvision/resnet18", seed: int = 0, name: str = "w") -> Path:
    torch.manual_seed(seed)
    model = featx.load_model(spec)
    path = tmp_path / f"{name}.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def write(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def tiny_config(tmp_path: Path, **extra: object) -> Path:
    weights = seeded(tmp_path, "tests.test_export:Tiny")
    config = {
        "model": "tests.test_export:Tiny",
        "weights": weights.name,  # relative: to the config's folder
        "upto": "stage",
        "outputs": {"s2": "stage", "s1": "act"},  # not the children's order
        "verify": SMALL,
        **extra,
    }
    return write(tmp_path / "tiny.yaml", config)


def test_onnx_export_returns_the_taps_in_config_order_named_with_dynamic_batch_height_width(tmp_path, capsys):
    import onnx
    import onnxruntime

    weights = seeded(tmp_path)
    config = write(
        tmp_path / "r18.yaml",
        {
            "model": "torchvision/resnet18",
            "weights": str(weights),
            "upto": "layer2",
            "outputs": {"c3": "layer2", "c2": "layer1"},
            "norm": "frozen",
            "verify": SMALL,
        },
    )
    out = tmp_path / "r18.onnx"
    code, stdout, err = run(capsys, "export", config, "--format", "onnx", "--out", out)
    assert code == 0, err
    assert err == ""  # the exporter's chatter is not shown
    for batch, h, w in CHECK_SIZES:  # every check shape and output is a row of the printed table
        for name in ("c3", "c2"):
            assert any(
                line.startswith(f"{batch}x3x{h}x{w}") and f" {name} " in line for line in stdout.splitlines()
            )
    assert "matches the PyTorch backbone within atol 0.001, rtol 0.0001" in stdout

    model = onnx.load(str(out))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["featx_version"] == featx.__version__
    assert (props["source_model"], props["upto"], props["featx_format"]) == (
        "torchvision/resnet18",
        "layer2",
        "onnx",
    )
    assert json.loads(props["output_names"]) == ["c3", "c2"]
    assert json.loads(props["channels"]) == {"c3": 128, "c2": 64}
    assert json.loads(props["strides"]) == {"c3": 8, "c2": 4}
    assert (float(props["atol"]), float(props["rtol"])) == TOLERANCES["onnx"]
    assert json.loads(props["check_shapes"]) == [[b, 3, h, w] for b, h, w in CHECK_SIZES]
    assert json.loads(props["config"])["outputs"] == {"c3": "layer2", "c2": "layer1"}

    # independently of featx: the truncated torchvision model against the file, at a shape not checked
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["c3", "c2"]
    reference = torchvision.models.resnet18()
    reference.load_state_dict(load_file(str(weights)))
    getter = IntermediateLayerGetter(reference.eval(), {"layer2": "c3", "layer1": "c2"})
    x = torch.randn(2, 3, 75, 90)
    with torch.no_grad():
        expected = getter(x)
    c3, c2 = session.run(None, {"input": x.numpy()})
    assert torch.allclose(torch.from_numpy(c3), expected["c3"], atol=1e-4, rtol=1e-3)
    assert torch.allclose(torch.from_numpy(c2), expected["c2"], atol=1e-4, rtol=1e-3)
    assert c3.shape == (2, 128, 10, 12)


def test_pt2_export_holds_the_fpn_and_runs_at_any_batch_and_size(tmp_path):
    weights = seeded(tmp_path)
    cfg = {
        "model": "torchvision/resnet18",
        "weights": str(weights),
        "upto": "layer2",
        "outputs": ["layer1", "layer2"],
        "fpn": {"out_channels": 32},
        "verify": SMALL,
    }
    backbone = featx.build_backbone(cfg)
    out = tmp_path / "r18_fpn.pt2"
    result = export(cfg, out)
    assert result.ok and result.format == "pt2" and out.is_file()
    # the FPN's maps, named as torchvision names them (and as the backbone returns them)
    assert result.outputs == ("0", "1", "pool") == tuple(backbone(torch.randn(1, 3, 64, 64)))
    extra = {"featx.json": ""}
    program = torch.export.load(str(out), extra_files=extra)
    metadata = json.loads(extra["featx.json"])
    assert json.loads(metadata["output_names"]) == ["0", "1", "pool"]
    assert json.loads(metadata["channels"]) == {"0": 32, "1": 32, "pool": 32}
    assert json.loads(metadata["strides"]) == {"0": 4, "1": 8, "pool": 16}
    # export builds its own backbone; the FPN's init is random, so compare with the weights in the file,
    # loaded into the backbone built here
    fpn = {k.removeprefix("backbone.fpn."): v for k, v in program.state_dict.items() if ".fpn." in k}
    backbone.fpn.load_state_dict(fpn)
    x = torch.randn(3, 3, 70, 90)
    with torch.no_grad():
        got, expected = program.module()(x), backbone(x)
    assert [tuple(t.shape) for t in got] == [(3, 32, 18, 23), (3, 32, 9, 12), (3, 32, 5, 6)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, expected.values(), strict=True))


@pytest.mark.parametrize("keep_glue", [False, True])
def test_an_fpn_over_taps_inside_a_child_exports_every_map(tmp_path, keep_glue):
    # taps inside `layer2` and `layer3` (as convnext's `stages.N` and mobilenet's `features.N`): the
    # artifact returns the FPN's maps '0', '1' and 'pool', as the backbone does, not only 'pool'
    cfg = {
        "model": "torchvision/resnet18",
        "weights": str(seeded(tmp_path)),
        "upto": "layer3",
        "outputs": {"C3": "layer2.1", "C4": "layer3.1"},
        "keep_glue": keep_glue,
        "fpn": {"out_channels": 16},
        "verify": SMALL,
    }
    result = export(cfg, tmp_path / "nested_fpn.pt2")
    assert result.ok and result.outputs == ("0", "1", "pool")
    assert {d.output for d in result.diffs} == {"0", "1", "pool"}
    assert json.loads(result.metadata["strides"]) == {"0": 8, "1": 16, "pool": 32}


def test_safetensors_export_stores_the_fpn_and_rebuilds_it_exactly(tmp_path, capsys):
    weights = seeded(tmp_path)
    config = write(
        tmp_path / "fpn.yaml",
        {
            "model": "torchvision/resnet18",
            "weights": str(weights),
            "upto": "layer3",
            "outputs": {"0": "layer2", "1": "layer3"},
            "norm": "frozen",
            "fpn": {"out_channels": 64},
            "verify": SMALL,
        },
    )
    out = tmp_path / "fpn.safetensors"
    code, stdout, err = run(capsys, "export", config, "--out", out)
    assert code == 0, err
    assert "within atol 0, rtol 0 (max abs diff 0)" in stdout
    stored = load_file(str(out))
    assert {k.split(".")[0] for k in stored} == {
        "conv1",
        "bn1",
        "layer1",
        "layer2",
        "layer3",
        "fpn",
    }
    rebuilt = featx.build_backbone(out)
    assert all(torch.equal(v, stored[f"fpn.{k}"]) for k, v in rebuilt.fpn.state_dict().items())
    assert torch.equal(rebuilt.body.layer3[1].conv2.weight, load_file(str(weights))["layer3.1.conv2.weight"])
    assert main(["verify", str(out), "--mode", "eval", "--input-shape", "1,3,64,64"]) == 0  # fpn.* skipped
    again = featx.build_backbone(out)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(rebuilt(x).values(), again(x).values(), strict=True))


def test_export_of_a_spec_needs_no_config_and_rebuilds_from_any_folder(tmp_path, capsys, monkeypatch):
    weights = seeded(tmp_path)
    (tmp_path / "ship").mkdir()
    out = tmp_path / "ship" / "r18.safetensors"
    code, _, err = run(
        capsys,
        "export",
        "torchvision/resnet18",
        "--upto",
        "layer2",
        "--outputs",
        "layer1,layer2",
        "--weights",
        weights,
        "--input-shape",
        "1,3,64,64",
        "--out",
        out,
    )
    assert code == 0, err
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert (metadata["source_model"], metadata["upto"]) == ("torchvision/resnet18", "layer2")
    assert json.loads(metadata["config"])["weights"] == "r18.safetensors"  # the file itself, relative
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, stdout, err = run(capsys, "build", out, "--json")
    assert code == 0, err
    assert [(r["name"], r["channels"], r["stride"]) for r in json.loads(stdout)["outputs"]] == [
        ("layer1", 64, 4),
        ("layer2", 128, 8),
    ]
    code, stdout, err = run(capsys, "verify", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["upto"] == "layer2"
    rebuilt = featx.build_backbone(out)
    assert torch.equal(rebuilt.layer2[0].conv1.weight, load_file(str(weights))["layer2.0.conv1.weight"])


def test_onnx_and_pt2_exports_record_weights_relative_to_the_artifact(tmp_path):
    config = tiny_config(tmp_path)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "tiny.pt2"
    result = export(config, out)
    assert json.loads(result.metadata["config"])["weights"] == os.path.join("..", "w.safetensors")


def test_load_model_names_a_featx_export_and_says_how_to_rebuild_it(tmp_path):
    out = tmp_path / "r18.safetensors"
    config = {"model": "torchvision/resnet18", "upto": "layer2", "outputs": ["layer2"], "verify": SMALL}
    export(config, out, random_weights=True)
    with pytest.raises(FeatxError) as err:
        featx.load_model("torchvision/resnet18", weights=out)
    assert "is a featx export of `torchvision/resnet18` cut at `layer2`" in str(err.value)
    assert f"featx.build_backbone('{out}')" in str(err.value)
    assert "\n" not in str(err.value)


def test_load_model_names_a_truncated_state_dict(tmp_path):
    model = torchvision.models.resnet18()
    path = tmp_path / "cut.pth"
    torch.save(featx.truncate(model, "layer3").state_dict(), path)
    with pytest.raises(FeatxError, match=r"holds only the first 7 of 10 children \(through `layer3`\)"):
        featx.load_model("torchvision/resnet18", weights=path)


def test_a_failing_export_is_not_written_and_exits_1_with_the_table(tmp_path, capsys):
    # traced at an even width, the branch is specialised away: the artifact is wrong at width 131
    spec = "tests.test_export:Specialised"
    out = tmp_path / "s.pt2"
    code, stdout, err = run(
        capsys,
        "export",
        spec,
        "--upto",
        "even",
        "--input-shape",
        "1,3,32,32",
        "--random-weights",
        "--out",
        out,
    )
    assert code == 1
    assert not out.exists() and not list(tmp_path.iterdir())
    assert "pt2 artifact does NOT match the PyTorch backbone" in stdout
    assert "1x3x97x131" in stdout
    assert err.startswith("featx: error: pt2 export does not match the PyTorch backbone;")
    assert f"`{out}` was not written" in err


def test_export_api_raises_artifact_mismatch_with_the_diffs(tmp_path):
    cfg = {"model": "tests.test_export:Specialised", "upto": "even", "outputs": ["even"], "verify": SMALL}
    with pytest.raises(ArtifactMismatch) as err:
        export(cfg, tmp_path / "s.onnx", random_weights=True)
    check = err.value.check
    odd = [d for d in check.diffs if d.input_shape[-1] % 2]
    assert odd and all(not d.within and d.max_abs_diff == pytest.approx(1.0) for d in odd)
    assert all(d.within for d in check.diffs if not d.input_shape[-1] % 2)  # 160x128: the traced branch


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_an_untraceable_backbone_names_the_module_and_line(tmp_path, fmt):
    cfg = {"model": "tests.test_export:Gated", "upto": "gate", "outputs": ["gate"], "verify": SMALL}
    with pytest.raises(FeatxError) as err:
        export(cfg, tmp_path / f"g.{fmt}", random_weights=True)
    message = str(err.value)
    assert " cannot export the backbone in `gate` (Gate) at tests/test_export.py:" in message
    assert "data-dependent control flow" in message
    assert "\n" not in message and not list(tmp_path.iterdir())


def test_onnx_without_its_packages_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as when not installed
    code, _, err = run(capsys, "export", tiny_config(tmp_path), "--out", tmp_path / "t.onnx")
    assert code == 2
    assert err.strip() == (
        "featx: error: ONNX export needs the packages onnx, onnxruntime and onnxscript (`onnxruntime` not "
        "installed): pip install 'featx[onnx]'"
    )


def test_tolerance_flags_are_recorded(tmp_path, capsys):
    config = tiny_config(tmp_path)
    out = tmp_path / "t.pt2"
    code, stdout, err = run(capsys, "export", config, "--out", out, "--atol", "0", "--rtol", "0", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert (result["atol"], result["rtol"], result["written"], result["outputs"]) == (
        0.0,
        0.0,
        True,
        ["s2", "s1"],
    )
    extra = {"featx.json": ""}
    torch.export.load(str(out), extra_files=extra)
    assert (json.loads(extra["featx.json"])["atol"], json.loads(extra["featx.json"])["rtol"]) == (
        "0.0",
        "0.0",
    )


def test_an_export_off_at_small_elements_fails_though_within_rtol_of_the_largest(tmp_path):
    # max |a - b| = 0.001 <= 1e-5 + 1e-5 * max |b| (= 0.01): the rule before the tolerance was per element
    with pytest.raises(ArtifactMismatch) as err:
        export(SMALL_OFF, tmp_path / "s.pt2", random_weights=True)
    check = err.value.check
    assert (check.atol, check.rtol, check.tolerance) == (1e-5, 1e-5, "elementwise")
    assert [d.within for d in check.diffs] == [False, False]
    assert check.max_abs_diff == pytest.approx(0.001)
    assert check.max_rel_diff == pytest.approx(0.001 / 1000.001)
    assert not list(tmp_path.iterdir())


def _as_written_before_the_rule_was_recorded(path: Path, atol: float, rtol: float) -> None:
    extra = {"featx.json": ""}
    program = torch.export.load(str(path), extra_files=extra)
    metadata = json.loads(extra["featx.json"])
    del metadata["tolerance"]
    metadata.update(atol=repr(atol), rtol=repr(rtol))
    torch.export.save(program, str(path), extra_files={"featx.json": json.dumps(metadata)})


def test_an_artifact_without_a_tolerance_rule_is_checked_by_the_max_scaled_rule_it_was_written_under(
    tmp_path,
):
    out = tmp_path / "s.pt2"
    result = export(SMALL_OFF, out, atol=0.01, random_weights=True)  # per element: 0.001 <= 0.01
    assert result.metadata["tolerance"] == "elementwise"
    _as_written_before_the_rule_was_recorded(out, 1e-5, 1e-5)
    check = check_artifact(out, featx.resolve(SMALL_OFF))
    assert check.ok and check.tolerance == "max-scaled" and check.to_dict()["tolerance"] == "max-scaled"
    assert check.max_abs_diff == pytest.approx(0.001)


def test_an_artifact_recording_the_elementwise_rule_is_checked_element_by_element(tmp_path):
    out = tmp_path / "s.pt2"
    export(SMALL_OFF, out, atol=0.01, random_weights=True)
    _as_written_before_the_rule_was_recorded(out, 1e-5, 1e-5)
    extra = {"featx.json": ""}
    program = torch.export.load(str(out), extra_files=extra)
    metadata = json.loads(extra["featx.json"]) | {"tolerance": "elementwise"}
    torch.export.save(program, str(out), extra_files={"featx.json": json.dumps(metadata)})
    check = check_artifact(out, featx.resolve(SMALL_OFF))
    assert not check.ok and check.tolerance == "elementwise"


def test_an_artifact_recording_an_unknown_tolerance_rule_is_refused(tmp_path):
    out = tmp_path / "s.pt2"
    export(SMALL_OFF, out, atol=0.01, random_weights=True)
    extra = {"featx.json": ""}
    program = torch.export.load(str(out), extra_files=extra)
    metadata = json.loads(extra["featx.json"]) | {"tolerance": "ulps"}
    torch.export.save(program, str(out), extra_files={"featx.json": json.dumps(metadata)})
    with pytest.raises(FeatxError) as err:
        check_artifact(out, featx.resolve(SMALL_OFF))
    assert str(err.value) == (
        f"artifact `{out}` records tolerance `ulps` (metadata key `tolerance`); accepted: `elementwise`, "
        "`max-scaled`"
    )


# -- featx check on artifacts -----------------------------------------------------------------------------
def test_check_reverifies_artifacts_and_fails_when_they_are_stale(tmp_path, capsys):
    config = tiny_config(tmp_path, artifacts=["tiny.pt2", "tiny.safetensors"])
    for name in ("tiny.pt2", "tiny.safetensors"):
        export(config, tmp_path / name)
    code, stdout, err = run(capsys, "check", config)
    assert code == 0, stdout + err
    assert "tiny.pt2 ok, tiny.safetensors ok" in stdout

    # the model the config builds changes (a new checkpoint, a library upgrade): the artifacts are stale
    torch.manual_seed(1)
    save_file(Tiny().state_dict(), str(tmp_path / "w.safetensors"))
    junit, markdown = tmp_path / "j.xml", tmp_path / "s.md"
    code, stdout, err = run(capsys, "check", config, "--junit", junit, "--markdown", markdown)
    assert code == 1
    assert "NOT faithful" in stdout and "tiny.pt2 STALE, tiny.safetensors STALE" in stdout
    assert "artifact `tiny.pt2` differs from the PyTorch backbone by up to" in stdout
    assert "at output `s2`, `s1` (input 1x3x97x131, 3x3x160x128); tolerance atol 1e-05, rtol 1e-05" in stdout
    failure = ET.parse(junit).find(".//testcase/failure")
    assert failure is not None and "no longer matches the backbone the config builds" in failure.get(
        "message"
    )
    assert "| artifacts |" in markdown.read_text() and "tiny.pt2 STALE" in markdown.read_text()
    code, stdout, _ = run(capsys, "check", config, "--json")
    item = json.loads(stdout)["configs"][0]
    assert item["outcome"] == "not_faithful" and item["max_abs_diff"] == 0.0  # the cut itself is fine
    assert [(a["format"], a["ok"]) for a in item["artifacts"]] == [("pt2", False), ("safetensors", False)]
    assert all(a["max_abs_diff"] > 0.01 for a in item["artifacts"])


def test_check_reports_an_artifact_whose_outputs_changed(tmp_path, capsys):
    config = tiny_config(tmp_path, artifacts=["tiny.pt2"])
    export(config, tmp_path / "tiny.pt2")
    data = yaml.safe_load(config.read_text())
    write(config, {**data, "outputs": ["stage"]})
    code, stdout, _ = run(capsys, "check", config)
    assert code == 1
    assert (
        "artifact `tiny.pt2` no longer matches: its outputs are `s2`, `s1`; the config's backbone returns `stage`"
        in stdout
    )


def test_check_without_the_artifact_file_is_an_error_row(tmp_path, capsys):
    config = tiny_config(tmp_path, artifacts=["missing.onnx"])
    code, stdout, _ = run(capsys, "check", config)
    assert code == 2
    assert (
        f"artifact `{tmp_path / 'missing.onnx'}` does not exist; write it with `featx export CONFIG" in stdout
    )


def test_check_refuses_artifacts_of_a_randomly_initialised_config(tmp_path, capsys):
    config = write(
        tmp_path / "r.yaml",
        {
            "model": "tests.test_export:Tiny",
            "upto": "stage",
            "outputs": ["stage"],
            "verify": SMALL,
            "artifacts": ["r.pt2"],
        },
    )
    code, stdout, _ = run(capsys, "check", config)
    assert code == 2
    assert "key `artifacts`: the config has `weights: null`" in stdout


def test_check_refuses_artifacts_of_an_fpn_without_weights(tmp_path, capsys):
    weights = seeded(tmp_path)
    config = write(
        tmp_path / "f.yaml",
        {
            "model": "torchvision/resnet18",
            "weights": weights.name,
            "upto": "layer1",
            "outputs": ["layer1"],
            "fpn": {"out_channels": 8},
            "verify": SMALL,
            "artifacts": ["f.pt2"],
        },
    )
    code, stdout, _ = run(capsys, "check", config)
    assert code == 2
    assert "key `artifacts`: the config's `weights` holds no `fpn.*` tensors" in stdout


@pytest.mark.slow
def test_resnet50_fpn_onnx_export_and_check(tmp_path, capsys):
    weights = seeded(tmp_path, "torchvision/resnet50")
    shipped = yaml.safe_load(Path("configs/fasterrcnn_resnet50_fpn.yaml").read_text())
    config = write(
        tmp_path / "frcnn.yaml",
        {
            **shipped,
            "weights": weights.name,
            "artifacts": ["frcnn.onnx"],
            "verify": {**shipped["verify"], "modes": ["eval"]},
        },
    )
    code, _, err = run(capsys, "export", config, "--out", tmp_path / "frcnn.safetensors")
    assert code == 0, err
    write(config, {**yaml.safe_load(config.read_text()), "weights": "frcnn.safetensors"})  # FPN included
    code, stdout, err = run(capsys, "export", config, "--out", tmp_path / "frcnn.onnx")
    assert code == 0, err
    assert "onnx artifact matches the PyTorch backbone" in stdout
    code, stdout, err = run(capsys, "check", config)
    assert code == 0, stdout + err
    assert "frcnn.onnx ok" in stdout


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_an_export_of_a_keep_glue_backbone_carries_the_roots_glue(tmp_path, fmt):
    # googlenet with transform_input=True rescales the input channels in its own forward, before `conv1`:
    # glue a plain children cut loses. The keep-glue backbone runs it, and so must its artifact.
    kwargs = {"transform_input": True, "aux_logits": False, "init_weights": True}
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, **kwargs).eval()
    weights = tmp_path / "googlenet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    cfg = {
        "model": "torchvision/googlenet",
        "model_kwargs": kwargs,
        "weights": str(weights),
        "upto": "inception3b",
        "outputs": ["inception3b"],
        "keep_glue": True,
        "verify": {"input_shape": [1, 3, 96, 96]},
    }
    out = tmp_path / f"googlenet.{fmt}"
    result = export(cfg, out)
    assert result.ok and result.format == fmt and out.is_file()
    x = torch.randn(2, 3, 96, 112)
    seen = {}
    handle = model.inception3b.register_forward_hook(lambda m, i, o: seen.update(at_cut=o))
    with torch.no_grad():
        model(x)
        handle.remove()
        plain = nn.Sequential(*list(model.children())[:7])(x)  # conv1 .. inception3b, without the glue
    if fmt == "onnx":
        import onnxruntime

        (got,) = onnxruntime.InferenceSession(str(out)).run(None, {"input": x.numpy()})
        got = torch.from_numpy(got)
    else:
        with torch.no_grad():
            (got,) = torch.export.load(str(out)).module()(x)
    reference = seen["at_cut"]
    scale = float(reference.abs().max())  # init_weights makes tiny activations: compare relative to them
    assert float((got - reference).abs().max()) <= 1e-4 * scale
    assert float((plain - reference).abs().max()) > 1e-2 * scale  # the glue matters here


def test_a_keep_glue_fpn_config_exports_and_rebuilds_with_its_maps_in_order(tmp_path):
    config = {
        "model": "torchvision/resnet18",
        "upto": "layer3",
        "outputs": ["layer2", "layer3"],
        "keep_glue": True,
        "fpn": {"out_channels": 32},
        "verify": SMALL,
    }
    out = tmp_path / "kg_fpn.safetensors"
    with pytest.warns(FeatxWarning, match="the FPN stays at random init"):
        check = export(config, out, random_weights=True)
    assert check.ok and check.outputs == ("0", "1", "pool")
    # two builds from the export agree only if both read the FPN's tensors from it (else: two random inits)
    rebuilt, built = featx.build_backbone(out), featx.build_backbone(out)
    x = torch.randn(1, 3, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt(x).values(), built(x).values(), strict=True))


def test_a_difference_of_float32_rounding_size_is_refused_with_the_atol_that_would_pass():
    from featx.export import ArtifactCheck, OutputDiff

    rounding = OutputDiff((1, 3, 97, 131), "0", (1, 256, 25, 33), 3.06e-4, 1.39e-6, False)
    check = ArtifactCheck("frcnn.onnx", "onnx", 1e-4, 1e-4, ("0",), (rounding,))
    assert check.reasons[0].endswith(
        "tolerance atol 0.0001, rtol 0.0001; that is 1.39e-06 of the output's largest magnitude, the size of "
        "float32 rounding in another runtime: pass --atol 0.0004 (API atol=) if these maps are that large"
    )
    lost = OutputDiff((1, 3, 97, 131), "0", (1, 256, 25, 33), 10.37, 0.917, False)  # a lost op: no such hint
    assert "--atol" not in ArtifactCheck("r.onnx", "onnx", 1e-4, 1e-4, ("0",), (lost,)).reasons[0]
