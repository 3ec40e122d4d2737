"""Compute precision (`train.precision`): what `auto` picks on this hardware, and why.

Low precision is autocast: matrix products run in bf16 / fp16, trainable tensors,
optimiser state and aggregation stay float32, and the frozen backbone is held in the
low precision (half its memory). `auto` picks bf16 on CPUs with bf16 matrix instructions
(AVX512-BF16, AMX-BF16, Arm BF16) and on GPUs of compute capability 8.0 or newer (Ampere,
Jetson Orin), fp16 on GPUs with full-rate fp16 (Jetson Nano and TX2, P100, Volta and
Turing), fp32 elsewhere (a Raspberry Pi 4's Cortex-A72 has neither).
"""

from __future__ import annotations

import subprocess
import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from fedmoe_app.config import CHOICES, ConfigError

PRECISIONS = CHOICES["train.precision"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_FLAGS = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16", "bf16": "Arm BF16"}
CPU_FP16_FLAGS = {"avx512_fp16": "AVX512-FP16", "amx_fp16": "AMX-FP16", "asimdhp": "Arm FP16"}
# GPUs whose fp16 arithmetic runs at full rate without tensor cores: Tegra X1 (Jetson Nano),
# P100, Tegra X2; from compute capability 7.0 tensor cores do fp16.
FULL_RATE_FP16 = {(5, 3), (6, 0), (6, 2)}


@dataclass(frozen=True)
class Precision:
    """The precision a process computes in, and why it was chosen."""

    name: str  # fp32 | bf16 | fp16
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of matrix products and of the frozen backbone."""
        return DTYPES[self.name]

    @property
    def length_multiple(self) -> int:
        """Batches pad their token length to a multiple of this. Low-precision matrix
        products compile a kernel per new shape (oneDNN on a CPU) or want multiples of 8
        (tensor cores), so few distinct shapes pay; float32 has neither need."""
        return 1 if self.name == "fp32" else 8

    def autocast(self, device: torch.device) -> AbstractContextManager:
        """The autocast context that computes in this precision on `device` (off for fp32)."""
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.name != "fp32")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags, lower case (Linux /proc/cpuinfo; macOS sysctl)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags: set[str] = set()
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("flags", "features"):
                flags.update(value.lower().split())
        return frozenset(flags)
    if sys.platform == "darwin":  # Apple silicon from M2 on has BF16
        done = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True)
        return frozenset({"bf16"} if done.stdout.strip() == "1" else set())
    return frozenset()


def _named(flags: frozenset[str], table: dict[str, str]) -> list[str]:
    return [name for flag, name in table.items() if flag in flags]


def _cpu(requested: str) -> Precision:
    flags = cpu_flags()
    bf16, fp16 = _named(flags, CPU_BF16_FLAGS), _named(flags, CPU_FP16_FLAGS)
    if requested == "auto":
        if bf16:
            return Precision("bf16", f"train.precision auto: this CPU has {', '.join(bf16)}")
        return Precision("fp32", "train.precision auto: this CPU has no bf16 matrix instructions "
                                 "(AVX512-BF16, AMX-BF16 or Arm BF16)")
    needed = {"bf16": (bf16, "AVX512-BF16, AMX-BF16 or Arm BF16"), "fp16": (fp16, "AVX512-FP16, AMX-FP16 or Arm FP16")}
    if requested in needed:
        found, names = needed[requested]
        if not found:
            raise ConfigError(f"config key 'train.precision' is '{requested}' but this CPU lacks {names}; "
                              "allowed here: auto, fp32" + (", bf16" if bf16 else ""))
        return Precision(requested, f"train.precision {requested}: this CPU has {', '.join(found)}")
    return Precision("fp32", "train.precision fp32")


def _cuda(requested: str, device: torch.device) -> Precision:
    capability = torch.cuda.get_device_capability(device)
    gpu = f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]})"
    has_bf16 = capability >= (8, 0)
    has_fp16 = capability >= (7, 0) or capability in FULL_RATE_FP16
    if requested == "auto":
        if has_bf16:
            return Precision("bf16", f"train.precision auto: {gpu} computes in bf16")
        if has_fp16:
            return Precision("fp16", f"train.precision auto: {gpu} computes in fp16 but not bf16")
        return Precision("fp32", f"train.precision auto: {gpu} has no fast bf16 or fp16")
    if requested == "bf16" and not has_bf16:
        raise ConfigError(f"config key 'train.precision' is 'bf16' but {gpu} has no bf16 (needs 8.0 or newer); "
                          "allowed here: auto, fp32, fp16")
    slow = requested == "fp16" and not has_fp16
    return Precision(requested, f"train.precision {requested} on {gpu}"
                     + (" (no fast fp16 there: expect it slower than fp32)" if slow else ""))


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """The precision `train.precision` names on `device`; `auto` picks by the hardware."""
    if requested not in PRECISIONS:
        raise ConfigError(f"config key 'train.precision' is {requested!r}; allowed: {', '.join(PRECISIONS)}")
    return _cuda(requested, device) if device.type == "cuda" else _cpu(requested)
