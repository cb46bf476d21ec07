"""Nested cuts and taps: dotted paths into a child (``stages.2``), their verdicts level by level, sweep
``depth``, and config backbones tapped inside a container — bit-equal to timm ``features_only`` and
torchvision ``create_feature_extractor`` on the same weights."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import featx
from featx import FeatxError
from featx.cli import main
from featx.glue import KeepGlue
from tests.modes import run_in_mode
from tests.toy_models import Around, Skip, TrainOnly

X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
SMALL = {"input_shape": [2, 3, 64, 64]}
HERE = Path(__file__).name


def _line(text: str) -> str:
    """``test_nested.py:N`` of the line of this file holding ``text`` (featx shows the file relative to
    its sys.path entry, which may be the tests folder or the repository)."""
    lines = Path(__file__).read_text().splitlines()
    return f"{HERE}:{next(i for i, line in enumerate(lines, 1) if text in line and '_line(' not in line)}"


class Stage(nn.Module):
    """A container whose forward does more than call its children in order."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 4)

    def forward(self, x):
        x = self.a(x)
        x = x * 2  # the stage's own glue
        x = self.b(x)
        return self.c(x)


class WithStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.stage = Stage()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.stage(self.stem(x)))


class IteratesBlocks(nn.Module):
    """The root calls the children of a ModuleList itself, as timm's ViT-like models do."""

    def __init__(self, pos: bool) -> None:
        super().__init__()
        self.pos = pos
        self.stem = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.stem(x)
        if self.pos:
            x = x + 1  # the root's position-embedding-like glue
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _seeded(factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory().eval()


def _hooked(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The full model's output of module ``name``, by a forward hook (not through featx)."""
    seen = {}
    handle = dict(model.named_modules())[name].register_forward_hook(lambda m, a, out: seen.update(out=out))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["out"].clone()


# -- truncate ---------------------------------------------------------------------------------------------
def test_truncate_stages_2_keeps_the_same_blocks_under_their_state_dict_names():
    model = timm.create_model("convnext_atto")
    cut = featx.truncate(model, "stages.2")
    assert list(cut._modules) == ["stem", "stages"]
    assert list(cut.stages._modules) == ["0", "1", "2"]
    assert cut.stem is model.stem and all(cut.stages[i] is model.stages[i] for i in range(3))
    expected = [
        k for k in model.state_dict() if k.startswith(("stem.", "stages.0.", "stages.1.", "stages.2."))
    ]
    assert list(cut.state_dict()) == expected


def test_truncate_at_any_depth_runs_what_the_path_names():
    model = _seeded(lambda: timm.create_model("convnext_atto"))
    cut = featx.truncate(model, "stages.1.blocks.0").eval()
    assert list(cut.stages[1]._modules) == ["downsample", "blocks"]
    assert list(cut.stages[1].blocks._modules) == ["0"]
    with torch.no_grad():
        by_hand = model.stages[1].blocks[0](model.stages[1].downsample(model.stages[0](model.stem(X64))))
        assert torch.equal(cut(X64), by_hand)


def test_digit_segments_name_sequential_children_and_plain_cuts_are_unchanged():
    seq = nn.Sequential(nn.ReLU(), nn.Sequential(nn.Tanh(), nn.Sigmoid(), nn.ReLU()))
    assert list(featx.truncate(seq, "1.1")[1]._modules) == ["0", "1"]
    assert list(featx.truncate(seq, "1")._modules) == ["0", "1"]  # a name first, as before
    assert featx.truncate(seq, "1")[1] is seq[1]


@pytest.mark.parametrize(
    ("upto", "fragment"),
    [
        ("stages.9", "`stages` (Sequential) has no child `9`; its children: `0`, `1`, `2`, `3`"),
        ("stages.2.blokcs", "has no child `blokcs` (did you mean `blocks`?)"),
        ("stem.0.bias", "goes through `stem.0` (Conv2d), which has no children to cut between (`bias` is a "),
        ("stages..2", "has an empty segment"),
    ],
)
def test_bad_paths_are_one_line_and_leave_the_model_untouched(upto, fragment, untouched):
    model = timm.create_model("convnext_atto")
    with untouched(model), pytest.raises(FeatxError) as raised:
        featx.verify(model, upto, X64)
    assert fragment in str(raised.value) and "\n" not in str(raised.value)


# -- verify -----------------------------------------------------------------------------------------------
def test_convnext_stages_2_is_faithful_and_its_json_shows_the_container():
    model = _seeded(lambda: timm.create_model("convnext_atto"))
    report = featx.verify(model, "stages.2", X64)
    assert report.faithful
    assert {m: r.method for m, r in report.modes.items()} == {"eval": "run", "train": "run"}
    data = report.to_dict()
    assert (data["upto"], data["kept"]) == ("stages.2", 2)  # kept: the root children the cut touches
    assert [c["kept"] for c in data["children"]] == [True, True, False, False]
    (stages,) = data["containers"]
    assert (stages["name"], stages["type"], stages["kept"]) == ("stages", "Sequential", 3)
    assert [(c["name"], c["kept"]) for c in stages["children"]] == [
        ("stages.0", True),
        ("stages.1", True),
        ("stages.2", True),
        ("stages.3", False),
    ]
    assert stages["children"][2]["output_shape"] == [2, 160, 4, 4]
    assert data["glue"] == []


def test_a_containers_own_glue_is_lost_with_its_source_line():
    model = _seeded(WithStage)
    x = torch.randn(3, 4)
    report = featx.verify(model, "stage.b", x)
    mul = next(g for g in report.to_dict()["glue"] if g["op"] == "mul")
    assert mul["source"].split("/")[-1] == _line("x = x * 2  # the stage's own glue")
    assert mul == {
        "op": "mul",
        "source": mul["source"],
        "after": "stage.a",
        "before": "stage.b",
        "modes": ["eval", "train"],
        "count": 1,
        "container": "stage",
        "status": "lost",
    }
    assert not report.faithful
    assert (
        report.reasons[0]
        == f"glue `mul` ({mul['source']}) runs in `stage`'s forward before `stage.b` in the full model and is lost"
    )
    with torch.no_grad():  # the literal answer, without featx
        literal = model.stage.b(model.stage.a(model.stem(x)))
    diff = (literal - _hooked(model, "stage.b", x)).abs().max().item()
    assert report.modes["eval"].max_abs_diff == pytest.approx(diff, rel=0, abs=0)
    # cut before it, the same glue is applied right at the cut and the cut is faithful
    before = featx.verify(model, "stage.a", x)
    assert before.faithful
    assert next(g for g in before.to_dict()["glue"] if g["op"] == "mul")["status"] == "at_cut"


def test_caformer_stage_reshape_glue_is_lost_inside_the_stage():
    model = _seeded(lambda: timm.create_model("caformer_s18"))
    report = featx.verify(model, "stages.2.blocks", X64)
    assert not report.faithful
    glue = [g for g in report.to_dict()["glue"] if g["container"] == "stages.2" and g["status"] == "lost"]
    source = f"timm/models/metaformer.py:{_metaformer_line('x = x.reshape(B, C, -1).transpose(1, 2)')}"
    assert [(g["op"], g["source"], g["before"]) for g in glue] == [
        ("reshape", source, "stages.2.blocks"),
        ("transpose", source, "stages.2.blocks"),
    ]
    assert featx.verify(model, "stages.2.downsample", X64).faithful


def _metaformer_line(text: str) -> int:
    import timm.models.metaformer as metaformer

    lines = Path(metaformer.__file__).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


@pytest.mark.parametrize("pos", [False, True])
def test_a_modulelist_the_root_iterates_is_cut_inside_and_the_roots_glue_is_lost(pos):
    model = _seeded(lambda: IteratesBlocks(pos))
    x = torch.randn(3, 4)
    report = featx.verify(model, "blocks.1", x)
    with torch.no_grad():
        literal = model.blocks[1](model.blocks[0](model.stem(x)))
    assert report.faithful == torch.equal(literal, _hooked(model, "blocks.1", x))
    assert report.faithful is (not pos)
    statuses = [(g["op"], g["status"]) for g in report.to_dict()["glue"]]
    assert statuses == ([("add", "lost")] if pos else [])


# -- sweep ------------------------------------------------------------------------------------------------
def test_sweep_depth_1_is_todays_sweep():
    model = _seeded(WithStage)
    assert [c.upto for c in featx.sweep(model, torch.randn(3, 4)).cuts] == ["stem", "stage", "head"]


@pytest.mark.parametrize("factory", [WithStage, lambda: IteratesBlocks(True), lambda: IteratesBlocks(False)])
def test_sweep_depth_2_verdicts_equal_verify_and_the_literal_sweep(factory):
    model = _seeded(factory)
    x = torch.randn(3, 4)
    derived = featx.sweep(model, x, depth=2)
    literal = featx.sweep(model, x, depth=2, literal=True)
    assert [c.upto for c in derived.cuts] == [c.upto for c in literal.cuts]
    for d, lit in zip(derived.cuts, literal.cuts, strict=True):
        if not any(c.calls["eval"] for c in [derived.anatomy.unit(d.upto)]):  # verify refuses: no value there
            assert not d.faithful and not lit.faithful
            continue
        one = featx.verify(model, d.upto, x)
        assert d.faithful == lit.faithful == one.faithful, d.upto
        assert {m: r.max_abs_diff for m, r in d.modes.items()} == {
            m: r.max_abs_diff for m, r in one.modes.items()
        }


def test_convnext_sweep_depth_2_lists_the_nested_cuts_in_forward_order_and_derives_them():
    model = _seeded(lambda: timm.create_model("convnext_atto"))
    data = featx.sweep(model, X64, depth=2).to_dict()
    cuts = [(c["upto"], c["kept"], c["depth"]) for c in data["cuts"]]
    assert cuts[:8] == [
        ("stem.0", 1, 2),
        ("stem.1", 1, 2),
        ("stem", 1, 1),
        ("stages.0", 2, 2),
        ("stages.1", 2, 2),
        ("stages.2", 2, 2),
        ("stages.3", 2, 2),
        ("stages", 2, 1),
    ]
    assert all(c["faithful"] for c in data["cuts"])
    stage_cuts = [c for c in data["cuts"] if c["upto"].startswith("stages.")]
    assert {r["method"] for c in stage_cuts for r in c["modes"].values()} == {"derived"}


def test_cli_sweep_depth_2_json(capsys):
    code = main(["sweep", "timm/convnext_atto", "--input-shape", "2,3,64,64", "--depth", "2", "--json"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "stages.2" in [c["upto"] for c in json.loads(out)["cuts"]]


def test_cli_verify_nested_cut(capsys):
    code = main(["verify", "timm/convnext_atto", "--upto", "stages.2", "--input-shape", "2,3,64,64"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "cut inside `stages` at `stages.2`" in out
    assert "cut: keeps 3 of 4 children of `stages`" in out
    assert out.rstrip().endswith(
        "faithful: the cut at `stages.2` equals the full model there in eval and train"
    )


# -- configs ----------------------------------------------------------------------------------------------
def _weights(tmp_path: Path, model: nn.Module) -> str:
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def _timm_features(name: str, full: nn.Module) -> nn.Module:
    """timm's features_only model with ``full``'s weights (FeatureListNet names `stages.0` `stages_0`)."""
    features = timm.create_model(name, features_only=True)
    own = full.state_dict()
    state = {}
    for key in features.state_dict():
        head, _, rest = key.partition(".")
        state[key] = own[key] if key in own else own[f"{head.replace('_', '.')}.{rest}"]
    features.load_state_dict(state)
    return features.eval()


@pytest.mark.parametrize(
    ("name", "upto", "outputs", "strides"),
    [
        ("convnext_atto", "stages", ["stages.0", "stages.1", "stages.2", "stages.3"], [4, 8, 16, 32]),
        (
            "efficientnet_b0",
            "blocks.6",
            ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"],
            [2, 4, 8, 16, 32],
        ),
        (
            "resnetv2_50",
            "stages.3",
            ["stem.conv", "stages.0", "stages.1", "stages.2", "stages.3"],
            [2, 4, 8, 16, 32],
        ),
    ],
)
def test_nested_taps_are_bit_equal_to_timm_features_only(tmp_path, name, upto, outputs, strides):
    full = _seeded(lambda: timm.create_model(name))
    features = _timm_features(name, full)
    assert features.feature_info.module_name() == outputs  # the same taps, named as timm names them
    backbone = featx.build_backbone(
        {
            "model": f"timm/{name}",
            "weights": _weights(tmp_path, full),
            "upto": upto,
            "outputs": outputs,
            "verify": SMALL,
        }
    )
    with torch.no_grad():
        ours, theirs = list(backbone(X64).values()), features(X64)
    assert [torch.equal(a, b) for a, b in zip(ours, theirs, strict=True)] == [True] * len(outputs)
    assert list(backbone.strides.values()) == strides == features.feature_info.reduction()
    assert list(backbone.out_channels.values()) == features.feature_info.channels()
    assert set(backbone.state_dict()) <= set(full.state_dict())


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v3_large"])
def test_features_taps_are_bit_equal_to_create_feature_extractor(tmp_path, name):
    full = _seeded(getattr(torchvision.models, name))
    taps = (
        ["features.1", "features.3", "features.8"]
        if name.endswith("small")
        else ["features.3", "features.6", "features.12", "features.16"]
    )
    extractor = create_feature_extractor(full, {t: t for t in taps}).eval()
    backbone = featx.build_backbone(
        {
            "model": f"torchvision/{name}",
            "weights": _weights(tmp_path, full),
            "upto": taps[-1],
            "outputs": taps,
            "verify": SMALL,
        }
    )
    with torch.no_grad():
        ours, theirs = backbone(X64), extractor(X64)
    assert list(ours) == taps
    assert all(torch.equal(ours[t], theirs[t]) for t in taps)
    assert list(backbone.state_dict()) == [
        k
        for k in full.state_dict()
        if int(k.split(".")[1]) <= int(taps[-1].split(".")[1]) and k.startswith("features.")
    ]


def test_a_nested_cut_keeps_only_the_blocks_it_runs_and_export_rebuilds_bit_exactly(tmp_path):
    full = _seeded(lambda: timm.create_model("convnext_atto"))
    config = {
        "model": "timm/convnext_atto",
        "weights": _weights(tmp_path, full),
        "upto": "stages.2",
        "outputs": ["stages.1", "stages.2"],
        "verify": SMALL,
    }
    backbone = featx.build_backbone(config)
    keys = list(backbone.state_dict())
    assert keys == [
        k for k in full.state_dict() if k.startswith(("stem.", "stages.0.", "stages.1.", "stages.2."))
    ]
    out = tmp_path / "backbone.safetensors"
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    from featx.export import export  # the export branch moved export() to featx.export

    export(tmp_path / "c.yaml", out)
    rebuilt = featx.build_backbone({**config, "weights": str(out)})  # strict: the file holds no stages.3
    with torch.no_grad():
        assert all(
            torch.equal(a, b) for a, b in zip(backbone(X64).values(), rebuilt(X64).values(), strict=True)
        )


def test_fpn_on_nested_taps_builds_and_runs():
    backbone = featx.build_backbone(
        {
            "model": "timm/convnext_atto",
            "upto": "stages.3",
            "outputs": {"C3": "stages.1", "C4": "stages.2", "C5": "stages.3"},
            "fpn": {"out_channels": 64},
            "verify": SMALL,
        }
    )
    with torch.no_grad():
        out = backbone(X64)
    # FPN maps are named as torchvision names them ('0'..'n-1', 'pool'); map_names keeps the config's
    assert backbone.map_names == {"C3": "0", "C4": "1", "C5": "2"}
    assert {k: list(v.shape) for k, v in out.items()} == {
        "0": [2, 64, 8, 8],
        "1": [2, 64, 4, 4],
        "2": [2, 64, 2, 2],
        "pool": [2, 64, 1, 1],
    }


def test_freeze_and_frozen_norms_reach_into_the_container():
    backbone = featx.build_backbone(
        {
            "model": "timm/efficientnet_b0",
            "upto": "blocks.4",
            "outputs": ["blocks.2", "blocks.4"],
            "freeze": "bn1",
            "norm": "frozen",
            "verify": SMALL,
        }
    )
    assert not any(p.requires_grad for p in backbone["conv_stem"].parameters())
    assert all(p.requires_grad for p in backbone["blocks"].parameters())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules())
    backbone.train()
    assert not backbone["bn1"].training and backbone["blocks"].training


def test_upto_naming_a_container_that_taps_reach_into_is_checked_as_its_last_child(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "model: timm/convnext_atto\nupto: stages\noutputs: [stages.1, stages]\nverify: {input_shape: [2, 3, 64, 64]}\n"
    )
    item = featx.check([config]).items[0]
    assert item.outcome == "faithful"
    assert item.upto == "stages.3"
    assert [r.upto for r in item.reports] == ["stages.1", "stages.3"]
    assert dict(item.outputs) == {"stages.1": "stages.1", "stages": "stages.3"}


# -- keep_glue at nested cuts -----------------------------------------------------------------------------
def _full_value(model: nn.Module, name: str, x: torch.Tensor, mode: str, seed: int = 0) -> torch.Tensor:
    """What module ``name`` returns (its last call) in a full forward of a copy of ``model`` in ``mode``
    under ``seed``: a plain forward hook, not featx."""
    model = copy.deepcopy(model).train(mode == "train")
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    torch.manual_seed(seed)
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[-1]


def test_vit_blocks_4_with_keep_glue_is_what_blocks_4_returns_in_eval_and_train():
    # dropout before and inside the blocks: train mode draws random numbers, as the full model does
    model = _seeded(
        lambda: timm.create_model("vit_tiny_patch16_224", img_size=64, pos_drop_rate=0.1, proj_drop_rate=0.1)
    )
    keep = featx.truncate(copy.deepcopy(model), "blocks.4", keep_glue=True)
    for mode in ("eval", "train"):
        assert torch.equal(
            run_in_mode(keep, X64, mode, seed=3), _full_value(model, "blocks.4", X64, mode, seed=3)
        )
    assert not torch.equal(run_in_mode(keep, X64, "train", seed=3), run_in_mode(keep, X64, "train", seed=4))
    report = featx.verify(model, "blocks.4", X64, keep_glue=True)
    assert report.faithful
    assert {m: r.max_abs_diff for m, r in report.modes.items()} == {"eval": 0.0, "train": 0.0}
    statuses = {(g["op"], g["status"]) for g in report.to_dict()["glue"] if g["after"] == "patch_embed"}
    assert statuses == {("expand", "kept"), ("cat", "kept"), ("add", "kept")}
    assert not featx.verify(model, "blocks.4", X64).faithful  # the plain nested cut loses cls token and pos


def test_vit_blocks_4_keeps_the_same_modules_under_their_state_dict_names():
    model = timm.create_model("vit_tiny_patch16_224", img_size=64)
    keep = featx.truncate(model, "blocks.4", keep_glue=True)
    keys = list(keep.state_dict())
    expected = [
        k
        for k in model.state_dict()
        if not k.startswith(("blocks.", "norm.", "fc_norm.", "head."))
        or k.startswith(tuple(f"blocks.{i}." for i in range(5)))
    ]
    assert keys == expected  # the model's keys, in its order: a subset, nothing new
    assert all(keep.get_submodule(f"blocks.{i}") is model.blocks[i] for i in range(5))
    assert keep.cls_token is model.cls_token and keep.patch_embed is model.patch_embed


def test_convnext_stages_2_with_keep_glue_equals_the_plain_nested_cut_and_features_only():
    model = _seeded(lambda: timm.create_model("convnext_atto"))
    keep = featx.truncate(model, "stages.2", keep_glue=True).eval()
    plain = featx.truncate(model, "stages.2").eval()
    features = _timm_features("convnext_atto", model)
    with torch.no_grad():
        got, sequential, theirs = keep(X64), plain(X64), features(X64)[2]
    assert torch.equal(got, sequential) and torch.equal(got, theirs)
    assert list(keep.state_dict()) == list(plain.state_dict())
    assert keep.stem is model.stem and all(
        keep.get_submodule(f"stages.{i}") is model.stages[i] for i in range(3)
    )
    report = featx.verify(model, "stages.2", X64, keep_glue=True)
    assert report.faithful and report.keep_glue
    assert report.to_dict()["containers"][0]["name"] == "stages"


def test_mobilenet_v3_small_features_3_with_keep_glue_equals_create_feature_extractor():
    model = _seeded(torchvision.models.mobilenet_v3_small)
    keep = featx.truncate(model, "features.3", keep_glue=True).eval()
    extractor = create_feature_extractor(model, {"features.3": "f"}).eval()
    with torch.no_grad():
        assert torch.equal(keep(X64), extractor(X64)["f"])
    assert list(keep.state_dict()) == [
        k for k in model.state_dict() if k.startswith(tuple(f"features.{i}." for i in range(4)))
    ]
    assert featx.verify(model, "features.3", X64, keep_glue=True).faithful


def test_a_containers_own_glue_is_kept_where_the_plain_nested_cut_loses_it():
    model = _seeded(WithStage)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # by hand: the stage's `* 2` between `a` and `b`
        expected = model.stage.b(model.stage.a(model.stem(x)) * 2)
        without = model.stage.b(model.stage.a(model.stem(x)))
    assert torch.equal(expected, _full_value(model, "stage.b", x, "eval"))
    keep = featx.truncate(model, "stage.b", keep_glue=True)
    assert (
        isinstance(keep.stage, KeepGlue) and keep.stage.a is model.stage.a and keep.stage.b is model.stage.b
    )
    assert list(keep.state_dict()) == [
        "stem.weight",
        "stem.bias",
        "stage.a.weight",
        "stage.a.bias",
        "stage.b.weight",
        "stage.b.bias",
    ]
    assert torch.equal(run_in_mode(keep, x, "eval"), expected)
    assert torch.equal(featx.truncate(model, "stage.b").eval()(x), without)
    plain = featx.verify(model, "stage.b", x)
    kept = featx.verify(model, "stage.b", x, keep_glue=True)
    assert (plain.faithful, kept.faithful) == (False, True)
    assert plain.modes["eval"].max_abs_diff == float((expected - without).abs().max())
    mul = next(g for g in kept.to_dict()["glue"] if g["op"] == "mul")
    assert (mul["container"], mul["status"]) == ("stage", "kept")
    line = re.escape(_line("x = x * 2  # the stage's own glue"))
    assert re.search(rf"↳ mul +glue, kept +(tests/)?{line} \(eval, train\)", str(kept))
    assert "keeps 2 of 3 children, and the glue" in str(kept).splitlines()[0]


def test_mode_dependent_glue_of_a_container_runs_per_mode_graph():
    model = _seeded(lambda: Around(TrainOnly()))
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    keep = featx.truncate(model, "stage.b", keep_glue=True)
    assert "dropout" in keep.stage.code["train"] and "dropout" not in keep.stage.code["eval"]
    for mode in ("eval", "train"):
        assert torch.equal(run_in_mode(keep, x, mode, seed=5), _full_value(model, "stage.b", x, mode, seed=5))
    assert featx.verify(model, "stage.b", x, keep_glue=True).faithful
    assert not featx.verify(model, "stage.b", x, modes=["train"]).faithful


def test_a_root_that_calls_grandchildren_itself_is_cut_right_after_the_named_one():
    model = _seeded(lambda: IteratesBlocks(pos=True))
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    keep = featx.truncate(model, "blocks.1", keep_glue=True)
    assert keep.cut_at == {"eval": "blocks.1", "train": "blocks.1"}
    with torch.no_grad():
        expected = model.blocks[1](model.blocks[0](model.stem(x) + 1))
    assert torch.equal(run_in_mode(keep, x, "eval"), expected)
    assert list(keep.state_dict()) == [
        "stem.weight",
        "stem.bias",
        "blocks.0.weight",
        "blocks.0.bias",
        "blocks.1.weight",
        "blocks.1.bias",
    ]
    report = featx.verify(model, "blocks.1", x, keep_glue=True)
    assert report.faithful
    assert [(g["op"], g["status"]) for g in report.to_dict()["glue"]] == [("add", "kept")]


def test_eva_which_iterates_its_blocks_is_faithful_at_blocks_4_with_keep_glue():
    model = _seeded(lambda: timm.create_model("eva02_tiny_patch14_224", img_size=56))
    x = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    keep = featx.truncate(copy.deepcopy(model), "blocks.4", keep_glue=True)
    assert torch.equal(run_in_mode(keep, x, "eval"), _full_value(model, "blocks.4", x, "eval"))
    assert featx.verify(model, "blocks.4", x, keep_glue=True).faithful
    assert not featx.verify(model, "blocks.4", x).faithful


def test_sweep_depth_2_with_keep_glue_makes_and_checks_every_inner_cut():
    model = _seeded(WithStage)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    plain = featx.sweep(model, x, depth=2)
    kept = featx.sweep(model, x, depth=2, keep_glue=True)
    order = ["stem", "stage.a", "stage.b", "stage.c", "stage", "head"]
    assert [c.upto for c in plain.cuts] == [c.upto for c in kept.cuts] == order
    assert [c.upto for c in plain.cuts if not c.faithful] == ["stage.b", "stage.c"]
    assert all(c.faithful for c in kept.cuts)
    for c in kept.cuts:  # each inner cut its own keep_glue module, compared with the recorded value
        assert {r.method for r in c.modes.values()} == {"run"}
    by = {c.upto: c for c in kept.cuts}
    assert [g.op for g in by["stage.b"].kept_glue] == ["mul"] and by["stage.a"].kept_glue == ()
    data = kept.to_dict()
    assert {c["upto"]: c["keep_glue"] for c in data["cuts"]} == dict.fromkeys(order, True)


def test_convnext_sweep_depth_2_with_keep_glue_is_faithful_at_every_cut():
    model = _seeded(lambda: timm.create_model("convnext_atto"))
    result = featx.sweep(model, X64, depth=2, keep_glue=True)
    assert [c.upto for c in result.cuts][:8] == [
        "stem.0",
        "stem.1",
        "stem",
        "stages.0",
        "stages.1",
        "stages.2",
        "stages.3",
        "stages",
    ]
    assert [c.upto for c in result.cuts if not c.faithful] == []
    assert all(c.refused is None for c in result.cuts)


def test_a_container_fx_cannot_trace_is_refused_naming_it_and_its_line(untouched):
    model = Around()  # its `stage` is DataDependent: `if x.sum() > 0:`
    with untouched(model), pytest.raises(FeatxError) as raised:
        featx.truncate(model, "stage.a", keep_glue=True)
    message = str(raised.value)
    assert "\n" not in message
    assert (
        "cannot trace the forward of `DataDependent` (`stage`, a container on the path of the cut)" in message
    )
    assert "toy_models.py:" in message and "(`if x.sum() > 0:`)" in message
    assert "cut at `stage` or without keep_glue" in message
    x = torch.randn(2, 4)
    assert featx.verify(model, "stage", x, keep_glue=True).faithful  # the root alone is traced there
    result = featx.sweep(model, x, depth=2, keep_glue=True)
    refused = {c.upto: c.refused is not None for c in result.cuts}
    assert refused == {"stem": False, "stage.a": True, "stage.b": True, "stage": False, "head": False}
    assert "cannot trace the forward of `DataDependent`" in result.cuts[1].reasons[0]


def test_a_container_called_twice_cannot_be_cut_inside():
    model = Around(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), twice=True)
    with pytest.raises(FeatxError) as raised:
        featx.truncate(model, "stage.0", keep_glue=True)
    message = str(raised.value)
    assert "forward of `Around` calls the container `stage` 2 times" in message
    assert message.count("toy_models.py:") == 2 and "cut at `stage` or without keep_glue" in message


def test_a_cut_inside_a_container_whose_output_reads_its_input_again_is_what_the_child_returns():
    model = Around(Skip())  # Skip: `return self.b(self.a(x)) + x`, the add dead code at `stage.a`
    x = torch.randn(2, 4)
    with torch.no_grad():
        h = model.stem(x)
        assert torch.equal(featx.truncate(model, "stage.a", keep_glue=True)(x), model.stage.a(h))
        # at its last child too: a nested cut's value is what that child returns, the add after it dropped
        assert torch.equal(
            featx.truncate(model, "stage.b", keep_glue=True)(x), model.stage.b(model.stage.a(h))
        )
        assert torch.equal(featx.truncate(model, "stage", keep_glue=True)(x), model.stage(h))


def test_cli_verify_keep_glue_at_a_dotted_upto(capsys):
    argv = ["verify", "timm/levit_128s", "--upto", "stages.1", "--input-shape", "2,3,64,64"]
    argv += ["--model-kwarg", "img_size=64"]
    assert main(argv) == 1  # LeViT flattens the stem's output before `stages`: lost without keep_glue
    capsys.readouterr()
    assert main([*argv, "--keep-glue"]) == 0
    out = capsys.readouterr().out
    assert "cut at `stages.1` (inside `stages`, keeps 2 of 4 children, and the glue)" in out
    assert re.search(r"↳ flatten +glue, kept", out) and re.search(r"↳ transpose +glue, kept", out)
    assert out.rstrip().endswith(
        "faithful: the cut at `stages.1` equals the full model there in eval and train"
    )


def test_cli_sweep_depth_2_with_keep_glue(capsys):
    argv = [
        "sweep",
        "timm/convnext_atto",
        "--input-shape",
        "2,3,64,64",
        "--depth",
        "2",
        "--keep-glue",
        "--json",
    ]
    assert main(argv) == 0
    cuts = {c["upto"]: c for c in json.loads(capsys.readouterr().out)["cuts"]}
    assert (cuts["stages.2"]["keep_glue"], cuts["stages.2"]["faithful"], cuts["stages.2"]["depth"]) == (
        True,
        True,
        2,
    )
    assert all(c["faithful"] and c["refused"] is None for c in cuts.values())


GLUE_CONVNEXT = {"model": "timm/convnext_atto", "keep_glue": True, "verify": SMALL}


def test_keep_glue_backbone_taps_inside_stages_are_bit_equal_to_timm_features_only(tmp_path):
    full = _seeded(lambda: timm.create_model("convnext_atto"))
    features = _timm_features("convnext_atto", full)
    outputs = ["stages.0", "stages.1", "stages.2", "stages.3"]
    config = {**GLUE_CONVNEXT, "weights": _weights(tmp_path, full), "upto": "stages.3", "outputs": outputs}
    backbone = featx.build_backbone(config)
    assert isinstance(backbone, KeepGlue)
    with torch.no_grad():
        ours, theirs = backbone(X64), features(X64)
    assert list(ours) == outputs
    assert [torch.equal(a, b) for a, b in zip(ours.values(), theirs, strict=True)] == [True] * 4
    assert list(backbone.strides.values()) == [4, 8, 16, 32]
    assert set(backbone.state_dict()) == set(
        featx.build_backbone({**config, "keep_glue": False}).state_dict()
    )
    item = featx.check([_write(tmp_path, config)]).items[0]
    assert (item.outcome, item.upto, [r.upto for r in item.reports]) == ("faithful", "stages.3", outputs)
    assert all(r.keep_glue for r in item.reports)


def test_keep_glue_backbone_taps_are_bit_equal_to_create_feature_extractor(tmp_path):
    full = _seeded(torchvision.models.mobilenet_v3_small)
    taps = ["features.1", "features.3", "features.8"]
    extractor = create_feature_extractor(full, {t: t for t in taps}).eval()
    config = {
        **GLUE_CONVNEXT,
        "model": "torchvision/mobilenet_v3_small",
        "weights": _weights(tmp_path, full),
        "upto": "features.8",
        "outputs": taps,
    }
    backbone = featx.build_backbone(config)
    with torch.no_grad():
        ours, theirs = backbone(X64), extractor(X64)
    assert list(ours) == taps and all(torch.equal(ours[t], theirs[t]) for t in taps)


def test_keep_glue_backbone_taps_a_container_as_what_it_returns(tmp_path):
    full = _seeded(lambda: timm.create_model("convnext_atto"))
    config = {
        **GLUE_CONVNEXT,
        "weights": _weights(tmp_path, full),
        "upto": "stages",
        "outputs": ["stages.1", "stages"],
    }
    backbone = featx.build_backbone(config)
    assert backbone.taps == {"stages.1": ["stages.1"], "stages": ["stages"]} and backbone.upto == "stages"
    with torch.no_grad():
        out = backbone(X64)
    assert torch.equal(out["stages.1"], _full_value(full, "stages.1", X64, "eval"))
    assert torch.equal(out["stages"], _full_value(full, "stages", X64, "eval"))
    item = featx.check([_write(tmp_path, config)]).items[0]
    assert (item.outcome, [r.upto for r in item.reports]) == ("faithful", ["stages.1", "stages"])


def test_keep_glue_backbone_with_a_containers_own_glue_returns_the_full_models_values():
    # caformer's stage reshapes its map to tokens between `downsample` and `blocks`: a plain nested backbone
    # cannot even run `stages.2.blocks`; the keep_glue cut returns what the full model has there, and a
    # backbone refuses to measure those tokens as an NCHW map (issue 23 §7)
    config = {
        **GLUE_CONVNEXT,
        "model": "timm/caformer_s18",
        "upto": "stages.2.blocks",
        "outputs": ["stages.1", "stages.2.blocks"],
    }
    torch.manual_seed(0)
    plan = featx.resolve(config)
    torch.manual_seed(0)
    full = featx.load_model("timm/caformer_s18").eval()
    keep = featx.truncate(plan.model, "stages.2.blocks", keep_glue=True).eval()
    with torch.no_grad():
        assert torch.equal(keep(X64), _full_value(full, "stages.2.blocks", X64, "eval"))
    with pytest.raises(FeatxError, match=r"output `stages.2.blocks` is tokens \(B, N, C\) \[2, 16, 320\]"):
        plan.build()
    with pytest.raises(FeatxError, match=r"inside `stages.2` \(MetaFormerStage\).* applies `reshape`"):
        featx.build_backbone({**config, "keep_glue": False})


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    return path


def test_keep_glue_vit_backbone_from_a_weights_file_reads_the_roots_own_tensors(tmp_path):
    # the glue reads `cls_token` and `pos_embed`, tensors of the root itself, not of any kept child
    full = _seeded(lambda: timm.create_model("vit_tiny_patch16_224", img_size=64))
    config = {
        **GLUE_CONVNEXT,
        "model": "timm/vit_tiny_patch16_224",
        "model_kwargs": {"img_size": 64},
        "weights": _weights(tmp_path, full),
        "upto": "blocks.4",
        "outputs": ["blocks.1", "blocks.4"],
    }
    plan = featx.resolve(config)
    model = plan.model
    assert torch.equal(model.cls_token, full.cls_token) and torch.equal(model.pos_embed, full.pos_embed)
    keep = featx.truncate(model, "blocks.4", keep_glue=True)
    with torch.no_grad():
        assert torch.equal(keep.eval()(X64), _full_value(full, "blocks.4", X64, "eval"))
    # its taps are tokens (B, N, C), which the backbone lays on the input's grid as NCHW maps (issue 27 §2)
    backbone = plan.build().eval()
    with torch.no_grad():
        maps = list(backbone(X64).values())
        theirs = full.eval().forward_intermediates(
            X64, indices=[1, 4], output_fmt="NCHW", norm=False, intermediates_only=True
        )
    assert [list(m.shape[1:]) for m in maps] == [[192, 4, 4], [192, 4, 4]]
    assert all(torch.equal(a, b) for a, b in zip(maps, theirs, strict=True))


class IteratingStage(nn.Module):
    """A container with glue of its own that calls the children of its ModuleList itself."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

    def forward(self, x):
        x = self.pre(x) + 1
        for block in self.blocks:
            x = block(x)
        return x


def test_a_container_that_calls_its_grandchildren_is_cut_after_the_named_one():
    model = _seeded(lambda: Around(IteratingStage()))
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    keep = featx.truncate(model, "stage.blocks.1", keep_glue=True)
    with torch.no_grad():
        expected = model.stage.blocks[1](model.stage.blocks[0](model.stage.pre(model.stem(x)) + 1))
    assert torch.equal(run_in_mode(keep, x, "eval"), expected)
    assert keep.cut_at == {"eval": "stage.blocks.1", "train": "stage.blocks.1"}
    assert featx.verify(model, "stage.blocks.1", x, keep_glue=True).faithful
    # at depth 2 the cut `stage.blocks` is the value of `stage.blocks.2`, which the stage calls itself: the
    # sweep records it (tracking `stage.blocks` below the depth asked for) to compare with
    result = featx.sweep(model, x, depth=2, keep_glue=True)
    assert [(c.upto, c.faithful) for c in result.cuts] == [
        ("stem", True),
        ("stage.pre", True),
        ("stage.blocks", True),
        ("stage", True),
        ("head", True),
    ]
    assert [c.upto for c in featx.sweep(model, x, depth=2).cuts if not c.faithful] == ["stage.blocks"]


@pytest.mark.parametrize("keep_glue", [False, True])
def test_a_nested_backbone_exports_with_torch_export_and_equals_the_eager_one(keep_glue):
    # Taps inside `stages`: the nested Sequential (or the keep_glue graph) must trace for deployment, and the
    # exported program must compute what the eager backbone does, in the config's tap order.
    backbone = featx.build_backbone(
        {
            "model": "timm/convnext_atto",
            "upto": "stages.2",
            "outputs": ["stages.0", "stages.1", "stages.2"],
            "keep_glue": keep_glue,
        }
    ).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    exported = torch.export.export(backbone, (x,))
    with torch.no_grad():
        eager, out = backbone(x), exported.module()(x)
    assert list(out) == list(eager) == ["stages.0", "stages.1", "stages.2"]
    assert [tuple(v.shape) for v in out.values()] == [(2, 40, 16, 16), (2, 80, 8, 8), (2, 160, 4, 4)]
    for name, value in eager.items():
        torch.testing.assert_close(out[name], value, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_nested_backbone_compiles_with_torch_compile():
    backbone = featx.build_backbone(
        {"model": "timm/convnext_atto", "upto": "stages.1", "outputs": ["stages.0", "stages.1"]}
    ).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager, out = backbone(x), torch.compile(backbone)(x)
    for name, value in eager.items():
        torch.testing.assert_close(out[name], value, rtol=1e-5, atol=1e-5)


def test_verify_config_checks_the_cut_the_backbone_runs_as_check_does(tmp_path, capsys):
    # `upto: stages` with taps inside `stages`: the backbone runs stages.0..stages.3 child by child, so
    # the cut both commands verify is `stages.3`, not `stages` as written.
    config = tmp_path / "convnext.yaml"
    config.write_text(
        "model: timm/convnext_atto\nupto: stages\noutputs: [stages.1, stages.2]\n"
        "verify: {input_shape: [2, 3, 64, 64]}\n"
    )
    assert main(["verify", str(config), "--json"]) == 0
    verified = json.loads(capsys.readouterr().out)
    assert main(["check", str(config), "--json"]) == 0
    checked = json.loads(capsys.readouterr().out)
    assert verified["upto"] == checked["configs"][0]["upto"] == "stages.3"
