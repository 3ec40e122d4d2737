"""Micro-benchmarks on the training device: its measured matmul peak, and the sparse MoE
layer against a dense layer doing the same k experts' work."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from fedmoe_app.moe import BottleneckExpert, SparseMoE
from fedmoe_app.system import synchronize

CPU = torch.device("cpu")


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the `with` block with `threads` torch threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def best_seconds(work: Callable[[], None], repeats: int, warmup: int = 2, device: torch.device = CPU) -> float:
    """Fastest wall time of `repeats` calls of `work` (after `warmup` calls), each until
    its work on `device` is done."""
    for _ in range(warmup):
        work()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak_gflops(threads: int = 1, size: int = 1024, repeats: int = 10, device: torch.device = CPU) -> float:
    """Measured float32 matmul throughput (GFLOP/s) on `device` (with `threads` torch
    threads on a CPU): the physical ceiling a training step there can approach."""
    size = size if device.type == "cpu" else 4 * size  # a GPU needs larger products to fill
    with torch_threads(threads):
        a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
        seconds = best_seconds(lambda: torch.mm(a, b), repeats, device=device)
    return 2 * size**3 / seconds / 1e9


def moe_and_dense(hidden: int, expert_hidden: int, num_experts: int, top_k: int, seed: int = 0):
    """A SparseMoE holding all `num_experts` experts with top-`top_k` routing, and the dense
    layer that does the same expert work for every token: one bottleneck of width k * h."""
    torch.manual_seed(seed)
    experts = {e: BottleneckExpert(hidden, expert_hidden, init_scale=0.02) for e in range(num_experts)}
    moe = SparseMoE(hidden, num_experts, experts, top_k)
    dense = BottleneckExpert(hidden, top_k * expert_hidden, init_scale=0.02)
    return moe, dense


def dispatch_ratio(hidden: int, expert_hidden: int, num_experts: int, top_k: int, tokens: int,
                   threads: int = 1, repeats: int = 10, device: torch.device = CPU) -> dict[str, float]:
    """Forward+backward seconds on `device` of the sparse MoE (k of M experts) and of the
    dense equivalent on `tokens` tokens, and their ratio (1.0 = dispatch costs nothing)."""
    with torch_threads(threads):
        moe, dense = (layer.to(device) for layer in moe_and_dense(hidden, expert_hidden, num_experts, top_k))
        x = torch.randn(tokens, hidden, device=device, requires_grad=True)

        def moe_step() -> None:
            out, _ = moe(x)
            out.sum().backward()

        def dense_step() -> None:
            dense(x).sum().backward()

        moe_s, dense_s = best_seconds(moe_step, repeats, device=device), best_seconds(dense_step, repeats, device=device)
    return {"num_experts": num_experts, "top_k": top_k, "tokens": tokens, "moe_ms": moe_s * 1e3,
            "dense_ms": dense_s * 1e3, "ratio": moe_s / dense_s}
