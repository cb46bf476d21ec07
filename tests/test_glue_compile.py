"""keep_glue modules compile whole and export: ``torch.compile(keep, fullgraph=True)`` captures one graph (no
graph break) and computes what the eager module computes, and ``torch.export.export(keep, (x,))`` gives a
program that does too.

Eager values are compared at ``torch.testing.assert_close``'s float32 tolerance (inductor fuses and reorders
float32 arithmetic); ``backend="eager"`` captures the graph with dynamo and runs it as is, so there the values
are bit-equal. The eager module's own faithfulness to the full model is tests/test_glue.py's. Inductor
compiles take tens of seconds on two cores: the default run compiles the seed toy with inductor and checks the
capture of the rest with ``backend="eager"``; the models at full inductor compile are marked ``slow``.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
import yaml
from safetensors.torch import save_file
from torch import nn
from torch._dynamo.exc import Unsupported

import featx
from examples.seed_toy import ResN
from featx import FeatxError
from featx.cli import main
from featx.export import export
from featx.glue import trace_root
from tests.modes import run_as_is, run_in_mode


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cache of another test's graphs, guards or recompile counts."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Drops(nn.Module):
    """timm's head in small: ``F.dropout(x, p=self.drop_rate, training=self.training)`` reads a plain
    attribute, which the traced graph holds as a constant and the cut checks after every call."""

    def __init__(self, drop_rate: float = 0.5) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 3)
        self.drop_rate = drop_rate

    def forward(self, x):
        x = F.dropout(self.a(x), p=self.drop_rate, training=self.training)
        return self.b(x)


class Rescales(nn.Module):
    """A small image model whose root scales the stem's output by a plain attribute (``self.scale``): glue a
    children cut loses, and a read the keep_glue cut checks after every call."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.stage = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.scale = 3.0

    def forward(self, x):
        return self.stage(self.stem(x) * self.scale)


def test_the_seed_toy_cut_compiles_whole_and_gives_the_full_models_8():
    # a regression test: it compiled before keep_glue cuts were made compilable
    keep = featx.truncate(ResN().eval(), "blk", keep_glue=True)
    x = torch.ones(5, 5)
    compiled = torch.compile(keep, fullgraph=True)
    assert torch.equal(compiled(x), torch.full((5, 5), 8.0))
    assert torch.equal(compiled(x), keep(x))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_cut_whose_glue_reads_a_model_attribute_compiles_whole(mode):
    # `self.drop_rate` is checked after every call; dynamo could not trace that check (a look into the
    # module's `__dict__`), so fullgraph=True refused the whole module
    model = Drops().train(mode == "train")
    keep = featx.truncate(model, "b", keep_glue=True)
    x = torch.randn(4, 8)
    compiled = torch.compile(keep, fullgraph=True, backend="eager")
    assert torch.equal(run_as_is(compiled, x, seed=3), run_as_is(keep, x, seed=3))
    assert torch.equal(run_as_is(keep, x, seed=3), run_as_is(model, x, seed=3))


def test_a_compiled_cut_follows_the_mode_it_is_switched_to():
    model = Drops().eval()
    keep = featx.truncate(model, "b", keep_glue=True)
    compiled = torch.compile(keep, fullgraph=True, backend="eager")
    x = torch.randn(4, 8)
    for mode in ("eval", "train", "eval"):
        assert torch.equal(run_in_mode(compiled, x, mode, seed=1), run_in_mode(model, x, mode, seed=1)), mode


def test_a_compiled_cut_refuses_once_an_attribute_its_graph_holds_changes():
    # the compiled module guards on `drop_rate`: a change recompiles, and the recompiled check refuses,
    # where a graph compiled for p=0.5 would silently keep dropping half
    model = Drops().train()
    keep = featx.truncate(model, "b", keep_glue=True)
    x = torch.randn(4, 8)
    compiled = torch.compile(keep, fullgraph=True, backend="eager")
    compiled(x)
    model.drop_rate = 0.1
    with pytest.raises(Unsupported, match=r"reads `drop_rate` \(.*\), which held 0\.5 when the cut was made"):
        compiled(x)
    model.drop_rate = 0.5  # back to the value it was traced with: the cut runs again
    assert torch.equal(run_as_is(compiled, x, seed=2), run_as_is(model, x, seed=2))


