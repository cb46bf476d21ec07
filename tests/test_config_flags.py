"""A CONFIG with model and cut flags: on verify, build, export and extract each flag overrides the config key
that says the same (``--upto`` -> ``upto``, ``--weights`` -> ``weights``, ``--model-kwarg K=V`` ->
``model_kwargs.K``, ...), as mmdetection's ``--cfg-options`` do on every tool; the same flag on the same
config gives the same backbone on every verb, which says which flag overrode which key."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import featx
from featx.cli import main
from tests.modes import value_at
from tests.test_one_surface import _preprocessed

R18 = "torchvision/resnet18"
SHAPE = (1, 3, 32, 32)  # the config's `verify.input_shape`


def _state(seed: int) -> dict[str, torch.Tensor]:
    model = featx.load_model(R18, seed=seed)
    with torch.no_grad():  # BN statistics that are not the identity, so the weights show in the features
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.uniform_(-0.2, 0.2)
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class Override:
    flags: tuple[str, ...]  # "@name" is a file of the `config` fixture's folder
    module: str  # whose output the backbone's one feature is
    weights: str  # which state the model holds: "own" (the config's) or "flag" (--weights')
    overridden: dict[str, str]  # config key -> flag, as build and export report it
    input_shape: tuple[int, ...] = SHAPE


OVERRIDES = {
    "--upto": Override(("--upto", "layer2.0"), "layer2.0", "own", {"upto": "--upto"}),
    "--keep-glue": Override(("--keep-glue",), "layer3", "own", {"keep_glue": "--keep-glue"}),
    "--weights": Override(("--weights", "@other.safetensors"), "layer3", "flag", {"weights": "--weights"}),
    "--weights-prefix": Override(
        ("--weights", "@ddp.safetensors", "--weights-prefix", "module."),
        "layer3",
        "flag",
        {"weights": "--weights", "weights_prefix": "--weights-prefix"},
    ),
    # a download switch merged into `model_kwargs`: the weights of torch's (temporary) cache
    "--model-kwarg": Override(
        ("--model-kwarg", "weights=IMAGENET1K_V1"), "layer3", "flag", {"model_kwargs": "--model-kwarg"}
    ),
    "--input-shape": Override(
        ("--input-shape", "1,3,48,48"),
        "layer3",
        "own",
        {"verify.input_shape": "--input-shape"},
        input_shape=(1, 3, 48, 48),
    ),
}


@pytest.fixture(scope="module")
def states() -> dict[str, dict[str, torch.Tensor]]:
    return {"own": _state(1), "flag": _state(2)}


@pytest.fixture
def config(tmp_path, states, monkeypatch) -> Path:
    """A config of its own weights (beside it), cut at `layer3` and tapping it; other weights beside it and
    as torchvision's IMAGENET1K_V1 in a temporary torch cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"  # IMAGENET1K_V1's file
    cached.parent.mkdir(parents=True)
    torch.save(states["flag"], cached)
    save_file(states["own"], str(tmp_path / "own.safetensors"))
    save_file(states["flag"], str(tmp_path / "other.safetensors"))
    save_file({f"module.{k}": v for k, v in states["flag"].items()}, str(tmp_path / "ddp.safetensors"))
    path = tmp_path / "r18.yaml"
    path.write_text(
        f"model: {R18}\nweights: own.safetensors\nupto: layer3\n"
        f"verify: {{input_shape: {list(SHAPE)}, modes: [eval]}}\n"
    )
    return path


def _flags(given: Override, config: Path) -> list[str]:
    return [str(config.parent / f[1:]) if f.startswith("@") else f for f in given.flags]


def _model(given: Override, states) -> torch.nn.Module:
    """The full model the overridden config means, built here without featx's config layer."""
    model = featx.load_model(R18, seed=99)
    model.load_state_dict(states[given.weights])
    return model.eval()


