"""The modules a backbone is: ``Backbone`` (the kept children run in order, tapped) and ``GlueBackbone``
(the root's traced forward up to the cut, tapped), frozen and normalised as configured."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import ItemsView, Iterator, KeysView, Mapping, ValuesView

import torch
from torch import nn

from featx.backbone.tokens import TokenMap, to_map
from featx.errors import FeatxError, listing
from featx.glue_module import KeepGlue, captured, own_forward


class OneOutputChannels(int):
    """The channels of a backbone with one output: an int, as torchvision's detection heads read
    ``backbone.out_channels`` (``FasterRCNN(c4_backbone, ...)``). It still reads as the one-entry mapping
    ``{output name: channels}`` that ``out_channels`` was before (``out_channels["res4"]``, ``.items()``),
    with a ``FutureWarning``: ``backbone.channels`` is that mapping for any number of outputs."""

    name: str

    def __new__(cls, name: str, channels: int) -> OneOutputChannels:
        value = super().__new__(cls, channels)
        value.name = name
        return value

    def _as_mapping(self) -> dict[str, int]:
        warnings.warn(
            f"`out_channels` of a backbone with one output is the int {int(self)} (as torchvision's heads "
            f"expect); reading it as a mapping (`out_channels[{self.name!r}]`) is deprecated: use "
            f"`backbone.channels[{self.name!r}]`",
            FutureWarning,
            stacklevel=3,
        )
        return {self.name: int(self)}

    def __getitem__(self, name: str) -> int:
        return self._as_mapping()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._as_mapping())

    def keys(self) -> KeysView[str]:  # dict's views, as the mapping had them
        return self._as_mapping().keys()

    def values(self) -> ValuesView[int]:
        return self._as_mapping().values()

    def items(self) -> ItemsView[str, int]:
        return self._as_mapping().items()

    def __reduce__(self) -> tuple[type[OneOutputChannels], tuple[str, int]]:
        return OneOutputChannels, (self.name, int(self))


def out_channels(channels: Mapping[str, int]) -> dict[str, int] | OneOutputChannels:
    """What a backbone's ``out_channels`` reads: the int of its one output, as torchvision's heads expect
    (a C4 backbone), else the mapping output name -> channels (as ``channels``)."""
    if len(channels) == 1:
        ((name, count),) = channels.items()
        return OneOutputChannels(name, count)
    return dict(channels)


class Backbone(nn.ModuleDict):
    """The kept children of a model, run in order, returning the tapped feature maps by output name.

    Children keep their names, so ``state_dict()`` keys are the full model's. A container that a nested
    tap or cut reaches into (``stages`` for ``outputs: [stages.1, stages.2]``) is an ``nn.Sequential`` of
    its kept children, the same module objects under the same names, and runs them one by one so the taps
    inside it see their outputs; the build refuses a container whose own forward does more than that (a
    residual block's add). Each tap is what its module returned: a later module that writes to its input
    in place does not change it. Frozen children have ``requires_grad=False`` and stay in eval mode under
    ``.train()``; with ``norm_eval`` every BatchNorm does (mmdetection's ``norm_eval``). ``channels``
    and ``strides`` map output names to what a dry run measured; ``out_channels`` is ``channels``, or
    with one output its int (``OneOutputChannels``), as torchvision's heads expect.
    """

    def __init__(
        self,
        children: Mapping[str, nn.Module],
        taps: Mapping[str, list[str]],
        frozen: list[str],
        norm_eval: bool,
        expanded: tuple[str, ...] = (),
    ) -> None:
        super().__init__(children)
        self.taps = dict(taps)  # dotted module name -> output names
        self.expanded = tuple(expanded)  # containers run child by child (dotted names)
        self.nested = bool(self.expanded)
        self.frozen = list(frozen)
        self.norm_eval = norm_eval
        self.channels: dict[str, int] = {}  # output name -> channels, as measured
        self.strides: dict[str, int] = {}
        self.shapes: dict[str, list[int]] = {}  # at the dry run's input shape
        self.input_shape: tuple[int, ...] = ()  # the dry run's input shape
        self.output_names: list[str] = [o for outputs in self.taps.values() for o in outputs]  # config order
        self.source_params = 0  # parameters of the whole model the children were cut from
        self.upto = list(self.keys())[-1] if len(self) else ""  # the last module run (dotted if nested)
        self.token_maps: dict[str, TokenMap] = {}  # output name -> how its tokens become a map
        self.makes_maps = False  # whether there are any (a type TorchScript reads)
        self.norm_name = ""  # the final norm's child name when a token map applies it
        self.held_norm = ""  # the same, when held only for the maps (not a kept child, never run in order)
        for name in self.frozen:
            self.get_submodule(name).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not torch.jit.is_scripting() and self.nested:  # TorchScript takes the children loop below
            return _run_nested(self, x)
        # A module may write to its input in place (torchvision's `relu` after `bn1` is ReLU(inplace=True)),
        # so a tap is copied just before the next module runs; the last module's taps are not copied.
        # Copying only before a module seen to write in place would save the copy, but no attribute says
        # so soundly: any forward may (`x += y`, `x.mul_(g)`), in one mode or for some inputs. The cost is
        # one copy of each earlier tap: 28 MiB and ~4% of the forward for resnet50 layer1..layer4 at 512x512.
        out = OrderedDict()
        held: list[str] = []  # the outputs that hold `x` itself: cloned before the next module runs
        image = x  # a token map's grid is the input's
        for name, module in self.items():
            if name != self.held_norm:  # the final norm a token map applies is not run in order
                if len(held) > 0:
                    # TorchScript's are tensors
                    value = x.clone() if torch.jit.is_scripting() else captured(x)
                    for output in held:
                        out[output] = value
                    held = []
                x = module(x)
                if name in self.taps:
                    for output in self.taps[name]:
                        out[output] = x
                    held = self.taps[name]
        if not torch.jit.is_scripting() and self.makes_maps:  # scripting one is refused
            return _as_maps(self, out, image)
        return out

    __jit_unused_properties__ = ("out_channels",)  # TorchScript compiles properties unless told not to

    @property
    def out_channels(self) -> dict[str, int] | OneOutputChannels:
        """``channels``; with one output, its int (as torchvision's heads read ``out_channels``)."""
        return out_channels(self.channels)

    def __prepare_scriptable__(self) -> Backbone:
        """``torch.jit.script`` hook: refused where outputs are token maps, which TorchScript would skip."""
        _refuse_script(self)
        return self

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        _hold_frozen(self, self.frozen, self.norm_eval)
        return self


class GlueBackbone(KeepGlue):
    """``Backbone`` for a config with ``keep_glue: true``: the root's own forward up to the cut (see
    ``featx.glue.KeepGlue``), returning the value of each tapped module in the full forward by output name.

    A cut or tap inside a container (``stages.2``) is made by that container's own traced forward, so
    its glue is kept too, and the tap is exactly what the named module returns in the full forward — at
    the last child too, where ``truncate(..., keep_glue=True)`` returns the model's output instead. Same
    attributes as ``Backbone`` (``taps``, ``frozen``, ``channels``, ``out_channels``, ``strides``, ``shapes``,
    ``keys()``); ``state_dict()`` keys are the full model's.
    """

    def __init__(
        self, keep: KeepGlue, taps: Mapping[str, list[str]], frozen: list[str], norm_eval: bool
    ) -> None:
        nn.Module.__init__(self)
        self.__dict__.update(keep.__dict__)  # its mode too: that of the model it was cut from
        own_forward(self)  # this class's forward, not the one bound to `keep`
        self.taps: dict[str, list[str]] = dict(taps)  # tapped child -> output names, as Backbone's
        self.frozen = list(frozen)
        self.norm_eval = norm_eval
        self.channels: dict[str, int] = {}
        self.strides: dict[str, int] = {}
        self.shapes: dict[str, list[int]] = {}
        self.input_shape: tuple[int, ...] = ()  # the dry run's input shape
        self.output_names: list[str] = [o for outputs in self.taps.values() for o in outputs]  # config order
        self.source_params = 0
        self.token_maps: dict[str, TokenMap] = {}  # output name -> how its tokens become a map
        self.makes_maps = False  # whether there are any
        self.norm_name = ""  # the final norm's child name when a token map applies it
        self.held_norm = ""  # the same, when held only for the maps (not a kept child)
        for name in self.frozen:
            self.get_submodule(name).requires_grad_(False)

    def keys(self) -> list[str]:
        """The kept children's names, in the model's order (as ``Backbone.keys()``)."""
        return [name for name, _ in self.named_children() if name != self.held_norm]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        values = super().forward(x)
        if not isinstance(values, dict):  # one tap, at the cut
            values = {self.upto: values}
        out = OrderedDict(
            (output, values[child]) for child, outputs in self.taps.items() for output in outputs
        )
        return _as_maps(self, out, x) if self.makes_maps else out

    __jit_unused_properties__ = ("out_channels",)  # TorchScript compiles properties unless told not to

    @property
    def out_channels(self) -> dict[str, int] | OneOutputChannels:
        """``channels``; with one output, its int (as torchvision's heads read ``out_channels``)."""
        return out_channels(self.channels)

    def train(self, mode: bool = True) -> GlueBackbone:
        super().train(mode)
        _hold_frozen(self, self.frozen, self.norm_eval)
        return self


def take_maps(
    backbone: Backbone | GlueBackbone, maps: Mapping[str, TokenMap], norm: tuple[str, nn.Module] | None
) -> None:
    """Make ``backbone`` return each output of ``maps`` as an NCHW map (``featx.backbone.tokens``); ``norm``
    (its name in the model, the module) is the final norm a map applies, held as a child under the model's
    own name so ``state_dict()`` keys stay the full model's, and never run in the children's order."""
    backbone.token_maps = dict(maps)
    backbone.makes_maps = bool(maps)
    if norm is not None:
        backbone.norm_name = norm[0]
        if norm[0] not in dict(backbone.named_children()):  # a cut past the norm keeps and runs it
            backbone.held_norm = norm[0]
            backbone.add_module(norm[0], norm[1])


def as_map(
    backbone: Backbone | GlueBackbone, output: str, value: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """``value``, what output ``output``'s module returned on input ``x``, as ``backbone`` returns it: made
    into an NCHW map where the output is a token map, else as is (``featx check``'s reference)."""
    how = backbone.token_maps.get(output)
    if how is None:
        return value
    norm = backbone.get_submodule(backbone.norm_name) if how.norm else None
    return to_map(value, how, x.shape[-2], x.shape[-1], norm)


def _as_maps(
    backbone: Backbone | GlueBackbone, out: dict[str, torch.Tensor], x: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``out`` with each token output made into its NCHW map, in the same order."""
    return OrderedDict((name, as_map(backbone, name, value, x)) for name, value in out.items())


def _refuse_script(backbone: Backbone | GlueBackbone) -> None:
    if backbone.makes_maps:
        raise FeatxError(
            f"outputs {listing(backbone.token_maps)} are tokens made into NCHW maps, which TorchScript "
            "cannot run; export with `featx export --format pt2` or `onnx` instead"
        )


def _hold_frozen(backbone: nn.Module, frozen: list[str], norm_eval: bool) -> None:
    """Frozen modules stay in eval mode; with ``norm_eval`` every BatchNorm does."""
    for name in frozen:
        backbone.get_submodule(name).eval()
    if norm_eval:
        for module in backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _run_nested(backbone: Backbone, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``backbone``'s forward when containers run child by child: each kept module in turn, tapped (each
    tap copied before the next module runs, as in ``Backbone.forward``)."""
    out: dict[str, torch.Tensor] = OrderedDict()
    expanded = set(backbone.expanded)
    held: list[str] = []  # the outputs that hold `x` itself: cloned before the next module runs

    def run(container: nn.Module, prefix: str, x: torch.Tensor) -> torch.Tensor:
        for name, module in container.named_children():
            dotted = prefix + name
            if dotted == backbone.held_norm:
                continue
            if dotted in expanded:
                x = run(module, dotted + ".", x)
            else:
                if held:
                    value = captured(x)
                    out.update(dict.fromkeys(held, value))
                    held.clear()
                x = module(x)
            for output in backbone.taps.get(dotted, ()):
                out[output] = x
                held.append(output)
        return x

    run(backbone, "", x)
    return _as_maps(backbone, out, x) if backbone.token_maps else out