def test_without_fullgraph_a_compiled_cut_refuses_a_changed_attribute_with_featx_own_error():
    # a regression test: without fullgraph dynamo broke the graph at the check and ran it in Python
    model = Drops().train()
    keep = featx.truncate(model, "b", keep_glue=True)
    x = torch.randn(4, 8)
    compiled = torch.compile(keep, backend="eager")
    compiled(x)
    model.drop_rate = 0.1
    with pytest.raises(
        FeatxError, match=r"reads `drop_rate` .* held 0\.5 when the cut was made and now holds 0\.1"
    ):
        compiled(x)


def test_more_keep_glue_cuts_than_dynamo_keeps_graphs_per_function_each_compile_whole():
    # dynamo keeps at most `recompile_limit` graphs per code object; with one `KeepGlue.forward` for all
    # cuts the ninth compiled in a process failed under fullgraph (and silently ran eagerly without it)
    x = torch.randn(4, 8)
    for _ in range(torch._dynamo.config.recompile_limit + 2):
        model = Drops().eval()
        compiled = torch.compile(featx.truncate(model, "b", keep_glue=True), fullgraph=True, backend="eager")
        assert torch.equal(compiled(x), model(x))


def test_a_deep_copy_of_a_keep_glue_cut_runs_its_own_modules():
    # a regression test for the forward each cut holds of its own: the copy's is bound to the copy
    model = Drops().eval()
    keep = featx.truncate(model, "b", keep_glue=True)
    twin = copy.deepcopy(keep)
    with torch.no_grad():
        twin.b.weight.zero_()
        twin.b.bias.fill_(7.0)
        x = torch.randn(4, 8)
        assert torch.equal(twin(x), torch.full((4, 3), 7.0))
        assert torch.equal(keep(x), model(x))


def test_timm_resnet18_with_head_dropout_compiles_whole_in_train_mode():
    model = timm.create_model("resnet18", drop_rate=0.5).train()
    keep = featx.truncate(model, "fc", keep_glue=True)
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(keep, fullgraph=True, backend="eager")
    assert torch.equal(run_as_is(compiled, x, seed=5), run_as_is(keep, x, seed=5))


def test_a_cut_whose_glue_reads_a_model_attribute_exports_with_strict_torch_export():
    model = Drops().eval()
    keep = featx.truncate(model, "b", keep_glue=True)
    x = torch.randn(4, 8)
    program = torch.export.export(keep, (x,), strict=True)
    assert torch.equal(program.module()(x), model(x))


def test_resnet18_cut_inside_a_block_exports_with_torch_export():
    # a regression test: non-strict export (torch.export's default) ran the check in Python already
    model = torchvision.models.resnet18().eval()
    keep = featx.truncate(model, "layer2.0.conv2", keep_glue=True)
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(keep, (x,))
    assert torch.equal(program.module()(x), keep(x))


def test_a_keep_glue_configs_pt2_export_carries_the_glue_and_featx_check_proves_it(tmp_path, capsys):
    # a regression test: `featx export` (torch.export, non-strict) ran the check in Python already
    torch.manual_seed(0)
    model = Rescales().eval()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    config = {
        "model": "tests.test_glue_compile:Rescales",
        "weights": "w.safetensors",
        "upto": "stage",
        "outputs": ["stage"],
        "keep_glue": True,
        "verify": {"input_shape": [1, 3, 32, 32], "modes": ["eval"]},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert export(tmp_path / "c.yaml", tmp_path / "c.pt2").ok
    x = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        (got,) = torch.export.load(str(tmp_path / "c.pt2")).module()(x)
        assert torch.equal(got, model(x))  # the model's value at `stage`, its `* self.scale` included
        assert not torch.allclose(got, model.stage(model.stem(x)))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**config, "artifacts": ["c.pt2"]}))
    assert main(["check", str(tmp_path / "c.yaml")]) == 0
    out = capsys.readouterr().out
    assert (
        "c.pt2 ok" in out and " same " in out
    )  # the artifact against the backbone, the backbone against the model


