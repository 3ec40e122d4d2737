"""Instruction tuning on the tiny random-initialised decoders: every applicable method on every
family, federated in this process (the ClientApp's own handlers answer, as in the tests),
on the commonsense data. Per run: global held-out loss per round, option accuracy per
benchmark after the last round, step seconds and peak RSS per tier, bytes per round.

With `--costs`: one local round of a client of each tier, each in a process of its own, per
family and method: seconds per local step and the process's peak resident memory (in the
federated runs every client shares one process, so their RSS is not a tier's).

With `--generation`: seconds to answer test prompts by greedy generation (eval.scoring:
generate) with the key / value cache against recomputing the whole sequence every token,
one thread, per family; both must pick the same answers.

The backbones are random: accuracy sits near chance (1/4 for ARC, 1/2 for BoolQ) and says
nothing of what a pretrained model would reach; the loss falling says adapters and
aggregation learn the output format, which is what these runs can show.

    python -m bench.instruction --data-dir ../shared/data/commonsense --out results/instruction
    python -m bench.instruction --costs --strategies fedavg_lora,ub_smoe --out results/instruction
    python -m bench.instruction --generation --backbones tiny-llama,tiny-olmoe --out results/instruction
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.markdown import table as markdown_table
from fedmoe_app.backbones import DENSE_DECODERS, MOE_DECODERS, end_of_sequence_id, load_tokenizer
from fedmoe_app.config import load_config
from fedmoe_app.methods import METHODS, method_class
from fedmoe_app.model import build_model, num_layers, state_to_numpy
from fedmoe_app.records import to_record
from fedmoe_app.server import GlobalEvaluator
from fedmoe_app.tasks.instruction import encode_choices, extract_answer, generated_choices
from fedmoe_app.tasks.instruction_data import read_jsonl
from strategies import make_strategy

METHODS_FOR_LM = [name for name, cls in METHODS.items() if cls.adapter != "head"]


def completed(config):
    """`config` as the ServerApp completes it from the data before any client is asked."""
    from fedmoe_app.tasks import task_of

    task = task_of(config)
    return task.completed_config(task.splits())


def run_one(strategy: str, backbone: str, data_dir: str, rounds: int, nodes: int, overrides: str) -> dict:
    """One in-process federated run; its round records condensed."""
    from flwr.supercore.task_identity import TaskIdentity

    from bench.in_process import InProcessGrid

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1
    config = completed(load_config(f"conf/{strategy}.yaml,conf/instruction.yaml",
                                   f"model.backbone={backbone} rounds={rounds} data.data-dir={data_dir} {overrides}"))
    model = method_class(strategy).global_model(config, 0)
    records: list[dict] = []
    start = time.perf_counter()
    make_strategy(config, num_layers(config), on_round=records.append).start(
        InProcessGrid(nodes), to_record(state_to_numpy(model)), num_rounds=rounds,
        evaluate_fn=GlobalEvaluator(config, model))
    trained = [r for r in records if r["round"] > 0]
    return {
        "strategy": strategy, "backbone": backbone, "seconds": time.perf_counter() - start,
        "loss": [r["global_loss"] for r in records],
        "accuracy": records[-1]["global_accuracy"],
        "accuracy_by_benchmark": records[-1]["global_accuracy_by_benchmark"],
        "step_seconds": trained[-1]["step_seconds"], "peak_rss_mb": trained[-1]["peak_rss_mb"],
        "bytes_per_round": sum(sum(r["bytes_down"].values()) + sum(r["bytes_up"].values()) for r in trained) / len(trained),
        "failures": sum(r["failures"] for r in trained),
    }


def client_cost(strategy: str, backbone: str, tier: str, data_dir: str, overrides: str) -> dict:
    """One local round of a `tier` client (partition 0 of 3) in this process: its step seconds and peak RSS."""
    from fedmoe_app.client import ClientTask
    from fedmoe_app.system import peak_rss_mb

    config = completed(load_config(f"conf/{strategy}.yaml,conf/instruction.yaml",
                                   f"model.backbone={backbone} data.data-dir={data_dir} {overrides}"))
    task = ClientTask(config, {"partition-id": 0, "num-partitions": 3, "device-tier": tier})
    from strategies.replies import Node

    server = make_strategy(config, num_layers(config))  # what the server sends a node of this tier in round 1
    server.global_arrays = state_to_numpy(method_class(strategy).global_model(config, 0))
    node = Node(1, "client-1", task.budget, len(task.data.train_index))
    server.nodes = {1: node}
    _, metrics, _, _ = task.train(server.arrays_for(node, 1), {"server-round": 1, **server.config_for(node, 1)})
    return {"strategy": strategy, "backbone": backbone, "tier": tier, "step_seconds": metrics["step-seconds"],
            "steps": metrics["steps"], "batch_size": task.budget.batch_size, "max_length": task.budget.max_length,
            "experts_per_token": getattr(task.method({}), "experts_per_token", lambda: None)(),
            "peak_rss_mb": peak_rss_mb()}


def costs(args) -> list[dict]:
    """`client_cost` of every family, method and tier, each in a fresh process."""
    rows = []
    for backbone in args.backbones.split(","):
        for strategy in args.strategies.split(","):
            for tier in ("rpi4", "jetson-nano", "jetson-orin"):
                done = subprocess.run([sys.executable, "-m", "bench.instruction", "--one-cost", strategy, backbone, tier,
                                       "--data-dir", args.data_dir, "--overrides", args.overrides],
                                      capture_output=True, text=True, check=True)
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def cost_table(rows: list[dict]) -> str:
    """A markdown table of the per-tier client costs."""
    header = ["backbone", "method", "tier", "batch x length", "experts per token", "s / local step", "peak RSS MB"]
    return markdown_table(header, [[r["backbone"], r["strategy"], r["tier"], f"{r['batch_size']} x {r['max_length']}",
                                    f"{r['experts_per_token'] or '-'}", f"{r['step_seconds']:.3f}", f"{r['peak_rss_mb']:.0f}"]
                                   for r in rows])


def greedy_by_recomputing(model, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """Greedy continuation of `prompt`, recomputing the whole sequence for every new token:
    the reference the cached decoding is timed against."""
    ids = torch.tensor([prompt])
    for _ in range(max_new_tokens):
        token = int(model(ids, torch.ones_like(ids), positions=torch.tensor([ids.shape[1] - 1])).argmax())
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        if token == eos:
            break
    return ids[0, len(prompt):].tolist()


@torch.no_grad()
def generation_cost(backbone: str, data_dir: str, prompts: int = 30, max_new_tokens: int = 32) -> dict:
    """Seconds to generate for `prompts` BoolQ test prompts with the cache and by recomputing
    (best of two), fft_moe adapters (backbone experts on a native MoE family), fp32, one thread."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    strategy = "hfedmoe" if backbone in MOE_DECODERS else "fft_moe"
    config = load_config(f"conf/{strategy}.yaml,conf/instruction.yaml",
                         f"model.backbone={backbone} train.precision=fp32 instruction.max-new-tokens={max_new_tokens}")
    model = build_model(config, 0, "moe")
    model.train(False)
    tokenizer = load_tokenizer(backbone)
    rows = read_jsonl(Path(data_dir) / "test" / "boolq.jsonl")
    choices = encode_choices(rows.select(range(prompts)), tokenizer, 256, "alpaca")
    eos = end_of_sequence_id(tokenizer)
    seconds = {"cached": [], "recomputed": []}
    for _ in range(2):
        start = time.perf_counter()
        cached = generated_choices(model, choices, max_new_tokens, tokenizer)
        seconds["cached"].append(time.perf_counter() - start)
        start = time.perf_counter()
        recomputed = [extract_answer(tokenizer.decode(greedy_by_recomputing(model, prompt, max_new_tokens, eos),
                                                      skip_special_tokens=True), words)
                      for prompt, words in zip(choices.prompts, choices.option_words)]
        seconds["recomputed"].append(time.perf_counter() - start)
    if cached != recomputed:
        raise RuntimeError(f"{backbone}: cached decoding picked {cached}, recomputing {recomputed}")
    return {"backbone": backbone, "strategy": strategy, "prompts": prompts, "max_new_tokens": max_new_tokens,
            "cached_s": min(seconds["cached"]), "recomputed_s": min(seconds["recomputed"])}


