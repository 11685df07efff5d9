"""Where the model runs: --device resolved to a torch device."""

from __future__ import annotations

import torch

from fgcli.errors import SetupError, UsageError


def resolve_device(spec: str) -> torch.device:
    """auto = cuda if available, else cpu; explicit devices must exist."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise UsageError(f"--device: {spec!r} is not a device; use auto, cpu, cuda, cuda:N "
                         "or mps") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SetupError(f"--device {spec}: no CUDA device is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SetupError(f"--device {spec}: only {torch.cuda.device_count()} CUDA "
                             "device(s) here")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise SetupError(f"--device {spec}: MPS is not available here")
    elif device.type != "cpu":
        raise UsageError(f"--device: unsupported device {spec!r}")
    return device
