"""Backbone configs: a YAML file or the same mapping as a dict, checked key by key.

Every error names the file (or ``<dict>``), the key path and what is accepted, with a "did you mean" for
unknown keys. The keys are the contract in docs/config.md; ``freeze`` also comes in the spellings of
torchvision (``trainable_layers``), mmdetection (``frozen_stages``) and detectron2 (``freeze_at``).
Only ``model`` and ``upto`` are required: without ``outputs`` the backbone's one output is the cut, named
after the module it cuts at.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from featx.config_keys import (
    ARTIFACT_SUFFIXES,
    FpnSpec,
    VerifySpec,
    _artifacts,
    _cut,
    _data,
    _fpn,
    _known,
    _leaf_functions,
    _optional,
    _outputs,
    _shorthand,
    _the_cut,
    _typed,
    _verify,
)
from featx.errors import FeatxError, a_or_an, did_you_mean, listing, long_integer, one_line, too_many_digits
from featx.function_names import function_name
from featx.model_sources import ModelSource
from featx.numerics import Numerics
from featx.yaml_numbers import safe_load as read_yaml

NORMS = ("frozen", "eval", "train")
FREEZE_SPELLINGS = ("freeze", "trainable_layers", "frozen_stages", "freeze_at")
_KEYS = (
    "model",
    "model_kwargs",
    "weights",
    "weights_prefix",
    "strict",
    "upto",
    "outputs",
    "out_indices",
    "strides",
    "norm",
    "keep_glue",
    "final_norm",
    "leaf_functions",
    "fpn",
    "verify",
    "data",
    "artifacts",
    "numerics",
    *FREEZE_SPELLINGS,
)


def is_config_path(text: str) -> bool:
    """Whether a SPEC|CONFIG argument names a config: a YAML file, or a featx export (whose metadata holds
    its config). Every verb that takes either asks this one question."""
    return text.endswith((".yaml", ".yml", *ARTIFACT_SUFFIXES))


@dataclass(frozen=True)
class BackboneConfig:
    """A checked backbone config. ``outputs`` maps output names to module names (child names or dotted
    paths) as written; an integer is kept here and refused against the model (``featx.backbone.plan``),
    whose stage-like children the refusal names."""

    model: str
    upto: str | int
    outputs: tuple[tuple[str, str | int], ...]
    model_kwargs: Mapping[str, object] = field(default_factory=dict)
    weights: str | None = None
    weights_prefix: str | None = None
    strict: bool = True
    freeze: tuple[str, object] | None = None  # (spelling, value) as written; resolved against the model
    norm: str = "train"
    keep_glue: bool = False  # cut with the root's glue kept (featx.truncate(..., keep_glue=True))
    # token taps (ViT, Swin) made into maps with the model's final norm applied first (timm's
    # forward_intermediates(norm=True)); not `norm`, which says how BatchNorms run
    final_norm: bool = False
    # the ecosystem's shorthand for `outputs` (at most one of the three), resolved against the model by
    # featx.backbone.resolve: timm feature_info indices, or the strides of the taps
    out_indices: tuple[int, ...] | None = None
    strides: tuple[int, ...] | None = None
    # functions keep_glue's trace keeps whole (truncate's `leaf_functions`), resolved from their dotted names
    leaf_functions: tuple[Callable[..., Any], ...] = ()
    fpn: FpnSpec | None = None
    verify: VerifySpec = field(default_factory=VerifySpec)
    data: Mapping[str, object] = field(default_factory=dict)  # preprocessing overrides, keys in DATA_KEYS
    artifacts: tuple[str, ...] = ()  # exported files `featx check` re-verifies; relative to the config file
    # the numeric setting verify and check run the full model and the cut in (`numerics:`, featx.numerics)
    numerics: Numerics = field(default_factory=Numerics)
    source: str = "<dict>"
    raw: Mapping[str, object] = field(default_factory=dict)  # the mapping as written, for export metadata
    # config key -> the command-line flag that set it over the config's own value (``override``)
    overridden: Mapping[str, str] = field(default_factory=dict)

    @cached_property
    def model_source(self) -> ModelSource:
        """``model``, ``model_kwargs``, ``weights`` and ``weights_prefix`` as one value: what the weights
        are (a file, beside the config when relative; a pretrained weights name; none), parsed once when
        the config is read (a changed copy, ``dataclasses.replace``, parses its own)."""
        return ModelSource.parse(
            self.model,
            self.weights,
            weights_prefix=self.weights_prefix,
            model_kwargs=self.model_kwargs,
            where=f"{self.source}: key `model_kwargs`",
            origin="key `weights`",
        )

    def key(self, name: str) -> str:
        """How an error names the value of config key ``name`` (``upto``, ``outputs.layer3``): where it
        came from, ``c.yaml: key `upto``` — or the flag that overrode it (``--upto``)."""
        for key in (name, name.split(".")[0].split("[")[0]):
            if key in self.overridden:
                return self.overridden[key]
        return f"{self.source}: key `{name}`"

    def override(
        self,
        *,
        upto: str | int | None = None,
        outputs: Sequence[str | int] | None = None,
        keep_glue: bool | None = None,
        weights: str | os.PathLike[str] | None = None,
        weights_prefix: str | None = None,
        model_kwargs: Mapping[str, object] | None = None,
        input_shape: Sequence[int] | None = None,
        leaf_functions: Sequence[Callable[..., Any]] | None = None,
        numerics: Mapping[str, object] | None = None,
    ) -> BackboneConfig:
        """This config with the command line's model and cut flags over its keys, as mmdetection's
        ``--cfg-options`` override a config's keys on every tool: ``--upto`` sets ``upto``, ``--outputs``
        ``outputs`` (without it, a config without ``outputs`` taps the new cut), ``--keep-glue``
        ``keep_glue: true``, ``--weights`` and ``--weights-prefix`` ``weights`` and ``weights_prefix``,
        each ``--model-kwarg`` one key of ``model_kwargs`` (merged), ``--input-shape``
        ``verify.input_shape``, each ``--leaf-function`` one more of ``leaf_functions`` (with the config's
        own; the glue must be kept, by the config or ``--keep-glue``), ``numerics`` (``--dtype``,
        ``--autocast``, ``--compile``, ``--channels-last``: the keys of ``numerics:`` given, each over the
        config's own; a switch not given is None). None (and ``keep_glue=False``) leaves
        a key as the config has it. The one place every verb applies these flags to a CONFIG; ``overridden`` records which flag set which key,
        so errors name the flag (``key``) and the verbs show it. ``raw`` (what an export embeds) holds
        the values in force. A relative ``weights`` is relative to the working directory, not the config.

        Raises:
            FeatxError: what ``ModelSource.with_overrides`` refuses (both ``--weights`` and a download
                switch in ``--model-kwarg``), ``--weights-prefix`` with no weights to strip it from.
        """
        flags: dict[str, str] = {}
        raw = dict(self.raw)
        cfg = self
        if weights is not None or weights_prefix is not None or model_kwargs:
            source = self.model_source.with_overrides(
                weights=weights, weights_prefix=weights_prefix, model_kwargs=model_kwargs
            )
            if weights_prefix is not None and source.weights.text is None and source.weights.file is None:
                raise FeatxError(
                    f"--weights-prefix {weights_prefix} needs weights to strip it from: --weights, or the "
                    f"config's `weights` (`{self.source}` has none)"
                )
            cfg = self.with_source(source)
            given = {"weights": weights, "weights_prefix": weights_prefix, "model_kwargs": model_kwargs}
            flags.update({key: _FLAGS[key] for key, value in given.items() if value})
            raw.update(
                model_kwargs=dict(source.model_kwargs), weights=cfg.weights, weights_prefix=cfg.weights_prefix
            )
        cut, taps, glue, verify = self.upto, self.outputs, self.keep_glue, self.verify
        if upto is not None:
            if isinstance(upto, bool) or not isinstance(upto, (str, int)):
                raise FeatxError(f"--upto {upto!r} is not a cut: a child name, a count or a dotted path")
            cut = raw["upto"] = upto
            flags["upto"] = _FLAGS["upto"]
            if outputs is None and self.raw.get("outputs") is None:  # the one output is the cut
                taps = _the_cut(cut)
        if outputs is not None:
            listed = list(outputs)
            taps = _outputs(listed, "--outputs")
            raw["outputs"] = listed
            flags["outputs"] = _FLAGS["outputs"]
        if keep_glue is not None and keep_glue != self.keep_glue:
            glue = raw["keep_glue"] = keep_glue
            flags["keep_glue"] = _FLAGS["keep_glue"]
        leaves = self.leaf_functions
        if leaf_functions:
            leaves = tuple(dict.fromkeys((*leaves, *leaf_functions)))
            raw["leaf_functions"] = [function_name(function) for function in leaves]
            flags["leaf_functions"] = _FLAGS["leaf_functions"]
            if not glue:
                raise FeatxError(
                    f"--leaf-function {function_name(leaf_functions[0])} names a function keep_glue's trace keeps "
                    f"whole, and `{self.source}` does not keep the glue; pass --keep-glue too"
                )
        if input_shape is not None:
            verify = dataclasses.replace(self.verify, input_shape=tuple(input_shape))
            written = self.raw.get("verify")
            raw["verify"] = {
                **(written if isinstance(written, Mapping) else {}),
                "input_shape": list(input_shape),
            }
            flags["verify.input_shape"] = _FLAGS["input_shape"]
        setting = self.numerics
        given_numerics = {k: v for k, v in (numerics or {}).items() if v is not None and v is not False}
        if given_numerics:
            written = self.raw.get("numerics")
            values = {**(written if isinstance(written, Mapping) else {}), **given_numerics}
            setting = Numerics.parse(values, "numerics")
            raw["numerics"] = setting.to_dict()
            flags.update({f"numerics.{k}": _NUMERICS_FLAGS[k] for k in given_numerics})
        if not flags:
            return self
        changed = dataclasses.replace(
            cfg,
            numerics=setting,
            upto=cut,
            outputs=taps,
            keep_glue=glue,
            leaf_functions=leaves,
            verify=verify,
            raw=raw,
            overridden={**self.overridden, **flags},
        )
        changed.__dict__["model_source"] = cfg.model_source  # parsed already
        return changed

    def with_source(self, source: ModelSource) -> BackboneConfig:
        """This config building ``source`` instead (the command line's ``--weights``, ``--model-kwarg``
        and ``--weights-prefix`` applied with ``ModelSource.with_overrides``)."""
        weights = source.weights
        changed = dataclasses.replace(
            self,
            model=source.spec,
            model_kwargs=dict(source.model_kwargs),
            weights=str(weights.file) if weights.file is not None else weights.text,
            weights_prefix=weights.prefix,
        )
        changed.__dict__["model_source"] = source  # parsed already: the cached value
        return changed


# the flag that overrides each config key (``BackboneConfig.override``)
_FLAGS = {
    "upto": "--upto",
    "outputs": "--outputs",
    "keep_glue": "--keep-glue",
    "weights": "--weights",
    "weights_prefix": "--weights-prefix",
    "model_kwargs": "--model-kwarg",
    "input_shape": "--input-shape",
    "leaf_functions": "--leaf-function",
}
_NUMERICS_FLAGS = {
    "dtype": "--dtype",
    "autocast": "--autocast",
    "compile": "--compile",
    "channels_last": "--channels-last",
}


def load_config(config: str | os.PathLike[str] | Mapping[str, object]) -> BackboneConfig:
    """Read and check a config file, or check a mapping of the same keys.

    Only ``model`` and ``upto`` are required. Without ``outputs`` the backbone has one output, the cut
    itself, named after the module it cuts at (``upto: layer3`` is ``outputs: [layer3]``; ``upto: 7`` on a
    torchvision ResNet is ``outputs: [layer3]`` too).

    A ``.safetensors`` file written by ``featx export`` is a config too: the one embedded in its metadata,
    whose ``weights`` is the file itself (a relative ``weights`` resolves against the file's folder, never
    the working directory).
    """
    if isinstance(config, Mapping):
        return _parse(config, "<dict>")
    if not isinstance(config, (str, os.PathLike)):
        kind = "None" if config is None else f"{a_or_an(type(config).__name__)} ({config!r:.40})"
        raise FeatxError(
            f"a backbone config cannot be {kind}; accepted: the path of a YAML config or of a featx "
            ".safetensors export, or a mapping of config keys"
        )
    path = Path(config)
    if path.suffix == ".safetensors":
        return exported_config(path)
    if path.suffix in ARTIFACT_SUFFIXES:
        raise FeatxError(
            f"`{path}` is {'an ONNX' if path.suffix == '.onnx' else 'a torch.export (pt2)'} export: it holds the backbone's graph, not a "
            "model featx can rebuild; run it with onnxruntime / torch.export.load, or rebuild from a "
            ".safetensors export or the config"
        )
    if not path.is_file():
        raise FeatxError(f"config file `{path}` does not exist")
    try:
        data = read_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise FeatxError(_yaml_error(path, err)) from None
    except (OSError, UnicodeDecodeError) as err:
        raise FeatxError(f"config file `{path}` cannot be read: {err}") from None
    except RecursionError:  # PyYAML's composer recurses once per level of nesting
        raise FeatxError(
            f"config file `{path}` nests its lists or mappings too deeply to read; a config is a few levels deep"
        ) from None
    except ValueError as err:  # an integer past Python's digit limit (sys.set_int_max_str_digits)
        if too_many_digits(err):
            raise FeatxError(
                f"config file `{path}` holds {long_integer()}; no config value is that long"
            ) from None
        raise FeatxError(f"config file `{path}` holds a value YAML cannot read: {one_line(err)}") from None
    if not isinstance(data, Mapping):
        raise FeatxError(
            f"config file `{path}` holds a {type(data).__name__}, not a mapping of config keys "
            f"({listing(_KEYS[:4])}, ...)"
        )
    return _parse(data, str(path))


def _yaml_error(path: Path, err: yaml.YAMLError) -> str:
    """One line: ``file:line:column: not valid YAML: the problem``, without PyYAML's source excerpt."""
    if not isinstance(err, yaml.MarkedYAMLError) or err.problem_mark is None:
        return f"config file `{path}` is not valid YAML: {one_line(err)}"
    mark = err.problem_mark
    where = f"{path}:{mark.line + 1}:{mark.column + 1}"
    problem = " ".join(str(err.problem or err.context or "syntax error").split())
    context = ""
    if err.context and err.problem and err.context_mark is not None:
        start = err.context_mark
        context = f" ({err.context} started at {start.line + 1}:{start.column + 1})"
    return f"{where}: not valid YAML: {problem}{context}"


def export_metadata(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """The featx metadata of a ``.safetensors`` file ``featx export`` wrote, or None for any other
    safetensors file (a plain checkpoint)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FeatxError(f"export file `{path}` does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise FeatxError(
            f"`{path}` is not a readable safetensors file: {' '.join(str(err).split())}"
        ) from None
    return metadata if "featx_version" in metadata and "config" in metadata else None


def exported_config(path: str | os.PathLike[str]) -> BackboneConfig:
    """The config embedded in a featx ``.safetensors`` export, with ``weights`` the export itself."""
    path = Path(path)
    metadata = export_metadata(path)
    if metadata is None:
        raise FeatxError(
            f"`{path}` is a safetensors file without featx metadata (not written by `featx export`); "
            "name it as `weights:` in a config, or pass a config (.yaml) or a featx export"
        )
    try:
        data = json.loads(metadata["config"])
    except ValueError:
        raise FeatxError(f"`{path}`: its featx metadata `config` is not valid JSON") from None
    if not isinstance(data, Mapping):
        raise FeatxError(f"`{path}`: its featx metadata `config` is not a mapping")
    data = {k: v for k, v in data.items() if k != "artifacts"}  # those belong to the config file
    return _parse({**data, "weights": path.name, "weights_prefix": None}, str(path))


def _parse(data: Mapping[str, object], source: str) -> BackboneConfig:
    if not any(key in data for key in ("model", "upto", "outputs")):  # some other tool's YAML
        raise FeatxError(
            f"{source}: not a featx backbone config: it has none of the keys `model`, `upto`, `outputs`"
            + (f" (it has {listing(map(str, data), 6)})" if data else " (it is empty)")
        )
    _known(data, _KEYS, source, "")
    shorthand = _shorthand(data, source)
    for key in ("model", "upto") if shorthand is None else ("model",):
        if key not in data or data[key] is None:
            raise FeatxError(f"{source}: key `{key}` is required")
    model = _typed(data, "model", str, source)
    # with `out_indices`/`strides` and no `upto`, the cut is the last tap: "" until resolved
    upto = _cut(data["upto"], source, "upto") if data.get("upto") is not None else ""
    kwargs = data.get("model_kwargs")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise FeatxError(
            f"{source}: key `model_kwargs` must be a mapping of keyword arguments, got {kwargs!r}"
        )
    # a constructor's own download switch (`weights: DEFAULT`, `pretrained: true`) says what `weights` says;
    # a relative weights file is beside the config file
    prefix = _optional(data, "weights_prefix", str, source)
    try:
        model_source = ModelSource.parse(
            model,
            _optional(data, "weights", str, source),
            weights_prefix=prefix,
            model_kwargs=kwargs,
            where=f"{source}: key `model_kwargs`",
            origin="key `weights`",
            base_dir=None if source == "<dict>" else Path(source).parent,
        )
    except FeatxError as err:
        raise FeatxError(str(err) if str(err).startswith(source) else f"{source}: {err}") from None
    weights = model_source.weights
    spellings = [k for k in FREEZE_SPELLINGS if data.get(k) is not None]
    if len(spellings) > 1:
        raise FeatxError(f"{source}: keys {listing(spellings)} all say what to freeze; keep one")
    norm = data.get("norm")
    norm = "train" if norm is None else norm
    if not isinstance(norm, str) or norm not in NORMS:
        raise FeatxError(
            f"{source}: key `norm` is `{norm}`; accepted: {listing(NORMS)}{did_you_mean(str(norm), NORMS)}"
        )
    keep_glue = bool(_optional(data, "keep_glue", bool, source, default=False))
    cfg = BackboneConfig(
        model=model,
        upto=upto,
        outputs=(
            _outputs(data["outputs"], source)
            if data.get("outputs") is not None
            else (() if shorthand is not None else _the_cut(upto))
        ),
        out_indices=shorthand[1] if shorthand is not None and shorthand[0] == "out_indices" else None,
        strides=shorthand[1] if shorthand is not None and shorthand[0] == "strides" else None,
        model_kwargs=dict(model_source.model_kwargs),
        weights=str(weights.file) if weights.file is not None and source != "<dict>" else weights.text,
        weights_prefix=prefix,
        strict=bool(_optional(data, "strict", bool, source, default=True)),
        freeze=(spellings[0], data[spellings[0]]) if spellings else None,
        norm=norm,
        keep_glue=keep_glue,
        final_norm=bool(_optional(data, "final_norm", bool, source, default=False)),
        leaf_functions=_leaf_functions(data.get("leaf_functions"), source, keep_glue),
        fpn=_fpn(data.get("fpn"), source),
        verify=_verify(data.get("verify"), source),
        data=_data(data.get("data"), source),
        artifacts=_artifacts(data.get("artifacts"), source),
        numerics=Numerics.parse(data.get("numerics"), f"{source}: numerics"),
        source=source,
        raw=dict(data),
    )
    cfg.__dict__["model_source"] = model_source  # parsed once, here
    return cfg
