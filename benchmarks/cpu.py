"""The CPU a benchmark ran on, read without importing torch: every benchmark prints it, since
figures compare only within one run on one machine."""

from __future__ import annotations

import os
import platform
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")  # what decides the kernels


def cpu() -> tuple[str, str]:
    """The model name and the FLAGS it has, as text."""
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return (model or platform.processor() or "unknown CPU",
            " ".join(f for f in FLAGS if f in flags) or "none of " + ", ".join(FLAGS))


def cpu_line() -> str:
    model, flags = cpu()
    return f"CPU: {model}, {os.cpu_count()} cores; flags: {flags}"
