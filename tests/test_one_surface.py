"""One model, one cut, one surface: every verb that takes a SPEC takes the same model flags, and they agree.

Each weights source — a weights file, a torchvision weights name read from a temporary torch cache, an
``hf-hub:`` id read from a temporary hub cache, random weights seeded by ``--seed`` — is given to
``verify``, ``sweep``, ``inspect``, ``build``, ``export`` and ``extract`` with the same flags, at a dotted
cut and at a cut with ``--keep-glue``; the features ``export`` and ``extract`` write are the full model's
value at the cut, computed here with a forward hook on a model loaded with the same weights. ``taps``
takes the same model flags (it has no cut: it proposes one) and the config it writes builds the full
model's values at its pyramid. ``check`` and ``build`` take a shipped config with ``--weights FILE`` in
place of the config's own.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform

import featx
from featx.cli import main
from tests.modes import value_at

TORCHVISION, TIMM = "torchvision/resnet18", "timm/resnet18"
SMALL = ["--input-shape", "1,3,32,32"]
TWO = ["--input-shape", "2,3,64,64"]  # train mode's batch norm needs two values per channel at layer4
HUB_REPO = "featx-test/resnet18-seeded"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@dataclass(frozen=True)
class Source:
    """A model spec and the flags that give it its weights; ``model()`` is the full model with them."""

    spec: str
    flags: tuple[str, ...]
    model: Callable[[], torch.nn.Module]
    random: bool = False


@dataclass(frozen=True)
class Cut:
    flags: tuple[str, ...]
    module: str  # whose output the cut's feature is


CUTS = {
    "dotted cut": Cut(("--upto", "layer2.0"), "layer2.0"),
    # resnet18 has no glue before its pooled head (a backbone taps feature maps): the traced cut is the chain
    "keep glue": Cut(("--upto", "layer3", "--keep-glue"), "layer3"),
}


def _state(spec: str, seed: int) -> dict[str, torch.Tensor]:
    model = featx.load_model(spec, seed=seed)
    with torch.no_grad():  # BN statistics that are not the identity, so the weights show in the features
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.uniform_(-0.2, 0.2)
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def _loaded(spec: str, state: dict[str, torch.Tensor]) -> Callable[[], torch.nn.Module]:
    def model() -> torch.nn.Module:
        m = featx.load_model(spec, seed=99)
        m.load_state_dict(state)
        return m.eval()

    return model


@pytest.fixture
def sources(tmp_path, monkeypatch) -> dict[str, Source]:
    """The four ways to name weights, each a different seeded state; the caches are temporary and offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    file_state = _state(TORCHVISION, 1)
    save_file(file_state, str(tmp_path / "r18.safetensors"))
    named_state = _state(TORCHVISION, 2)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"  # IMAGENET1K_V1's file
    cached.parent.mkdir(parents=True)
    torch.save(named_state, cached)
    hub_state = _state(TIMM, 3)
    snapshot = tmp_path / "hub" / ("models--" + HUB_REPO.replace("/", "--"))
    (snapshot / "snapshots" / REVISION).mkdir(parents=True)
    save_file(hub_state, str(snapshot / "snapshots" / REVISION / "model.safetensors"))
    (snapshot / "refs").mkdir()
    (snapshot / "refs" / "main").write_text(REVISION)
    return {
        "weights file": Source(
            TORCHVISION, ("--weights", str(tmp_path / "r18.safetensors")), _loaded(TORCHVISION, file_state)
        ),
        "torchvision name": Source(
            TORCHVISION, ("--weights", "IMAGENET1K_V1"), _loaded(TORCHVISION, named_state)
        ),
        "hf-hub id": Source(TIMM, ("--weights", f"hf-hub:{HUB_REPO}"), _loaded(TIMM, hub_state)),
        "random, seeded": Source(
            TORCHVISION, ("--seed", "5"), lambda: featx.load_model(TORCHVISION, seed=5), random=True
        ),
    }


SOURCES = ["weights file", "torchvision name", "hf-hub id", "random, seeded"]


