"""Models built from a spec: ``load_model`` (built, its weights loaded) and ``build_model`` (built, its
weights located), both through the ``ModelSource`` a spec, its weights and keyword arguments are parsed into.

A spec names where a model comes from:

- ``torchvision/<name>``: ``torchvision.models.get_model(name, weights=None, **model_kwargs)``;
- ``timm/<name>``: ``timm.create_model(name, pretrained=False, **model_kwargs)``;
- ``package.module:callable``: the callable (a class or factory) imported and called with ``model_kwargs``.

One job per module, each of whose names is importable from here too: ``featx.model_sources`` (the
``ModelSource`` value, ``model_source`` and ``given_model``, what each model was built from), ``featx.builders``
(what builds each library's models, a constructor's refusal in one line), ``featx.input_shapes`` (a model's
own input size and the shapes it takes), ``featx.devices`` (``torch_device``). What the weights are (a file, a
pretrained weights name, random with a seed) is ``featx.weights``'s ``WeightsSource``; reading a file into
the model is ``featx.checkpoints``'s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import nn

from featx.builders import BuildFailed as BuildFailed
from featx.builders import MissingAttribute as MissingAttribute
from featx.builders import attribute as attribute
from featx.builders import import_module as import_module
from featx.builders import spec_form_error as spec_form_error
from featx.checkpoints import Checkpoint
from featx.devices import torch_device as torch_device
from featx.input_shapes import check_input_shape as check_input_shape
from featx.input_shapes import default_input_shape as default_input_shape
from featx.input_shapes import fixed_input_size as fixed_input_size
from featx.model_sources import COMMAND_LINE as COMMAND_LINE
from featx.model_sources import KEYWORDS as KEYWORDS
from featx.model_sources import LIBRARIES as LIBRARIES
from featx.model_sources import ModelSource
from featx.model_sources import SourceNames as SourceNames
from featx.model_sources import download_switches as download_switches
from featx.model_sources import given_model as given_model
from featx.model_sources import model_source as model_source
from featx.model_sources import source_of as source_of
from featx.model_sources import weights_of as weights_of
from featx.weights import (
    is_weights_name,  # noqa: F401  the cli's "file or name?", until it takes a ModelSource
)


def load_model(
    spec: str,
    weights: str | os.PathLike[str] | None = None,
    *,
    weights_prefix: str | None = None,
    seed: int | None = None,
    **model_kwargs: object,
) -> nn.Module:
    """Build the model named by ``spec`` with its own initialisation, then load ``weights`` if given.

    ``weights`` is a local ``.safetensors`` file or a torch checkpoint (a state dict, or a dict holding
    one under ``state_dict``/``model``); it must match the model's state dict exactly: missing,
    unexpected and mis-shaped keys are reported by name. ``weights_prefix`` (``module.``,
    ``backbone.body``: a dotted path) is stripped from the file's keys first; when the keys do not match
    and one prefix would make them, the error names it. The returned model is in eval mode.

    ``weights`` may also name pretrained weights the way torchvision and timm do, read from their caches
    (see ``build_model``): ``DEFAULT``, ``IMAGENET1K_V2`` or ``ResNet50_Weights.IMAGENET1K_V2`` for a
    torchvision spec; ``DEFAULT`` (the spec's tag, else timm's default), a tag such as ``a1_in1k``, or
    ``hf-hub:org/name`` for a timm spec. The constructors' own switches in ``model_kwargs``
    (``pretrained=True``; torchvision's ``weights_backbone``) are read the same way.

    Without weights, ``seed`` (when not None) seeds the model's random init, under
    ``torch.random.fork_rng()``: the same seed builds the same model in every process, and the caller's
    RNG is left as it was (see ``build_model``).

    Raises:
        FeatxError: unknown spec (with close matches), a constructor that rejects ``model_kwargs``,
            a missing, corrupt or mismatched weights file, pretrained weights that are not cached and
            cannot be downloaded (naming the file and where it belongs).
    """

    source = ModelSource.parse(
        spec, weights, weights_prefix=weights_prefix, model_kwargs=model_kwargs, seed=seed
    )
    return source.load()


def build_model(
    spec: str,
    weights: str | os.PathLike[str] | None,
    model_kwargs: Mapping[str, object],
    *,
    weights_prefix: str | None = None,
    seed: int | None = None,
) -> tuple[nn.Module, Checkpoint | None]:
    """The model ``spec`` names, and the checkpoint ``weights`` resolves to (None without weights).

    A local file is only located here; ``load_weights`` reads it. Pretrained weights named as torchvision
    names them are looked up where torchvision keeps them (``torch.hub.get_dir()/checkpoints/`` under
    ``TORCH_HOME``, the file named by the weights' URL) and handed to torchvision's own builder, so the
    model is exactly ``get_model(name, weights=...)`` — its kwargs adjustments (inception's
    ``transform_input``) and key renames (densenet) included; built under ``torch.device("meta")`` nothing
    is read, and ``Checkpoint.keys`` tells ``load_weights`` which file key feeds each model key. timm tags
    and ``hf-hub:`` ids are looked up in the Hugging Face hub cache (``HF_HUB_CACHE``, ``HF_HOME``) as
    timm does, ``model.safetensors`` first, then ``pytorch_model.bin``; the model is built with
    ``pretrained=False`` and ``load_weights`` reads the file (timm's ``filter_fn`` conversions are not
    applied: weights published by timm match its models as they are). Missing files are downloaded as
    torchvision (``download_url_to_file``, hash checked) and ``huggingface_hub`` would, unless
    ``HF_HUB_OFFLINE`` is set; then, or when the download fails, the error names the file and its path.

    When ``weights`` is None and ``seed`` is not None, the constructor runs under
    ``torch.random.fork_rng()`` after ``torch.manual_seed(seed)``: its random init is the same in every
    process and every run, and the caller's RNG state is untouched.
    """

    source = ModelSource.parse(
        spec, weights, weights_prefix=weights_prefix, model_kwargs=model_kwargs, seed=seed
    )
    return source.build()
