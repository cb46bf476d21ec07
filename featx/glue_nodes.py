"""Reading the nodes of a graph keep_glue traced: which are pure (dead ones can go), which only read what a
tensor is like (a shape, a dtype), and how a refusal names a node and the line of the model's code that made it.
"""

from __future__ import annotations

import builtins
import operator
import re

import torch.fx as fx

from featx.code_location import in_torch_or_featx, short_path

# Nodes that neither write to a tensor nor draw random numbers: dead ones can go. A module call or any
# other torch function stays even when its value is unused, since it may update BN statistics or advance
# the RNG as the full forward does.
_OPERATORS = [
    "add",
    "sub",
    "mul",
    "floordiv",
    "truediv",
    "mod",
    "pow",
    "neg",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "and_",
    "or_",
    "not_",
]
PURE_FUNCTIONS = frozenset(
    {getattr, builtins.len, operator.getitem, *(getattr(operator, n) for n in _OPERATORS)}
)
PURE_METHODS = frozenset(
    [
        "size",
        "dim",
        "numel",
        "stride",
        "view",
        "reshape",
        "flatten",
        "permute",
        "transpose",
        "expand",
        "contiguous",
        "unsqueeze",
        "squeeze",
        "type_as",
        "to",
        "float",
        "half",
        "__getitem__",
    ]
)


_META_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout"})
_META_METHODS = frozenset({"size", "dim", "numel", "stride", "get_device"})


def is_meta(node: fx.Node, meta: set[fx.Node]) -> bool:
    """A shape, dtype or device, or arithmetic on those: what a tensor is like, not what it holds."""
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
        return node.args[1] in _META_ATTRS
    if node.op == "call_method" and node.target in _META_METHODS:
        return True
    inputs = node.all_input_nodes
    return (
        node.op == "call_function"
        and node.target in PURE_FUNCTIONS
        and bool(inputs)
        and all(n in meta for n in inputs)
    )


def describe(node: fx.Node, prefix: str = "") -> str:
    if node.op == "call_module":
        return f"the call of `{join(prefix, str(node.target))}`"
    return f"`{getattr(node.target, '__name__', str(node.target))}`"


def line(node: fx.Node) -> str:
    """`` (file:line)`` of the model code that made ``node``, from fx's recorded stack."""
    trace = node.stack_trace or ""
    found = re.findall(r'File "([^"]+)", line (\d+)', trace)
    for filename, line in reversed(found):
        if not in_torch_or_featx(filename):
            return f" ({short_path(filename)}:{line})"
    return ""


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
