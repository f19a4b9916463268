"""Runtime options shared by the CLI and the library: device resolution."""

from __future__ import annotations

import torch

from npstune.errors import ConfigError


def resolve_device(device: str | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` -> torch.device;
    a clear error if CUDA is absent."""
    name = (device or "cpu").strip()
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type != "cpu":
        raise ConfigError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    return dev
