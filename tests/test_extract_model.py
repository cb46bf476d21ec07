"""featx extract takes the model, its weights and the cut as featx verify does: weights names read from
torch's cache, the constructors' download switches, a seeded random init (refused unless asked for), dotted
cuts and taps, ``--weights-prefix``, and a featx ``.safetensors`` export as a config.

Nothing is downloaded: a seeded resnet18 state dict is laid out in a torch cache under ``tmp_path``
(``TORCH_HOME``), under the file name torchvision downloads ``ResNet18_Weights.IMAGENET1K_V1`` as.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

import featx
from featx.cli import main
from featx.export import export
from featx.extraction import ExtractResult
from tests.extract_support import ROOT, SPEC, assert_same_features, cli, set_flag

R18 = "torchvision/resnet18"
R18_FILE = "resnet18-f37072fd.pth"  # where torchvision keeps ResNet18_Weights.IMAGENET1K_V1


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torch cache holding a seeded resnet18 state dict as ResNet18_Weights.IMAGENET1K_V1's file."""
    home = tmp_path_factory.mktemp("torch")
    torch.manual_seed(7)
    path = home / "hub" / "checkpoints" / R18_FILE
    path.parent.mkdir(parents=True)
    torch.save(featx.load_model(R18).state_dict(), path)
    return home


