"""What the recorder (``featx.recorder``) reads off each call it sees: of a torch function, its clean
name, whether it writes in place and whether it adds (``_facts``, cached per function); of any call, the
tensors it takes and the tensors a module made (``_tensors``, ``_call_inputs``, ``_made_outputs``); of a
module, whether it is a leaf whose forward runs with the recorder's mode off (``_leaf_kind``); and the
line of the model's code that made the call (``_source``).
"""

from __future__ import annotations

import contextlib
import sys
from types import FrameType
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from featx.code_location import in_torch_or_featx, short_path

_ADD_OPS = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__"})


def _leaf_kind(module: nn.Module) -> int:
    """Whether ``module`` is a leaf to the recorder, and which: of a class of torch.nn's own (not a
    subclass from elsewhere) and without children. Such a forward is one functional call on its input:
    never a merge or glue, and what it returns is made from its input.

    They run with the recorder's mode off (``_Recorder.call``): such a forward writes nothing but running
    statistics, which the snapshot copies anyway, the input where ``inplace=True``, and the weight where
    ``max_norm`` is set (``nn.Embedding`` renormalises the rows it looks up, inside ``F.embedding``, where
    the mode would not see it either); ``_Recorder.call`` sees those two writes coming by the flag.
    """
    if module._modules:
        return _NOT_LEAF
    kind = type(module)
    ours = _TORCH_LEAF.get(kind)
    if ours is None:
        ours = _TORCH_LEAF[kind] = kind.__module__.startswith("torch.nn.modules.")
    if not ours:
        return _NOT_LEAF
    state = module.__dict__
    if state.get("max_norm") is not None:
        return _WRITES_WEIGHTS
    return _WRITES_INPUT if state.get("inplace") is True else _LEAF


_NOT_LEAF, _LEAF, _WRITES_INPUT, _WRITES_WEIGHTS = range(4)
_TORCH_LEAF: dict[type, bool] = {}


def _call_inputs(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors a module is called with: most often its one positional tensor."""
    if kwargs:
        return _tensors(args) + _tensors(kwargs)
    if len(args) == 1 and isinstance(args[0], torch.Tensor):
        return [args[0]]
    return _tensors(args)


def _made_outputs(output: Any, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors a module returned but its inputs: what it returns of its input as is (``nn.Identity``,
    a ``DropPath`` at rate 0) it did not make, so a shortcut through one stays an identity shortcut."""
    if isinstance(output, torch.Tensor):
        return [] if any(output is i for i in inputs) else [output]
    return [t for t in _tensors(output) if not any(t is i for i in inputs)]


def _tensors(tree: Any) -> list[torch.Tensor]:
    """The tensors in ``tree``, as ``pytree.tree_leaves`` finds them; plain tuples, lists and dicts (what
    torch calls and modules pass almost always) are walked here, anything else by pytree."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    kind = type(tree)
    if kind is tuple or kind is list:
        found = []
        for x in tree:
            if isinstance(x, torch.Tensor):
                found.append(x)
            elif x is not None and type(x) not in _SCALARS:
                found += _tensors(x)
        return found
    if kind is dict:
        return _tensors(tuple(tree.values()))
    if tree is None or kind in _SCALARS:
        return []
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


_SCALARS = frozenset(
    {int, float, bool, str, complex, torch.dtype, torch.device, torch.Size, slice, type(...)}
)


# func -> (clean name, writes in place by its name, is an add): the same few hundred functions are
# seen thousands of times per forward.
_FACTS: dict[Any, tuple[str, bool, bool]] = {}


def _facts(func: Any) -> tuple[str, bool, bool]:
    name = _op_name(func)
    facts = (_clean_name(name), _writes_in_place(name, {}), name in _ADD_OPS)
    with contextlib.suppress(TypeError):  # an unhashable callable is worked out on every call
        _FACTS[func] = facts
    return facts


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":  # a property such as Tensor.T or Tensor.mT
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def _clean_name(name: str) -> str:
    """Operators by the name of the function they stand for: ``__add__`` -> ``add``, ``__iadd__`` -> ``add_``."""
    if name.startswith("__") and name.endswith("__"):
        core = name[2:-2]
        if core.startswith("i") and core[1:] in _INPLACE_OPERATORS:
            return core[1:] + "_"
        if core.startswith("r") and core[1:] in _INPLACE_OPERATORS:
            return core[1:]
        return core
    return name


_INPLACE_OPERATORS = frozenset(
    {
        "add",
        "sub",
        "mul",
        "truediv",
        "floordiv",
        "mod",
        "pow",
        "matmul",
        "and",
        "or",
        "xor",
        "lshift",
        "rshift",
    }
)


def _writes_in_place(name: str, kwargs: dict) -> bool:
    if "out" in kwargs or kwargs.get("inplace") is True:  # F.relu(x, inplace=True) is seen as `relu`
        return True
    if name.startswith("__"):
        return name in ("__setitem__",) or (name.startswith("__i") and name[3:-2] in _INPLACE_OPERATORS)
    return name.endswith("_")


def _source(owner: nn.Module) -> str:
    """``file:line`` of the code that made the current torch call: the innermost frame of ``owner``'s own
    methods (``forward``, or a helper it calls), else the innermost frame outside torch and featx."""
    frame: FrameType | None = sys._getframe(2)
    fallback = None
    while frame is not None:
        filename = frame.f_code.co_filename
        if not in_torch_or_featx(filename) and not filename.startswith("<"):
            if fallback is None:
                fallback = frame
            if "self" in frame.f_code.co_varnames and frame.f_locals.get("self") is owner:
                return f"{short_path(filename)}:{frame.f_lineno}"
        frame = frame.f_back
    if fallback is None:
        return "?"
    return f"{short_path(fallback.f_code.co_filename)}:{fallback.f_lineno}"
