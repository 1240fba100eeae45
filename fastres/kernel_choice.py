"""What `--kernels auto` picks: eager until a committed GPU measurement says otherwise."""

from __future__ import annotations

import torch

from fastres.structures import ResNetSpec


def choose(spec: ResNetSpec, device: torch.device) -> tuple[str, str]:
    """('eager' or 'triton', why) for this structure on this device."""
    if device.type != "cuda":
        return "eager", ("on the CPU fastres's Triton kernels run only under the interpreter, "
                         "for tests")
    return "eager", "no committed GPU measurement for this device yet"
