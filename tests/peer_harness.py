"""What the peers' own extractor tests hold their modules to, as plain functions featx's modules are held to.

torchvision's ``test/test_backbone_utils.py`` and timm's ``tests/test_models.py`` check that a feature
extractor built from a model returns the model's own values (in train and eval, under the same seed), that
gradients flow back to every parameter the value depends on, and that the module keeps the mode it was built
in. Here the reference is always the model itself: a forward hook on the module the cut names (its output
cloned, autograd kept, so nothing the forward does later can change it), on a deep copy of the model taken
before featx sees it, run under the same seed. Nothing here uses featx.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torchvision
from torch import nn
from torch.utils import _pytree as pytree

SEED = 0


@dataclass(frozen=True)
class Peer:
    """A model to build: ``spec`` as featx names it, the constructor's keyword arguments, the input size."""

    spec: str
    size: int = 64
    kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def id(self) -> str:
        return self.spec.split("/", 1)[1]

    def build(self, seed: int = SEED) -> nn.Module:
        """The model with random weights drawn under ``seed``."""
        source, name = self.spec.split("/", 1)
        torch.manual_seed(seed)
        if source == "timm":
            return timm.create_model(name, pretrained=False, **dict(self.kwargs))
        return torchvision.models.get_model(name, weights=None, **dict(self.kwargs))

    def input(self, batch: int = 2, seed: int = SEED) -> torch.Tensor:
        return torch.randn((batch, 3, self.size, self.size), generator=torch.Generator().manual_seed(seed))


def value_at(model: nn.Module, names: Sequence[str], x: torch.Tensor, seed: int = SEED) -> dict[str, Any]:
    """What each module of ``names`` returns (its last call) when ``model`` runs on ``x`` under ``seed``,
    and the model's output under ``""``: cloned as it is returned, autograd kept."""
    modules = dict(model.named_modules())
    seen: dict[str, Any] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            # a torch.Size is a pytree node that tree_map would rebuild as a plain tuple: keep it as it is
            seen[name] = pytree.tree_map(
                lambda t: t.clone() if isinstance(t, torch.Tensor) else t,
                output,
                is_leaf=lambda t: isinstance(t, torch.Size),
            )

        return hook

    handles = [modules[name].register_forward_hook(keep(name)) for name in names]
    try:
        torch.manual_seed(seed)
        seen[""] = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def reference_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` to take the reference values from, so that running it (BN statistics, a
    counter a forward keeps) cannot change the model featx is given, nor the other way round."""
    return copy.deepcopy(model)


def gradients(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def mean_of(tree: Any) -> torch.Tensor:
    """The sum of the means of every floating tensor in ``tree``: one scalar to call backward on."""
    leaves = [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum((t.float().mean() for t in leaves), torch.zeros(()))


def differences(out: Any, reference: Any) -> list[str]:
    """Where ``out`` is not bit-equal to ``reference``: ``[]`` when it is, else one entry per differing
    element (``"[1]: max abs diff 0.5"``, ``"[0]: shape [2, 3] vs [2, 4]"``)."""
    leaves_out, spec_out = pytree.tree_flatten_with_path(out)
    leaves_ref, spec_ref = pytree.tree_flatten(reference)
    if spec_out != spec_ref:
        return [f"structure {spec_out} vs {spec_ref}"]
    found = []
    for (path, a), b in zip(leaves_out, leaves_ref, strict=True):
        at = pytree.keystr(path) or "output"
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            if a != b:
                found.append(f"{at}: {a!r} vs {b!r}")
        elif a.shape != b.shape:
            found.append(f"{at}: shape {list(a.shape)} vs {list(b.shape)}")
        elif not torch.equal(a, b):
            diff = (a.detach().double() - b.detach().double()).abs().max()
            found.append(f"{at}: max abs diff {float(diff):.6g}")
    return found


def cut_differences(
    model: nn.Module,
    reference: nn.Module,
    names: Sequence[str],
    x: torch.Tensor,
    make: Callable[[str], nn.Module | None],
) -> list[tuple[str, int, list[str]]]:
    """Each cut of ``names`` (children of ``model``'s root) as ``make(cut)`` builds it (None: refused),
    called twice on ``x`` under the seed ``value_at`` uses, as it comes back (no ``.train()``/``.eval()``),
    against ``reference``'s value at the cut (the model's output at its last child). Returns the cuts that
    differ, as ``(cut, call, differences)``."""
    wrong: list[tuple[str, int, list[str]]] = []
    with torch.no_grad():
        expected = value_at(reference, names, x)
        for cut in names:
            module = make(cut)
            want = expected[""] if cut == names[-1] else expected.get(cut)
            if module is None or want is None:  # refused, or never called in this mode
                continue
            for call in range(2):
                torch.manual_seed(SEED)
                if diff := differences(module(x), want):
                    wrong.append((cut, call, diff))
    return wrong


def traced_once(
    trace: Callable[[nn.Module], Any], refusal: type[Exception]
) -> Callable[[nn.Module, str], nn.Module]:
    """A ``cut(model, name)`` making what ``featx.truncate(model, name, keep_glue=True)`` makes —
    ``trace_root(model).cut(name)`` — from one ``trace(model)`` for every cut of the model: the zoo's
    root is traced once, not once per cut. A root that does not trace refuses every cut the same way."""
    traced: dict[int, Any] = {}

    def cut(model: nn.Module, name: str) -> nn.Module:
        if id(model) not in traced:
            try:
                traced[id(model)] = trace(model)
            except refusal as err:
                traced[id(model)] = err
        root = traced[id(model)]
        if isinstance(root, refusal):
            raise root
        return root.cut(name)

    return cut


def every_root_cut_differences(
    peer: Peer, mode: str, cut: Callable[[nn.Module, str], nn.Module], refusal: type[Exception]
) -> list[tuple[str, int, list[str]]]:
    """``cut_differences`` of every root-child cut of ``peer``'s model in ``mode``, each made by
    ``cut(model, name)`` (the zoo's keep_glue cut) or refused with ``refusal``, whose message must be one
    line saying why."""
    model = peer.build().train(mode == "train")
    reference = reference_copy(model)
    names = [name for name, _ in model.named_children()]

    def make(name: str) -> nn.Module | None:
        try:
            return cut(model, name)
        except refusal as err:
            assert str(err) and "\n" not in str(err)
            return None

    return cut_differences(model, reference, names, peer.input(seed=1), make)
