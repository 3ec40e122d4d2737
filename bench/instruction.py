"""Instruction tuning on the tiny random-initialised decoders: every applicable method on every
family, federated in this process (the ClientApp's own handlers answer, as in the tests),
on the commonsense data. Per run: global held-out loss per round, option accuracy per
benchmark after the last round, step seconds and peak RSS per tier, bytes per round.

The backbones are random: accuracy sits near chance (1/4 for ARC, 1/2 for BoolQ) and says
nothing of what a pretrained model would reach; the loss falling says adapters and
aggregation learn the output format, which is what these runs can show.

    python -m bench.instruction --data-dir ../shared/data/commonsense --out results/instruction
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from fedmoe_app.backbones import DENSE_DECODERS, MOE_DECODERS
from fedmoe_app.config import load_config
from fedmoe_app.methods import METHODS, method_class
from fedmoe_app.model import num_layers, state_to_numpy
from fedmoe_app.records import to_record
from fedmoe_app.server import GlobalEvaluator
from strategies import make_strategy

METHODS_FOR_LM = [name for name, cls in METHODS.items() if cls.adapter != "head"]


def run_one(strategy: str, backbone: str, data_dir: str, rounds: int, nodes: int, overrides: str) -> dict:
    """One in-process federated run; its round records condensed."""
    from tests.conftest import InProcessGrid  # the same in-process grid the tests use
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1
    config = load_config(f"conf/{strategy}.yaml,conf/instruction.yaml",
                         f"model.backbone={backbone} rounds={rounds} data.data-dir={data_dir} {overrides}")
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


def table(rows: list[dict]) -> str:
    """A markdown table of the runs."""
    lines = ["| backbone | method | loss by round | accuracy (mean; per benchmark) | step s by tier | peak RSS MB by tier | MB per round |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = " ".join(f"{x:.2f}" for x in r["loss"])
        bench = ", ".join(f"{k} {v:.2f}" for k, v in (r["accuracy_by_benchmark"] or {}).items())
        steps = ", ".join(f"{k} {v:.3f}" for k, v in r["step_seconds"].items())
        rss = ", ".join(f"{k} {v:.0f}" for k, v in r["peak_rss_mb"].items())
        lines.append(f"| {r['backbone']} | {r['strategy']} | {loss} | {r['accuracy']:.3f}; {bench} | {steps} | {rss} | "
                     f"{r['bytes_per_round'] / 1e6:.2f} |")
    return "\n".join(lines)


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
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for backbone in args.backbones.split(","):
        for strategy in args.strategies.split(","):
            rows.append(run_one(strategy, backbone, str(Path(args.data_dir).resolve()), args.rounds, args.nodes,
                                args.overrides))
            print(json.dumps(rows[-1]), flush=True)
            (out / "instruction.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "instruction.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
