"""Model weights on disk: a plain state_dict, written atomically, read with weights_only."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from optimsweep.util.atomic import write_atomic


def save_state_dict(model: nn.Module, path: Path | str) -> Path:
    """Write `model`'s state_dict (moved to CPU) so that a crash never leaves half a file."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return write_atomic(path, lambda fh: torch.save(state, fh))


def load_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)
