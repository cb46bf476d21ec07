"""``featx check``: verify every backbone config and every cut it declares, for CI.

A config declares its cut (``upto``) and its taps (``outputs``); each is a cut the built backbone relies
on, so each must be faithful: ``verify_cuts`` checks them all with one recorded forward and one run of the
kept children per mode. Every config becomes one ``ConfigCheck``; a config that cannot be checked (bad
YAML, not a config, a model that will not load or run) is an ``error`` item and the run goes on. When
the cuts are faithful the backbone is built and proven too (``featx.built_proof``): its taps equal the
full model's values there with the same norm handling. The outcome is JSON here (``to_dict``); its table,
JUnit XML and Markdown (with a Mermaid picture of each cut) are drawn by ``featx.render``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from featx.anatomy_values import Glue
from featx.backbone.plan import PlanError, resolve
from featx.built_proof import BuiltMode, prove_built, reference_taps
from featx.config import load_config
from featx.errors import FeatxError, one_line, printable
from featx.export import ArtifactCheck, check_artifact
from featx.input_shapes import check_input_shape
from featx.inspection import example
from featx.numerics import Numerics, environment
from featx.render.check_text import VERDICTS
from featx.render.text import diff_text
from featx.report import Report, discarded_note
from featx.verification import verify_cuts
from featx.vocab import ERROR, FAITHFUL, LOST, NOT_FAITHFUL, Outcome

# the run exits with its worst item's
EXIT_CODES: dict[Outcome, int] = {FAITHFUL: 0, NOT_FAITHFUL: 1, ERROR: 2}
CONFIG_SUFFIXES = (".yaml", ".yml")
# What a config that cannot be checked raises: FeatxError for bad input (a file that will not load, a key,
# a model or weights featx refuses), and what torch raises when the model will not run as configured (a
# RuntimeError such as a shape it cannot take or memory it cannot get, out-of-memory included; MemoryError).
# Anything else is a bug in featx and propagates instead of becoming the config's error.
CONFIG_ERRORS: tuple[type[Exception], ...] = (FeatxError, RuntimeError, MemoryError)


@dataclass(frozen=True)
class ConfigCheck:
    """One config: its declared cuts verified, or why it could not be."""

    config: str  # the path as found
    model: str | None = None
    upto: str | None = None
    outputs: tuple[tuple[str, str], ...] = ()  # (output name, tapped child), in the config's order
    reports: tuple[Report, ...] = ()  # one per declared cut, shallowest first; the last is `upto`
    artifacts: tuple[ArtifactCheck, ...] = ()  # the config's `artifacts`, run against its backbone
    error: str | None = None
    fpn: str | None = None  # with `fpn`: `loaded` from the weights file, or `random` (its own init)
    seconds: float = 0.0
    # the backbone as built against the full model with the same norm handling, one per mode; empty when
    # it was not built (a declared cut is not faithful, or the config could not be checked)
    built: tuple[BuiltMode, ...] = ()
    # featx.numerics.environment() where its forwards ran (docs/json.md, "numeric environment")
    environment: dict[str, object] = field(default_factory=dict)

    @property
    def outcome(self) -> Outcome:
        if self.error is not None or not self.reports:
            return ERROR
        faithful = (
            all(r.faithful for r in self.reports)
            and all(b.faithful for b in self.built)
            and all(a.ok for a in self.artifacts)
        )
        return FAITHFUL if faithful else NOT_FAITHFUL

    @property
    def faithful(self) -> bool:
        return self.outcome == FAITHFUL

    @property
    def max_abs_diff(self) -> float | None:
        """Over every declared cut and mode; None when some output could not be compared (the truncated
        model raised, or returned another shape) or nothing was checked."""
        diffs = [m.max_abs_diff for r in self.reports for m in r.modes.values()]
        compared = [d for d in diffs if d is not None]
        return max(compared) if compared and len(compared) == len(diffs) else None

    @property
    def lost_glue(self) -> tuple[Glue, ...]:
        """Glue that runs before a kept child in the full model and that no declared cut carries."""
        lost: dict[Glue, None] = {}
        for r in self.reports:
            lost.update(dict.fromkeys(g for g in r.anatomy.glue if r.glue_status(g) == LOST))
        return tuple(lost)

    @property
    def reasons(self) -> tuple[str, ...]:
        """One sentence per cause, prefixed by the cut when the config declares more than one."""
        if self.error is not None:
            return (self.error,)
        seen: dict[str, None] = {}
        for r in self.reports:
            for reason in r.reasons:
                seen.setdefault(f"at `{r.upto}`: {reason}" if len(self.reports) > 1 else reason)
        for built in self.built:
            seen.update(dict.fromkeys(built.reasons))
        for artifact in self.artifacts:
            seen.update(dict.fromkeys(artifact.reasons))
        return tuple(seen)

    @property
    def notes(self) -> tuple[str, ...]:
        """What the verdicts do not say: each declared cut whose value the model's output does not depend on
        (``featx.report.discarded_note``)."""
        return tuple(note for r in self.reports if (note := discarded_note(r.upto, r.modes)))

    @property
    def stale(self) -> tuple[ArtifactCheck, ...]:
        """The artifacts that no longer match the config's backbone."""
        return tuple(a for a in self.artifacts if not a.ok)

    @property
    def built_differs(self) -> bool:
        """The backbone was built and some tap differs from the full model's value in some mode."""
        return not all(b.faithful for b in self.built)

    @property
    def built_max_abs_diff(self) -> float | None:
        """Over the built backbone's taps in every mode; None when not built or some tap not compared."""
        diffs = [b.max_abs_diff for b in self.built]
        return max(diffs) if diffs and None not in diffs else None  # type: ignore[type-var]

    @property
    def taps(self) -> dict[str, list[str]]:
        """Tapped child -> output names."""
        taps: dict[str, list[str]] = {}
        for output, child in self.outputs:
            taps.setdefault(child, []).append(output)
        return taps

    def message(self) -> str:
        """What failed where, with the max diff: the words of the JSON ``message``, the JUnit failure and
        the pytest plugin (the table and the Markdown show its reasons)."""
        if self.outcome == ERROR:
            return f"{self.config}: cannot be checked: {self.error}"
        cuts = ", ".join(f"`{r.upto}`" for r in self.reports)
        if self.built_differs and all(r.faithful for r in self.reports):
            modes = ", ".join(b.mode for b in self.built if not b.faithful)
            head = (
                f"{self.config}: `{self.model}` cut at `{self.upto}` is faithful, but the backbone the config "
                f"builds is not ({modes}); max abs diff {diff_text(self.built_max_abs_diff)}"
            )
            return "\n".join([head, *(f"  - {reason}" for reason in self.reasons)])
        if self.stale and all(r.faithful for r in self.reports):
            names = ", ".join(f"`{Path(a.path).name}`" for a in self.stale)
            head = (
                f"{self.config}: `{self.model}` cut at `{self.upto}` is faithful, but its artifact "
                f"{names} no longer matches the backbone the config builds"
            )
            return "\n".join([head, *(f"  - {reason}" for reason in self.reasons)])
        head = (
            f"{self.config}: `{self.model}` cut at `{self.upto}` (checked at {cuts}) is "
            f"{VERDICTS[self.outcome]}; max abs diff {diff_text(self.max_abs_diff)}"
        )
        if self.lost_glue:
            head += "; lost glue: " + ", ".join(
                f"{g.label()} before `{g.before}`" if g.before else g.label() for g in self.lost_glue
            )
        if self.outcome == FAITHFUL:
            return head
        return "\n".join([head, *(f"  - {reason}" for reason in self.reasons)])

    def to_dict(self) -> dict[str, object]:
        last = self.reports[-1] if self.reports else None
        return {
            "config": self.config,
            "outcome": self.outcome,
            "faithful": self.faithful,
            "model": self.model,
            "upto": self.upto,
            "outputs": dict(self.outputs),
            "modes": list(last.modes) if last else [],
            "max_abs_diff": self.max_abs_diff,
            "lost_glue": [g.to_dict(last.kept) for g in self.lost_glue] if last else [],
            "reasons": list(self.reasons),
            "artifacts": [a.to_dict() for a in self.artifacts],
            "fpn": self.fpn,
            "error": self.error,
            "message": self.message(),
            "seconds": round(self.seconds, 3),
            # the backbone as built (freeze, norm handling, keep_glue, the body before any FPN) against the
            # full model's values at its taps with the same norm handling: mode -> verdict; null if not built
            "built": {b.mode: b.to_dict() for b in self.built} or None,
            "cuts": [r.cut.to_dict() for r in self.reports],  # as `featx sweep --json` has each cut
            "report": last.to_dict() if last else None,  # `featx verify --json` of the cut at `upto`
            "environment": dict(self.environment),
        }