# -- full inductor compiles and strict exports of real models (slow) ---------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("upto", ["layer3", "layer2.0.conv2", "fc"])
def test_torchvision_resnet18_cut_compiled_by_inductor_equals_eager(upto):
    # max abs diff measured: layer3 4.2e-06, layer2.0.conv2 3.2e-06, fc 1.1e-06 (random init, 2x3x32x32)
    keep = featx.truncate(torchvision.models.resnet18().eval(), upto, keep_glue=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(keep, fullgraph=True)(x), keep(x))


@pytest.mark.slow
def test_vit_cut_inside_its_blocks_compiled_by_inductor_equals_eager():
    # the root reads eight plain attributes (`global_pool`, `num_prefix_tokens`, ...); max abs diff 5.7e-07
    model = timm.create_model("vit_tiny_patch16_224", img_size=32).eval()
    keep = featx.truncate(model, "blocks.5", keep_glue=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(keep, fullgraph=True)(x), keep(x))


@pytest.mark.slow
def test_timm_dropout_glue_compiled_by_inductor_draws_as_the_compiled_model_does():
    # inductor draws dropout's random numbers its own way: under one seed the compiled cut equals the
    # compiled model (bit-equal as measured), and with `fallback_random` it draws as eager (max abs diff 1.3e-05)
    model = timm.create_model("resnet18", drop_rate=0.5).train()
    keep = featx.truncate(model, "fc", keep_glue=True)
    x = torch.randn(2, 3, 32, 32)
    compiled_model = run_as_is(torch.compile(model, fullgraph=True), x, seed=7)
    torch.testing.assert_close(run_as_is(torch.compile(keep, fullgraph=True), x, seed=7), compiled_model)
    torch._dynamo.reset()
    eager_random = torch.compile(keep, fullgraph=True, options={"fallback_random": True})
    torch.testing.assert_close(run_as_is(eager_random, x, seed=7), run_as_is(keep, x, seed=7))


@pytest.mark.slow
def test_vit_token_maps_of_a_keep_glue_backbone_compile_whole():
    backbone = featx.build_backbone(
        {
            "model": "timm/vit_tiny_patch16_224",
            "model_kwargs": {"img_size": 32},
            "upto": "blocks.5",
            "outputs": ["blocks.3", "blocks.5"],
            "keep_glue": True,
            "verify": {"input_shape": [1, 3, 32, 32]},
        }
    ).eval()
    assert backbone.makes_maps
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(backbone, fullgraph=True, backend="eager")
    for name, value in backbone(x).items():
        assert torch.equal(compiled(x)[name], value), name


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spec", "upto", "mode"),
    [
        ("torchvision/resnet18", "layer3", "eval"),
        ("timm/resnet18", "fc", "train"),
        ("timm/vit_tiny_patch16_224", "blocks.5", "eval"),
    ],
)
def test_keep_glue_cuts_of_real_models_export_with_strict_torch_export(spec, upto, mode):
    kwargs = {"drop_rate": 0.5} if mode == "train" else {"img_size": 32} if "vit" in spec else {}
    model = featx.load_model(spec, **kwargs).train(mode == "train")
    keep = featx.truncate(model, upto, keep_glue=True)
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(keep, (x,), strict=True)
    assert torch.equal(run_as_is(program.module(), x, seed=4), run_as_is(keep, x, seed=4))


def test_a_keep_glue_cut_with_taps_compiles_whole():
    # taps come back as a dict, each copied as it is made (`captured`, a pytree map)
    cut = trace_root(Drops().eval()).cut("b", ["a"])
    x = torch.randn(4, 8)
    compiled = torch.compile(cut, fullgraph=True, backend="eager")
    got, want = compiled(x), cut(x)
    assert list(got) == ["a", "b"] and all(torch.equal(got[k], want[k]) for k in want)
