"""Pretrained weights named the ecosystems' way, found in (or downloaded to) their caches.

A weights text is a local file when it exists, has a folder part or a weights-file suffix; otherwise it
names pretrained weights: a torchvision weights enum member (``DEFAULT``, ``IMAGENET1K_V2``,
``ResNet50_Weights.IMAGENET1K_V2``), a timm pretrained tag (``a1_in1k``) or a Hugging Face hub id
(``hf-hub:org/name``). Names resolve to files where torchvision (``torch.hub.get_dir()/checkpoints``)
and huggingface_hub (``HF_HUB_CACHE``) keep them, downloaded there unless ``HF_HUB_OFFLINE`` is set.
"""

from __future__ import annotations

import os
import sys
import urllib.parse
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from featx.checkpoints import WEIGHT_SUFFIXES, Checkpoint, read_state_dict
from featx.errors import FeatxError, did_you_mean, listing, one_line
from featx.files import sha256_of

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum  # a member names torchvision weights: `.name`, `.url`


def is_weights_name(text: str | os.PathLike[str]) -> bool:
    """Whether ``text`` names pretrained weights (``DEFAULT``, ``a1_in1k``, ``hf-hub:...``) rather than a
    file: it is not an existing path, has no folder part and no weights-file suffix."""
    return _local_path(text) is None


def _local_path(weights: str | os.PathLike[str]) -> Path | None:
    if not isinstance(weights, str):
        return Path(weights)
    if weights.startswith(("hf-hub:", "hf_hub:")):
        return None
    path = Path(weights)
    if path.exists() or "/" in weights or os.sep in weights or weights.endswith(WEIGHT_SUFFIXES):
        return path
    return None


KINDS = ("file", "torchvision", "timm", "hf-hub", "random")


