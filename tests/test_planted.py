"""Generated models with planted glue and residuals: featx must find exactly what was planted.

Each model is a root with 2-12 children, each an affine map, a dropout, or a residual block nested at some
depth (identity or projection shortcut, ``+`` or ``+=``). The root's forward plants glue at chosen
boundaries: value-changing ops (constants, in-place ops, functional dropout, a skip from an earlier child,
a root-level position embedding), value-preserving ones (reshape, unflatten/flatten and permute round
trips), and a random draw that changes no value but shifts the dropout masks of later children. The ground
truth follows from the plan alone: a cut is faithful in a mode exactly when no glue that changes values in
that mode runs before its last kept child, and no random draw precedes a kept dropout child in train mode
(every child is injective, so a change is never hidden). featx's sweep — derived and literal — must agree cut by cut, mode by mode, and report
exactly the planted glue and residuals with the right boundaries, owners, shortcuts and statuses.
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import featx

WIDTH = 64  # 2x64 values: dropout children (p=0.1, at most 12) never zero them all (p < 1e-17)


@dataclass(frozen=True)
class ChildPlan:
    kind: str  # affine | dropout | block
    depth: int = 0  # block: how many Sequentials wrap it
    shortcut: str = "identity"  # block: identity | projection
    in_place: bool = False  # block: out += shortcut instead of out = out + shortcut


@dataclass(frozen=True)
class GluePlan:
    boundary: int  # runs after child boundary-1 and before child boundary (0: at the input, N: at the output)
    kind: str
    source_child: int = 0  # skip: the earlier child whose output is added


# kind -> (ops featx should record, modes in which it changes values)
GLUE = {
    "add_const": (["add"], {"eval", "train"}),
    "mul_const": (["mul"], {"eval", "train"}),
    "iadd_const": (["add_"], {"eval", "train"}),
    "dropout": (["dropout"], {"train"}),
    "skip": (["add"], {"eval", "train"}),
    "pos_embed": (["add"], {"eval", "train"}),
    "reshape_round_trip": (["reshape", "reshape"], set()),
    "unflatten_round_trip": (["unflatten", "flatten"], set()),
    "permute_round_trip": (["permute", "permute"], set()),
    "draw_random": (["rand"], set()),  # changes no value, but shifts every later dropout mask in train mode
}


class Affine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(WIDTH) + 0.5)  # never zero: injective
        self.bias = nn.Parameter(torch.randn(WIDTH))

    def forward(self, x):
        return x * self.weight + self.bias


class ResidualBlock(nn.Module):
    def __init__(self, shortcut: str, in_place: bool) -> None:
        super().__init__()
        self.body = Affine()
        self.proj = Affine() if shortcut == "projection" else None
        self.in_place = in_place

    def forward(self, x):
        shortcut = x if self.proj is None else self.proj(x)
        out = self.body(x)
        if self.in_place:
            out += shortcut
        else:
            out = out + shortcut
        return out


def build_child(plan: ChildPlan) -> nn.Module:
    if plan.kind == "affine":
        return Affine()
    if plan.kind == "dropout":
        return nn.Dropout(0.1)
    module: nn.Module = ResidualBlock(plan.shortcut, plan.in_place)
    for _ in range(plan.depth):
        module = nn.Sequential(module)
    return module


class Planted(nn.Module):
    def __init__(self, children: list[ChildPlan], glue: list[GluePlan]) -> None:
        super().__init__()
        for i, plan in enumerate(children):
            self.add_module(f"c{i}", build_child(plan))
        self.glue = glue
        self.pos = nn.Parameter(torch.randn(WIDTH) + 3.0)  # never zero

    def forward(self, x):
        n = len(self._modules)
        outputs = []
        for boundary in range(n + 1):
            for g in self.glue:
                if g.boundary == boundary:
                    x = self.apply_glue(g, x, outputs)
            if boundary < n:
                x = self._modules[f"c{boundary}"](x)
                outputs.append(x)
        return x

    def apply_glue(self, g: GluePlan, x, outputs):
        if g.kind == "add_const":
            return x + 0.5
        if g.kind == "mul_const":
            return x * -2.0
        if g.kind == "iadd_const":
            return x.add_(1.5)
        if g.kind == "dropout":
            return F.dropout(x, 0.5, self.training)
        if g.kind == "skip":
            return x + outputs[g.source_child]
        if g.kind == "pos_embed":
            return x + self.pos
        if g.kind == "reshape_round_trip":
            return x.reshape(x.shape[0], WIDTH // 2, 2).reshape(x.shape[0], WIDTH)
        if g.kind == "unflatten_round_trip":
            return x.unflatten(1, (4, WIDTH // 4)).flatten(1)
        if g.kind == "permute_round_trip":
            return x.permute(1, 0).permute(1, 0)
        if g.kind == "draw_random":
            torch.rand(1)
            return x
        raise AssertionError(g.kind)


_lines, _first = inspect.getsourcelines(Planted.apply_glue)
GLUE_LINES = range(_first, _first + len(_lines))


@st.composite
def plans(draw) -> tuple[list[ChildPlan], list[GluePlan]]:
    n = draw(st.integers(2, 12))
    children = []
    for _ in range(n):
        kind = draw(st.sampled_from(["affine", "dropout", "block", "block"]))
        if kind == "block":
            children.append(
                ChildPlan(
                    "block",
                    depth=draw(st.integers(0, 3)),
                    shortcut=draw(st.sampled_from(["identity", "projection"])),
                    in_place=draw(st.booleans()),
                )
            )
        else:
            children.append(ChildPlan(kind))
    glue = []
    for _ in range(draw(st.integers(0, 5))):
        boundary = draw(st.integers(0, n))
        kinds = [k for k in GLUE if k != "skip" or boundary > 0]
        kind = draw(st.sampled_from(kinds))
        source = draw(st.integers(0, boundary - 1)) if kind == "skip" else 0
        glue.append(GluePlan(boundary, kind, source))
    return children, glue


def expected_faithful(children: list[ChildPlan], glue: list[GluePlan], kept: int, mode: str) -> bool:
    changes = any(g.boundary <= kept - 1 and mode in GLUE[g.kind][1] for g in glue)
    shifts_masks = mode == "train" and any(
        g.kind == "draw_random" and any(c.kind == "dropout" for c in children[g.boundary : kept])
        for g in glue
    )
    return not (changes or shifts_masks)


def glue_status(boundary: int, kept: int) -> str:
    if boundary <= kept - 1:
        return "lost"
    return "at_cut" if boundary == kept else "dropped"


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans(), seed=st.integers(0, 2**16))
def test_featx_finds_exactly_the_planted_glue_and_residuals(plan, seed):
    children, glue = plan
    torch.manual_seed(seed)
    model = Planted(children, glue)
    x = torch.randn(2, WIDTH)
    names = [f"c{i}" for i in range(len(children))]

    derived = featx.sweep(model, x)
    literal = featx.sweep(model, x, literal=True)

    # Glue: exactly the planted ops, at their boundaries, from the planting lines.
    found = Counter()
    for g in derived.anatomy.glue:
        found[(g.op, g.after_index, g.before_index)] += g.count
        path, line = g.source.rsplit(":", 1)
        assert path.endswith("test_planted.py") and int(line) in GLUE_LINES, g
    planted = Counter()
    for g in glue:
        for op in GLUE[g.kind][0]:
            after = g.boundary - 1 if g.boundary > 0 else None
            before = g.boundary if g.boundary < len(children) else None
            planted[(op, after, before)] += 1
    assert found == planted

    # Residuals: one per block, owned by the innermost block module, plus one lost merge per skip.
    expected = Counter(
        (".".join([names[i]] + ["0"] * c.depth), names[i], c.shortcut)
        for i, c in enumerate(children)
        if c.kind == "block"
    )
    expected += Counter(("", None, None) for g in glue if g.kind == "skip")
    got = Counter(
        (r.module, r.child, r.shortcut if r.child is not None else None) for r in derived.anatomy.residuals
    )
    assert got == expected

    for kept in range(1, len(children) + 1):
        cut, run = derived.cuts[kept - 1], literal.cuts[kept - 1]
        for mode in ("eval", "train"):
            truth = expected_faithful(children, glue, kept, mode)
            assert cut.modes[mode].ok == truth, (kept, mode, cut.reasons)
            assert run.modes[mode].ok == truth, (kept, mode, run.reasons)
        assert (
            cut.faithful
            == run.faithful
            == all(expected_faithful(children, glue, kept, m) for m in ("eval", "train"))
        )
        assert {(g.op, g.after_index) for g in cut.lost_glue} == {
            (op, g.boundary - 1 if g.boundary > 0 else None)
            for g in glue
            if glue_status(g.boundary, kept) == "lost"
            for op in GLUE[g.kind][0]
        }
        # Residual statuses as planted: a block's merge goes with its child, a skip is the root's own.
        planted_status = Counter(
            (".".join([names[i]] + ["0"] * c.depth), "kept" if i < kept else "dropped")
            for i, c in enumerate(children)
            if c.kind == "block"
        )
        planted_status += Counter(("", "lost") for g in glue if g.kind == "skip")
        assert Counter((r.module, r.status(kept)) for r in derived.anatomy.residuals) == planted_status
