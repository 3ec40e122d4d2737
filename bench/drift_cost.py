"""What the drift corrections cost a client per local step: `train_local` on one client's
rows with no correction, with FedProx's term (`train.proximal-mu`), and with FedProx and
SCAFFOLD's control variate (a correction for every trained tensor), interleaved in one
process so that the three see the same machine; median step seconds over the repeats.

    python -m bench.drift_cost --data-dir ../shared/data/ag_news --strategies fft_moe,fedavg_lora

Prints a Markdown table (one thread, the run config's precision, batches of 16 rows).
"""

from __future__ import annotations

import argparse
from statistics import median

import numpy as np

from bench.markdown import table
from fedmoe_app.client import ClientTask
from bench.kernels import torch_threads
from bench.learning import strategy_file
from fedmoe_app.config import load_config
from fedmoe_app.model import load_state, state_to_numpy
from fedmoe_app.train import train_local

VARIANTS = ("none", "fedprox", "fedprox + scaffold")


def step_seconds(strategy: str, data_dir: str, steps: int, repeats: int, mu: float) -> dict[str, float]:
    """Median seconds per local step of each variant for partition 0 of 10 of `strategy`'s default run."""
    config = load_config(strategy_file(strategy), f"data.data-dir={data_dir} data.max-train-rows=400")
    client = ClientTask(config, {"partition-id": 0, "num-partitions": 10})
    method = client.method({})
    model = method.global_model(config, 4)
    start = state_to_numpy(model)
    generator = np.random.default_rng(0)
    correction = {k: generator.normal(0, 1e-3, a.shape).astype(np.float32) for k, a in start.items()}
    batches = list(client.task.batches(client.train_set, 16, client.tokenizer.pad_token_id, shuffle=False,
                                       num_batches=steps))
    loss = client.task.batch_loss(client.data, 4)
    settings = {"none": (0.0, None), "fedprox": (mu, None), "fedprox + scaffold": (mu, correction)}
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with torch_threads(1):
        for _ in range(repeats):
            for variant in VARIANTS:
                load_state(model, start)
                proximal_mu, variant_correction = settings[variant]
                result = train_local(model, batches, len(batches), config.train.lr, 0.0, method, loss,
                                     proximal_mu=proximal_mu, correction=variant_correction)
                seconds[variant].append(result.step_seconds)
    return {v: median(s) for v, s in seconds.items()} | {"tensors": len(start)}


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--strategies", default="fft_moe,fedavg_lora")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--mu", type=float, default=0.01)
    args = parser.parse_args(argv)
    rows = []
    for strategy in args.strategies.split(","):
        found = step_seconds(strategy, args.data_dir, args.steps, args.repeats, args.mu)
        base = found["none"]
        rows.append([strategy, found["tensors"], *(f"{1000 * found[v]:.0f} ms ({found[v] / base:.2f}x)" for v in VARIANTS)])
    print(table(["strategy", "trained tensors", *(f"step, {v}" for v in VARIANTS)], rows))


if __name__ == "__main__":
    main()