def run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("flag", list(OVERRIDES))
def test_verify_of_a_config_verifies_the_cut_the_flag_says(flag, config, states, capsys):
    given = OVERRIDES[flag]
    code, out, err = run(capsys, "verify", config, *_flags(given, config), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["upto"], report["input_shape"], report["faithful"]) == (
        given.module,
        list(given.input_shape),
        True,
    )
    assert report["kept"] == {"layer2.0": 6, "layer3": 7}[given.module]
    assert report["keep_glue"] is (flag == "--keep-glue")


@pytest.mark.parametrize("flag", list(OVERRIDES))
def test_build_of_a_config_builds_what_the_flag_says_and_names_it(flag, config, states, capsys):
    given = OVERRIDES[flag]
    code, out, err = run(capsys, "build", config, *_flags(given, config), "--json")
    assert code == 0, err
    summary = json.loads(out)
    expected = value_at(_model(given, states), given.module, torch.zeros(given.input_shape))
    assert [(o["child"], o["shape"]) for o in summary["outputs"]] == [(given.module, list(expected.shape))]
    assert summary["overridden"] == given.overridden


@pytest.mark.parametrize("flag", list(OVERRIDES))
def test_export_of_a_config_holds_what_the_flag_says_and_names_it(flag, config, states, tmp_path, capsys):
    given = OVERRIDES[flag]
    out = tmp_path / "backbone.safetensors"
    code, stdout, err = run(capsys, "export", config, *_flags(given, config), "--out", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["overridden"] == given.overridden
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (feature,) = featx.build_backbone(out)(x).values()
    assert torch.equal(feature, value_at(_model(given, states), given.module, x))


@pytest.mark.parametrize("flag", [f for f in OVERRIDES if f != "--input-shape"])  # images have their size
def test_extract_of_a_config_stores_what_the_flag_says(flag, config, states, images, tmp_path, capsys):
    given = OVERRIDES[flag]
    out = tmp_path / "features"
    argv = ["extract", config, *_flags(given, config), "--data", images, "--out", out]
    code, _, err = run(capsys, *argv, "--workers", "0", "--no-progress")
    assert code == 0, err
    features = featx.open_features(out)
    stored = torch.stack([next(iter(features[k].values())) for k in features.keys])
    x = _preprocessed(out, images, list(features.keys))
    assert torch.equal(stored, value_at(_model(given, states), given.module, x))


def test_build_says_which_flags_overrode_the_config(config, capsys):
    code, out, err = run(capsys, "build", config, "--upto", "layer2", "--keep-glue")
    assert code == 0, err
    assert out.splitlines()[0] == f"featx build  {config}  (--upto over `upto`, --keep-glue over `keep_glue`)"


def test_an_upto_before_the_configs_taps_is_refused_naming_the_flag(config, capsys):
    config.write_text(config.read_text() + "outputs: [layer2, layer3]\n")
    code, _, err = run(capsys, "build", config, "--upto", "layer2")
    assert code == 2
    assert err == (
        f"featx: error: --upto layer2 cuts before `layer3`, which {config} taps (key `outputs[1]`); give "
        "--outputs too, with modules the cut runs (`conv1`, `bn1`, `relu`, `maxpool`, `layer1`, `layer2`)\n"
    )


def test_build_says_once_that_an_fpn_stays_at_random_init(config, capsys):
    config.write_text(config.read_text() + "fpn: {out_channels: 16}\n")
    other = config.parent / "other.safetensors"  # a body's weights, without FPN tensors
    code, out, err = run(capsys, "build", config, "--weights", other)
    assert code == 0, err
    assert err == ""
    assert [line for line in out.splitlines() if "random" in line] == [
        f"fpn: random (`{other}` holds no FPN tensors; looked for `fpn.*`, `neck.lateral_convs.*`, `fpn_lateral*`)"
    ]


def test_a_freeze_past_an_overriding_cut_names_the_flag(config, capsys):
    config.write_text(config.read_text() + "freeze: layer3\n")
    code, _, err = run(capsys, "build", config, "--upto", "layer2", "--outputs", "layer2")
    assert code == 2
    assert err == (
        f"featx: error: {config}: key `freeze` freezes through `layer3`, past the cut at `layer2` (from --upto)\n"
    )