@dataclass(frozen=True)
class Check:
    """``featx.check``'s answer: one ``ConfigCheck`` per config found, in order."""

    paths: tuple[str, ...]
    items: tuple[ConfigCheck, ...]
    environment: dict[str, object] = field(default_factory=dict)  # the run's: its device, float32 eager

    @property
    def exit_code(self) -> int:
        """0 all faithful, 1 some config not faithful, 2 some config could not be checked."""
        return max((EXIT_CODES[i.outcome] for i in self.items), default=EXIT_CODES[ERROR])

    @property
    def counts(self) -> dict[str, int]:
        """Outcome -> how many configs have it, every outcome present."""
        return {o: sum(i.outcome == o for i in self.items) for o in (FAITHFUL, NOT_FAITHFUL, ERROR)}

    @property
    def has_fpn(self) -> bool:
        """Some config has an FPN: the table gets an ``fpn`` column (``loaded``, ``random``)."""
        return any(i.fpn for i in self.items)

    @property
    def has_artifacts(self) -> bool:
        """Some config names artifacts: the table and the Markdown get an ``artifacts`` column."""
        return any(i.artifacts for i in self.items)

    def to_dict(self) -> dict[str, object]:
        return {
            "paths": list(self.paths),
            "exit_code": self.exit_code,
            "summary": {"configs": len(self.items), **self.counts},
            "configs": [i.to_dict() for i in self.items],
            "environment": dict(self.environment),
        }

    def __str__(self) -> str:
        from featx.render.check_text import render_text

        return render_text(self)