def generation_table(rows: list[dict]) -> str:
    """A markdown table of `generation_cost` rows."""
    header = ["backbone", "adapters", "prompts x new tokens", "cached s", "recomputed s", "speed-up"]
    return markdown_table(header, [[r["backbone"], r["strategy"], f"{r['prompts']} x {r['max_new_tokens']}", f"{r['cached_s']:.2f}",
                                    f"{r['recomputed_s']:.2f}", f"{r['recomputed_s'] / r['cached_s']:.2f}x"] for r in rows])


def table(rows: list[dict]) -> str:
    """A markdown table of the federated runs (step times and memory: `--costs`, each client
    alone in its process; here every client shares one process)."""
    header = ["backbone", "method", "global loss by round (0 = before training)", "accuracy: mean; per benchmark", "MB per round"]
    cells = []
    for r in rows:
        loss = " ".join(f"{x:.2f}" for x in r["loss"])
        bench = ", ".join(f"{k} {v:.2f}" for k, v in (r["accuracy_by_benchmark"] or {}).items())
        cells.append([r["backbone"], r["strategy"], loss, f"{r['accuracy']:.3f}; {bench}", f"{r['bytes_per_round'] / 1e6:.2f}"])
    return markdown_table(header, cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/commonsense")
    parser.add_argument("--out", default="results/instruction")
    parser.add_argument("--backbones", default=",".join(DENSE_DECODERS + MOE_DECODERS))
    parser.add_argument("--strategies", default=",".join(METHODS_FOR_LM))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--overrides", default="data.max-train-rows=600 eval.test-samples=20 "
                        "eval.final-test-samples=20")
    parser.add_argument("--costs", action="store_true", help="per-tier client costs instead of federated runs")
    parser.add_argument("--generation", action="store_true", help="greedy generation: cached against recomputed")
    parser.add_argument("--report", action="store_true", help="only print the tables of the JSON files in --out")
    parser.add_argument("--one-cost", nargs=3, metavar=("STRATEGY", "BACKBONE", "TIER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    data_dir = str(Path(args.data_dir).resolve())
    if args.one_cost:
        print(json.dumps(client_cost(*args.one_cost, data_dir, args.overrides)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        for name, render in (("instruction", table), ("costs", cost_table), ("generation", generation_table)):
            if (out / f"{name}.json").is_file():
                print(render(json.loads((out / f"{name}.json").read_text())) + "\n")
        return
    if args.generation:
        rows = [generation_cost(backbone, data_dir) for backbone in args.backbones.split(",")]
        (out / "generation.json").write_text(json.dumps(rows, indent=1) + "\n")
        (out / "generation.md").write_text(generation_table(rows) + "\n")
        print(generation_table(rows))
        return
    if args.costs:
        args.data_dir = data_dir
        rows = costs(args)
        (out / "costs.json").write_text(json.dumps(rows, indent=1) + "\n")
        (out / "costs.md").write_text(cost_table(rows) + "\n")
        print(cost_table(rows))
        return
    rows = []
    for backbone in args.backbones.split(","):
        for strategy in args.strategies.split(","):
            rows.append(run_one(strategy, backbone, data_dir, args.rounds, args.nodes, args.overrides))
            print(json.dumps(rows[-1]), flush=True)
            (out / "instruction.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "instruction.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
