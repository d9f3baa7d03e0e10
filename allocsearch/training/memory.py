"""Peak memory of the work since a reset: CUDA's max allocated, else the process's peak RSS (Linux)."""
from __future__ import annotations

from pathlib import Path


def rss_mb(field: str = "VmRSS") -> float | None:
    """A memory field of /proc/self/status in MiB (VmRSS now, VmHWM peak); None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak(device) -> float | None:
    """Start a new peak measurement; returns the memory in use now (MiB) as its baseline."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:  # Linux: writing 5 resets the process's peak RSS (VmHWM)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    return rss_mb("VmRSS")


def peak_mb(device) -> tuple[float | None, str]:
    """(peak MiB since :func:`reset_peak`, what was measured)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    peak = rss_mb("VmHWM")
    return peak, "process peak RSS" if peak is not None else ""