@pytest.fixture
def cached(torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The cached resnet18 file, with TORCH_HOME pointing at its cache, offline."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return torch_home / "hub" / "checkpoints" / R18_FILE


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def r18(images: Path, out: Path, *extra: str) -> list[str]:
    return extract_argv(R18, images, out, *extra)


def extract_argv(spec: str, images: Path, out: Path, *extra: str) -> list[str]:
    return [
        "extract", spec, "--data", str(images), "--out", str(out), "--upto", "layer1", "--pool", "avg",
        "--batch-size", "3", "--workers", "0", "--no-progress", *extra,
    ]  # fmt: skip


def fingerprint(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["fingerprint"]


def test_a_torchvision_weights_name_extracts_what_its_cached_file_does(
    cached: Path, images: Path, tmp_path: Path
) -> None:
    assert main(r18(images, tmp_path / "file", "--weights", str(cached))) == 0
    assert main(r18(images, tmp_path / "name", "--weights", "IMAGENET1K_V1")) == 0
    assert_same_features(tmp_path / "name", tmp_path / "file")


@pytest.mark.parametrize("given", [["--weights", "IMAGENET1K_V1"], ["--model-kwarg", "pretrained=true"]])
def test_the_fingerprint_records_a_weights_name_and_the_sha256_of_its_cached_file(
    given: list[str], cached: Path, images: Path, tmp_path: Path
) -> None:
    assert main(r18(images, tmp_path / "out", *given)) == 0
    assert fingerprint(tmp_path / "out")["weights"] == {
        "name": "ResNet18_Weights.IMAGENET1K_V1",
        "file": R18_FILE,
        "sha256": hashlib.sha256(cached.read_bytes()).hexdigest(),
    }


def test_a_torchvision_weights_name_gets_its_weights_transforms(
    cached: Path, images: Path, tmp_path: Path
) -> None:
    result = featx.extract(
        R18, images, tmp_path / "out", upto="layer1", weights="DEFAULT", workers=0, progress=False
    )
    assert str(result.preprocessing) == (
        "torchvision ResNet18_Weights.IMAGENET1K_V1: resize 256 bilinear, center crop 224x224, "
        "mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)"
    )


@pytest.mark.parametrize("switch", ["weights=IMAGENET1K_V1", "weights=DEFAULT"])
def test_model_kwarg_download_switches_are_weights(
    switch: str, cached: Path, images: Path, tmp_path: Path
) -> None:
    assert main(r18(images, tmp_path / "file", "--weights", str(cached))) == 0
    assert main(r18(images, tmp_path / "switch", "--model-kwarg", switch)) == 0
    assert_same_features(tmp_path / "switch", tmp_path / "file")


def test_a_model_without_weights_is_refused_in_one_line(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(r18(images, tmp_path / "out")) == 2
    assert capsys.readouterr().err == (
        "featx: error: `torchvision/resnet18` gets no weights, so its features would be those of a random "
        "init; give weights (--weights: a .safetensors file or torch checkpoint, DEFAULT, IMAGENET1K_V1, a "
        "timm tag, hf-hub:org/name; a config's `weights`) or pass --random-weights (the init seeded by "
        "--seed, default 0)\n"
    )
    assert not (tmp_path / "out").exists()


def test_random_weights_and_weights_together_are_refused(
    data: Path, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*cli(data, tmp_path / "out", weights), "--random-weights"]) == 2
    assert capsys.readouterr().err == (
        f"featx: error: --random-weights asks for a random init, but `{SPEC}` gets weights `{weights}`; "
        "keep one\n"
    )


def random_cli(data: Path, out: Path, *extra: str) -> list[str]:
    argv = cli(data, out, Path("unused"))
    at = argv.index("--weights")
    return [*argv[:at], *argv[at + 2 :], "--random-weights", *extra]


def test_two_runs_on_random_weights_give_bit_equal_features(data: Path, tmp_path: Path) -> None:
    assert main(random_cli(data, tmp_path / "a")) == 1  # 1: the corrupt image
    torch.manual_seed(123)  # the caller's RNG does not choose the init
    assert main(random_cli(data, tmp_path / "b")) == 1
    assert_same_features(tmp_path / "a", tmp_path / "b")
    assert fingerprint(tmp_path / "a")["weights"] == {"random": True, "seed": 0}


def test_the_seed_chooses_the_random_init(data: Path, tmp_path: Path) -> None:
    assert main(random_cli(data, tmp_path / "a")) == 1
    assert main(random_cli(data, tmp_path / "b", "--seed", "1")) == 1
    a, b = featx.open_features(tmp_path / "a"), featx.open_features(tmp_path / "b")
    assert not torch.equal(a.tensor("block"), b.tensor("block"))
    assert fingerprint(tmp_path / "b")["weights"] == {"random": True, "seed": 1}


def test_a_resume_on_random_weights_continues_the_same_model_and_another_seed_is_refused(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    killed = subprocess.run(
        [sys.executable, "-m", "featx", *random_cli(data, out)],
        env={**os.environ, "PYTHONPATH": str(ROOT), "FEATX_EXTRACT_EXIT_AFTER": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == 17, killed.stderr  # died after its first shard
    assert main(random_cli(data, out, "--seed", "1")) == 2
    assert capsys.readouterr().err.startswith(
        f"featx: error: --out `{out}` holds another extraction (its fingerprint differs in `weights.seed`)"
    )
    assert main(random_cli(data, out)) == 1
    assert "shards: 3 computed, 1 already done" in capsys.readouterr().out
    assert main(random_cli(data, tmp_path / "fresh")) == 1
    assert_same_features(out, tmp_path / "fresh")


@pytest.mark.torchrun
def test_two_torchrun_ranks_on_random_weights_extract_what_one_process_does(
    data: Path, tmp_path: Path
) -> None:
    assert main(random_cli(data, tmp_path / "one")) == 1
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "featx"]
    ranks = subprocess.run(
        [*command, *random_cli(data, tmp_path / "two")],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "samples 25: 24 extracted, 1 failed" in ranks.stdout, ranks.stderr
    assert_same_features(tmp_path / "two", tmp_path / "one")


def test_another_shard_size_is_refused_naming_data_shard_size(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(random_cli(data, out)) == 1
    assert main(set_flag(random_cli(data, out), "--shard-size", "3")) == 2
    assert capsys.readouterr().err.startswith(
        f"featx: error: --out `{out}` holds another extraction (its fingerprint differs in `data.shard_size`)"
    )


def test_another_model_kwarg_is_another_extraction_naming_it(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(random_cli(data, out)) == 1
    # the same cut of another model: resuming would serve the first model's features as this one's
    assert main([*random_cli(data, out), "--model-kwarg", "glue=true"]) == 2
    assert capsys.readouterr().err.startswith(
        f"featx: error: --out `{out}` holds another extraction (its fingerprint differs in `model_kwargs`)"
    )


def test_a_dotted_cut_and_taps_extract_what_a_config_of_the_same_cut_does(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = r18(images, tmp_path / "spec", "--random-weights", "--outputs", "layer1.1,layer2.0")
    assert main(set_upto(argv, "layer2.0")) == 0
    assert "featx extract  torchvision/resnet18  cut at `layer2.0`" in capsys.readouterr().out
    config = tmp_path / "r18.yaml"
    config.write_text(yaml.safe_dump({"model": R18, "upto": "layer2.0", "outputs": ["layer1.1", "layer2.0"]}))
    by_config = [config.as_posix(), *r18(images, tmp_path / "config", "--random-weights")[2:]]
    assert main(["extract", *set_upto(by_config, "layer2.0")]) == 0
    assert_same_features(tmp_path / "spec", tmp_path / "config")
    for out in ("spec", "config"):
        manifest = json.loads((tmp_path / out / "manifest.json").read_text())
        assert manifest["fingerprint"]["cut"] == "layer2.0", out
        assert manifest["fingerprint"]["taps"] == {"layer1.1": "layer1.1", "layer2.0": "layer2.0"}, out


def set_upto(argv: list[str], upto: str) -> list[str]:
    at = argv.index("--upto")
    return [*argv[: at + 1], upto, *argv[at + 2 :]]


def test_a_dotted_cut_with_keep_glue_extracts_what_that_module_returns(images: Path, tmp_path: Path) -> None:
    assert main(set_upto(r18(images, tmp_path / "plain", "--random-weights"), "layer2.0")) == 0
    glued = set_upto(r18(images, tmp_path / "glue", "--random-weights", "--keep-glue"), "layer2.0")
    assert main(glued) == 0
    assert fingerprint(tmp_path / "glue")["cut"] == "layer2.0"
    assert_same_features(tmp_path / "glue", tmp_path / "plain")


def test_a_tap_inside_a_dropped_part_of_the_cut_is_refused(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = set_upto(r18(images, tmp_path / "out", "--random-weights", "--outputs", "layer2.1"), "layer2.0")
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(
        "featx: error: --outputs `layer2.1` is after the cut at `layer2.0`; the cut runs "
    )


def test_a_cut_that_is_not_a_child_or_too_long_a_count_names_the_flag(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for upto, said in [
        ("layr2", "--upto `layr2` is not a child of `ResNet` (did you mean `layer2`"),
        ("9" * 5000, "--upto `9999999999999999… (5000 characters)` is an integer of more than 4300 digits"),
    ]:
        assert main(set_upto(r18(images, tmp_path / "out", "--random-weights"), upto)) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"featx: error: {said}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_weights_prefix_strips_the_checkpoints_keys(
    data: Path, weights: Path, reference: Path, tmp_path: Path
) -> None:
    wrapped = tmp_path / "ddp.safetensors"
    save_file({f"module.{k}": v for k, v in load_file(weights).items()}, wrapped)
    assert main([*cli(data, tmp_path / "out", wrapped), "--weights-prefix", "module."]) == 1
    assert_same_features(tmp_path / "out", reference)


def test_a_featx_safetensors_export_is_extracted_as_its_config(
    data: Path, weights: Path, reference: Path, tmp_path: Path
) -> None:
    exported = tmp_path / "tiny.safetensors"
    export({"model": SPEC, "weights": str(weights), "upto": "block", "outputs": ["act", "block"]}, exported)
    result = featx.extract(
        exported, data, tmp_path / "out", pool={"block": "avg"}, batch_size=4, shard_size=7, workers=0,
        progress=False,
    )  # fmt: skip
    assert result.model == str(exported)
    assert_same_features(tmp_path / "out", reference)


def test_a_plain_safetensors_checkpoint_as_the_model_is_refused_in_one_line(
    data: Path, weights: Path, tmp_path: Path
) -> None:
    with pytest.raises(featx.FeatxError) as err:
        featx.extract(weights, data, tmp_path / "out", workers=0, progress=False)
    assert str(err.value) == (
        f"`{weights}` is a safetensors file without featx metadata (not written by `featx export`); name it "
        "as `weights:` in a config, or pass a config (.yaml) or a featx export"
    )


def test_vit_tokens_pooled_by_cls_token(images: Path, tmp_path: Path) -> None:
    result = featx.extract(
        "timm/vit_tiny_patch16_224", images, tmp_path / "out", upto="blocks", keep_glue=True, pool="cls",
        random_weights=True, model_kwargs={"depth": 2}, workers=0, progress=False,
    )  # fmt: skip
    assert result.outputs["blocks"]["shape"] == [192]
    assert result.verified.startswith("faithful in eval mode")


def test_a_vit_built_at_another_size_is_preprocessed_at_that_size(images: Path, tmp_path: Path) -> None:
    result = featx.extract(
        "timm/vit_tiny_patch16_224", images, tmp_path / "out", upto="blocks", keep_glue=True, pool="cls",
        random_weights=True, model_kwargs={"depth": 2, "img_size": 64}, workers=0, progress=False,
    )  # fmt: skip
    assert result.preprocessing.settings["input_size"] == (3, 64, 64)
    assert result.preprocessing.source == "timm pretrained_cfg, at the model's input size 64x64"
    assert result.verified.startswith("faithful in eval mode")


def test_a_data_input_size_a_fixed_size_vit_cannot_take_is_refused(images: Path, tmp_path: Path) -> None:
    config = {
        "model": "timm/vit_tiny_patch16_224",
        "model_kwargs": {"depth": 2, "img_size": 64},
        "upto": "patch_embed.proj",  # a config's backbone taps NCHW maps
        "keep_glue": True,
        "data": {"input_size": 96},
    }
    with pytest.raises(featx.FeatxError) as err:
        featx.extract(config, images, tmp_path / "out", random_weights=True, workers=0)
    assert str(err.value) == (
        "the config's `data.input_size` [3, 96, 96] is 96x96; `timm/vit_tiny_patch16_224` runs at 64x64 only "
        "(as built: `img_size`); set `data.input_size` to [3, 64, 64] or drop it"
    )


def test_an_hf_hub_id_extracts_what_its_cached_file_does(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(3)
    state = featx.load_model("timm/resnet18").state_dict()
    snapshot = tmp_path / "hub" / "models--org--r18" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "model.safetensors")
    (tmp_path / "hub" / "models--org--r18" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--r18" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (
        main(extract_argv("timm/resnet18", images, tmp_path / "hub-id", "--weights", "hf-hub:org/r18")) == 0
    )
    file = snapshot / "model.safetensors"
    assert main(extract_argv("timm/resnet18", images, tmp_path / "file", "--weights", str(file))) == 0
    assert_same_features(tmp_path / "hub-id", tmp_path / "file")
    assert fingerprint(tmp_path / "hub-id")["weights"] == {
        "name": "hf-hub:org/r18",
        "file": "model.safetensors",
        "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
    }


def test_load_model_seed_builds_the_same_init_and_leaves_the_callers_rng_alone() -> None:
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    a = featx.load_model(SPEC, seed=3).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(6)
    b = featx.load_model(SPEC, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(3)
    assert torch.equal(featx.load_model(SPEC).state_dict()["stem.weight"], a["stem.weight"])


def test_a_config_without_weights_is_refused_naming_the_config(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": SPEC, "upto": "block", "outputs": ["act", "block"]}))
    argv = [config.as_posix(), "--data", str(data), "--out", str(tmp_path / "out"), "--workers", "0"]
    assert main(["extract", *argv, "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith(
        f"featx: error: {config}: `{SPEC}` gets no weights, so its features would be those of a random init; "
    )
    assert main(["extract", *argv, "--no-progress", "--random-weights", "--seed", "2"]) == 1
    assert fingerprint(tmp_path / "out")["weights"] == {"random": True, "seed": 2}


def test_a_timm_tag_gets_the_preprocessing_of_that_tags_pretrained_cfg(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(4)
    state = featx.load_model("timm/resnet18").state_dict()
    repo = tmp_path / "hub" / "models--timm--resnet18.a3_in1k"
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in state.items()}, repo / "snapshots" / ("0" * 40) / "model.safetensors"
    )
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = featx.extract(
        "timm/resnet18", images, tmp_path / "out", upto="layer1", pool="avg", weights="a3_in1k", workers=0,
        progress=False,
    )  # fmt: skip
    assert str(result.preprocessing) == (
        "timm pretrained_cfg of resnet18.a3_in1k: resize 168 bicubic, center crop 160x160, "
        "mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)"
    )


def test_a_spec_is_cut_by_the_backbone_builder_which_refuses_a_tap_inside_a_residual_block(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``extract SPEC --upto/--outputs`` resolves and builds through ``featx.backbone.resolve``, as a
    config does: a tap inside a block whose forward adds its input would run the block's children
    without the add, so it is refused before anything runs, naming the flag."""
    argv = r18(images, tmp_path / "out", "--random-weights", "--outputs", "layer1.0.conv1")
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "featx: error: --outputs `layer1.0.conv1` is inside `layer1.0` (BasicBlock), whose children the plain "
        "backbone runs one after the other, but its forward applies `add` (torchvision/models/resnet.py:102); "
        "tap `layer1.0` or pass --keep-glue\n"
    )
    assert not (tmp_path / "out").exists()


# Fingerprints as featx 1a6737f (before the model source was carried as one value) wrote them, for a
# TinyNet run on five 40-pixel-wide PNGs in shards of 3; `featx`/`torch` are the running versions and the
# weights file's sha256 is that of the file the test writes. A store is resumed only when its fingerprint is
# equal, so these must not change: a store an earlier featx wrote would be refused, or recomputed.
_PREPROCESSING = {
    "source": "ImageNet default", "input_size": [3, 32, 32], "interpolation": "bilinear",
    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_pct": 0.875, "crop_mode": "center",
}  # fmt: skip
_DATA = {
    "kind": "folder", "samples": 5, "shard_size": 3,
    "keys_sha256": "38fb2e4f2b66a005ec2fb71198bc339a2ef32041808f54001f2bd5b6d75394aa",
}  # fmt: skip
EARLIER_FINGERPRINTS = {
    "spec": {
        "model": SPEC, "model_kwargs": {"glue": "False"}, "config": None, "weights": "tiny.safetensors",
        "cut": "block", "keep_glue": False, "taps": {"act": "act", "block": "block"},
        "pool": {"act": "none", "block": "avg"}, "dtype": {"act": "float16", "block": "float32"},
        "preprocessing": _PREPROCESSING, "data": _DATA, "format": "safetensors", "autocast": False,
        "channels_last": False,
    },
    "random": {
        "model": SPEC, "config": None, "weights": {"random": True, "seed": 3}, "cut": "block",
        "keep_glue": True, "taps": {"block": "block"}, "pool": {"block": "none"},
        "dtype": {"block": "float32"}, "preprocessing": _PREPROCESSING, "data": _DATA, "format": "npy",
        "autocast": False, "channels_last": False,
    },
    "config": {
        "model": SPEC, "config": "<dict>", "weights": "tiny.safetensors", "cut": "block", "keep_glue": False,
        "taps": {"mid": "act"}, "pool": {"mid": "none"}, "dtype": {"mid": "float32"},
        "preprocessing": _PREPROCESSING, "data": _DATA, "format": "safetensors", "autocast": False,
        "channels_last": False,
    },
}  # fmt: skip


def _earlier_run(kind: str, root: Path, data: Path) -> ExtractResult:
    file = root / "tiny.safetensors"
    common: dict = {"workers": 0, "batch_size": 2, "shard_size": 3, "progress": False}
    out = root / kind
    if kind == "spec":
        return featx.extract(
            SPEC, data, out, upto="block", outputs=["act", "block"], pool={"block": "avg"},
            dtype={"act": "float16"}, weights=str(file), model_kwargs={"glue": False}, **common,
        )  # fmt: skip
    if kind == "random":
        return featx.extract(
            SPEC, data, out, upto="block", keep_glue=True, random_weights=True, seed=3, format="npy", **common
        )
    config = {"model": SPEC, "weights": str(file), "upto": "block", "outputs": {"mid": "act"}}
    return featx.extract(config, data, out, **common)


@pytest.mark.parametrize("kind", list(EARLIER_FINGERPRINTS))
def test_the_fingerprint_is_the_one_earlier_featx_wrote_so_their_stores_resume(
    kind: str, tmp_path: Path
) -> None:
    from tests.extract_support import TinyNet

    torch.manual_seed(0)
    save_file(TinyNet().state_dict(), tmp_path / "tiny.safetensors")
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(data / f"{i}.png")
    expected = dict(EARLIER_FINGERPRINTS[kind])
    if expected["weights"] == "tiny.safetensors":
        sha = hashlib.sha256((tmp_path / "tiny.safetensors").read_bytes()).hexdigest()
        expected["weights"] = {"file": "tiny.safetensors", "sha256": sha}
    expected |= {"featx": featx.__version__, "torch": torch.__version__}
    first = _earlier_run(kind, tmp_path, data)
    assert (first.computed, first.resumed) == (2, 0)
    stored = json.loads((tmp_path / kind / "fingerprint.json").read_text())
    assert stored["fingerprint"] == expected
    assert stored["id"] == hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:16]
    again = _earlier_run(kind, tmp_path, data)
    assert (again.computed, again.resumed) == (0, 2)


def test_a_model_source_is_extracted_as_the_spec_and_weights_it_was_parsed_from(
    data: Path, weights: Path, reference: Path, tmp_path: Path
) -> None:
    from featx.models import ModelSource

    source = ModelSource.parse(SPEC, str(weights))
    options = {"upto": "block", "outputs": ["act", "block"], "pool": {"block": "avg"}, "workers": 0}
    featx.extract(source, data, tmp_path / "out", batch_size=4, shard_size=7, progress=False, **options)
    assert_same_features(tmp_path / "out", reference)
    assert (tmp_path / "out" / "fingerprint.json").read_text() == (reference / "fingerprint.json").read_text()


def test_a_model_source_without_weights_takes_the_seed_of_extract(data: Path, tmp_path: Path) -> None:
    from featx.models import ModelSource

    options = {"upto": "block", "workers": 0, "random_weights": True, "progress": False}
    featx.extract(ModelSource.parse(SPEC), data, tmp_path / "a", seed=5, **options)
    featx.extract(ModelSource.parse(SPEC, seed=6), data, tmp_path / "b", seed=5, **options)
    assert fingerprint_of(tmp_path / "a")["weights"] == {"random": True, "seed": 5}
    assert fingerprint_of(tmp_path / "b")["weights"] == {"random": True, "seed": 6}  # its own seed wins


def fingerprint_of(out: Path) -> dict:
    return json.loads((out / "fingerprint.json").read_text())["fingerprint"]