def check(
    paths: Iterable[str | os.PathLike[str]],
    *,
    device: str = "cpu",
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
    weights: str | None = None,
    numerics: Mapping[str, object] | None = None,
) -> Check:
    """Verify every config under ``paths`` (files or folders) and every cut each declares.

    Folders are searched recursively for ``*.yaml``/``*.yml``, hidden ones skipped. A path that holds no
    config, or a config that cannot be checked, is an ``error`` item; the others still run.
    ``progress(done, total, config)`` is called before each config and once at the end. ``weights``
    overrides every config's ``weights`` (what ``resolve`` takes: a file or a weights name); ``numerics``
    (keys of a config's ``numerics:``, the ``--dtype``/``--autocast``/``--compile``/``--channels-last``
    flags) override each config's own, key by key.

    Example:
        >>> result = featx.check(["configs/"])
        >>> result.exit_code, [i.outcome for i in result.items][:1]
        (0, ['faithful'])
    """
    given = tuple(str(p) for p in paths)
    found = discover(given)
    items = []
    for done, (config, error) in enumerate(found):
        if progress is not None:
            progress(done, len(found), config)
        items.append(
            ConfigCheck(config, error=error)
            if error
            else check_config(config, device=device, seed=seed, weights=weights, numerics=numerics)
        )
    if progress is not None:
        progress(len(found), len(found), "")
    return Check(given, tuple(items), environment=_environment(device, numerics))


def discover(paths: Sequence[str]) -> list[tuple[str, str | None]]:
    """``(config path, None)`` for each config file under ``paths``, in order and once each, or
    ``(path, why)`` for a path that names no config."""
    found: list[tuple[str, str | None]] = []
    seen: set[Path] = set()
    accepted = " or ".join(f"*{s}" for s in CONFIG_SUFFIXES)
    if not paths:
        return [("(no paths)", f"nothing to check; pass config files or folders of {accepted}")]
    for text in paths:
        path = Path(text)
        shown = display_path(text)
        if path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.suffix in CONFIG_SUFFIXES
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not files:
                found.append((text, f"folder `{shown}` holds no config files ({accepted})"))
        elif path.exists() and not path.is_file():  # /dev/null, a FIFO, a socket
            found.append(
                (text, f"`{shown}` is not a config file or folder; accepted: {accepted} files and folders")
            )
            continue
        elif path.is_file():
            if path.suffix not in CONFIG_SUFFIXES:
                found.append(
                    (text, f"`{shown}` is not a config file; accepted: {accepted} files and folders")
                )
                continue
            files = [path]
        else:
            found.append((text, f"`{shown}` does not exist"))
            continue
        for file in files:
            if file.resolve() not in seen:
                seen.add(file.resolve())
                found.append((str(file), None))
    return found


