"""The bad-input catalogue: every malformed input across the command line and the Python API, with the
message fragment it must produce. The command line exits 2 with one line on stderr and no traceback; the
API raises FeatxError with a one-line message. Later features (configs, export, check) add their rows here;
``featx check``'s per-config errors are not here: they are rows of its report (tests/test_check.py).
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import featx
from featx import FeatxError
from featx.cli import _parser, main
from featx.verification import verify_cuts
from tests.toy_models import Around, DataDependent, Describe, Scale, Skip

R18 = ["torchvision/resnet18"]
LONG = "9" * 5000  # past Python's 4300-digit limit of int(text)
LONG_SHOWN = "`9999999999999999… (5000 characters)` is an integer of more than 4300 digits"
VIT = "timm/vit_tiny_patch16_224"
FPN_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "fasterrcnn_resnet50_fpn.yaml"
CFG = {
    "model": "torchvision/resnet18",
    "upto": "layer3",
    "outputs": ["layer2"],
    "verify": {"input_shape": [1, 3, 32, 32]},
}
SMALL = ["--input-shape", "2,3,32,32"]


@dataclass(frozen=True)
class Cli:
    argv: list[str]  # "@name" stands for a file the `files` fixture made
    fragment: str


@dataclass(frozen=True)
class Api:
    call: Callable[[dict[str, Path]], object]
    fragment: str


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


class NoTensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Identity()
        self.b = Describe()

    def forward(self, x):
        return self.b(self.a(x))


CATALOGUE: dict[str, Cli | Api] = {
    # usage
    "no command": Cli([], "required: command"),
    "unknown command": Cli(["frobnicate"], "invalid choice: 'frobnicate'"),
    "verify without --upto": Cli(["verify", *R18], "--upto"),
    "unknown flag": Cli(
        ["verify", *R18, "--upto", "1", "--mdoe"],
        "featx verify: unrecognized argument `--mdoe` (did you mean `--mode`, `--dtype`?); see `featx verify --help`\n",
    ),
    "unknown flag with a required one missing": Cli(
        ["export", *R18, "--upto", "1", "--frob"],
        "featx: error: featx export: unrecognized argument `--frob` (did you mean `--rtol`?); see "
        "`featx export --help`\n",
    ),
    "unknown flag and no positional argument": Cli(
        ["check", "--frob"],
        "featx: error: featx check: unrecognized argument `--frob`; see `featx check --help`\n",
    ),
    "unknown flag before the command": Cli(
        ["--frob", "verify", *R18, "--upto", "1"],
        "featx: error: unrecognized argument `--frob` (did you mean `--rtol`?); before the command featx takes "
        "`--help`, `--version` only, a command's flags go after it (see `featx verify --help`)\n",
    ),
    "featx's own flag misspelt": Cli(
        ["--vers"], "featx: error: unrecognized argument `--vers` (did you mean `--version`?)"
    ),
    "a command's flag before the command": Cli(
        ["--upto", "1", "verify", *R18],
        "featx: error: unrecognized argument `--upto` before the command: it is a flag of `featx verify`, so it "
        "goes after `verify` (see `featx verify --help`)\n",
    ),
    "--weights-prefix without weights, on export": Cli(
        [
            "export",
            *R18,
            "--upto",
            "layer1",
            "--weights-prefix",
            "module.",
            "--random-weights",
            "--out",
            "r.pt2",
        ],
        "featx: error: --weights-prefix module. needs --weights (the file to strip it from)\n",
    ),
    "a prefix of a flag is not the flag": Cli(
        ["build", *R18, "--upto", "layer3", "--out", "layer2"],
        "featx build: unrecognized arguments `--out` `layer2` (did you mean `--upto`, `--outputs`?)",
    ),
    "unknown flags of another verb": Cli(
        ["build", "@list.yaml", "--svg=cut.svg", "--fast"],
        "featx build: unrecognized arguments `--svg=cut.svg` `--fast`; see `featx build --help`\n",
    ),
    # specs
    "unknown torchvision model": Cli(["inspect", "torchvision/resnet5O"], "did you mean `resnet50`"),
    "unknown timm model": Cli(["inspect", "timm/resnet50dd"], "did you mean `resnet50d`"),
    "hub timm model": Cli(["inspect", "timm/hf-hub:timm/resnet50.a1_in1k"], "unknown timm model"),
    "spec without a source": Cli(
        ["inspect", "resnet50"], "did you mean `torchvision/resnet50` or `timm/resnet50`"
    ),
    "unknown source": Cli(["inspect", "tv/resnet18"], "is not one of `torchvision/<name>`"),
    "source misspelt": Cli(
        ["inspect", "timn/resnet18"],
        "model spec `timn/resnet18` is not one of `torchvision/<name>`, `timm/<name>`, `package.module:callable` "
        "(did you mean `timm/resnet18`?)\n",
    ),
    "module that does not import": Cli(
        ["inspect", "no_such_pkg.models:build"], "cannot import module `no_such_pkg"
    ),
    "missing attribute": Cli(["inspect", "examples.seed_toy:ResNN"], "did you mean `ResN`"),
    "attribute not callable": Cli(["inspect", "examples.seed_toy:__doc__"], "not a class or function"),
    "callable returns no module": Cli(
        ["inspect", "builtins:dict", *SMALL], "returned a dict, not a torch.nn.Module"
    ),
    "empty callable path": Cli(["inspect", "examples.seed_toy:"], "must be `package.module:callable`"),
    # model kwargs
    "kwarg without =": Cli(["verify", *R18, "--upto", "1", "--model-kwarg", "drop"], "KEY=VALUE"),
    "kwarg key not an identifier": Cli(["verify", *R18, "--upto", "1", "--model-kwarg", "1x=2"], "KEY=VALUE"),
    "kwarg value bad YAML": Cli(
        ["verify", *R18, "--upto", "1", "--model-kwarg", "a=[1,"], "not a YAML scalar"
    ),
    "kwarg the constructor rejects": Cli(
        ["verify", *R18, "--upto", "1", "--model-kwarg", "num_clases=3"],
        "building `torchvision/resnet18` with --model-kwarg num_clases=3 failed: it takes no keyword argument "
        "`num_clases` "
        "(did you mean `num_classes`, `norm_layer`?); accepted: `weights`, `progress`, `block`, `layers`, "
        "`num_classes`, `zero_init_residual`, `groups`, `width_per_group`, `replace_stride_with_dilation`, "
        "`norm_layer`\n",
    ),
    "kwarg a timm model rejects": Cli(
        ["verify", "timm/resnet18", "--upto", "1", "--model-kwarg", "drop_rat=0.1"],
        "it takes no keyword argument `drop_rat` (did you mean `drop_rate`, `drop_path_rate`, `drop_block_rate`?); "
        "accepted: `pretrained`, `block`, `layers`, `num_classes`, `in_chans`,",
    ),
    "kwarg to a constructor without any": Cli(
        ["verify", "examples.seed_toy:ResN", "--upto", "1", "--model-kwarg", "x=1"],
        "building `examples.seed_toy:ResN` with --model-kwarg x=1 failed: it takes no keyword arguments\n",
    ),
    "kwarg of the wrong type": Cli(
        ["verify", *R18, "--upto", "1", "--model-kwarg", "num_classes=many"],
        "error: building `torchvision/resnet18` with --model-kwarg num_classes=many failed: TypeError: empty(): "
        "argument 'size' (position 1) must be tuple of ints, but found element of type str at pos 0; "
        "`num_classes` defaults to 1000, an int, not a str\n",
    ),
    "kwarg of the wrong type, on build": Cli(
        ["build", *R18, "--upto", "layer2", "--model-kwarg", "num_classes=x"],
        "featx: error: building `torchvision/resnet18` with --model-kwarg num_classes=x failed: TypeError: ",
    ),
    "kwarg of the wrong type over a config": Cli(
        ["build", "@nobatch.yaml", "--model-kwarg", "num_classes=x"],
        "nobatch.yaml: building `torchvision/resnet18` with --model-kwarg num_classes=x failed: TypeError: ",
    ),
    "config kwarg of the wrong type": Api(
        lambda f: featx.build_backbone({**CFG, "model_kwargs": {"num_classes": "x"}}),
        "<dict>: key `model_kwargs`: building `torchvision/resnet18` with num_classes='x' failed: TypeError: "
        "empty(): argument 'size' (position 1) must be tuple of ints, but found element of type str at pos 0; "
        "`num_classes` defaults to 1000, an int, not a str",
    ),
    "kwarg argument of the wrong type": Api(
        lambda f: featx.load_model("torchvision/resnet18", num_classes=[1], zero_init_residual=1),
        "building `torchvision/resnet18` with num_classes=[1], zero_init_residual=1 failed: TypeError: empty(): "
        "argument 'size' (position 1) must be tuple of ints, but found element of type list at pos 0; "
        "`num_classes` defaults to 1000, an int, not a list; `zero_init_residual` defaults to False, a bool, "
        "not an int",
    ),
    "kwarg value of 5000 digits": Cli(
        ["verify", *R18, "--upto", "1", "--model-kwarg", f"num_classes={LONG}"],
        "argument --model-kwarg: `num_classes=9999999999999999… (5000 characters)`: the value is an integer of "
        "more than 4300 digits",
    ),
    # cuts
    "upto unknown name": Cli(["verify", *R18, "--upto", "layer9", *SMALL], "did you mean `layer4`"),
    "upto zero": Cli(["verify", *R18, "--upto", "0", *SMALL], "keeps 0 of 10"),
    "upto past the end": Cli(["verify", *R18, "--upto", "11", *SMALL], "accepted: 1..10"),
    "upto too negative": Cli(["verify", *R18, "--upto", "-10", *SMALL], "accepted: 1..10, -1..-9"),
    "upto of 5000 digits": Cli(
        ["verify", *R18, "--upto", LONG, *SMALL],
        f"featx: error: --upto {LONG_SHOWN}; accepted: 1..10, -1..-9, or a child name: `conv1`",
    ),
    "upto of 5000 digits, on build": Cli(
        ["build", *R18, "--upto", f"-{LONG}", *SMALL],
        "featx: error: --upto `-999999999999999… (5001 characters)`",
    ),
    "outputs of 5000 digits": Cli(
        ["build", *R18, "--upto", "layer3", "--outputs", f"layer1,{LONG}", *SMALL],
        f"featx: error: --outputs {LONG_SHOWN}; accepted: 1..10, -1..-9, or a child name",
    ),
    "seed of 5000 digits": Cli(
        ["verify", *R18, "--upto", "1", "--seed", LONG], f"error: argument --seed: {LONG_SHOWN}"
    ),
    "input shape of 5000 digits": Cli(
        ["build", *R18, "--upto", "1", "--input-shape", f"1,3,{LONG},8"],
        f"error: argument --input-shape: {LONG_SHOWN}",
    ),
    "upto past the end of a model with one child": Api(
        lambda f: featx.truncate(nn.Sequential(nn.ReLU()), 2),
        "upto 2 keeps 2 of 1 children; accepted: 1, or a child name: `0`",
    ),
    "upto past the end of a model with two children": Api(
        lambda f: featx.truncate(nn.Sequential(nn.ReLU(), nn.ReLU()), -2),
        "upto -2 keeps 0 of 2 children; accepted: 1..2, -1, or a child name: `0`, `1`",
    ),
    "upto more negative than children": Cli(
        ["verify", *R18, "--upto", "-11", *SMALL],
        "upto -11 drops the last 11 of 10 children; accepted: 1..10",
    ),
    "TorchScript child": Api(
        lambda f: featx.verify(
            nn.Sequential(torch.jit.script(nn.Conv2d(3, 4, 3)), nn.ReLU()), 1, torch.randn(1, 3, 8, 8)
        ),
        "`0` is a TorchScript module, which takes no forward hooks",
    ),
    "TorchScript stage of a ResNet": Api(
        lambda f: featx.sweep(_scripted_layer1(), torch.randn(1, 3, 32, 32)),
        "`layer1` is a TorchScript module, which takes no forward hooks",
    ),
    "TorchScript model": Api(
        lambda f: featx.verify(torch.jit.script(nn.Sequential(nn.ReLU(), nn.ReLU())), 1, torch.randn(2, 4)),
        "the model is TorchScript",
    ),
    "config input shape without batch": Cli(
        ["verify", "@nobatch.yaml"],
        "nobatch.yaml: key `verify.input_shape` [3, 32, 32] has 3 dimensions; `torchvision/resnet18` takes 4",
    ),
    "build input shape without batch": Cli(
        ["build", "@nobatch.yaml"],
        "nobatch.yaml: key `verify.input_shape` [3, 32, 32] has 3 dimensions; `torchvision/resnet18` takes 4, "
        "batch included (e.g. [2, 3, 224, 224])\n",
    ),
    "input too small for a fixed-size ViT": Cli(
        ["verify", "timm/vit_tiny_patch16_224", "--upto", "blocks", "--input-shape", "1,3,32,32"],
        "--input-shape 1,3,32,32 is 32x32; `timm/vit_tiny_patch16_224` runs at 224x224 only (e.g. 2,3,224,224)\n",
    ),
    "config input of another size for a fixed-size ViT": Api(
        lambda f: featx.build_backbone(
            {
                "model": "timm/vit_tiny_patch16_224",
                "upto": "blocks",
                "verify": {"input_shape": [1, 3, 192, 192]},
            }
        ),
        "<dict>: key `verify.input_shape` [1, 3, 192, 192] is 192x192; `timm/vit_tiny_patch16_224` runs at "
        "224x224 only (e.g. [2, 3, 224, 224])",
    ),
    "upto a float": Api(
        lambda f: featx.truncate(nn.Sequential(nn.ReLU()), 0.5), "neither a child name nor an int"
    ),
    "no children": Api(lambda f: featx.sweep(nn.ReLU(), torch.ones(2)), "has no children"),
    "nested path that does not exist": Cli(
        ["verify", *R18, "--upto", "layer3.7", *SMALL],
        "`layer3` (Sequential) has no child `7`; its children: `0`, `1`",
    ),
    "nested path with a close match": Cli(
        ["verify", *R18, "--upto", "layer3.0.conv3", *SMALL],
        "has no child `conv3` (did you mean `conv2`, `conv1`?)",
    ),
    "nested path under an unknown child": Cli(
        ["verify", *R18, "--upto", "layr3.0", *SMALL], "has no child `layr3` (did you mean `layer3`"
    ),
    "path through a parameter": Cli(
        ["verify", *R18, "--upto", "conv1.weight", *SMALL],
        "goes through `conv1` (Conv2d), which has no children",
    ),
    "path through a leaf deeper down": Cli(
        ["verify", *R18, "--upto", "layer1.0.bn1.bias", *SMALL], "goes through `layer1.0.bn1` (BatchNorm2d)"
    ),
    "path with an empty segment": Cli(
        ["verify", *R18, "--upto", "layer3..1", *SMALL], "has an empty segment"
    ),
    "sweep depth below 1": Cli(["sweep", *R18, "--depth", "0"], "below 1"),
    "sweep depth not an int": Api(
        lambda f: featx.sweep(nn.Sequential(nn.ReLU()), torch.ones(2), depth=1.5), "not a depth"
    ),
    "config tap inside a container after the cut": Api(
        lambda f: featx.build_backbone({**CFG, "upto": "layer3.0", "outputs": ["layer3.1"]}),
        "key `outputs.layer3.1` taps `layer3.1`, after the cut at `layer3.0`",
    ),
    "config cut through a leaf": Api(
        lambda f: featx.build_backbone({**CFG, "upto": "layer3.0.conv1.weight"}),
        "key `upto`: upto `layer3.0.conv1.weight` goes through",
    ),
    # inputs
    "input shape of the wrong rank": Cli(
        ["verify", *R18, "--upto", "1", "--input-shape", "3,32,32"], "takes 4"
    ),
    "input shape not integers": Cli(
        ["verify", *R18, "--upto", "1", "--input-shape", "2,3,a,b"], "comma-separated"
    ),
    "input shape with a zero": Cli(
        ["verify", *R18, "--upto", "1", "--input-shape", "2,3,0,32"], "not a positive"
    ),
    "input the model cannot take": Cli(
        ["verify", *R18, "--upto", "1", "--input-shape", "2,1,32,32"], "before any child returned"
    ),
    "input too large to allocate": Cli(
        ["verify", *R18, "--upto", "1", "--input-shape", "4000000000,3,224,224"], "cannot make the input"
    ),
    "no input size known": Cli(
        ["sweep", "examples.seed_toy:ResN"], "`examples.seed_toy:ResN` declares no input size"
    ),
    "cut at a child returning no tensor": Api(
        lambda f: featx.verify(NoTensor(), "b", torch.ones(2)), "returns a str, not a tensor"
    ),
    # options
    "mode not a mode": Cli(["verify", *R18, "--upto", "1", "--mode", "test"], "invalid choice: 'test'"),
    "API mode not a mode": Api(
        lambda f: featx.verify(nn.Sequential(nn.ReLU()), 1, torch.ones(2), modes="test"), "`eval`, `train`"
    ),
    "negative seed": Cli(
        ["verify", *R18, "--upto", "1", "--seed", "-1"],
        "error: argument --seed: `-1` is out of range; accepted: 0..4294967295 (see `featx verify --help`)\n",
    ),
    "seed past 2**32 - 1": Cli(
        ["check", "configs/", "--seed", "4294967296"], "argument --seed: `4294967296` is out of range"
    ),
    "seed not an integer": Cli(["build", *R18, "--upto", "1", "--seed", "1.5"], "`1.5` is not an integer"),
    "taps of a model with no map": Cli(
        ["taps", "torch.nn:Flatten", "--input-shape", "1,3,8,8"], "returns no map of the input at any module"
    ),
    "taps at an input the model does not take": Cli(
        ["taps", "timm/vit_tiny_patch16_224", "--model-kwarg", "depth=1", "--input-shape", "1,3,64,64"],
        "does not run on an input of shape [1, 3, 64, 64]",
    ),
    "taps depth zero": Cli(["taps", *R18, "--depth", "0"], "--depth"),
    "negative tolerance": Cli(["verify", *R18, "--upto", "1", "--atol", "-1"], "tolerances are >= 0"),
    # numerics
    "a dtype featx does not run in": Cli(
        ["verify", *R18, "--upto", "1", "--dtype", "fp8"],
        "featx: error: --dtype 'fp8' is not a dtype featx runs in; accepted: `float32`, `bfloat16`, "
        "`float16`\n",
    ),
    "a dtype featx does not run in, on sweep": Cli(["sweep", *R18, "--dtype", "int8"], "--dtype 'int8'"),
    "a dtype featx does not run in, on check": Cli(
        ["check", "configs", "--dtype", "double"], "--dtype 'double'"
    ),
    "numerics not a setting": Api(
        lambda f: featx.verify(nn.Sequential(Scale()), 1, torch.ones(2), numerics="bf16"),
        "numerics 'bf16' is not a setting; accepted: featx.numerics.Numerics(dtype=..., autocast=...)",
    ),
    "config numerics dtype": Api(
        lambda f: featx.build_backbone({**CFG, "numerics": {"dtype": "fp8"}}),
        "<dict>: numerics.dtype 'fp8' is not a dtype featx runs in; accepted: `float32`, `bfloat16`, `float16`",
    ),
    "config numerics unknown key": Api(
        lambda f: featx.build_backbone({**CFG, "numerics": {"tf32": True}}),
        "<dict>: numerics.tf32 is not a numerics key; accepted: `dtype`, `autocast`, `compile`, `channels_last`",
    ),
    "config numerics switch not a bool": Api(
        lambda f: featx.build_backbone({**CFG, "numerics": {"autocast": "yes please"}}),
        "<dict>: numerics.autocast 'yes please' is not true or false",
    ),
    "tolerance not a number": Cli(["verify", *R18, "--upto", "1", "--rtol", "tight"], "is not a number"),
    "device that is not one": Cli(["verify", *R18, "--upto", "1", "--device", "gpu7"], "not a torch device"),
    "device cpu with an index": Cli(
        ["verify", *R18, "--upto", "1", "--device", "cpu:1"],
        "--device `cpu:1`: the CPU has no index; use --device cpu",
    ),
    "device not on this machine": Cli(
        ["verify", *R18, "--upto", "1", "--device", "cuda:0"], "CUDA is not available"
    ),
    "model not a module": Api(lambda f: featx.verify(42, 1), "expected a torch.nn.Module or a spec"),
    "spec not a string": Api(lambda f: featx.load_model(None), "is not a string"),
    # weights files
    "weights file missing": Cli(
        ["verify", *R18, "--upto", "1", "--weights", "/nonexistent/r18.pth"], "does not exist"
    ),
    "weights file empty": Cli(
        ["verify", *R18, "--upto", "1", "--weights", "@empty.pth"], "not a readable torch"
    ),
    "weights file corrupt": Cli(
        ["verify", *R18, "--upto", "1", "--weights", "@corrupt.pth"], "not a readable torch"
    ),
    "weights file text": Cli(
        ["verify", *R18, "--upto", "1", "--weights", "@text.pth"], "not a readable torch checkpoint"
    ),
    "weights file json": Cli(
        ["verify", *R18, "--upto", "1", "--weights", "@json.pt"], "not a readable torch checkpoint"
    ),
    "safetensors truncated": Cli(
        ["verify", *R18, "--upto", "1", "--weights", "@truncated.safetensors"], "not a readable safetensors"
    ),
    "safetensors not safetensors": Cli(
        ["verify", *R18, "--upto", "1", "--weights", "@corrupt.safetensors"], "not a readable safetensors"
    ),
    "weights mis-keyed": Cli(
        ["verify", *R18, "--upto", "1", "--weights", "@miskeyed.safetensors"], "1 unexpected: `head.weight`"
    ),
    "weights mis-shaped": Cli(["verify", *R18, "--upto", "1", "--weights", "@misshaped.pth"], "mis-shaped"),
    "checkpoint without a state dict": Cli(
        ["verify", *R18, "--upto", "1", "--weights", "@nostate.pth"], "holds no state dict"
    ),
    "weights a folder": Cli(
        ["verify", *R18, "--upto", "1", "--weights", "@folder"], "is a folder, not a file"
    ),
    "DDP checkpoint without a prefix": Cli(
        ["verify", *R18, "--upto", "1", "--weights", "@ddp.pth"], "command line `--weights-prefix module.`"
    ),
    "weights prefix without weights": Cli(
        ["verify", *R18, "--upto", "1", "--weights-prefix", "module."], "needs --weights"
    ),
    "torchvision weights name unknown": Cli(
        ["verify", *R18, "--upto", "1", "--weights", "IMAGENET1K_V9"], "did you mean `IMAGENET1K_V1`"
    ),
    "another model's torchvision weights": Cli(
        ["verify", *R18, "--upto", "1", "--weights", "ResNet50_Weights.DEFAULT"], "are another model's"
    ),
    "timm tag unknown": Cli(
        ["verify", "timm/resnet18", "--upto", "1", "--weights", "a9_in1k"], "nor a pretrained tag of timm"
    ),
    "timm spec tag and weights tag differ": Api(
        lambda f: featx.load_model("timm/resnet18.a1_in1k", weights="a2_in1k"), "name it once"
    ),
    "weights name for an imported model": Api(
        lambda f: featx.load_model("examples.seed_toy:ResN", weights="DEFAULT"),
        "needs a `torchvision/<name>`",
    ),
    "weights prefix with a weights name": Api(
        lambda f: featx.load_model("torchvision/resnet18", weights="DEFAULT", weights_prefix="module."),
        "applies to a weights file",
    ),
    "pretrained not a bool": Cli(
        ["verify", *R18, "--upto", "1", "--model-kwarg", "pretrained=maybe"], "accepted: true or false"
    ),
    "weights given twice": Cli(
        ["verify", *R18, "--upto", "1", "--weights", "a.pth", "--model-kwarg", "weights=DEFAULT"],
        "both say which weights to load",
    ),
    "pickle carrying a payload": Cli(
        ["verify", *R18, "--upto", "1", "--weights", "@payload.pth"], "refuses arbitrary pickles"
    ),
    # backbone configs
    "config unknown key": Api(
        lambda f: featx.build_backbone({**CFG, "ouputs": []}), "did you mean `outputs`"
    ),
    "config missing key": Api(
        lambda f: featx.build_backbone({"model": "torchvision/resnet18"}), "key `upto` is required"
    ),
    "config wrong type": Api(
        lambda f: featx.build_backbone({**CFG, "outputs": "layer2"}), "key `outputs` must be a list"
    ),
    "config tap after the cut": Api(
        lambda f: featx.build_backbone({**CFG, "outputs": ["layer4"]}), "after the cut at `layer3`"
    ),
    "config tap not a child": Api(
        lambda f: featx.build_backbone({**CFG, "outputs": ["layer5"]}),
        "key `outputs.layer5`: output `layer5` is not a child",
    ),
    "config freeze misspelt": Api(
        lambda f: featx.build_backbone({**CFG, "freeze": "lyer1"}),
        "<dict>: key `freeze` is 'lyer1' (did you mean `layer1`, `layer4`, `layer3`?); accepted: null, a child "
        "name (`conv1`, `bn1`, `relu`, `maxpool`, `layer1`, `layer2`, `layer3`, `layer4`, `avgpool`, `fc`), a "
        "dotted name inside one (such as `layer1.0`) or a count 0..10",
    ),
    "config freeze a list": Api(
        lambda f: featx.build_backbone({**CFG, "freeze": ["layer1"]}),
        "<dict>: key `freeze` is the list ['layer1']: it takes one module, the last frozen with all before it "
        "(write `freeze: layer1`); accepted: null, a child name (`conv1`,",
    ),
    "config freeze a list of several": Api(
        lambda f: featx.build_backbone({**CFG, "freeze": ["layer1", "layer2"]}),
        "key `freeze` is the list ['layer1', 'layer2']: it takes one module, the last frozen with all before it; "
        "accepted:",
    ),
    "config freeze past the cut": Api(
        lambda f: featx.build_backbone({**CFG, "freeze": "fc"}), "past the cut"
    ),
    "config two freeze spellings": Api(
        lambda f: featx.build_backbone({**CFG, "freeze": "layer1", "freeze_at": 2}), "keep one"
    ),
    "config stages on a model without them": Api(
        lambda f: featx.build_backbone(
            {
                "model": "tests.toy_models:GlueBetweenConvs",
                "upto": "block",
                "frozen_stages": 1,
                "verify": {"input_shape": [1, 3, 16, 16]},
            }
        ),
        "has no stages featx can count",
    ),
    "config bad norm": Api(
        lambda f: featx.build_backbone({**CFG, "norm": "freeze"}), "did you mean `frozen`"
    ),
    "config bad verify shape": Api(
        lambda f: featx.build_backbone({**CFG, "verify": {"input_shape": [3, "a"]}}), "verify.input_shape"
    ),
    "config modes not a list": Api(
        lambda f: featx.build_backbone({**CFG, "verify": {"modes": 3}}), "must be a list"
    ),
    "config tolerance NaN": Api(
        lambda f: featx.build_backbone({**CFG, "verify": {"atol": float("nan")}}), "verify.atol"
    ),
    "config model_kwargs a list": Api(
        lambda f: featx.build_backbone({**CFG, "model_kwargs": []}), "model_kwargs"
    ),
    "config norm false": Api(lambda f: featx.build_backbone({**CFG, "norm": False}), "key `norm`"),
    "config output an integer": Api(
        lambda f: featx.build_backbone({**CFG, "outputs": [12]}),
        "key `outputs[0]` is the integer 12; outputs are module names, not indices",
    ),
    "build input not a multiple of the largest stride": Cli(
        ["build", "@odd.yaml"],
        "input 100x100 (`verify.input_shape` [1, 3, 100, 100]) is not a multiple of 8, the largest stride "
        "(output `layer2`): its maps would not line up with the input; use 96x96 or 104x104",
    ),
    "config ViT tap without keep_glue": Api(
        lambda f: featx.build_backbone(
            {
                "model": "timm/vit_tiny_patch16_224",
                "model_kwargs": {"img_size": 32, "depth": 1},
                "upto": "blocks.0",
                "verify": {"input_shape": [1, 3, 32, 32]},
            }
        ),
        "output `blocks.0` (`blocks.0`) is tokens [1, 4, 192], which `VisionTransformer`'s own forward makes "
        "with glue a plain cut loses (the class token, the position embedding); set `keep_glue: true`",
    ),
    "config token tap": Api(
        lambda f: featx.build_backbone(
            {
                "model": "tests.layout_models:Tokens",
                "upto": "tokens",
                "outputs": ["tokens"],
                "verify": {"input_shape": [1, 3, 32, 32]},
            }
        ),
        "output `tokens` is tokens (B, N, C) [1, 64, 8] at input 32x32, not an NCHW map (B, C, H, W)",
    ),
    "build integer outputs": Cli(
        ["build", "@indices.yaml"], "key `outputs[0]` is the integer 0; outputs are module names, not indices"
    ),
    "export unknown format": Cli(
        ["export", "@list.yaml", "--format", "tflite", "--out", "/tmp/x.tflite"],
        "--format `tflite` is not an export format; accepted: `safetensors`, `onnx`, `pt2`",
    ),
    "export format misspelt": Cli(
        ["export", "@list.yaml", "--format", "onxx", "--out", "/tmp/x.onnx"], "(did you mean `onnx`?)"
    ),
    "export suffix of another format": Cli(
        ["export", "@list.yaml", "--format", "onnx", "--out", "/tmp/x.safetensors"],
        "--out `/tmp/x.safetensors` must end in .onnx for --format onnx",
    ),
    "export suffix of no format": Cli(
        ["export", "@list.yaml", "--out", "/tmp/x.bin"],
        "--out `/tmp/x.bin` must end in `.safetensors`, `.onnx`, `.pt2` (the suffix names the format)",
    ),
    "export spec without upto": Cli(
        ["export", *R18, "--out", "/tmp/x.onnx"], "export torchvision/resnet18 needs --upto"
    ),
    "export output misspelt": Cli(
        ["export", *R18, "--upto", "layer3", "--outputs", "layer2,layr3", "--out", "/tmp/x.safetensors"],
        "featx: error: --outputs `layr3` is not a child of `ResNet` (did you mean `layer3`",
    ),
    "export config with an upto before its taps": Cli(
        ["export", str(FPN_CONFIG), "--upto", "layer2", "--out", "/tmp/x.onnx"],
        f"--upto layer2 cuts before `layer3`, which {FPN_CONFIG} taps (key `outputs.2`); give --outputs too, "
        "with modules the cut runs (`conv1`, `bn1`, `relu`, `maxpool`, `layer1`, `layer2`)\n",
    ),
    "export into a missing folder": Cli(
        ["export", *R18, "--upto", "layer1", "--out", "/nonexistent/x.onnx"],
        "folder `/nonexistent` does not exist",
    ),
    "build from an ONNX export": Cli(
        ["build", "/tmp/backbone.onnx"], "is an ONNX export: it holds the backbone's graph"
    ),
    "build from a plain safetensors file": Cli(
        ["build", "@miskeyed.safetensors"],
        "safetensors file without featx metadata (not written by `featx export`)",
    ),
    "config artifact with a bad suffix": Api(
        lambda f: featx.build_backbone({**CFG, "artifacts": ["backbone.tflite"]}),
        "key `artifacts[0]` is 'backbone.tflite'; accepted: files ending in `.safetensors`, `.onnx`, `.pt2`",
    ),
    "config weights prefix absent": Cli(
        ["build", "@prefixed.yaml"], "no key starting with prefix `backbone.`"
    ),
    "build spec without upto": Cli(
        ["build", "torchvision/resnet18"],
        "build torchvision/resnet18 needs --upto (the cut), or a config file",
    ),
    "build spec with an upto that is not a child": Cli(
        ["build", *R18, "--upto", "layer9"],
        "featx: error: --upto `layer9` is not a child of `ResNet` (did you",
    ),
    "build spec input shape without batch": Cli(
        ["build", *R18, "--upto", "layer2", "--input-shape", "3,32,32"],
        "featx: error: --input-shape 3,32,32 has 3 dimensions; `torchvision/resnet18` takes 4, batch included "
        "(e.g. 2,3,224,224)\n",
    ),
    "build spec input too small for a fixed-size ViT": Cli(
        ["build", VIT, "--upto", "blocks.5", "--input-shape", "1,3,32,32"],
        "featx: error: --input-shape 1,3,32,32 is 32x32; `timm/vit_tiny_patch16_224` runs at 224x224 only (e.g. "
        "2,3,224,224)\n",
    ),
    "build spec cut that cannot run": Cli(
        ["build", *R18, "--upto", "fc", "--input-shape", "1,3,32,32"],
        "featx: error: the backbone cannot run on an input of shape [1, 3, 32, 32]: RuntimeError: mat1 and mat2 "
        "shapes cannot be multiplied (512x1 and 512x1000); set --input-shape; or, if the full model runs at this "
        "shape, the cut lost glue the root's forward applies between children (`featx verify` names it): keep "
        "it with --keep-glue\n",
    ),
    "build config cut that cannot run at the flag's input shape": Cli(
        ["build", "@nobatch.yaml", "--upto", "fc", "--input-shape", "1,3,32,32"],
        "nobatch.yaml: the backbone cannot run on an input of shape [1, 3, 32, 32]: RuntimeError: mat1 and mat2 "
        "shapes cannot be multiplied (512x1 and 512x1000); set --input-shape; or,",
    ),
    "build spec ViT tokens without keep_glue": Cli(
        [
            "build",
            VIT,
            *("--model-kwarg", "img_size=32", "--model-kwarg", "depth=1"),
            *("--upto", "blocks.0", "--input-shape", "1,3,32,32"),
        ],
        "featx: error: output `blocks.0` (`blocks.0`) is tokens [1, 4, 192], which `VisionTransformer`'s own "
        "forward makes with glue a plain cut loses (the class token, the position embedding); pass --keep-glue\n",
    ),
    "build spec output named twice": Cli(
        ["build", *R18, "--upto", "layer2", "--outputs", "layer1,layer1"],
        "featx: error: --outputs names the output `layer1` twice",
    ),
    "export spec weights that do not exist": Cli(
        [
            "export",
            *R18,
            "--upto",
            "layer2",
            "--weights",
            "/nonexistent/r18.pth",
            "--out",
            "/tmp/x.safetensors",
        ],
        "featx: error: --weights: weights file `/nonexistent/r18.pth` does not exist",
    ),
    "build a path that is neither config nor spec": Cli(
        ["build", "/dev/null"],
        "featx: error: `/dev/null` is neither a config nor a model spec; accepted: a backbone config (*.yaml, "
        "*.yml), a *.safetensors file featx export wrote, or `torchvision/<name>`, `timm/<name>`, "
        "`package.module:callable`\n",
    ),
    "export a path that is neither config nor spec": Cli(
        ["export", "/dev/null", "--upto", "1", "--out", "/tmp/x.safetensors"],
        "featx: error: `/dev/null` is neither a config nor a model spec",
    ),
    "build a spec without a source": Cli(
        ["build", "resnet50"],
        "model spec `resnet50` is not one of `torchvision/<name>`, `timm/<name>`, "
        "`package.module:callable` (did you mean `torchvision/resnet50` or `timm/resnet50`?)\n",
    ),
    "build config with an upto that is not a child": Cli(
        ["build", "@nobatch.yaml", "--upto", "layer9"],
        "error: --upto `layer9` is not a child of `ResNet` (did you mean `layer4`",
    ),
    "build config with weights that do not exist": Cli(
        ["build", "@nobatch.yaml", "--weights", "/nonexistent/r18.pth"],
        "error: --weights: weights file `/nonexistent/r18.pth` does not exist",
    ),
    "build config with a weights prefix and no weights": Cli(
        ["build", "@nobatch.yaml", "--weights-prefix", "module."],
        "error: --weights-prefix module. needs weights to strip it from: --weights, or the config's `weights` (",
    ),
    "build config with an input shape without batch": Cli(
        ["build", "@nobatch.yaml", "--input-shape", "3,32,32"],
        "error: --input-shape 3,32,32 has 3 dimensions; `torchvision/resnet18` takes 4",
    ),
    "export config with an output after its cut": Cli(
        ["export", "@nobatch.yaml", "--outputs", "layer4", "--out", "/tmp/x.onnx"],
        "error: --outputs `layer4` is after the cut at `layer2`",
    ),
    "check weights for two configs": Cli(
        ["check", "@nobatch.yaml", "@odd.yaml", "--weights", "@ddp.pth"],
        "replaces one config's weights; the paths hold 2 configs",
    ),
    "config file missing": Cli(["build", "/nonexistent/backbone.yaml"], "does not exist"),
    "config file not YAML": Cli(
        ["build", "@broken.yaml"],
        "broken.yaml:2:1: not valid YAML: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence started at 1:8)\n",
    ),
    "config nested 2000 deep": Cli(
        ["build", "@deep.yaml"], "deep.yaml` nests its lists or mappings too deeply to read"
    ),
    "config integer of 5000 digits": Cli(
        ["build", "@long.yaml"],
        "long.yaml` holds an integer of more than 4300 digits; no config value is that long",
    ),
    "config None": Api(
        lambda f: featx.build_backbone(None),
        "a backbone config cannot be None; accepted: the path of a YAML config or of a featx .safetensors "
        "export, or a mapping of config keys",
    ),
    "config a list": Api(
        lambda f: featx.build_backbone([]), "a backbone config cannot be a list ([]); accepted"
    ),
    "config file a list": Cli(["build", "@list.yaml"], "holds a list, not a mapping"),
    "config that is some other tool's YAML": Api(
        lambda f: featx.build_backbone({"name": "ci", "on": "push", "jobs": {}}),
        "<dict>: not a featx backbone config: it has none of the keys `model`, `upto`, `outputs`",
    ),
    "config output named twice": Api(
        lambda f: featx.build_backbone({**CFG, "outputs": ["layer1", "layer1"]}),
        "names the output `layer1` twice",
    ),
    "verify_cuts with no cuts": Api(
        lambda f: verify_cuts(featx.load_model("torchvision/resnet18"), []), "no cuts to verify"
    ),
    "check without paths": Cli(["check"], "the following arguments are required: PATH"),
    "check bad device": Cli(["check", "configs/", "--device", "gpu9"], "--device `gpu9`"),
    "check junit into a missing folder": Cli(
        ["check", "@list.yaml", "--junit", "/nonexistent/dir/x.xml"],
        "folder `/nonexistent/dir` does not exist",
    ),
    "check markdown onto a folder": Cli(
        ["check", "@list.yaml", "--markdown", "."], "--markdown . is a folder"
    ),
    "verify svg into a missing folder": Cli(
        ["verify", *R18, "--upto", "layer1", "--svg", "/nonexistent/x.svg"],
        "folder `/nonexistent` does not exist",
    ),
    # keep_glue
    "keep_glue on a root fx cannot trace": Cli(
        ["verify", "tests.toy_models:DataDependent", "--upto", "a", "--keep-glue", "--input-shape", "2,4"],
        "torch.fx cannot trace the forward of `DataDependent` in eval mode at",
    ),
    "sweep keep_glue on a root fx cannot trace": Cli(
        ["sweep", "tests.toy_models:DataDependent", "--keep-glue", "--input-shape", "2,4"],
        "(`if x.sum() > 0:`)",
    ),
    "leaf function without keep_glue": Cli(
        ["verify", "tests.toy_models:ScalesByInt", "--upto", "b", "--leaf-function", "int"],
        "--leaf-function int names a function keep_glue's trace keeps whole; pass --keep-glue too",
    ),
    "leaf function that does not exist": Cli(
        [
            "verify",
            "tests.toy_models:ScalesByInt",
            "--upto",
            "b",
            "--keep-glue",
            "--leaf-function",
            "math.ciel",
        ],
        "--leaf-function is `math.ciel`: `math` has no `ciel` (did you mean `ceil`?)",
    ),
    "leaf function in a config that does not exist": Api(
        lambda f: featx.build_backbone({**CFG, "keep_glue": True, "leaf_functions": ["nosuch.f"]}),
        "<dict>: key `leaf_functions[0]` is `nosuch.f`: cannot import module `nosuch`",
    ),
    "leaf functions in a config without keep_glue": Api(
        lambda f: featx.build_backbone({**CFG, "leaf_functions": ["int"]}),
        "<dict>: key `leaf_functions` names functions keep_glue's trace keeps whole",
    ),
    "leaf functions without keep_glue": Api(
        lambda f: featx.verify(Skip(), "a", torch.ones(2, 4), leaf_functions=(int,)),
        "leaf_functions are kept whole by keep_glue's trace",
    ),
    "keep_glue at a module a block calls twice": Api(
        lambda f: featx.truncate(torchvision.models.resnet18(), "layer1.0.relu", keep_glue=True),
        "the forward of `BasicBlock` (`layer1.0`) calls `layer1.0.relu` 2 times",
    ),
    "keep_glue with an unknown cut": Api(
        lambda f: featx.truncate(Skip(), "c", keep_glue=True), "upto `c` is not a child of `Skip`"
    ),
    "keep_glue on a container fx cannot trace": Cli(
        ["verify", "tests.toy_models:Around", "--upto", "stage.a", "--keep-glue", "--input-shape", "2,4"],
        "torch.fx cannot trace the forward of `DataDependent` (`stage`, a container on the path of the cut)",
    ),
    "keep_glue inside a container called twice": Api(
        lambda f: featx.truncate(
            Around(nn.Sequential(nn.Linear(4, 4)), twice=True), "stage.0", keep_glue=True
        ),
        "the forward of `Around` calls the container `stage` 2 times",
    ),
    "config keep_glue tap on a container the cut goes into": Api(
        lambda f: featx.build_backbone({**CFG, "upto": "layer3.0", "outputs": ["layer3"], "keep_glue": True}),
        "key `outputs.layer3` taps `layer3`, which the cut at `layer3.0` goes into",
    ),
    "config freeze dotted name that names no module": Api(
        lambda f: featx.build_backbone({**CFG, "freeze": "layer2.5"}),
        "key `freeze`: `layer2.5`: `layer2` (Sequential) has no child `5`; its children: `0`, `1`",
    ),
    "config freeze dotted name past the cut": Api(
        lambda f: featx.build_backbone({**CFG, "upto": "layer3.0", "freeze": "layer3.1"}),
        "key `freeze` freezes through `layer3.1`, past the cut at `layer3.0`",
    ),
    "config freeze through a parameter": Api(
        lambda f: featx.build_backbone({**CFG, "freeze": "layer1.0.conv1.weight"}),
        "key `freeze`: `layer1.0.conv1.weight` goes through `layer1.0.conv1` (Conv2d)",
    ),
    "config keep_glue not a bool": Api(
        lambda f: featx.build_backbone({**CFG, "keep_glue": "yes"}), "key `keep_glue` must be a bool"
    ),
    # extract (its runs with real images are in tests/test_extract.py)
    "extract data that does not exist": Cli(
        ["extract", *R18, "--upto", "layer1", "--data", "/nonexistent/images", "--out", "/nonexistent/f"],
        "--data `/nonexistent/images` does not exist",
    ),
    "extract data without images": Cli(
        ["extract", *R18, "--upto", "layer1", "--data", "@folder", "--out", "/nonexistent/f"],
        "holds no image files",
    ),
    "verify svg onto a folder": Cli(
        ["verify", *R18, "--upto", "layer1", "--svg", "."], "--svg . is a folder"
    ),
}


def _scripted_layer1() -> nn.Module:
    model = torchvision.models.resnet18()
    model.layer1 = torch.jit.script(model.layer1)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Broken weights files, made from a real resnet18 state dict: once per module (one set is ~150 MB;
    one per row filled ~20 GB of disk a run). No row writes to them."""
    tmp_path = tmp_path_factory.mktemp("bad_input_files")
    state = featx.load_model("torchvision/resnet18").state_dict()
    made = {
        name: tmp_path / name
        for name in (
            "empty.pth",
            "corrupt.pth",
            "text.pth",
            "json.pt",
            "truncated.safetensors",
            "corrupt.safetensors",
            "miskeyed.safetensors",
            "misshaped.pth",
            "nostate.pth",
            "payload.pth",
        )
    }
    made["empty.pth"].write_bytes(b"")
    made["corrupt.pth"].write_bytes(b"PK\x03\x04 definitely not a zip archive")
    made["text.pth"].write_text("hello\n")  # torch's unpickler: KeyError 101
    made["json.pt"].write_text('{"a": 1}\n')  # torch's unpickler: "Unsupported operand 123"
    made["corrupt.safetensors"].write_text("{'this': 'is not safetensors'}")
    save_file(state, str(made["truncated.safetensors"]))
    data = made["truncated.safetensors"].read_bytes()
    made["truncated.safetensors"].write_bytes(data[: len(data) // 3])
    renamed = dict(state)
    renamed["head.weight"] = renamed.pop("fc.weight")
    save_file(renamed, str(made["miskeyed.safetensors"]))
    torch.save({**state, "fc.weight": torch.zeros(10, 512)}, made["misshaped.pth"])
    torch.save({"epoch": 3, "lr": 0.1}, made["nostate.pth"])
    made["ddp.pth"] = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, made["ddp.pth"])
    made["folder"] = tmp_path / "checkpoint"
    made["folder"].mkdir()
    made["prefixed.yaml"] = tmp_path / "prefixed.yaml"
    made["prefixed.yaml"].write_text(
        f"model: torchvision/resnet18\nupto: layer2\noutputs: [layer2]\nweights: {made['miskeyed.safetensors']}\n"
        "weights_prefix: backbone.\n"
    )
    made["nobatch.yaml"] = tmp_path / "nobatch.yaml"
    made["nobatch.yaml"].write_text(
        "model: torchvision/resnet18\nupto: layer2\noutputs: [layer2]\nverify: {input_shape: [3, 32, 32]}\n"
    )
    made["odd.yaml"] = tmp_path / "odd.yaml"  # 100 px: strides 4/8 would have rounded to 4/8 and 25/13 maps
    made["odd.yaml"].write_text(
        "model: torchvision/resnet18\nupto: layer2\noutputs: [layer2]\nverify: {input_shape: [1, 3, 100, 100]}\n"
    )
    made["indices.yaml"] = tmp_path / "indices.yaml"  # mmdetection's out_indices habit
    made["indices.yaml"].write_text("model: torchvision/resnet18\nupto: layer4\noutputs: [0, 1, 2, 3]\n")
    made["broken.yaml"] = tmp_path / "broken.yaml"
    made["broken.yaml"].write_text("model: [unclosed\n")
    made["deep.yaml"] = tmp_path / "deep.yaml"
    made["deep.yaml"].write_text("model: " + "[" * 2000 + "]" * 2000 + "\n")
    made["long.yaml"] = tmp_path / "long.yaml"
    made["long.yaml"].write_text("model: torchvision/resnet18\nupto: " + "9" * 5000 + "\noutputs: [layer1]\n")
    made["list.yaml"] = tmp_path / "list.yaml"
    made["list.yaml"].write_text("- model\n- upto\n")
    with open(made["payload.pth"], "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    return made


def test_every_command_of_the_command_line_has_bad_input_rows():
    """The catalogue follows the command line: a command added without a row here goes untested."""
    (commands,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    covered = {case.argv[0] for case in CATALOGUE.values() if isinstance(case, Cli) and case.argv}
    assert sorted(set(commands.choices) - covered) == []


@pytest.mark.parametrize("case", list(CATALOGUE.values()), ids=list(CATALOGUE))
def test_bad_input_gets_one_clear_line(case, files, capsys):
    if isinstance(case, Cli):
        argv = [str(files[arg[1:]]) if arg.startswith("@") else arg for arg in case.argv]
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 2
        assert out == ""
        assert err.startswith("featx: error: ") and err.count("\n") == 1, err
        assert "Traceback" not in err and "this must never run" not in err
        assert case.fragment in err
    else:
        with pytest.raises(FeatxError) as raised:
            case.call(files)
        message = str(raised.value)
        assert "\n" not in message
        assert case.fragment in message
    assert "this must never run" not in capsys.readouterr().out


def test_keep_glue_refusal_leaves_the_model_untouched(untouched):
    model = DataDependent()
    with untouched(model), pytest.raises(FeatxError):
        featx.verify(model, "a", torch.ones(2, 4), keep_glue=True)


def test_keep_glue_on_a_model_without_glue_is_the_sequential():
    """Not an error: a model whose forward is its children in order gives the Sequential's answer."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.ones(2, 4)
    assert torch.equal(featx.truncate(model, 2, keep_glue=True)(x), featx.truncate(model, 2)(x))
    assert featx.verify(model, 2, x, keep_glue=True).faithful


def test_build_of_a_cut_that_cannot_run_prints_one_line_and_no_torch_log(tmp_path, capfd):
    """The dry run's fake tensors fail first; torch logs each failing op with a traceback on the real
    stderr (capfd, not capsys: torch's log handler holds the stream it started with)."""
    config = tmp_path / "fc.yaml"
    config.write_text(
        "model: torchvision/resnet18\nupto: fc\noutputs: [fc]\nverify: {input_shape: [1, 3, 32, 32]}\n"
    )
    assert main(["build", str(config)]) == 2
    out, err = capfd.readouterr()
    assert out == ""
    assert err == (
        f"featx: error: {config}: the backbone cannot run on an input of shape [1, 3, 32, 32]: RuntimeError: "
        "mat1 and mat2 shapes cannot be multiplied (512x1 and 512x1000); set `verify.input_shape`; or, if the "
        "full model runs at this shape, the cut lost glue the root's forward applies between children "
        "(`featx verify` names it): keep it with --keep-glue / `keep_glue: true`\n"
    )
