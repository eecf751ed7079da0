"""Model weights on disk: a plain state_dict, written atomically, read with weights_only."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn


def save_state_dict(model: nn.Module, path: Path | str) -> Path:
    """Write `model`'s state_dict (moved to CPU) so that a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)
