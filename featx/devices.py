"""The torch device a run asks for (``--device``, the pytest plugin's), refused in one line where this
machine has none such."""

from __future__ import annotations

import torch

from featx.errors import FeatxError, listing


def torch_device(text: str, flag: str = "--device") -> torch.device:
    """``text`` as a torch device this machine has, for the command line (``flag``) and the pytest plugin.

    Raises:
        FeatxError: not a device name, a device type featx does not run on, or CUDA asked for where there
            is none ("CUDA is not available on this machine; use --device cpu").
    """
    try:
        device = torch.device(text)
    except RuntimeError:
        raise FeatxError(f"{flag} `{text}` is not a torch device; accepted: cpu, cuda, cuda:N, mps") from None
    if device.type == "cpu" and device.index is not None:  # torch accepts `cpu:1` and runs on the one CPU
        raise FeatxError(f"{flag} `{text}`: the CPU has no index; use {flag} cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FeatxError(f"{flag} `{text}`: CUDA is not available on this machine; use {flag} cpu")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise FeatxError(
            f"{flag} `{text}` is not supported; accepted: {listing(['cpu', 'cuda', 'mps', 'xpu'])}"
        )
    return device
