"""One surface in Python: every public function that takes a model takes it as a SPEC with the source
keywords the command line has as flags (``weights``, ``weights_prefix``, ``model_kwargs``: ``--weights``,
``--weights-prefix``, ``--model-kwarg``) or as one ``featx.ModelSource``, and the two give the same result.

The weights file holds a ResNet-18 of 10 classes under ``module.`` (a DDP checkpoint): without the prefix its
keys do not match, without ``num_classes=10`` its ``fc`` is mis-shaped, so a function that ran used all three.
The features ``build_backbone``, ``export`` and ``extract`` give are the full model's value at the cut,
seen here by a forward hook on the model loaded by hand. ``tests/test_one_surface.py`` holds the same table
for the command line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import featx
from featx.models import ModelSource
from featx.testing import assert_faithful
from featx.verification import inspect, verify_cuts
from tests import toy_models
from tests.modes import value_at

SPEC = "torchvision/resnet18"
KWARGS = {"num_classes": 10}
PREFIX = "module."
CUT = "layer2.0"
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
SHAPE = (2, 3, 64, 64)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = featx.load_model(SPEC, seed=1, **KWARGS)
    with torch.no_grad():  # BN statistics that are not the identity, so the weights show in the features
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.uniform_(-0.2, 0.2)
    path = tmp_path_factory.mktemp("weights") / "ddp.safetensors"
    save_file({PREFIX + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def loaded(weights: Path) -> nn.Module:
    """The model the weights describe, loaded by hand."""
    model = featx.load_model(SPEC, seed=99, **KWARGS)
    state = featx.load_model(SPEC, str(weights), weights_prefix=PREFIX, **KWARGS).state_dict()
    model.load_state_dict(state)
    return model.eval()


def images(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(2):
        pixels = torch.randint(0, 256, (40, 48, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def features(module: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        (value,) = module.eval()(X).values()
    return value


# each function, called with the model and the source keywords; what it returns, to compare
FUNCTIONS: dict[str, Callable[[Any, dict[str, Any], Path], Any]] = {
    "verify": lambda m, kw, tmp: featx.verify(m, CUT, X, **kw).to_dict(),
    "verify_cuts": lambda m, kw, tmp: [r.to_dict() for r in verify_cuts(m, ["layer1", CUT], X, **kw)],
    "sweep": lambda m, kw, tmp: featx.sweep(m, X, **kw).to_dict(),
    "inspect": lambda m, kw, tmp: inspect(m, X, **kw).to_dict(),
    "taps": lambda m, kw, tmp: featx.taps(m, SHAPE, check=False, **kw).to_dict(),
    "assert_faithful": lambda m, kw, tmp: assert_faithful(m, CUT, X, **kw).to_dict(),
    "build_backbone": lambda m, kw, tmp: features(featx.build_backbone(m, upto=CUT, **kw)),
    "build_backbone keep_glue": lambda m, kw, tmp: features(
        featx.build_backbone(m, upto="layer3", keep_glue=True, **kw)
    ),
}


def _export(model: Any, kw: dict[str, Any], tmp: Path) -> torch.Tensor:
    from featx.export import export

    out = tmp / "backbone.safetensors"
    export(model, out, upto=CUT, input_shape=SHAPE, **kw)
    return features(featx.build_backbone(out))


def _extract(model: Any, kw: dict[str, Any], tmp: Path) -> torch.Tensor:
    out = tmp / "features"
    featx.extract(model, images(tmp / "images"), out, upto=CUT, workers=0, progress=False, **kw)
    stored = featx.open_features(out)
    return torch.stack([stored[key][CUT] for key in stored.keys])


FUNCTIONS["export"] = _export
FUNCTIONS["extract"] = _extract
FEATURES = {"build_backbone": CUT, "build_backbone keep_glue": "layer3", "export": CUT}


@pytest.mark.parametrize("function", list(FUNCTIONS))
def test_the_source_keywords_and_a_model_source_give_the_same_result(function, weights, tmp_path):
    call = FUNCTIONS[function]
    keywords = {"weights": str(weights), "weights_prefix": PREFIX, "model_kwargs": KWARGS}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    by_keywords = call(SPEC, keywords, tmp_path / "a")
    source = ModelSource.parse(SPEC, str(weights), weights_prefix=PREFIX, model_kwargs=KWARGS)
    by_source = call(source, {}, tmp_path / "b")
    if isinstance(by_keywords, torch.Tensor):
        assert torch.equal(by_keywords, by_source)
        if function in FEATURES:  # the full model's value at the cut, with these weights
            assert torch.equal(by_keywords, value_at(loaded(weights), FEATURES[function], X))
    else:
        assert json.dumps(by_keywords, sort_keys=True, default=str) == json.dumps(
            by_source, sort_keys=True, default=str
        )


def test_extract_stores_the_full_models_value_with_the_source_keywords(weights, tmp_path):
    from PIL import Image
    from timm.data import create_transform

    keywords = {"weights": str(weights), "weights_prefix": PREFIX, "model_kwargs": KWARGS}
    stored = _extract(SPEC, keywords, tmp_path)
    settings = json.loads((tmp_path / "features" / "manifest.json").read_text())["fingerprint"][
        "preprocessing"
    ]
    assert settings["source"] == "ImageNet default"  # a weights file names no transforms
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    transform = create_transform(**{k: settings[k] for k in keys})
    names = featx.open_features(tmp_path / "features").keys
    x = torch.stack([transform(Image.open(tmp_path / "images" / k).convert("RGB")) for k in names])
    assert torch.equal(stored, value_at(loaded(weights), CUT, x))


def test_a_model_sources_keywords_go_over_its_own(weights):
    """Keywords given with a ModelSource replace its weights and merge into its kwargs, as the command line's
    flags go over a config's keys."""
    bare = ModelSource.parse(SPEC, model_kwargs=KWARGS)
    with_keywords = featx.verify(bare, CUT, X, weights=str(weights), weights_prefix=PREFIX)
    given = ModelSource.parse(SPEC, str(weights), weights_prefix=PREFIX, model_kwargs=KWARGS)
    assert with_keywords.to_dict() == featx.verify(given, CUT, X).to_dict()


