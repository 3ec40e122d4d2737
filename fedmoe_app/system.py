"""The machine a process runs on: the torch device it computes on, and what it costs."""

import resource
import sys
from pathlib import Path

import torch

from fedmoe_app.config import ConfigError


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (10^6 bytes). On Linux from
    /proc's VmHWM: getrusage's ru_maxrss survives execve, so a child started by a large
    parent would report the parent's peak."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6  # macOS: bytes, Linux: KiB


def torch_device(name: str) -> torch.device:
    """The device `train.device` names; `auto` is the first visible GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'train.device' is {name!r} but this process sees no GPU; allowed here: auto, cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        allowed = ", ".join(["auto", "cpu", "cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())])
        raise ConfigError(f"config key 'train.device' is {name!r}; allowed here: {allowed}")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (GPU kernels run asynchronously), so wall
    times measure the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