def check_config(
    path: str | os.PathLike[str],
    *,
    device: str = "cpu",
    seed: int = 0,
    weights: str | None = None,
    numerics: Mapping[str, object] | None = None,
    weights_prefix: str | None = None,
    model_kwargs: Mapping[str, object] | None = None,
) -> ConfigCheck:
    """Verify one config's cut and taps in its ``verify`` modes, input shape and tolerances.

    A faithful config must also build (``build_backbone``: taps that return feature maps, the FPN) — one
    featx cannot build is an ``error``; ``freeze`` is checked against the cut before anything runs. The
    backbone as built (frozen, its norm handling, keep_glue, the body before any FPN) is then run in each
    mode and each tap compared with the full model's value there, run with the same norm handling
    (``featx.built_proof``): a tap that differs makes the config not faithful (``built`` in the JSON). Each
    of its ``artifacts`` is then run against the built backbone (``featx.export.check_artifact``): one
    that no longer matches makes the config not faithful; one missing or unreadable is an ``error``.
    Only ``CONFIG_ERRORS`` become the item's error; any other exception is featx's own bug and propagates.
    The cuts are verified in the config's numeric setting (``numerics:``, with ``numerics`` over its keys);
    the backbone as built and the artifacts are checked as before, in float32 eager. ``weights``,
    ``weights_prefix`` and ``model_kwargs`` override the config's, as ``featx check CONFIG --weights`` does.
    """
    start = time.perf_counter()
    config = display_path(path)
    model_spec: str | None = None
    upto: str | None = None
    outputs: tuple[tuple[str, str], ...] = ()
    try:
        cfg = load_config(path)
        if numerics:
            cfg = cfg.override(numerics=numerics)
        model_spec = cfg.model
        with torch.random.fork_rng():  # without weights, the init is `seed`'s, as in verify and export
            torch.manual_seed(seed)
            plan = resolve(  # built once, for all below
                cfg,
                whole_model=True,
                weights=weights,
                weights_prefix=weights_prefix,
                model_kwargs=model_kwargs,
            )
        upto, outputs = plan.cut.upto, plan.outputs
        model = plan.model.to(device)
        shape = plan.verify.input_shape
        if shape is not None:
            check_input_shape(model, shape, cfg.model, "key `verify.input_shape`")
        try:
            x = example(model, None, seed, shape=shape, label=cfg.model)
        except FeatxError as err:
            raise FeatxError(f"{err}; set `verify.input_shape`") from None
        reports = verify_cuts(
            model,
            plan.cuts,
            x,
            modes=plan.verify.modes,
            atol=plan.verify.atol,
            rtol=plan.verify.rtol,
            seed=seed,
            keep_glue=plan.keep_glue,
            leaf_functions=plan.config.leaf_functions,
            model_output=False,  # each cut is a tap of the backbone: at the last child, what it returns
            label=cfg.model,
            numerics=cfg.numerics,
        )
        artifacts: tuple[ArtifactCheck, ...] = ()
        fpn = None
        built: tuple[BuiltMode, ...] = ()
        if all(r.faithful for r in reports):  # an unfaithful cut cannot build: its dry run is that Sequential
            # taken before the build, which replaces norms inside the children the model shares (`norm: frozen`)
            references = reference_taps(plan, x, plan.verify.modes, seed)
            model.to("cpu")  # the backbone is built and its artifacts run on the CPU
            backbone = plan.build()  # from the model just verified: its own children
            built = prove_built(plan, backbone, x, references, seed, device)
            fpn = plan.fpn
            if cfg.artifacts and cfg.weights is None:
                raise FeatxError(
                    "key `artifacts`: the config has `weights: null`, so its backbone is a new random init "
                    "on every build and an artifact cannot be checked against it; set `weights`"
                )
            if cfg.artifacts and cfg.fpn is not None and not plan.fpn_loaded:
                raise FeatxError(
                    "key `artifacts`: the config's `weights` holds no `fpn.*` tensors, so its FPN is a new "
                    "random init on every build and an artifact cannot be checked against it; name a "
                    "`.safetensors` featx export (it stores the FPN) as `weights`"
                )
            artifacts = tuple(check_artifact(a, plan, seed=seed) for a in cfg.artifacts)
    except CONFIG_ERRORS as err:  # a config that will not load, build or run: this item's error
        if isinstance(err, PlanError):  # resolved as far as its cut and taps
            upto, outputs = err.upto, err.outputs
        error = (
            printable(str(err)) if isinstance(err, FeatxError) else f"{type(err).__name__}: {one_line(err)}"
        )
        error = error.removeprefix(f"{path}: ")  # the item is that file already
        return ConfigCheck(
            config,
            model_spec,
            upto,
            outputs,
            error=error,
            seconds=time.perf_counter() - start,
            environment=_environment(device),
        )
    return ConfigCheck(
        config,
        model_spec,
        upto,
        outputs,
        reports,
        artifacts,
        fpn=fpn,
        seconds=time.perf_counter() - start,
        built=built,
        environment=reports[-1].environment,  # where the verified forwards ran
    )


def _environment(device: str, numerics: Mapping[str, object] | None = None) -> dict[str, object]:
    """The numeric environment on ``device`` in the setting the flags give (``numerics``: float32 eager
    without them; each config's own ``numerics:`` is in its own environment); empty for a device torch does
    not know, or flags that do not parse, which each config's error names already."""
    try:
        return environment(
            device, Numerics.parse(numerics or {}, "--dtype/--autocast/--compile/--channels-last")
        )
    except (RuntimeError, FeatxError):
        return {}


def display_path(path: str | os.PathLike[str]) -> str:
    """``path`` as text that can be printed and written: an undecodable byte becomes U+FFFD."""
    return os.fsencode(path).decode("utf-8", "replace")