def run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("cut", list(CUTS))
@pytest.mark.parametrize("source", SOURCES)
def test_verify_sweep_and_inspect_take_the_model_flags(sources, source, cut, capsys):
    given = sources[source]
    code, out, err = run(capsys, "verify", given.spec, *given.flags, *CUTS[cut].flags, *TWO, "--json")
    assert code == 0, err
    assert json.loads(out)["faithful"] is True
    keep_glue = ["--keep-glue"] if "--keep-glue" in CUTS[cut].flags else []
    code, out, err = run(capsys, "sweep", given.spec, *given.flags, *keep_glue, *TWO, "--json")
    assert code == 0, err
    unfaithful = [c["upto"] for c in json.loads(out)["cuts"] if not c["faithful"]]
    # torchvision's forward flattens before fc (glue, kept only with --keep-glue); timm's global_pool does
    assert unfaithful == (["fc"] if given.spec == TORCHVISION and not keep_glue else [])
    code, out, err = run(capsys, "inspect", given.spec, *given.flags, *TWO, "--json")
    assert code == 0, err
    assert [c["name"] for c in json.loads(out)["children"]][:2] == ["conv1", "bn1"]


@pytest.mark.parametrize("cut", list(CUTS))
@pytest.mark.parametrize("source", SOURCES)
def test_build_of_a_spec_measures_the_full_models_value_at_the_cut(sources, source, cut, capsys):
    given = sources[source]
    code, out, err = run(capsys, "build", given.spec, *given.flags, *CUTS[cut].flags, *SMALL, "--json")
    assert code == 0, err
    (output,) = json.loads(out)["outputs"]
    expected = value_at(given.model(), CUTS[cut].module, torch.zeros(1, 3, 32, 32))
    assert output["shape"] == list(expected.shape)


@pytest.mark.parametrize("cut", list(CUTS))
@pytest.mark.parametrize("source", SOURCES)
def test_export_of_a_spec_holds_the_full_models_value_at_the_cut(sources, source, cut, tmp_path, capsys):
    given = sources[source]
    out = tmp_path / "backbone.safetensors"
    random = ["--random-weights"] if given.random else []
    argv = ["export", given.spec, *given.flags, *random, *CUTS[cut].flags, *SMALL, "--out", out]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (feature,) = featx.build_backbone(out)(x).values()
    assert torch.equal(feature, value_at(given.model(), CUTS[cut].module, x))


