"""What a config means for its concrete model, resolved once: ``resolve`` -> ``BackbonePlan`` (the model,
the cut, the taps, the frozen modules, the cuts a check verifies)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from featx.backbone.body import Backbone, GlueBackbone
from featx.backbone.build import _assemble, _build
from featx.backbone.fpn import BackboneWithFPN, BuiltBackbone, body_of
from featx.backbone.freeze import resolve_freeze
from featx.backbone.loading import _kept_model, _loaded_modules, source_model
from featx.backbone.paths import FLAGS, _path
from featx.backbone.taps import Tap, by_module
from featx.config import BackboneConfig, load_config
from featx.config_keys import VerifySpec
from featx.cut import CutPath
from featx.errors import FeatxError, listing
from featx.guard import device_of
from featx.input_shapes import default_input_shape
from featx.numerics import environment


class PlanError(FeatxError):
    """A config that resolves as far as its cut and taps and then fails (``freeze`` past the cut): the cut
    and the ``(output, child)`` taps ride along, so ``featx check`` still shows them."""

    def __init__(self, message: str, upto: str, outputs: tuple[tuple[str, str], ...]) -> None:
        super().__init__(message)
        self.upto = upto
        self.outputs = outputs


@dataclasses.dataclass(frozen=True, eq=False)
class BackbonePlan:
    """What a config means for its concrete model, resolved once (``resolve``): the one place a config
    gets its meaning, which ``build_backbone``, ``featx check``, ``featx verify CONFIG``, ``featx build``
    and ``featx export`` all read.

    ``model`` is the whole source model with the weights loaded into the children the cut keeps (with
    ``resolve(..., whole_model=False)`` and a weights file, the parameters of the children after the cut stay on
    the ``meta`` device); ``cut`` is the cut the backbone runs (``upto: stages`` with taps inside: ``stages.3``) and
    ``kept`` how many root children it keeps; ``tapped`` holds the taps (``Tap``: output name and module), in
    the config's order, which ``taps``, ``outputs`` and ``features`` show in other shapes;
    ``frozen`` lists the frozen modules in forward order; ``cuts`` are the cuts a check verifies (the taps
    and the cut, shallowest first, ``cut`` last); ``verify`` is the config's ``verify`` with the overrides
    merged in. ``build()`` makes the backbone from ``model``'s own children (once: later calls return the
    same module, whose children are ``model``'s) and ``features`` reads what its dry run measured.
    """

    config: BackboneConfig
    model: nn.Module
    kept: int
    cut: CutPath
    tapped: tuple[Tap, ...]
    frozen: tuple[str, ...]
    cuts: tuple[CutPath, ...]
    verify: VerifySpec
    keep_glue: bool
    source_params: int  # parameters of the whole model
    builds: bool = True  # False when `upto` was overridden: a cut to verify, not the config's backbone
    _built: list[BuiltBackbone] = dataclasses.field(default_factory=list, repr=False)

    def __repr__(self) -> str:
        """One line: the model, the cut, the taps and the weights as written (the model itself is not shown,
        nor any file read)."""
        weights = self.config.model_source.weights
        written = "random init" if weights.kind == "random" else weights.text
        taps = dict(self.outputs)
        return f"BackbonePlan(model={self.config.model!r}, cut={self.cut.upto!r}, taps={taps!r}, weights={written!r})"

    @property
    def taps(self) -> Mapping[str, tuple[str, ...]]:
        """Each tapped module -> its output names (the order the modules are first tapped)."""
        return {child: tuple(outputs) for child, outputs in by_module(self.tapped).items()}

    @property
    def outputs(self) -> tuple[tuple[str, str], ...]:
        """``(output name, tapped module)`` in the config's order."""
        return tuple((tap.name, tap.child) for tap in self.tapped)

    @property
    def features(self) -> tuple[Tap, ...]:
        """The taps as measured by the backbone's dry run (``build()`` runs, once), in ``taps`` order."""
        body = body_of(self.build())
        return tuple(
            Tap(output, child).measure(body.channels[output], body.strides[output], body.shapes[output])
            for child, outputs in self.taps.items()
            for output in outputs
        )

    @property
    def maps(self) -> tuple[tuple[str, int, int], ...]:
        """What the built backbone returns, in the order an artifact returns it, as ``(name, channels,
        stride)``: each output in the config's order; with ``fpn``, each pyramid map as torchvision names
        them (``'0'``, ``'1'``, ... for the taps in the order the body returns them, then ``'pool'`` at twice
        the last stride with ``extra_blocks: pool``, or ``'p6'``, ``'p7'`` with ``p6p7``). Builds the backbone."""
        backbone = self.build()
        if isinstance(backbone, BackboneWithFPN):
            return tuple((name, backbone.out_channels, stride) for name, stride in backbone.strides.items())
        body = body_of(backbone)
        return tuple((name, body.channels[name], body.strides[name]) for name, _ in self.outputs)

    @property
    def fpn_loaded(self) -> bool:
        """Whether the FPN's weights came from the config's weights file (where torchvision, mmdetection,
        detectron2 or ``featx export`` store them); False without ``fpn`` or when the FPN keeps its own
        (random) init. Builds the backbone."""
        backbone = self.build()
        return isinstance(backbone, BackboneWithFPN) and backbone.fpn_loaded

    @property
    def fpn(self) -> str | None:
        """``loaded`` (the FPN's tensors came from the weights file), ``random`` (its own init) or None
        (no ``fpn``): what ``featx build`` and ``featx check`` show. Builds the backbone."""
        backbone = self.build()
        if not isinstance(backbone, BackboneWithFPN):
            return None
        return "loaded" if backbone.fpn_loaded else "random"

    @property
    def fpn_source(self) -> str | None:
        """Where the FPN's tensors came from, or why it is at its init; None without ``fpn``."""
        backbone = self.build()
        return backbone.fpn_source if isinstance(backbone, BackboneWithFPN) else None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The backbone's tensors as a weights file for this config holds them, which ``build_backbone``
        reads back: the kept children's under the full model's keys, with keep_glue the own tensors of the
        root and of each container on the cut's path (what rebuilding loads: ``_loaded_modules``), an
        FPN's under ``fpn.`` (contiguous, on the CPU; builds the backbone)."""
        backbone = self.build()
        tensors = {k: v.detach().contiguous().cpu() for k, v in body_of(backbone).state_dict().items()}
        if self.keep_glue:  # a traced forward that reads none of them still gets them back when rebuilt
            state = self.model.state_dict()
            own = [n for n in _loaded_modules(self.model, self.cut, self.config) if n in state]
            tensors.update({n: state[n].detach().contiguous().cpu() for n in own if n not in tensors})
        if isinstance(backbone, BackboneWithFPN):
            tensors.update(
                {f"fpn.{k}": v.detach().contiguous().cpu() for k, v in backbone.fpn.state_dict().items()}
            )
        return tensors

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The input shape the backbone is measured at (and an export made at): ``verify.input_shape``,
        else the model's own size at batch 1.

        Raises:
            FeatxError: no ``verify.input_shape`` and the model declares no input size.
        """
        try:
            return tuple(self.verify.input_shape or default_input_shape(self.model, batch=1))
        except FeatxError:
            raise FeatxError(
                f"{self.config.source}: `{self.config.model}` declares no input size; set `verify.input_shape`"
            ) from None

    def build(self, device: torch.device | None = None) -> BuiltBackbone:
        """The backbone: the kept children of ``model``, tapped, frozen and normalised as configured,
        measured on a dry run and (with ``fpn``) wrapped, in eval mode. Made on the first call: on
        ``device`` when given (the kept children move there with it, and its dry runs run there), else
        where the model is; a later call moves the same backbone to ``device`` when given."""
        if self._built:
            return self._built[0] if device is None else self._built[0].to(device)
        if not self.builds:
            raise FeatxError(
                f"{self.config.source}: the cut `{self.cut.upto}` overrides `upto`; it builds no backbone"
            )
        backbone = _build(self, device)
        self._built.append(backbone)
        return backbone

    def runner(self, model_output: bool = False) -> Backbone | GlueBackbone:
        """The backbone's tapped module over ``model``'s own children, in eval mode, without the dry run
        ``build()`` measures it on — so its outputs may be of any layout (ViT tokens), where ``build()``
        takes NCHW maps only — and without ``fpn``: what ``featx extract`` runs. A new module each call.
        ``model_output``: with keep_glue, a cut at the last child returns the model's output (as
        ``truncate(..., keep_glue=True)`` does) rather than what the child returns."""
        if not self.builds:
            raise FeatxError(
                f"{self.config.source}: the cut `{self.cut.upto}` overrides `upto`; it builds no backbone"
            )
        return _assemble(self, model_output).eval()

    def to_dict(self) -> dict[str, object]:
        """What ``featx build --json`` prints: each output measured, the parameters kept of the whole
        model's, the frozen modules and the FPN's channels (builds the backbone)."""
        backbone = self.build()
        frozen = list(self.frozen)
        return {
            "config": self.config.source,
            "outputs": [
                {
                    **f.to_dict(),
                    # a tap inside a frozen module is frozen with it
                    "frozen": any(f.child == n or f.child.startswith(n + ".") for n in frozen),
                }
                for f in self.features
            ],
            "params_kept": sum(p.numel() for p in body_of(backbone).parameters()),
            "params_total": self.source_params,
            "frozen": frozen,
            "fpn_out_channels": backbone.out_channels if isinstance(backbone, BackboneWithFPN) else None,
            "fpn": self.fpn,  # loaded | random | None
            "fpn_source": self.fpn_source,
            # where the dry runs measured it (docs/json.md, "numeric environment")
            "environment": environment(device_of((), backbone)),
        }


def resolve(
    config: str | os.PathLike[str] | Mapping[str, object] | BackboneConfig,
    *,
    upto: str | int | None = None,
    weights: str | os.PathLike[str] | None = None,
    weights_prefix: str | None = None,
    model_kwargs: Mapping[str, object] | None = None,
    keep_glue: bool | None = None,
    input_shape: tuple[int, ...] | None = None,
    modes: tuple[str, ...] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    whole_model: bool = False,
) -> BackbonePlan:
    """Resolve a config against its model, built once with its weights loaded once: a ``BackbonePlan``.

    The keywords override the config's keys as the command line's flags do (``BackboneConfig.override``,
    whose errors name the flag): ``upto`` verifies another cut (the plan has no taps or freeze then, and
    builds no backbone: ``featx verify CONFIG --upto X``), ``weights``, ``weights_prefix`` and
    ``model_kwargs`` change the model, ``keep_glue`` the cut, ``input_shape``, ``modes``, ``atol`` and
    ``rtol`` the ``verify`` settings. ``whole_model`` builds every child for real (what a check against the
    full forward needs); otherwise only the kept children get memory when a weights file is loaded.

    Raises:
        FeatxError: what ``build_backbone`` raises before its dry run (``PlanError`` for a ``freeze`` past
            the cut).
    """
    cfg = config if isinstance(config, BackboneConfig) else load_config(config)
    changed = upto is not None or weights is not None or weights_prefix is not None or bool(model_kwargs)
    glue_changed = keep_glue is not None and keep_glue != cfg.keep_glue
    # the plan's config says what it built: the overrides applied by the one rule of every verb
    cfg = cfg.override(
        upto=upto,
        keep_glue=keep_glue,
        weights=weights,
        weights_prefix=weights_prefix,
        model_kwargs=model_kwargs,
        input_shape=input_shape,
    )
    if cfg.out_indices is not None or cfg.strides is not None:
        cfg = written_outputs(cfg)
    given = cfg.verify
    verify = VerifySpec(
        given.input_shape,
        modes if modes is not None else given.modes,
        atol if atol is not None else given.atol,
        rtol if rtol is not None else given.rtol,
    )
    glue = cfg.keep_glue
    if whole_model or changed or glue_changed:
        model, kept = source_model(cfg)
    else:
        model, kept = _kept_model(cfg)
    source_params = sum(p.numel() for p in model.parameters())
    if upto is not None:  # a cut of its own: the config's taps and freeze are its backbone's
        cut = _path(model, cfg.upto, cfg, "upto")  # resolved once: loading the model resolved it
        return BackbonePlan(cfg, model, kept, cut, (), (), (cut,), verify, glue, source_params, builds=False)
    written = _path(model, cfg.upto, cfg, "upto")  # the cut, resolved once (loading the model resolved it)
    if not cfg.outputs:  # no `outputs:` and a count for `upto`: the one output is the child it cuts at
        cfg = dataclasses.replace(cfg, outputs=((written.upto, written.upto),))
    if glue:  # each tap is its module's value in the full forward, each a keep_glue cut
        cut, taps, paths = glue_plan(model, cfg, written)
        cuts = tuple(paths[name] for name in _made_order(model, set(taps) | {cut.upto}))
    else:
        cut, taps = plan(model, cfg, written)
        # the taps and the cut as the backbone runs them: prefixes of one chain of modules
        order = {unit: i for i, unit in enumerate(cut.units())}
        cuts = tuple(cut.prefix(unit) for unit in sorted(set(taps) | {cut.upto}, key=order.__getitem__))
    child_of = {output: child for child, outputs in taps.items() for output in outputs}
    tapped = tuple(Tap(output, child_of[output]) for output, _ in cfg.outputs if output in child_of)
    try:
        frozen = tuple(resolve_freeze(model, cfg, written))
    except FeatxError as err:
        raise PlanError(str(err), cut.upto, tuple((t.name, t.child) for t in tapped)) from None
    return BackbonePlan(cfg, model, kept, cut, tapped, frozen, cuts, verify, glue, source_params)


def written_outputs(cfg: BackboneConfig) -> BackboneConfig:
    """``cfg`` with its ``out_indices`` or ``strides`` resolved to module names, as ``outputs`` (also in
    ``raw``, what an export embeds): each index names ``model.feature_info[index]``'s module (timm's
    ``out_indices``; a ViT lists every block, so these are block indices), each stride the last module
    of ``feature_info`` at that reduction (the end of the stage at that stride). Without ``upto`` the cut
    is the last tap; a model with tokens built by its root's glue (a ViT's class token and position
    embedding) gets ``keep_glue: true`` unless the config says otherwise.

    Raises:
        FeatxError: a model without timm's ``feature_info`` (other models are not read yet), an index or
            stride it does not have (naming the key, the value and what it has).
    """
    from featx.models import load_model

    if "outputs" in cfg.overridden:  # --outputs over the shorthand: the flag's taps, cut at the last
        flagged = [str(child) for _, child in cfg.outputs]
        changed = dataclasses.replace(cfg, upto=cfg.upto or flagged[-1], out_indices=None, strides=None)
        changed.__dict__["model_source"] = cfg.model_source
        return changed
    key = "out_indices" if cfg.out_indices is not None else "strides"
    wanted = cfg.out_indices if cfg.out_indices is not None else cfg.strides
    assert wanted is not None
    kwargs: dict[str, Any] = dict(cfg.model_source.model_kwargs)
    with torch.random.fork_rng():  # the model built next gets the same init as from `outputs`
        model = load_model(cfg.model, **kwargs)  # its own init: feature_info only
    info = getattr(model, "feature_info", None)
    try:
        modules = [str(f["module"]) for f in info]  # type: ignore[union-attr]
        reductions = [int(f["reduction"]) for f in info]  # type: ignore[union-attr]
    except (TypeError, KeyError, ValueError):
        modules = []
    if not modules:
        raise FeatxError(
            f"{cfg.key(key)}: `{cfg.model}` has no timm `feature_info` to read {key} from (featx reads "
            "them from timm models for now); name the modules to tap in `outputs`"
        )
    names: list[str] = []
    for i, value in enumerate(wanted):
        if key == "out_indices":
            if not -len(modules) <= value < len(modules):
                raise FeatxError(
                    f"{cfg.key(f'{key}[{i}]')} is {value}; `{cfg.model}` has feature_info indices 0 to "
                    f"{len(modules) - 1} ({listing(modules, 6)})"
                )
            names.append(modules[value])
        else:
            at = [m for m, r in zip(modules, reductions, strict=True) if r == value]
            if not at:
                raise FeatxError(
                    f"{cfg.key(f'{key}[{i}]')} is {value}; `{cfg.model}` has strides "
                    f"{', '.join(map(str, sorted(set(reductions))))} (timm feature_info)"
                )
            names.append(at[-1])
    order = {m: i for i, m in enumerate(modules)}
    upto = cfg.upto if cfg.upto != "" else max(names, key=order.__getitem__)
    tokens = hasattr(model, "num_prefix_tokens") or hasattr(model, "pos_embed")
    glue = cfg.keep_glue or (tokens and cfg.raw.get("keep_glue") is None)
    raw = {k: v for k, v in cfg.raw.items() if k not in ("out_indices", "strides")}
    raw.update(upto=upto, outputs=list(names), keep_glue=glue)
    changed = dataclasses.replace(
        cfg,
        upto=upto,
        outputs=tuple((name, name) for name in names),
        keep_glue=glue,
        out_indices=None,
        strides=None,
        raw=raw,
    )
    changed.__dict__["model_source"] = cfg.model_source  # parsed already
    return changed


def plan(model: nn.Module, cfg: BackboneConfig, cut: CutPath) -> tuple[CutPath, dict[str, list[str]]]:
    """The cut the backbone runs and its taps (module -> output names, in the config's order), from the
    config's ``upto`` resolved against ``model`` (``cut``).

    An output is a child name or a dotted path into one (``stages.2``); an integer is refused, since
    mmdetection's ``out_indices`` habit reads it as a stage where a child index would tap ``conv1``. Every
    tap must be run by the cut.
    Each container a tap or the cut reaches into runs child by child (``CutPath.expanded``); a tap, or the
    cut, that names such a container itself takes the output of its last child, so that is what the
    cut's ``upto`` and the tap's module say (``upto: stages`` with ``outputs: [stages.1, stages]`` runs
    and checks ``stages.0``..``stages.3`` and taps ``stages.3``).
    """
    tapped = _tap_paths(model, cfg, cut)
    reach = {c for _, p in tapped for c in p.containers()[1:]}
    path = cut.expanded(model, sorted(reach, key=lambda c: c.count(".")))
    units = path.units()
    taps: dict[str, list[str]] = {}
    for i, (output, tap) in enumerate(tapped):
        target = tap.upto
        unit = next((u for u in reversed(units) if u == target or u.startswith(target + ".")), None)
        if unit is None and (cfg.source == FLAGS or "outputs" in cfg.overridden):
            raise FeatxError(
                f"--outputs `{output}` is after the cut at `{cut.upto}`; the cut runs {listing(units, 8)}"
            )
        if unit is None and "upto" in cfg.overridden:  # the config's taps, cut short by --upto
            raise FeatxError(
                f"--upto {cut.upto} cuts before `{target}`, which {cfg.source} taps (key `{_output_key(cfg, i, output)}`); "
                f"give --outputs too, with modules the cut runs ({listing(units, 8)})"
            )
        if unit is None:
            raise FeatxError(
                f"{cfg.source}: key `outputs.{output}` taps `{target}`, after the cut at `{cut.upto}`; "
                f"the cut runs {listing(units, 8)}"
            )
        taps.setdefault(unit, []).append(output)
    return path, taps


def _tap_paths(model: nn.Module, cfg: BackboneConfig, cut: CutPath) -> list[tuple[str, CutPath]]:
    """Each output's tapped module resolved against ``model``, in the config's order (integers refused)."""
    tapped: list[tuple[str, CutPath]] = []
    for i, (output, child) in enumerate(cfg.outputs):
        if isinstance(child, int):
            raise _integer_output(model, cut, cfg, i, output, child)
        tapped.append((output, _path(model, child, cfg, f"outputs.{output}")))
    return tapped


def _integer_output(
    model: nn.Module, cut: CutPath, cfg: BackboneConfig, i: int, output: str, index: int
) -> FeatxError:
    """The refusal of an integer in ``outputs``: mmdetection's ``out_indices: [0, 1, 2, 3]`` means the
    four stages, where a child index taps ``conv1``, ``bn1``, ``relu``, ``maxpool``; it names the model's
    stage-like children (those with modules inside, up to the cut) to write instead."""
    key = _output_key(cfg, i, output)
    kept = list(model.named_children())[: cut.kept]
    stages = [name for name, child in kept if next(child.children(), None) is not None]
    lists = [(len(child), name) for name, child in kept if isinstance(child, (nn.Sequential, nn.ModuleList))]
    inside = f"{max(lists, key=lambda item: item[0])[1]}.0" if lists else None  # the longest: the stages
    return FeatxError(
        f"{cfg.source}: key `{key}` is the integer {index}; outputs are module names, not indices: "
        f"name the modules to tap, such as this model's stage-like children "
        f"{listing(stages or [name for name, _ in kept], 8)}"
        + (f" (a dotted name such as `{inside}` taps inside one)" if inside else "")
        + "; stage indices (mmdetection's `out_indices`) are not read yet"
    )


def _output_key(cfg: BackboneConfig, i: int, output: str) -> str:
    """The config key of output ``i`` named ``output``: ``outputs[1]`` in a list, ``outputs.C3`` in a mapping."""
    return f"outputs[{i}]" if isinstance(cfg.raw.get("outputs"), list) else f"outputs.{output}"


def glue_plan(
    model: nn.Module, cfg: BackboneConfig, cut: CutPath
) -> tuple[CutPath, dict[str, list[str]], dict[str, CutPath]]:
    """The cut and taps of a ``keep_glue: true`` config, as written: each tap is the module it names,
    whose value in the full forward the backbone returns (a container a tap reaches into is not run child
    by child, so ``stages`` is what ``stages`` returns), and the cut is ``upto`` itself (``cut``); and
    each tapped module's path and the cut's, by dotted name.

    Raises:
        FeatxError: what ``plan`` refuses, and a tap on a container the cut goes into (``stages`` with
            ``upto: stages.2``): the full forward makes its value after the cut.
    """
    plan(model, cfg, cut)  # the same names, taps after the cut and indices refused the same way
    taps: dict[str, list[str]] = {}
    paths = {cut.upto: cut}
    for output, path in _tap_paths(model, cfg, cut):
        tap = path.upto
        paths.setdefault(tap, path)
        if cut.upto.startswith(tap + "."):
            raise FeatxError(
                f"{cfg.key('outputs.' + output)} taps `{tap}`, which the cut at `{cut.upto}` goes into: "
                f"with `keep_glue` a tap is what its module returns, made after the cut; tap `{cut.upto}` or "
                f"cut at `{tap}`"
            )
        taps.setdefault(tap, []).append(output)
    return cut, taps, paths


def _made_order(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Module names in the order the forward finishes them: a module after everything inside it
    (``stages.1`` before ``stages``), so the cut, which every tap precedes or lies in, comes last."""
    modules = [name for name, _ in model.named_modules(remove_duplicate=False)]
    ends = {}
    for i, name in enumerate(modules):  # a module ends where the last module inside it is listed
        for prefix in [name, *(name[:j] for j, c in enumerate(name) if c == ".")]:
            ends[prefix] = i
    return sorted(names, key=lambda n: (ends[n], -n.count(".")))
