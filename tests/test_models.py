"""Specs to models and local weight files, and what happens when either is wrong."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import featx
from featx import FeatxError
from featx.cli import main


def _seeded(spec: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return featx.load_model(spec)


def test_torchvision_timm_and_import_specs_build_models():
    assert type(featx.load_model("torchvision/resnet18")).__module__ == "torchvision.models.resnet"
    assert type(featx.load_model("timm/resnet18")).__module__ == "timm.models.resnet"
    assert type(featx.load_model("examples.seed_toy:ResN")).__name__ == "ResN"


def test_the_repositorys_examples_resolve_from_any_folder(tmp_path):
    """`examples.seed_toy:ResN` (the docs' spec) from a folder that is not the repository's root, with featx
    on the path and the repository not (featx reached through a link, as an install would)."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "featx").symlink_to(Path(featx.__file__).resolve().parent)
    code = "import featx; print(type(featx.load_model('examples.seed_toy:ResN')).__name__)"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert (result.returncode, result.stdout) == (0, "ResN\n"), result.stderr


def test_model_kwargs_reach_the_constructor():
    model = featx.load_model("torchvision/resnet50", replace_stride_with_dilation=[False, True, True])
    assert model.layer4[1].conv2.dilation == (4, 4)
    assert featx.load_model("timm/resnet50", drop_rate=0.5).drop_rate == 0.5


@pytest.mark.parametrize(
    ("spec", "kwargs", "shape"),
    [
        ("timm/vit_tiny_patch16_224", {"img_size": 64, "in_chans": 1}, (2, 1, 64, 64)),
        ("timm/vit_tiny_patch16_224", {"img_size": [32, 48]}, (2, 3, 32, 48)),
        ("timm/resnet18", {"in_chans": 5}, (2, 5, 224, 224)),
        ("torchvision/vit_b_32", {"image_size": 96}, (2, 3, 96, 96)),
        ("torchvision/inception_v3", {"init_weights": False, "aux_logits": False}, (2, 3, 299, 299)),
        ("torchvision/resnet18", {}, (2, 3, 224, 224)),
    ],
)
def test_default_input_shape_follows_the_models_own_size_and_its_kwargs(spec, kwargs, shape):
    from featx.models import default_input_shape

    model = featx.load_model(spec, **kwargs)
    assert default_input_shape(model) == shape
    model(torch.randn(1, *shape[1:]))  # and the model takes it


def test_safetensors_weights_are_loaded_exactly(tmp_path):
    source = _seeded("torchvision/resnet18", 1)
    path = tmp_path / "r18.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = featx.load_model("torchvision/resnet18", weights=path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())


@pytest.mark.parametrize("nest", [None, "state_dict", "model"])
def test_torch_checkpoints_load_plain_or_nested(tmp_path, nest):
    source = _seeded("timm/resnet18", 2)
    path = tmp_path / "r18.pth"
    state = source.state_dict()
    torch.save(state if nest is None else {nest: state, "epoch": 3}, path)
    loaded = featx.load_model("timm/resnet18", weights=path)
    assert torch.equal(loaded.fc.weight, source.fc.weight)


def test_a_checkpoint_carrying_a_pickle_payload_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    with pytest.raises(FeatxError, match="refuses arbitrary pickles"):
        featx.load_model("torchvision/resnet18", weights=path)
    assert not marker.exists()


def test_mismatched_weights_are_reported_by_name(tmp_path):
    state = featx.load_model("torchvision/resnet18").state_dict()
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(1)
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(FeatxError) as err:
        featx.load_model("torchvision/resnet18", weights=path)
    message = str(err.value)
    assert "1 missing: `fc.bias`" in message
    assert "1 unexpected: `extra.weight`" in message
    assert "`conv1.weight [64, 1, 7, 7] vs [64, 3, 7, 7]`" in message


def test_constructor_errors_name_the_spec_and_kwargs():
    with pytest.raises(FeatxError, match=r"building `torchvision/resnet18` with no_such_kwarg=1 failed"):
        featx.load_model("torchvision/resnet18", no_such_kwarg=1)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x80\x02}q\x00."[:3]])
def test_corrupt_and_truncated_weights_files_are_clear_errors(tmp_path, content):
    for suffix in (".pth", ".safetensors"):
        path = tmp_path / f"w{suffix}"
        path.write_bytes(content)
        with pytest.raises(FeatxError, match=f"weights file `{path}`"):
            featx.load_model("torchvision/resnet18", weights=path)


def test_truncated_safetensors_file_is_a_clear_error(tmp_path):
    path = tmp_path / "r18.safetensors"
    save_file(featx.load_model("torchvision/resnet18").state_dict(), str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FeatxError, match="not a readable safetensors file"):
        featx.load_model("torchvision/resnet18", weights=path)


def test_missing_weights_file(tmp_path):
    with pytest.raises(FeatxError, match="does not exist"):
        featx.load_model("torchvision/resnet18", weights=tmp_path / "nope.safetensors")


def test_a_ddp_checkpoint_names_the_prefix_to_strip_and_loads_with_it(tmp_path):
    source = _seeded("torchvision/resnet18", 4)
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    with pytest.raises(FeatxError) as err:
        featx.load_model("torchvision/resnet18", weights=path)
    assert "its keys carry the prefix `module.` (all 102 model keys match once it is stripped)" in str(
        err.value
    )
    assert "weights_prefix `module.`" in str(err.value)
    loaded = featx.load_model("torchvision/resnet18", weights=path, weights_prefix="module.")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())


def test_a_detectors_backbone_prefix_is_found_even_when_other_keys_are_there(tmp_path):
    source = _seeded("torchvision/resnet50", 5)
    state = {f"backbone.body.{k}": v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    state["roi_heads.box_head.fc6.weight"] = torch.zeros(2, 2)
    path = tmp_path / "detector.safetensors"
    save_file(state, str(path))
    keys = [k for k in source.state_dict() if not k.endswith("num_batches_tracked")]
    with pytest.raises(FeatxError) as err:
        featx.load_model("torchvision/resnet50", weights=path)
    # every key but the classifier's two, which a backbone checkpoint does not carry
    assert f"carry the prefix `backbone.body.` ({len(keys) - 2} of the {len(keys)} model keys" in str(
        err.value
    )


def test_a_prefix_is_a_dotted_path_with_or_without_its_trailing_dot(tmp_path):
    source = _seeded("torchvision/resnet18", 6)
    state = {f"backbone.body.{k}": v for k, v in source.state_dict().items()}
    state["backbone.bodyX.conv1.weight"] = torch.zeros(1)  # shares the letters, not the module path
    path = tmp_path / "prefixed.safetensors"
    save_file(state, str(path))
    for prefix in ("backbone.body", "backbone.body."):
        loaded = featx.load_model("torchvision/resnet18", weights=path, weights_prefix=prefix)
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())


def test_a_weights_folder_is_called_a_folder_and_its_files_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FeatxError, match=r"is a folder, not a file.*it holds `model\.safetensors`: name one"):
        featx.load_model("torchvision/resnet18", weights=tmp_path)


def test_cli_weights_prefix_strips_a_ddp_prefix(tmp_path, capsys):
    source = _seeded("torchvision/resnet18", 7)
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    argv = ["verify", "torchvision/resnet18", "--upto", "layer1", "--input-shape", "2,3,32,32"]
    assert main([*argv, "--weights", str(path), "--weights-prefix", "module", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["faithful"]
