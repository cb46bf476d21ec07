"""The zoo featx is proven on, and the literal answer a test computes without featx.

``literal_verdicts`` is the reference ``tests/test_zoo.py`` and ``benchmarks/zoo.py`` hold featx's verdicts
against. It uses nothing of featx: per mode, it runs the full model once with plain forward hooks on the
direct children (the last call's output, copied), then ``nn.Sequential(*children[:k])`` for every cut k,
each run under ``torch.manual_seed(seed)`` from the same state dict, and compares with ``torch.equal``.
As in featx's contract, NaN and Inf never count as equal, and a value that holds no tensor is not a verdict.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torchvision
from torch import nn
from torch.utils import _pytree as pytree

SEED = 0
MODES = ("eval", "train")

TORCHVISION_RESNETS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)
TIMM_RESNET_MODULES = ("resnet", "resnetv2", "resnest", "res2net", "sknet")


def resnet_zoo() -> list[str]:
    """Every timm model of the ResNet modules and the 10 torchvision ResNets, as featx specs."""
    timm_names = [n for module in TIMM_RESNET_MODULES for n in timm.list_models(module=module)]
    return [f"timm/{n}" for n in timm_names] + [f"torchvision/{n}" for n in TORCHVISION_RESNETS]


def torchvision_classifiers() -> list[str]:
    return [f"torchvision/{n}" for n in torchvision.models.list_models(module=torchvision.models)]


# One small model of every other timm module: the smallest by parameter count (a constructor on the meta
# device) that builds with random weights on the CPU and runs at a small input, picked by
# ``python benchmarks/zoo.py --pick``. The modules with no such model, and why, are in TIMM_SKIPPED.
TIMM_SMALL = {
    "beit": "beit_base_patch16_224",
    "byoanet": "halonet_h1",
    "byobnet": "test_byobnet",
    "cait": "cait_xxs24_224",
    "coat": "coat_tiny",
    "convit": "convit_tiny",
    "convmixer": "convmixer_768_32",
    "convnext": "test_convnext",
    "cpubone": "cpubone_nano",
    "crossvit": "crossvit_tiny_240",
    "csatv2": "csatv2",
    "cspnet": "cs3darknet_focus_s",
    "cspnext": "cspnext_tiny",
    "davit": "davit_tiny",
    "deepseek_vit": "deepseek_vit_412m",
    "deit": "deit_tiny_patch16_224",
    "densenet": "densenet121",
    "dla": "dla46x_c",
    "dpn": "dpn48b",
    "edgenext": "edgenext_small",
    "efficientformer": "efficientformer_l1",
    "efficientformer_v2": "efficientformerv2_s0",
    "efficientnet": "test_efficientnet",
    "efficientvim": "efficientvim_m1",
    "efficientvit_mit": "efficientvit_b0",
    "efficientvit_msra": "efficientvit_m0",
    "eva": "eva02_tiny_patch14_224",
    "fasternet": "fasternet_s",
    "fastvit": "fastvit_s12",
    "focalnet": "focalnet_tiny_srf",
    "gcvit": "gcvit_xxtiny",
    "gemma4_vit": "gemma4_vit_167m",
    "ghostnet": "ghostnetv2_100",
    "hardcorenas": "hardcorenas_b",
    "hgnet": "hgnet_tiny",
    "hiera": "hiera_tiny_224",
    "hieradet_sam2": "sam2_hiera_tiny",
    "hrnet": "hrnet_w18_small",
    "iformer": "iformer_s",
    "inception_next": "inception_next_atto",
    "inception_resnet_v2": "inception_resnet_v2",
    "inception_v3": "inception_v3",
    "inception_v4": "inception_v4",
    "lcnetv2": "lcnetv2_small",
    "levit": "levit_128s",
    "lowformer": "lowformer_b0",
    "mambaout": "test_mambaout",
    "maxxvit": "test_coatnet",
    "metaformer": "poolformerv2_s12",
    "mlp_mixer": "gmixer_12_224",
    "mobilenetv3": "mobilenetv3_small_050",
    "mobilenetv5": "mobilenetv5_300m",
    "mobilevit": "mobilevit_xxs",
    "mvitv2": "mvitv2_tiny",
    "naflexvit": "naflexvit_base_patch16_siglip",
    "nasnet": "nasnetalarge",
    "nest": "nest_tiny",
    "nextvit": "nextvit_small",
    "nfnet": "test_nfnet",
    "pit": "pit_xs_224",
    "pnasnet": "pnasnet5large",
    "pvt_v2": "pvt_v2_b0",
    "qwen3_vit": "qwen3_vit_306m",
    "rdnet": "rdnet_tiny",
    "regnet": "regnetx_002",
    "repghost": "repghostnet_050",
    "repvit": "repvit_m1",
}
# `--pick` ran out of time after `repvit` on this shared machine; the remaining modules are picked by
# name (the smallest-sounding model) and their sizes are each model's own, not measured.
TIMM_SMALL |= {
    "pnasnet": "pnasnet5large",
    "pvt_v2": "pvt_v2_b0",
    "rexnet": "rexnet_100",
    "selecsls": "selecsls42",
    "senet": "legacy_seresnet18",
    "sequencer": "sequencer2d_s",
    "starnet": "starnet_s050",
    "swiftformer": "swiftformer_xs",
    "swin_transformer": "swin_tiny_patch4_window7_224",
    "swin_transformer_v2": "swinv2_tiny_window8_256",
    "swin_transformer_v2_cr": "swinv2_cr_tiny_224",
    "tiny_vit": "tiny_vit_5m_224",
    "tnt": "tnt_s_patch16_224",
    "tresnet": "tresnet_m",
    "twins": "twins_pcpvt_small",
    "vgg": "vgg11",
    "visformer": "visformer_tiny",
    "vision_transformer": "test_vit",
    "vision_transformer_hybrid": "vit_tiny_r_s16_p8_224",
    "vision_transformer_relpos": "vit_relpos_small_patch16_224",
    "vision_transformer_sam": "samvit_base_patch16",
    "vitamin": "vitamin_small_224",
    "volo": "volo_d1_224",
    "vovnet": "ese_vovnet19b_slim_dw",
    "xception": "legacy_xception",
    "xception_aligned": "xception41",
    "xcit": "xcit_nano_12_p16_224",
}
TIMM_SKIPPED: dict[str, str] = {"qwen3_vit": "not tried: `--pick` ran out of time on this shared machine"}

# Smallest square input size (px) each model runs at, where it is not 64: fixed position embeddings,
# windowed attention, or a stem that needs more than 64 px. Found by trying 64, 96, 128, ... at batch 2.
MIN_SIZE: dict[str, int] = {
    "torchvision/inception_v3": 299,  # the aux branch (train mode) pools 5x5 out of Mixed_6e's 17x17
    "torchvision/vit_b_16": 224,
    "torchvision/vit_b_32": 224,
    "torchvision/vit_l_16": 224,
    "torchvision/vit_l_32": 224,
    "torchvision/vit_h_14": 224,
    "torchvision/maxvit_t": 224,
    "timm/vit_tiny_patch16_224": 224,
    "timm/beit_base_patch16_224": 224,
    "timm/cait_xxs24_224": 224,
    "timm/coat_tiny": 224,
    "timm/convit_tiny": 224,
    "timm/deepseek_vit_412m": 224,
    "timm/deit_tiny_patch16_224": 224,
    "timm/efficientformer_l1": 224,
    "timm/efficientformerv2_s0": 224,
    "timm/eva02_tiny_patch14_224": 224,
    "timm/gcvit_xxtiny": 224,
    "timm/gmixer_12_224": 224,
    "timm/halonet_h1": 256,
    "timm/hiera_tiny_224": 224,
    "timm/inception_resnet_v2": 96,
    "timm/inception_v3": 96,
    "timm/inception_v4": 96,
    "timm/levit_128s": 224,
    "timm/nest_tiny": 224,
    "timm/pit_xs_224": 224,
    "timm/pnasnet5large": 331,
    "timm/samvit_base_patch16": 1024,
    "timm/sequencer2d_s": 224,
    "timm/swiftformer_xs": 224,
    "timm/swin_tiny_patch4_window7_224": 224,
    "timm/swinv2_cr_tiny_224": 224,
    "timm/swinv2_tiny_window8_256": 256,
    "timm/test_coatnet": 160,
    "timm/tiny_vit_5m_224": 224,
    "timm/tnt_s_patch16_224": 224,
    "timm/twins_pcpvt_small": 224,
    "timm/visformer_tiny": 224,
    "timm/vit_relpos_small_patch16_224": 224,
    "timm/vit_tiny_r_s16_p8_224": 224,
    "timm/vitamin_small_224": 224,
    "timm/volo_d1_224": 224,
    "timm/xcit_nano_12_p16_224": 224,
}


@dataclass(frozen=True)
class Built:
    spec: str
    model: nn.Module
    x: torch.Tensor


def build(spec: str, size: int | None = None, batch: int = 2, seed: int = SEED) -> Built:
    """``spec`` with random weights drawn under ``seed``, and a seeded normal input of ``batch`` x 3 x size^2
    (default: the model's MIN_SIZE, else 64)."""
    source, name = spec.split("/", 1)
    torch.manual_seed(seed)
    if source == "timm":
        model = timm.create_model(name, pretrained=False)
    else:
        model = torchvision.models.get_model(name, weights=None)
    size = size or MIN_SIZE.get(spec, 64)
    x = torch.randn((batch, 3, size, size), generator=torch.Generator().manual_seed(seed))
    return Built(spec, model, x)


def same(out: Any, reference: Any) -> bool:
    """``torch.equal`` leaf by leaf, same structure, dtype and shape; NaN/Inf never equal; needs a tensor."""
    leaves_out, spec_out = pytree.tree_flatten(out)
    leaves_ref, spec_ref = pytree.tree_flatten(reference)
    if spec_out != spec_ref or not any(isinstance(t, torch.Tensor) for t in leaves_ref):
        return False
    for a, b in zip(leaves_out, leaves_ref, strict=True):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.dtype != b.dtype or not torch.equal(a, b) or not bool(a.isfinite().all()):
                return False
        elif isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or a != b:
            return False
    return True


def _copy(tree: Any) -> Any:
    return pytree.tree_map(
        lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else copy.copy(t), tree
    )


def _hooked(children: Sequence[nn.Module], module: nn.Module, x: torch.Tensor) -> dict[int, Any]:
    """Run ``module`` on a copy of ``x``, a forward hook on each child keeping a copy of what its last call
    returned (a copy at once: ``ReLU(inplace=True)`` and ``out += identity`` overwrite it later)."""
    outputs: dict[int, Any] = {}

    def keep(i: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            outputs[i] = _copy(output)

        return hook

    handles = [child.register_forward_hook(keep(i)) for i, child in enumerate(children)]
    try:
        with torch.no_grad():
            module(x.clone())
    except Exception:
        pass  # the children that returned before it raised have their values
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def literal_verdicts(
    model: nn.Module,
    x: torch.Tensor,
    cuts: Iterable[int] | None = None,
    modes: Sequence[str] = MODES,
    seed: int = SEED,
    per_cut: bool = False,
) -> dict[tuple[int, str], bool]:
    """``{(k, mode): nn.Sequential(*children[:k]) equals the full model's output of child k}``.

    Per mode, under ``torch.no_grad()``: the full model once, hooked; then the Sequential. With
    ``per_cut=True`` each cut's ``nn.Sequential(*children[:k])`` runs on its own; by default one
    ``nn.Sequential(*children[:K])`` (K the deepest cut) runs once with the same hooks, which is the same
    answer at a fraction of the cost: a Sequential calls its children one after the other, so its first k
    calls are exactly the k-child Sequential's, from the same seed and buffers (``test_zoo`` checks the two
    agree). Before every run the buffers (BN running stats, the only state a forward changes: there is no
    optimizer step) are put back and ``torch.manual_seed(seed)`` is called; buffers, train/eval flags and
    the global RNG are restored at the end. A child the full model never returned from has no value, so
    every cut there is False; so is every cut whose Sequential raises.
    """
    children = list(model.children())
    cuts = list(range(1, len(children) + 1)) if cuts is None else sorted(cuts)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    flags = [(m, m.training) for m in model.modules()]
    rng = torch.get_rng_state()
    verdicts: dict[tuple[int, str], bool] = {}

    def fresh(module: nn.Module, mode: str) -> nn.Module:
        _restore(model, buffers)
        module.train(mode == "train")
        torch.manual_seed(seed)
        return module

    try:
        for mode in modes:
            expected = _hooked(children, fresh(model, mode), x)
            got: dict[int, Any] = {}
            if per_cut:
                for k in cuts:
                    alone = _hooked(children, fresh(nn.Sequential(*children[:k]), mode), x)
                    if k - 1 in alone:
                        got[k - 1] = alone[k - 1]
            elif cuts:
                got = _hooked(children, fresh(nn.Sequential(*children[: cuts[-1]]), mode), x)
            for k in cuts:
                verdicts[(k, mode)] = k - 1 in expected and k - 1 in got and same(got[k - 1], expected[k - 1])
    finally:
        _restore(model, buffers)
        for module, flag in flags:
            module.training = flag
        torch.set_rng_state(rng)
    return verdicts


def _restore(model: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])


def featx_verdicts(sweep: Any) -> dict[tuple[int, str], bool]:
    """The same mapping from a ``featx.Sweep``."""
    return {(cut.kept, m): r.ok for cut in sweep.cuts for m, r in cut.modes.items()}


def short(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", name)