@pytest.mark.parametrize("source", SOURCES)
def test_taps_of_a_spec_proposes_a_pyramid_on_the_same_weights(sources, source, tmp_path, capsys):
    """``taps`` loads the model the flags name (a bad source fails there) and writes it into its config as
    given (a file relative to the config, a weights name; nothing for random weights, whose seed the
    header names): that config, built with the same seed, is the full model's value at every level."""
    given = sources[source]
    written = tmp_path / "pyramid" / "backbone.yaml"
    written.parent.mkdir()
    argv = ["taps", given.spec, *given.flags, *TWO, "--no-check", "--config", written, "--json"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert json.loads(out)["model"] == given.spec
    seed = int(given.flags[1]) if given.random else 0
    assert (f"`--seed {seed}`" in written.read_text()) == given.random
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    backbone = featx.build_backbone(written, seed=seed)
    with torch.no_grad():
        features = backbone(x)
    model, tapped = given.model(), {o: m for m, outputs in backbone.taps.items() for o in outputs}
    assert tapped == {"C2": "layer1", "C3": "layer2", "C4": "layer3", "C5": "layer4"}
    for name, feature in features.items():
        assert torch.equal(feature, value_at(model, tapped[name], x)), name


def _extract(capsys, source: Source, cut: Cut, images: Path, out: Path, *extra: str) -> tuple[int, str]:
    argv = ["extract", source.spec, *source.flags, *cut.flags, "--data", images, "--out", out]
    code, _, err = run(capsys, *argv, "--workers", "0", "--no-progress", *extra)
    return code, err


def _preprocessed(out: Path, images: Path, keys: list[str]) -> torch.Tensor:
    """The images as the run's manifest says it preprocessed them (its timm data config)."""
    settings = json.loads((out / "manifest.json").read_text())["fingerprint"]["preprocessing"]
    if settings["source"].startswith("torchvision"):  # the weights' own transforms
        transform = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    else:
        keys_of_timm = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
        transform = create_transform(**{k: settings[k] for k in keys_of_timm})
    return torch.stack([transform(Image.open(images / k).convert("RGB")) for k in keys])


@pytest.mark.parametrize("cut", list(CUTS))
@pytest.mark.parametrize("source", SOURCES)
def test_extract_of_a_spec_stores_the_full_models_value_at_the_cut(
    sources, source, cut, images, tmp_path, capsys
):
    given = sources[source]
    out = tmp_path / "features"
    code, err = _extract(
        capsys, given, CUTS[cut], images, out, *(["--random-weights"] if given.random else [])
    )
    assert code == 0, err
    features = featx.open_features(out)
    stored = torch.stack([next(iter(features[k].values())) for k in features.keys])
    x = _preprocessed(out, images, list(features.keys))
    assert torch.equal(stored, value_at(given.model(), CUTS[cut].module, x))


def test_extract_on_random_weights_gives_the_same_features_twice(sources, images, tmp_path, capsys):
    given = sources["random, seeded"]
    for out in (tmp_path / "a", tmp_path / "b"):
        code, err = _extract(capsys, given, CUTS["dotted cut"], images, out, "--random-weights")
        assert code == 0, err
    a, b = featx.open_features(tmp_path / "a"), featx.open_features(tmp_path / "b")
    assert torch.equal(a.tensor("layer2.0"), b.tensor("layer2.0"))


def test_extract_refuses_random_weights_unless_asked(sources, images, tmp_path, capsys):
    code, err = _extract(capsys, sources["random, seeded"], CUTS["dotted cut"], images, tmp_path / "f")
    assert code == 2
    assert err.startswith("featx: error: ") and "--random-weights" in err and err.count("\n") == 1
    assert not (tmp_path / "f" / "manifest.json").exists()


@pytest.fixture
def shipped(tmp_path) -> Path:
    """A config naming weights the user does not have: ``--weights FILE`` must replace them."""
    config = tmp_path / "shipped" / "r18.yaml"
    config.parent.mkdir()
    config.write_text(
        "model: torchvision/resnet18\nweights: not-here.safetensors\nupto: layer2\noutputs: [layer1, layer2]\n"
        "verify: {input_shape: [1, 3, 32, 32], modes: [eval]}\n"
    )
    return config


def test_check_of_a_config_uses_the_weights_flag_instead_of_the_configs(sources, shipped, capsys):
    code, out, err = run(capsys, "check", shipped, *sources["weights file"].flags, "--json")
    assert code == 0, (out, err)
    (item,) = json.loads(out)["configs"]
    assert item["outcome"] == "faithful"


def test_check_refuses_the_weights_flag_with_more_than_one_config(sources, shipped, capsys):
    other = shipped.parent / "r18-copy.yaml"
    other.write_text(shipped.read_text())
    weights = sources["weights file"].flags[1]
    code, _, err = run(capsys, "check", shipped, other, "--weights", weights)
    assert code == 2
    assert err == (
        f"featx: error: --weights {weights} replaces one config's weights; the paths hold 2 configs "
        f"(`{shipped}`, `{other}`); check one config with --weights\n"
    )


def test_export_of_a_config_uses_the_weights_flag_instead_of_the_configs(sources, shipped, tmp_path, capsys):
    given = sources["weights file"]
    code, _, err = run(capsys, "export", shipped, *given.flags, "--out", tmp_path / "b.safetensors")
    assert code == 0, err
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = featx.build_backbone(tmp_path / "b.safetensors")(x)
    assert torch.equal(features["layer2"], value_at(given.model(), "layer2", x))


def test_build_of_a_config_uses_the_weights_flag_instead_of_the_configs(sources, shipped, capsys):
    code, out, err = run(capsys, "build", shipped, *sources["weights file"].flags, "--json")
    assert code == 0, err
    assert [o["shape"] for o in json.loads(out)["outputs"]] == [[1, 64, 8, 8], [1, 128, 4, 4]]


def test_a_cut_given_as_a_count_names_its_output_after_the_module(capsys):
    assert (
        main(["build", "torchvision/resnet18", "--upto", "-3", "--input-shape", "1,3,64,64", "--json"]) == 0
    )
    outputs = json.loads(capsys.readouterr().out)["outputs"]
    assert [(o["name"], o["child"]) for o in outputs] == [("layer3", "layer3")]
