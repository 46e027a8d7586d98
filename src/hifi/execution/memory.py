"""Peak memory of a piece of work, measured the same way by the benchmarks and a tune's run record.

On CUDA it is the device memory PyTorch allocated (reset before the work); on the CPU the
process's peak resident set, which cannot be reset, so it also counts what the process
held before the work (the model among it).
"""

from __future__ import annotations

import resource
from typing import Any

import torch

__all__ = ["peak_memory", "reset_peak_memory"]


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak on ``device`` (a no-op on the CPU, whose peak is the process's)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """``{"device", "peak_mb", "what"}``: the peak since :func:`reset_peak_memory` (CUDA) or of the process (CPU)."""
    if device.type == "cuda":
        return {"device": str(device), "peak_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "what": "CUDA memory allocated by PyTorch, peak over the work"}
    return {"device": "cpu", "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "what": "the process's peak resident memory (includes the model and anything loaded before)"}
