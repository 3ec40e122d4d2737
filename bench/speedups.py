"""Before/after of the optimisations, measured in one process on the same model and data:
length-grouped batches in evaluation (the server's and every client's per round) and in
local training steps (the padding the frozen backbone would otherwise compute)."""

from __future__ import annotations

import time

from bench.kernels import torch_threads
from fedmoe_app.budgets import load_tiers
from fedmoe_app.config import RunConfig
from fedmoe_app.batches import encode, iterate_batches
from fedmoe_app.data import load_splits, load_test_set
from fedmoe_app.methods import method_class
from fedmoe_app.model import build_model, num_layers
from fedmoe_app.backbones import load_tokenizer
from fedmoe_app.server import eval_max_length
from fedmoe_app.train import train_local
from fedmoe_app.tasks.classification import classifier_loss, evaluate_classifier


def _real_token_share(batches: list[dict]) -> float:
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    return real / sum(b["attention_mask"].numel() for b in batches)


def evaluation_speedup(config: RunConfig, repeats: int = 2) -> dict:
    """Server-side evaluation of the global MoE model on the test subsample, batches in
    data order (before) and grouped by length (after): seconds, accuracy of both."""
    tokenizer = load_tokenizer(config.model.backbone)
    test = encode(load_test_set(config.data, config.seed, config.eval.test_samples), tokenizer, eval_max_length(config))
    model = build_model(config, load_splits(config.data, config.seed).num_labels, "moe")
    out = {}
    for label, grouped in (("before", False), ("after", True)):
        batches = list(iterate_batches(test, config.eval.batch_size, tokenizer.pad_token_id, shuffle=False,
                                       group_by_length=grouped))
        times, result = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            result = evaluate_classifier(model, batches)
            times.append(time.perf_counter() - start)
        out[label] = {"seconds": min(times), "accuracy": result.accuracy, "real_token_share": _real_token_share(batches)}
    out["speedup"] = out["before"]["seconds"] / out["after"]["seconds"]
    return out


def training_step_speedup(config: RunConfig, tier: str, steps: int = 12) -> dict:
    """Seconds per local MoE training step of a `tier` client on random batches (before) and
    on random length-grouped batches (after), from the same initial model."""
    budget = load_tiers(config.devices.file)[tier]
    tokenizer = load_tokenizer(config.model.backbone)
    splits = load_splits(config.data, config.seed)
    train = encode(splits.train.select(range(min(len(splits.train), 50 * budget.batch_size))), tokenizer,
                   budget.max_length)
    held = list(range(min(budget.experts_held, config.moe.num_experts)))
    out = {"tier": tier, "batch_size": budget.batch_size, "steps": steps}
    for label, grouped in (("before", False), ("after", True)):
        model = build_model(config, splits.num_labels, "moe", held=[held] * num_layers(config), top_k=budget.top_k)
        batches = list(iterate_batches(train, budget.batch_size, tokenizer.pad_token_id, shuffle=True,
                                       seed=config.seed, num_batches=steps + 1, group_by_length=grouped))
        method = method_class("fft_moe")(config, budget, [], {})
        train_local(model, batches[:1], 1, config.train.lr, 0.0, method, classifier_loss())  # warm-up
        result = train_local(model, batches[1:], steps, config.train.lr, 0.0, method, classifier_loss())
        out[label] = {"step_seconds": result.step_seconds, "real_token_share": _real_token_share(batches[1:])}
    out["speedup"] = out["before"]["step_seconds"] / out["after"]["step_seconds"]
    return out


def measure_speedups(config: RunConfig, tier: str) -> dict:
    """Both before/after measurements, with one torch thread as a client uses."""
    with torch_threads(config.train.threads):
        return {"evaluation": evaluation_speedup(config), "training_step": training_step_speedup(config, tier)}