@dataclass(frozen=True)
class WeightsSource:
    """What a model's weights are, decided once by ``parse``: a local file, a torchvision weights enum
    name, a timm pretrained tag, an ``hf-hub:`` id, or none (``random``: the constructor's init, seeded by
    ``seed`` when it is not None).

    ``text`` is the weights as written (None for random), ``origin`` where it was written (``--weights``,
    ``x.yaml: key `weights```), ``model`` the spec a name belongs to, ``prefix`` what to strip from a
    file's keys, as written. A name is resolved only when asked (``member``, ``checkpoint``, ``path``,
    ``label``, ``fingerprint``): then the file is looked up in its library's cache, or downloaded there.
    """

    kind: str  # one of KINDS
    text: str | None
    origin: str = "weights"
    model: str = ""
    prefix: str | None = None
    # a random init's seed (``ModelSource.build`` seeds it); ``featx.extract`` keeps it with weights too,
    # for what they leave out (the tail after the cut)
    seed: int | None = None
    file: Path | None = None  # a local file (a config-relative one already joined to the config's folder)

    @classmethod
    def parse(
        cls,
        text: str | os.PathLike[str] | None,
        spec: str,
        *,
        prefix: str | None = None,
        seed: int | None = None,
        origin: str = "weights",
        base_dir: str | os.PathLike[str] | None = None,
    ) -> WeightsSource:
        """The weights ``text`` says, for the model ``spec``. A relative path resolves against ``base_dir``
        (a config file's folder) when given; a name (``DEFAULT``, ``a1_in1k``, ``hf-hub:...``) stays a name
        unless such a file is there.

        Raises:
            FeatxError: a weights name with ``prefix`` (a name's keys are the model's own), or for a spec
                that is not ``torchvision/<name>`` or ``timm/<name>``.
        """
        model = spec if isinstance(spec, str) else ""
        if text is None:
            return cls("random", None, origin, model, prefix, seed)
        path = _local_path(text)
        if base_dir is not None and not os.path.isabs(os.fspath(text)):
            beside = Path(base_dir) / os.fspath(text)
            if beside.exists() or path is not None:
                path = beside
        text = os.fspath(text)  # a dict config's `model_kwargs: {weights: Path(...)}` too
        if path is not None:
            return cls("file", text, origin, model, prefix, None, path)
        if prefix:
            raise FeatxError(
                f"weights_prefix `{prefix}` applies to a weights file; `{text}` names pretrained "
                "weights, whose keys are the model's own"
            )
        library, sep, _ = model.partition("/")
        if sep and library == "torchvision":
            return cls("torchvision", text, origin, model)
        if sep and library == "timm":
            return cls("hf-hub" if text.startswith(("hf-hub:", "hf_hub:")) else "timm", text, origin, model)
        raise FeatxError(
            f"weights file `{text}` does not exist (a pretrained weights name such as `DEFAULT` "
            f"needs a `torchvision/<name>` or `timm/<name>` spec, not `{spec}`)"
        )

    @property
    def named(self) -> bool:
        """Pretrained weights named the ecosystem's way, read through a cache (not a file, not random)."""
        return self.kind in ("torchvision", "timm", "hf-hub")

    @property
    def _name(self) -> str:
        return self.model.partition("/")[2]

    @cached_property
    def member(self) -> WeightsEnum | None:
        """The torchvision weights enum member: the one a name says, or the one whose download file a
        file is (``resnet50-11ad3fa6.pth``); None for other weights or a file torchvision did not name."""
        if self.kind == "torchvision" and self.text is not None:
            return _torchvision_weights(self._name, self.text)
        if self.kind == "file" and self.file is not None and self.model.startswith("torchvision/"):
            enum = _torchvision_enum(self._name)
            return next((w for w in enum or () if Path(w.url).name == self.file.name), None)
        return None

    @cached_property
    def checkpoint(self) -> Checkpoint | None:
        """The file to read (a name resolved through its cache, downloaded if missing) and what it is
        called; None for random weights, or for a constructor's own switch before it is built."""
        if self.kind == "file":
            assert self.file is not None
            return Checkpoint(self.file, str(self.text))
        if self.kind == "torchvision" and self.text is not None:
            member = self.member
            assert member is not None
            return Checkpoint(_torchvision_file(member), _weights_label(member), True)
        if self.kind in ("timm", "hf-hub"):
            return _timm_checkpoint(self._name, str(self.text))
        return None

    @property
    def path(self) -> Path | None:
        """The local file the weights are read from (a name's cache file), or None for random weights."""
        checkpoint = self.checkpoint
        return None if checkpoint is None else checkpoint.path

    @property
    def label(self) -> str:
        """The weights in a few words: the file as written, the resolved name
        (``ResNet18_Weights.IMAGENET1K_V1``, ``resnet18.a1_in1k``, ``hf-hub:org/name``), or the seed."""
        if self.kind == "random":
            return "random init" + (f", seed {self.seed}" if self.seed is not None else "")
        if self.kind == "file" or self.checkpoint is None:
            return str(self.text)
        return self.checkpoint.name

    def fingerprint(self) -> dict[str, object]:
        """What the weights are, to compare runs by: ``{"random": true, "seed": N}``, or the file read and
        its sha256 (``{"file", "sha256"}``), with the name first for named weights
        (``{"name", "file", "sha256"}``: a name is recorded as a name, its cache file by hash)."""
        if self.kind == "random" or self.checkpoint is None:
            return {"random": True, "seed": self.seed}
        path = self.checkpoint.path
        record: dict[str, object] = {"file": path.name, "sha256": sha256_of(path)}
        return {"name": self.label, **record} if self.named else record

    def to_dict(self) -> dict[str, object]:
        """The weights as parsed, nothing resolved: kind, text as written, origin, file, prefix, seed."""
        return {
            "kind": self.kind,
            "text": self.text,
            "origin": self.origin,
            "file": None if self.file is None else str(self.file),
            "prefix": self.prefix,
            "seed": self.seed,
        }


_HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm looks for in a hub repo, in order


class _Served:
    """While active, torchvision's weights enums read their state dicts from the local cache (or download
    them there) instead of ``load_state_dict_from_url``. The model's own weights (a member of ``enum``) are
    kept as ``member`` and ``state``, with the file key each tensor came from, so renames the builder makes
    (densenet) can be followed; a backbone's (``weights_backbone``) are only served."""

    def __init__(self, enum: type[WeightsEnum] | None) -> None:
        self.enum = enum
        self.member: WeightsEnum | None = None
        self.state: dict[str, torch.Tensor] | None = None
        self.origin: dict[int, str] = {}

    def __enter__(self) -> _Served:
        from torchvision.models._api import WeightsEnum

        self._original = WeightsEnum.get_state_dict
        served = self

        def get_state_dict(member: WeightsEnum, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
            state = dict(read_state_dict(_torchvision_file(member)))
            if served.enum is not None and isinstance(member, served.enum):
                served.member, served.state = member, state
                served.origin = {id(tensor): key for key, tensor in state.items()}
            return state

        WeightsEnum.get_state_dict = get_state_dict
        return self

    def __exit__(self, *exc: object) -> None:
        from torchvision.models._api import WeightsEnum

        WeightsEnum.get_state_dict = self._original


def _torchvision_enum(name: str) -> type[WeightsEnum] | None:
    from torchvision.models import get_model_weights

    try:
        return get_model_weights(name)
    except (KeyError, ValueError):
        return None


def _torchvision_weights(name: str, text: str) -> WeightsEnum:
    """The torchvision weights enum member ``text`` names for model ``name`` (a model torchvision has:
    ``ModelSource`` looks its builder up first, so an unknown model is reported as such)."""
    from torchvision.models import get_weight

    enum = _torchvision_enum(name)
    if enum is None or not enum.__members__:
        raise FeatxError(
            f"weights `{text}`: torchvision `{name}` has no pretrained weights, and no such file"
        )
    members = list(enum.__members__)
    short = text[len(enum.__name__) + 1 :] if text.startswith(enum.__name__ + ".") else text
    if short in enum.__members__:
        return enum[short]
    if "." in text:
        try:
            other = get_weight(text)
        except (KeyError, ValueError, AttributeError):
            other = None
        if other is not None:
            raise FeatxError(
                f"weights `{text}` are another model's, not torchvision `{name}`'s; accepted: "
                f"{listing(members)} ({enum.__name__})"
            )
    raise FeatxError(
        f"weights `{text}` is not a file, nor a weights name of torchvision `{name}`"
        f"{did_you_mean(short, members)}; accepted: {listing(members)} ({enum.__name__}), or a "
        ".safetensors file or torch checkpoint"
    )


def _weights_label(member: WeightsEnum) -> str:
    return f"{type(member).__name__}.{member.name}"


def _torchvision_file(member: WeightsEnum) -> Path:
    return _torch_hub_file(member.url, f"torchvision weights `{_weights_label(member)}`")


def _torch_hub_file(url: str, label: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps ``url``'s file, downloaded there if missing."""
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if path.is_file():
        return path
    where = f"put `{filename}` (from {url}) at `{path}`"
    if _offline():
        raise FeatxError(
            f"{label} are not in torch's cache and HF_HUB_OFFLINE is set, so none is fetched: {where}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(filename)
    try:
        torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None, sys.stderr.isatty())
    except (OSError, RuntimeError, ValueError) as err:  # no network is an URLError; a bad hash a RuntimeError
        raise FeatxError(
            f"{label} are not in torch's cache and cannot be downloaded "
            f"({type(err).__name__}: {one_line(err)}): {where}"
        ) from None
    return path


def _timm_checkpoint(name: str, text: str) -> Checkpoint:
    """The cached file of the timm weights ``text`` names for ``timm/<name>`` (a model timm has: see
    ``_torchvision_weights``)."""
    import timm
    from timm.models import get_pretrained_cfg
    from timm.models._registry import get_arch_pretrained_cfgs, split_model_name_tag

    if text.startswith(("hf-hub:", "hf_hub:")):
        repo, _, revision = text[len("hf-hub:") :].partition("@")
        return Checkpoint(_hub_file(repo, revision or None, _HUB_FILES, f"hub weights `{text}`"), text, True)
    arch, spec_tag = split_model_name_tag(name)
    tags = [cfg.tag for cfg in get_arch_pretrained_cfgs(arch).values() if cfg.tag]
    head, dot, rest = text.partition(".")
    if text == "DEFAULT":
        default = get_pretrained_cfg(arch)
        tag = spec_tag or (default.tag if default is not None and default.tag else "")
    elif dot and head == arch:
        tag = rest
    elif dot and timm.is_model(head):
        raise FeatxError(
            f"weights `{text}` are another model's, not timm `{arch}`'s; accepted: {listing(tags)}"
        )
    else:
        tag = text
    if spec_tag and tag != spec_tag:
        raise FeatxError(
            f"spec `timm/{name}` names the tag `{spec_tag}` and weights `{text}` the tag `{tag}`; name it once"
        )
    if tag not in tags:
        raise FeatxError(
            f"weights `{text}` is not a file, nor a pretrained tag of timm `{arch}`{did_you_mean(tag, tags)}; "
            f"accepted: `DEFAULT`, {listing(tags, 8)}, `hf-hub:<org>/<name>`, or a .safetensors file or "
            "torch checkpoint"
        )
    cfg = get_pretrained_cfg(f"{arch}.{tag}")
    assert cfg is not None, "a tag timm lists for the arch has its pretrained cfg"
    label = f"timm weights `{arch}.{tag}`"
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HUB_FILES
        return Checkpoint(_hub_file(repo, revision or None, files, label), f"{arch}.{tag}", True)
    url = cfg.url[0] if isinstance(cfg.url, tuple) else cfg.url  # timm also takes (url, file name)
    if url:
        return Checkpoint(_torch_hub_file(url, label), f"{arch}.{tag}", True)
    raise FeatxError(f"{label} name no file to download (no hub id, no URL); pass a weights file")


def _hub_file(repo: str, revision: str | None, files: tuple[str, ...], label: str) -> Path:
    """The first of ``files`` in hub repo ``repo`` that the Hugging Face cache holds, downloaded if none."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    cache = _hub_cache()
    for filename in files:
        hit = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision)
        if isinstance(hit, str):
            return Path(hit)
    folder = Path(cache) / ("models--" + repo.replace("/", "--"))
    where = (
        f"expected `{files[0]}` of hub repo `{repo}` at `{folder}/snapshots/<commit>/{files[0]}` "
        f"(and `refs/{revision or 'main'}` there holding <commit>, as huggingface_hub leaves it)"
    )
    if _offline():
        raise FeatxError(f"{label} are not in the Hugging Face cache and HF_HUB_OFFLINE is set: {where}")
    for filename in files:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache))
        except EntryNotFoundError:
            continue
        except Exception as err:  # no network, no such repo, no access: the one line says which
            raise FeatxError(
                f"{label} are not in the Hugging Face cache and cannot be downloaded "
                f"({type(err).__name__}: {one_line(err)}): {where}"
            ) from None
    raise FeatxError(f"{label}: hub repo `{repo}` has none of {listing(files)}")


def _hub_cache() -> str:
    """The Hugging Face hub cache as huggingface_hub finds it, read from the environment now (so a cache
    set after import is honoured): ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    cache = (
        os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    )
    return os.path.expandvars(os.path.expanduser(cache))


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set, now or when huggingface_hub was imported."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if value.upper() in ("1", "ON", "YES", "TRUE"):
        return True
    hub = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(hub, "HF_HUB_OFFLINE", False))