def test_the_source_keywords_are_used(weights):
    """Without the prefix the file's keys do not match; without the kwargs its fc is mis-shaped."""
    with pytest.raises(featx.FeatxError, match=r"pass weights_prefix `module\.`"):
        featx.verify(SPEC, CUT, X, weights=str(weights), model_kwargs=KWARGS)
    with pytest.raises(featx.FeatxError, match="mis-shaped"):
        featx.verify(SPEC, CUT, X, weights=str(weights), weights_prefix=PREFIX)


REFUSED = {
    "verify": lambda m: featx.verify(m, 1, torch.ones(2, 4), weights="w.safetensors"),
    "verify_cuts": lambda m: verify_cuts(m, [1], torch.ones(2, 4), weights_prefix="module."),
    "sweep": lambda m: featx.sweep(m, torch.ones(2, 4), model_kwargs={"width": 3}),
    "inspect": lambda m: inspect(m, torch.ones(2, 4), weights="w.safetensors"),
    "taps": lambda m: featx.taps(m, (2, 4), weights="w.safetensors"),
    "assert_faithful": lambda m: assert_faithful(m, 1, torch.ones(2, 4), weights="w.safetensors"),
}


@pytest.mark.parametrize("function", list(REFUSED))
def test_a_built_module_refuses_the_source_keywords_in_one_line(function):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(featx.FeatxError) as err:
        REFUSED[function](model)
    message = str(err.value)
    assert "\n" not in message
    assert "is for a model spec or a featx.models.ModelSource, and model is a built Sequential" in message
    assert message.split(" is for")[0] in (
        "weights='w.safetensors'",
        "weights_prefix='module.'",
        "model_kwargs={'width': 3}",
    )


def test_weights_prefix_without_weights_is_refused_naming_the_keyword():
    with pytest.raises(featx.FeatxError) as err:
        featx.verify(SPEC, CUT, X, weights_prefix=PREFIX)
    assert str(err.value) == "weights_prefix='module.' needs weights (the file to strip it from)"


def test_a_spec_without_weights_is_built_from_seed_as_on_the_command_line():
    """``verify(spec, seed=S)`` builds the random init from S, as ``featx verify SPEC --seed S`` does: one
    seed, one model."""
    spec, x = "tests.toy_models:Recorded", torch.ones(2, 4)
    toy_models.BUILT.clear()
    for seed in (7, 7, 8):
        featx.verify(spec, "a", x, seed=seed, modes=("eval",))
    first, again, other = (dict(m.state_dict()) for m in toy_models.BUILT)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["a.weight"], other["a.weight"])
    toy_models.BUILT.clear()
    with torch.random.fork_rng():
        torch.manual_seed(7)
        expected = toy_models.Recorded()
    assert torch.equal(expected.a.weight, first["a.weight"])


def test_export_of_a_spec_with_keep_glue_is_the_command_lines(weights, tmp_path):
    """``featx.export(SPEC, upto=..., keep_glue=True, weights=...)`` writes what ``featx export SPEC
    --keep-glue --weights ...`` writes: one path from the arguments to the config."""
    from featx.cli import main
    from featx.export import export

    (tmp_path / "python").mkdir()
    (tmp_path / "cli").mkdir()
    python, cli = tmp_path / "python" / "r18.safetensors", tmp_path / "cli" / "r18.safetensors"
    export(SPEC, python, upto="layer3", keep_glue=True, weights=str(weights), weights_prefix=PREFIX,
           model_kwargs=KWARGS, input_shape=SHAPE)  # fmt: skip
    argv = ["export", SPEC, "--upto", "layer3", "--keep-glue", "--weights", str(weights), "--weights-prefix",
            PREFIX, "--model-kwarg", "num_classes=10", "--input-shape", "2,3,64,64", "--out", str(cli)]  # fmt: skip
    assert main(argv) == 0
    from safetensors import safe_open

    with safe_open(str(python), "pt") as a, safe_open(str(cli), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        names = a.keys()
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in names)
        config_a, config_b = json.loads(a.metadata()["config"]), json.loads(b.metadata()["config"])
    assert config_a == config_b and config_a["keep_glue"] is True


def test_assert_faithful_of_a_config_takes_the_source_keywords_over_the_configs(weights, tmp_path):
    """A shipped config names weights the user does not have: the keywords replace them, as
    ``featx check CONFIG --weights FILE --weights-prefix P --model-kwarg K=V`` does."""
    config = tmp_path / "r18.yaml"
    config.write_text(
        f"model: {SPEC}\nweights: not-here.safetensors\nupto: layer2\noutputs: [layer1, layer2]\n"
        "verify: {input_shape: [2, 3, 64, 64], modes: [eval]}\n"
    )
    result = assert_faithful(config, weights=str(weights), weights_prefix=PREFIX, model_kwargs=KWARGS)
    assert result.faithful
    with pytest.raises(AssertionError, match="not-here"):  # the config's own weights are not there
        assert_faithful(config)
