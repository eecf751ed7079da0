"""What a trial trained on, said so a person comparing runs can tell the machines apart: the
device, its name and memory, and which of the machine's GPUs it was (the worker sees only its
own, as `cuda:0`)."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch


@functools.cache  # read once a process, not at each trial's start
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_facts(device: torch.device) -> dict[str, str]:
    """name, memory_gib (GPUs) and index: the GPU as the machine numbers it (the entry of
    CUDA_VISIBLE_DEVICES the worker was given), `cpu` on the CPU."""
    if device.type != "cuda":
        return {"name": f"{cpu_model()} ({os.cpu_count()} cores)", "index": "cpu"}
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    visible = [e.strip() for e in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
               if e.strip()]
    return {"name": props.name, "memory_gib": f"{props.total_memory / 2**30:.1f}",
            "index": visible[index] if index < len(visible) else str(index)}
