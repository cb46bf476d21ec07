"""The numeric setting a model runs in, and the numeric environment a result was computed in.

``Numerics`` is one value, parsed once (``--dtype``, ``--autocast``, ``--compile``, ``--channels-last``, a
config's ``numerics:`` section) and carried: the full model and the cut run the same way under it, and
the comparison takes its tolerance from it (``tolerance``: ``torch.testing.assert_close``'s defaults for
the dtype the model computes in). The default is float32 eager, contiguous: featx's exact comparison.

``environment`` is what every report, JSON, manifest and artifact records of the machine and the
libraries that computed it: versions, device and its name, the numeric setting, TF32 flags, the
deterministic-algorithms flag and the thread count (documented in docs/json.md, "numeric environment").
"""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from featx.errors import FeatxError, listing

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
SPELLINGS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}

# torch.testing.assert_close's defaults per dtype (rtol, atol): what "equal" means in that dtype
ASSERT_CLOSE: dict[torch.dtype, tuple[float, float]] = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
}
KEYS = ("dtype", "autocast", "compile", "channels_last")  # a config's `numerics:` section


def dtype_name(text: object, where: str) -> str:
    """``text`` as one of ``DTYPES``' names (``bf16`` -> ``bfloat16``); ``where`` names the flag or key.

    Raises:
        FeatxError: not a dtype featx runs models in.
    """
    if isinstance(text, torch.dtype):  # torch.bfloat16 as well as "bfloat16"
        text = str(text).removeprefix("torch.")
    name = SPELLINGS.get(str(text).lower(), str(text).lower()) if isinstance(text, str) else None
    if name not in DTYPES:
        raise FeatxError(f"{where} {text!r} is not a dtype featx runs in; accepted: {listing(list(DTYPES))}")
    return name


@dataclass(frozen=True)
class Numerics:
    """How a model runs: its parameters' and input's ``dtype``, ``autocast`` (bfloat16 on CPU, float16
    on CUDA, around the forward), ``compile`` (``torch.compile``), ``channels_last`` (model and 4-d inputs
    in ``torch.channels_last`` memory format). The default is float32 eager, contiguous."""

    dtype: str = "float32"
    autocast: bool = False
    compile: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype, "dtype"))
        for key in ("autocast", "compile", "channels_last"):
            if not isinstance(getattr(self, key), bool):
                raise FeatxError(f"{key} {getattr(self, key)!r} is not true or false")

    @classmethod
    def parse(cls, section: object, where: str = "numerics") -> Numerics:
        """A config's ``numerics:`` mapping (keys ``KEYS``); ``where`` names it in errors.

        Raises:
            FeatxError: not a mapping, an unknown key, or a bad value (naming the key and what is accepted).
        """
        if section is None:
            return cls()
        if not isinstance(section, Mapping):
            raise FeatxError(f"{where} {section!r} is not a mapping; accepted keys: {listing(list(KEYS))}")
        unknown = [key for key in section if key not in KEYS]
        if unknown:
            raise FeatxError(f"{where}.{unknown[0]} is not a numerics key; accepted: {listing(list(KEYS))}")
        values = dict(section)
        if "dtype" in values:
            values["dtype"] = dtype_name(values["dtype"], f"{where}.dtype")
        for key in ("autocast", "compile", "channels_last"):
            if key in values and not isinstance(values[key], bool):
                raise FeatxError(f"{where}.{key} {values[key]!r} is not true or false")
        return cls(**values)

    @property
    def is_default(self) -> bool:
        """float32 eager, contiguous: featx's exact comparison."""
        return self == Numerics()

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """The dtype autocast computes in on ``device`` (None without autocast)."""
        if not self.autocast:
            return None
        return torch.float16 if device.type == "cuda" else torch.bfloat16

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the forward computes in: autocast's where autocast is on, else ``dtype``."""
        low = self.autocast_dtype(device)
        # autocast casts every floating input but float64 to its own dtype (float16 to bfloat16 on CPU)
        return self.torch_dtype if low is None else low

    def tolerance(self, device: torch.device) -> tuple[float, float]:
        """``(rtol, atol)``: ``torch.testing.assert_close``'s defaults for the dtype the forward computes in."""
        return ASSERT_CLOSE[self.compute_dtype(device)]

    def model(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` in this setting's dtype and memory format, in place (``module.to``); not compiled."""
        module.to(dtype=self.torch_dtype)
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        return module

    def input(self, x: Any) -> Any:
        """A tensor input in this setting: floating tensors to ``dtype``, 4-d ones channels-last."""
        if not isinstance(x, torch.Tensor):
            return x
        if x.is_floating_point():
            x = x.to(self.torch_dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @contextlib.contextmanager
    def running(self, device: torch.device) -> Iterator[None]:
        """Around a forward: autocast on ``device`` when asked for, else nothing."""
        low = self.autocast_dtype(device)
        if low is None:
            yield
            return
        with torch.autocast(device.type, dtype=low):
            yield

    def to_dict(self) -> dict[str, object]:
        return {
            "dtype": self.dtype,
            "autocast": self.autocast,
            "compile": self.compile,
            "channels_last": self.channels_last,
        }


def device_name(device: torch.device) -> str:
    """The device's own name: the GPU's (``torch.cuda.get_device_name``), the CPU's model name."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return _cpu_name()
    return device.type


@functools.cache  # the machine's CPU does not change within a process: /proc/cpuinfo is read once
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache  # an imported package's version does not change within a process: its metadata is read once
def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | str = "cpu", numerics: Numerics | None = None) -> dict[str, object]:
    """The numeric environment of a result (JSON ``environment``; docs/json.md): what a number computed
    here depends on besides the model and its input."""
    from featx._version import __version__

    device = torch.device(device)
    numerics = numerics or Numerics()
    autocast = numerics.autocast_dtype(device)
    return {
        "featx": __version__,
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "timm": _version("timm"),
        "python": platform.python_version(),
        "device": str(device),
        "device_name": device_name(device),
        "dtype": numerics.dtype,
        "autocast": None if autocast is None else str(autocast).removeprefix("torch."),
        "compile": numerics.compile,
        "channels_last": numerics.channels_last,
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "threads": torch.get_num_threads(),
    }
