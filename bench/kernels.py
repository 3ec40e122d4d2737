"""Micro-benchmarks on the training device: its measured matmul peak per dtype, and each
sparse MoE dispatch implementation against a dense layer doing the same k experts' work,
in float32 and in the low precision the hardware has."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from fedmoe_app.moe import DISPATCHES, BottleneckExperts, SparseMoE, pick_dispatch
from fedmoe_app.precision import Precision
from fedmoe_app.system import synchronize

IMPLEMENTATIONS = tuple(d for d in DISPATCHES if d != "auto")

CPU = torch.device("cpu")
WARMUP_CALLS = 20  # enough for the expert segment sizes met in training to be compiled once


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the `with` block with `threads` torch threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def best_seconds(work: Callable[[], None], repeats: int, warmup: int = 2, device: torch.device = CPU,
                 reduce: Callable[[list[float]], float] = min) -> float:
    """Fastest (or `reduce`d) wall time of `repeats` calls of `work` (after `warmup`
    calls), each until its work on `device` is done."""
    for _ in range(warmup):
        work()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return reduce(times)


def matmul_peak_gflops(threads: int = 1, size: int = 1024, repeats: int = 10, device: torch.device = CPU,
                       dtype: torch.dtype = torch.float32) -> float:
    """Measured matmul throughput (GFLOP/s) in `dtype` on `device` (with `threads` torch
    threads on a CPU): the physical ceiling a training step there can approach."""
    size = size if device.type == "cpu" else 4 * size  # a GPU needs larger products to fill
    with torch_threads(threads):
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        seconds = best_seconds(lambda: torch.mm(a, b), repeats, device=device)
    return 2 * size**3 / seconds / 1e9


def dense_bottleneck(hidden: int, width: int) -> nn.Module:
    """A dense two-layer FFN d -> width -> d (GELU), as one adapter expert of that width."""
    return nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, hidden))


def moe_and_dense(hidden: int, expert_hidden: int, num_experts: int, top_k: int, dispatch: str = "auto",
                  seed: int = 0) -> tuple[SparseMoE, nn.Module]:
    """A SparseMoE holding all `num_experts` experts with top-`top_k` routing, and the dense
    layer that does the same expert work for every token: one bottleneck of width k * h."""
    torch.manual_seed(seed)
    experts = BottleneckExperts(hidden, expert_hidden, range(num_experts), init_scale=0.02)
    return SparseMoE(hidden, num_experts, experts, top_k, dispatch=dispatch), dense_bottleneck(hidden, top_k * expert_hidden)


def dispatch_ratio(hidden: int, expert_hidden: int, num_experts: int, top_k: int, tokens: int, dispatch: str,
                   precision: Precision, threads: int = 1, repeats: int = 10, device: torch.device = CPU) -> dict:
    """Mean forward+backward seconds on `device`, in `precision`, of the sparse MoE (k of M
    experts, `dispatch`) and of the dense equivalent on `tokens` tokens, and their ratio
    (1.0 = dispatch costs nothing). Every call routes new random tokens, as training does,
    so the tokens per expert (the shapes of its products) change from call to call; the
    first WARMUP_CALLS calls are not timed."""
    with torch_threads(threads):
        moe, dense = (layer.to(device) for layer in moe_and_dense(hidden, expert_hidden, num_experts, top_k, dispatch))
        inputs = [torch.randn(tokens, hidden, device=device, requires_grad=True) for _ in range(repeats + WARMUP_CALLS)]

        def step(layer: nn.Module, calls: Iterator[torch.Tensor]) -> Callable[[], None]:
            def work() -> None:
                with precision.autocast(device):
                    out = layer(next(calls))
                (out[0] if isinstance(out, tuple) else out).float().sum().backward()
            return work

        moe_s, dense_s = (best_seconds(step(layer, iter(inputs)), repeats, WARMUP_CALLS, device, statistics.mean)
                          for layer in (moe, dense))
    return {"num_experts": num_experts, "top_k": top_k, "tokens": tokens, "precision": precision.name,
            "dispatch": dispatch, "moe_ms": moe_s * 1e3, "dense_ms": dense_s * 1e3, "ratio": moe_s / dense_s}


def kernel_cases(hidden: int, expert_hidden: int, cases: Sequence[tuple[int, int]], tokens: int,
                 precisions: Sequence[Precision], threads: int = 1, device: torch.device = CPU) -> list[dict]:
    """`dispatch_ratio` of every implementation for each (M, k) and precision; `auto` marks
    the implementation `pick_dispatch` chooses there."""
    rows = []
    for precision in precisions:
        chosen = pick_dispatch(device, precision.dtype)
        for num_experts, top_k in cases:
            for dispatch in IMPLEMENTATIONS:
                row = dispatch_ratio(hidden, expert_hidden, num_experts, top_k, tokens, dispatch, precision, threads,
                                     device=device)
                rows.append({**row, "auto": dispatch == chosen})
    return rows
