"""Why a cut is not faithful, in words: the causes featx saw in the full forward (glue the cut loses,
children not fed as the truncated model feeds them, ``_reasons``, each saying what the truncated model does
instead, ``_instead``), then what each failing mode's comparison found."""

from __future__ import annotations

from featx.anatomy_values import Anatomy, Glue
from featx.cut import CutPath
from featx.mode_result import ModeResult
from featx.vocab import LOST


def _glue_on(anatomy: Anatomy, path: CutPath) -> tuple[Glue, ...]:
    """The glue of the root and of the containers a cut passes through."""
    containers = set(path.containers())
    return tuple(g for g in anatomy.glue if g.container in containers)


def _reasons(
    anatomy: Anatomy, path: CutPath, results: dict[str, ModeResult], keep_glue: bool = False, n: int = 0
) -> tuple[str, ...]:
    """The causes featx saw (lost glue, modules not fed as the truncated model feeds them), then what each
    failing mode's comparison found (``ModeResult.reason``)."""
    failing = [m for m, r in results.items() if not r.ok]
    if not failing:
        return ()
    reasons = []
    lost = [
        g
        for g in _glue_on(anatomy, path)
        if g.status_at(path, keep_glue, path.kept == n) == LOST and set(g.modes) & set(failing)
    ]
    for g in lost:
        where = f"before `{g.before}`" if g.before else "at the model's output"
        if g.container:
            where = f"in `{g.container}`'s forward " + (
                f"before `{g.before}`" if g.before else "after its children"
            )
        reasons.append(f"glue {g.label()} runs {where} in the full model and is lost")
    # keep_glue: the model's own forward feeds the children
    units = path.units()
    for i, child in enumerate(anatomy.unit(name) for name in units) if not keep_glue else ():
        notes = {m: note for m in failing if (note := child.feed.get(m))}
        for note in dict.fromkeys(notes.values()):
            in_modes = [m for m, n in notes.items() if n == note]
            glue_behind = any(
                g.container == child.name.rpartition(".")[0]
                and g.before_index == child.index
                and set(g.modes) & set(in_modes)
                for g in lost
            )
            if note.startswith("fed ") and glue_behind:
                continue  # the lost glue right before the child is the cause, already said
            reasons.append(
                f"child `{child.name}` is {note} in the full forward ({', '.join(in_modes)})"
                + _instead(note, units[i - 1] if i else None)
            )
    reasons += [results[m].reason(m) for m in failing]
    return tuple(reasons)


def _instead(note: str, before: str | None) -> str:
    """What the truncated model does where the full forward did what ``note`` says (a feed note of
    record.py), so that the reason says why the difference matters: the truncated model calls each of its
    modules once, in order, on what the one before it returned (the first on the model's input), with
    nothing between them."""
    fed = f"what `{before}` returns" if before else "the model's input"
    if note == "never called":
        return f"; the truncated model calls it on {fed}"
    if note.startswith("called ") and note.endswith(" times"):
        return f"; the truncated model calls it once, on {fed}"
    if note.startswith("fed something other than"):
        return f"; the truncated model feeds it {fed} as it is"
    if note.startswith("called with "):
        return f"; the truncated model calls it on {fed} alone"
    if note.startswith(("not called right after", "called although", "called before")):
        where = f"right after `{before}`" if before else "first"
        return f"; the truncated model calls it {where}, in registration order"
    if "random number generator" in note:
        return "; the truncated model draws nothing in between, so random ops (dropout) draw other numbers"
    if note.startswith("called after"):  # the model's own code changed an attribute or wrote a tensor
        return "; the truncated model makes no such change"
    return ""  # says the consequence itself (the train/eval flags, the grad or autocast state)
