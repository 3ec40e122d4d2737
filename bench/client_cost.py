"""What one client of a tier pays for one round of a strategy, measured in a fresh process
(so its peak resident memory is its own): seconds per local step, FLOPs per step counted
by torch's FLOP counter and the FFN's share of them, bytes down and up (in the wire dtype),
and their ratio to the full adapter set, at the configured precision. Seconds and FLOPs per
step are also measured at one shape for every tier (`REFERENCE_BATCH` rows of the tier's
max-length), so tiers compare at the same batch and length.

Usage: python -m bench.client_cost --strategy fft_moe --tier rpi4 [--data-dir DIR]
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fedmoe_app import messages as msg
from fedmoe_app.batches import iterate_batches
from fedmoe_app.client import ClientTask
from fedmoe_app.config import APP_DIR, load_config
from fedmoe_app.data import load_splits
from fedmoe_app.methods import method_class
from fedmoe_app.methods.base import ClientMethod
from fedmoe_app.model import num_layers, state_to_numpy
from fedmoe_app.records import record_nbytes, to_record, updates_from
from fedmoe_app.system import peak_rss_mb
from fedmoe_app.train import model_device, to_device, train_local
from fedmoe_app.tasks.classification import classifier_loss
from strategies import make_strategy
from strategies.base import Node

FLOP_BATCHES = 2
REFERENCE_BATCH = 8  # rows per step of the same-shape comparison (the smallest tier's batch)
REFERENCE_STEPS = 8
# The FFN of a layer, by module name: a BERT layer's intermediate and output blocks (with
# any MoE in them), a decoder layer's mlp.
FFN_MODULE = re.compile(r"\.(encoder\.layer\.\d+\.(intermediate|output)|layers\.\d+\.mlp)$")


def step_flops(model, batches, method: ClientMethod) -> tuple[float, float]:
    """Mean FLOPs of one training step (forward, the task loss and the method's terms,
    backward) over `batches`, and the FFNs' share of the forward FLOPs (the counter's
    per-module figures are exact in the forward pass only; a frozen FFN's backward is
    about its forward again, so the share of the step is about the same)."""
    model.train()
    device = model_device(model)
    for moe in model.moe_layers:  # the FLOP counter counts F.linear, not torch._grouped_mm: same work
        moe.dispatch = "segmented"
    total = forward = ffn = 0
    for batch in batches:
        batch = to_device(batch, device)
        with FlopCounterMode(display=False) as counter:
            logits = model(batch["input_ids"], batch["attention_mask"])
            loss = F.cross_entropy(logits, batch["labels"]) + method.loss_terms(model)
        forward += counter.get_total_flops()
        ffn += sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if FFN_MODULE.search(name))
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        total += counter.get_total_flops()
        model.zero_grad(set_to_none=True)
    model.train(False)
    return (forward + total) / len(batches), ffn / max(forward, 1)


def reference_shape_cost(task: ClientTask, down, server, config) -> dict:
    """Seconds (mean over REFERENCE_STEPS steps, after one warm-up step) and FLOPs per
    training step at REFERENCE_BATCH rows of the tier's max-length."""
    batches = list(iterate_batches(task.train_set, REFERENCE_BATCH, task.tokenizer.pad_token_id, shuffle=True,
                                   seed=config.seed, num_batches=REFERENCE_STEPS + 1,
                                   group_by_length=config.train.group_by_length))
    method = task.method(server)
    model = task.model(method, down)
    train_local(model, batches[:1], 1, config.train.lr, 0.0, method, classifier_loss())  # warm-up: kernels for this shape
    timed = train_local(model, batches[1:], REFERENCE_STEPS, config.train.lr, 0.0, task.method(server), classifier_loss())
    flops, ffn_share = step_flops(task.model(method, down), batches[:FLOP_BATCHES], method)
    return {"reference_batch": REFERENCE_BATCH, "reference_step_seconds": timed.step_seconds,
            "reference_step_gflops": flops / 1e9, "reference_ffn_share": ffn_share}


def measure(strategy_name: str, tier: str, overrides: str, num_clients: int = 10) -> dict:
    """One client of `tier` training one round of `strategy_name` from the initial global model."""
    config = load_config(f"conf/{strategy_name}.yaml", overrides)
    strategy = make_strategy(config, num_layers(config))
    task = ClientTask(config, {"device-tier": tier, "partition-id": 0, "num-partitions": num_clients})
    model = method_class(strategy_name).global_model(config, load_splits(config.data, config.seed).num_labels)
    strategy.global_arrays = state_to_numpy(model)
    budget = task.budget
    node = Node(1, "bench", budget, len(task.data.train_index))
    down = strategy.arrays_for(node, 1)
    server = {**strategy.config_for(node, 1), msg.SERVER_ROUND: 0}
    task.train(down, server)  # warm-up round: allocator, caches, lazy imports
    trained, metrics, _, _ = task.train(down, {**server, msg.SERVER_ROUND: 1})
    batches = list(iterate_batches(task.train_set, budget.batch_size, task.tokenizer.pad_token_id, shuffle=True,
                                   seed=config.seed, num_batches=FLOP_BATCHES,
                                   group_by_length=config.train.group_by_length))
    method = task.method(server)
    client_model = task.model(method, down)
    flops, ffn_share = step_flops(client_model, batches, method)
    reference = reference_shape_cost(task, down, server, config)
    wire = config.federation.wire_dtype
    full = record_nbytes(to_record(strategy.global_arrays, wire))
    up = record_nbytes(to_record(updates_from(trained, down), wire))
    down_bytes = record_nbytes(to_record(down, wire))
    return {
        "strategy": strategy_name, "tier": tier, "threads": config.train.threads,
        "precision": client_model.precision.name, "wire_dtype": wire,
        "batch_size": budget.batch_size, "max_length": budget.max_length, "local_steps": budget.local_steps,
        "experts_held": budget.experts_held, "experts_per_token": method.experts_per_token()
        if hasattr(method, "experts_per_token") else None, "experts_trained": budget.experts_trained,
        "step_seconds": float(metrics[msg.STEP_SECONDS]), "train_seconds": float(metrics[msg.TRAIN_SECONDS]),
        "step_gflops": flops / 1e9, "achieved_gflops_per_s": flops / 1e9 / float(metrics[msg.STEP_SECONDS]),
        "ffn_share": ffn_share, **reference,
        "bytes_down": down_bytes, "bytes_up": up, "full_adapter_bytes": full,
        "bytes_up_ratio": up / full, "bytes_down_ratio": down_bytes / full,
        "trainable_params": sum(a.size for a in trained.values()),
        "peak_rss_mb": peak_rss_mb(),
    }


def measure_in_subprocess(strategy: str, tier: str, overrides: str, timeout_s: float = 900) -> dict:
    """`measure` in a fresh Python process (its own peak memory); the JSON it prints."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.client_cost", "--strategy", strategy, "--tier", tier,
         "--overrides", overrides], cwd=APP_DIR, capture_output=True, text=True, timeout=timeout_s,
    )
    if done.returncode != 0:
        raise RuntimeError(f"client cost of {strategy} / {tier} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    """Command line: measure one (strategy, tier) and print the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--tier", required=True)
    parser.add_argument("--overrides", default="")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.strategy, args.tier, args.overrides)))


if __name__ == "__main__":
    main()
