"""The ``nn.Sequential`` of what a cut keeps (``truncate``), or with ``keep_glue`` the module that keeps
the root's glue as well: either way a ``featx.truncated_model.TruncatedModel``.

The cut itself (``CutPath``, ``resolve_path``, ``resolve_cut``, ``child_names``) is ``featx.cut``; those
names are importable from here too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

from torch import nn

from featx.cut import CutPath, Level, child_names, resolve_cut, resolve_path
from featx.glue import keep_glue as _keep_glue
from featx.glue import leaf_functions_for
from featx.glue_module import KeepGlue
from featx.truncated_model import TruncatedModel

__all__ = [
    "CutPath",
    "Level",
    "TruncatedModel",
    "TruncatedSequential",
    "child_names",
    "resolve_cut",
    "resolve_path",
    "truncate",
    "truncated",
]


class TruncatedSequential(nn.Sequential, TruncatedModel):
    """The plain cut: an ``nn.Sequential`` of the kept children (indexing, ``len``, iteration and
    ``state_dict()`` as ``nn.Sequential(*list(model.children())[:k])`` has them), and a ``TruncatedModel``:
    ``upto`` is the cut as resolved, ``keep_glue`` is False. A slice (``cut[:2]``) is a plain
    ``nn.Sequential``, as it always was: it is another cut."""

    keep_glue = False

    def __init__(self, modules: OrderedDict[str, nn.Module], upto: str) -> None:
        super().__init__(modules)
        self.upto = upto

    def __getitem__(self, idx: Any) -> Any:
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)


def truncated(model: nn.Module, path: CutPath) -> TruncatedSequential:
    """The truncated model of ``path``: a ``TruncatedSequential`` of the root's kept children where a
    partly kept container is an ``nn.Sequential`` of its own kept children, the same module objects under
    the same names (so ``state_dict()`` keys are a prefix subset of the model's). Each Sequential carries
    the train/eval flag of the module it stands for (the root, a container) and the kept modules keep
    theirs, so the result is in the mode the model is in, mixed modes included."""
    modules = dict(model.named_modules(remove_duplicate=False))

    by = {level.container: level for level in path.levels}

    def build(level: Level) -> nn.Sequential:
        kept = [
            (
                name.rsplit(".", 1)[-1] if level.container else name,
                build(by[name]) if name in by else modules[name],
            )
            for name in level.names[: level.kept]
        ]
        sequential = (
            nn.Sequential(OrderedDict(kept))
            if level.container
            else TruncatedSequential(OrderedDict(kept), path.upto)
        )
        sequential.training = modules[level.container].training  # the mode of the module it stands for
        return sequential

    root = build(path.levels[0])
    assert isinstance(root, TruncatedSequential)
    return root


@overload
def truncate(
    model: nn.Module,
    upto: str | int,
    keep_glue: Literal[False] = False,
    *,
    leaf_functions: Sequence[Callable[..., Any]] = (),
) -> TruncatedSequential: ...


@overload
def truncate(
    model: nn.Module,
    upto: str | int,
    keep_glue: Literal[True],
    *,
    leaf_functions: Sequence[Callable[..., Any]] = (),
) -> KeepGlue: ...


@overload
def truncate(
    model: nn.Module,
    upto: str | int,
    keep_glue: bool = False,
    *,
    leaf_functions: Sequence[Callable[..., Any]] = (),
) -> TruncatedModel: ...


def truncate(
    model: nn.Module,
    upto: str | int,
    keep_glue: bool = False,
    *,
    leaf_functions: Sequence[Callable[..., Any]] = (),
) -> TruncatedModel:
    """A ``featx.TruncatedModel`` of ``model`` cut at ``upto``, whatever ``keep_glue`` says: ``forward(x)``
    gives the value at the cut, ``.upto`` is the cut as resolved (``-3`` on a ResNet is ``"layer3"``),
    ``.keep_glue`` says which kind it is, and ``state_dict()`` keys are the model's own.

    Without ``keep_glue`` it is a ``featx.truncation.TruncatedSequential``: an ``nn.Sequential`` of the first
    children of ``model`` up to and including the cut (indexing, ``len`` and iteration as ever); with
    ``keep_glue=True``, a ``featx.glue.KeepGlue`` (below). Which one is decided by the flag alone.

    The Sequential holds the *same* module objects under their original names, so its ``state_dict()``
    keys are a prefix subset of the model's and training one trains the other. It assumes what
    ``nn.Sequential(*list(model.children())[:k])`` assumes: the model's ``forward()`` calls each kept
    child once, in registration order, on exactly what the previous child returned, and does nothing
    else in between. ``featx.verify`` checks that assumption; this function does not. The result comes back
    in the model's mode: each module featx makes has the train/eval flag of the module it stands for, the
    kept modules keep theirs (a model with norms held in eval stays so), and ``train()``/``eval()`` on it
    act as on the model.

    A dotted ``upto`` (``stages.2``) cuts inside a child: the Sequential holds the root's children before
    ``stages``, then ``stages`` itself as an ``nn.Sequential`` of its children through ``2`` — the same
    block objects under the same names, so the keys stay ``stages.0.…`` — and assumes the same of
    ``stages``' forward (timm's stages, torchvision's ``features`` are such containers). Any depth works.

    With ``keep_glue=True`` it returns a ``featx.glue.KeepGlue`` instead: the same kept children, run by
    the root's own forward traced with ``torch.fx`` up to the cut, so the root's glue (``torch.flatten``,
    ViT's class token and position embedding) is kept and the module returns what the full model computes
    at the cut (for the last child, the model's output; for a dotted ``upto``, what that module returns).
    A dotted cut traces each container on the path the same way and keeps its glue too; the container
    becomes a ``KeepGlue`` of its kept children. It raises ``FeatxError`` where it cannot (the root or a
    container on the path does not trace, a container on the path is called more than once, the cut module
    is called more than once inside a block); a model without glue gives the same values as the Sequential. See
    ``featx.glue``.

    ``leaf_functions`` (with ``keep_glue=True`` only) are functions the forward calls that the trace keeps
    whole, as one step of the kept forward run as it is — as torchvision's ``create_feature_extractor``
    takes them in ``tracer_kwargs={"autowrap_functions": ...}``: a conversion of a tensor (``int``,
    ``float``) or a function of your own that ``torch.fx`` cannot trace through. A root that calls such a
    function on a tensor is otherwise refused, naming the function.
    """
    leaves = leaf_functions_for(leaf_functions, keep_glue)
    path = resolve_path(model, upto)
    if keep_glue:
        return _keep_glue(model, path, leaves)
    return truncated(model, path)
