"""What moves the global model in a run's last round.

One run in this process (the server's own strategy, the ClientApp's own handlers:
`bench/in_process.py`), keeping the checkpoint of every round. Then the last round is
re-run from the checkpoint before it, once per variant (run-config overrides, one setting
changed at a time), and every model is scored on the same test rows. The kept last round
is also split by tensor group: the model before it with only its experts, its routers or
the rest (head, LoRA) taken from after it, to show which group's update moved the score.

    python -m bench.last_round --strategy fft_moe --seed 1 --data-dir ../shared/data/ag_news \\
        --variants "train.lr=0.0005" "train.logit-adjustment=1.0"

Runs with the same strategy, seed and overrides reuse the kept checkpoints (`--out`).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from bench.in_process import InProcessGrid
from bench.markdown import table
from fedmoe_app.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedmoe_app.config import RunConfig, load_config
from fedmoe_app.methods import method_class
from fedmoe_app.model import num_layers, state_to_numpy
from fedmoe_app.names import expert_of, router_layer
from fedmoe_app.records import to_record
from fedmoe_app.server import GlobalEvaluator
from strategies import make_strategy

GROUPS = ("experts", "routers", "rest")


def group_of(key: str) -> str:
    """The tensor group of a global-model key: experts, routers, or the rest (head, LoRA)."""
    if expert_of(key) is not None:
        return "experts"
    return "routers" if router_layer(key) is not None else "rest"


def with_group(before: dict[str, np.ndarray], after: dict[str, np.ndarray], group: str) -> dict[str, np.ndarray]:
    """`before` with the tensors of `group` taken from `after`."""
    return {key: (after[key] if group_of(key) == group else value) for key, value in before.items()}


def change_by_group(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> dict[str, float]:
    """Per group present, the norm of the change divided by the norm before."""
    out = {}
    for group in GROUPS:
        keys = [k for k in before if group_of(k) == group]
        if keys:
            change = sum(float(np.sum((after[k].astype(np.float64) - before[k]) ** 2)) for k in keys)
            size = sum(float(np.sum(before[k].astype(np.float64) ** 2)) for k in keys)
            out[group] = (change / max(size, 1e-30)) ** 0.5
    return out


def _run(config: RunConfig, num_nodes: int, initial: dict[str, np.ndarray], first_round: int,
         state: Checkpoint | None, keep: Path | None) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Rounds `first_round`..last in this process; the round records and the final arrays.
    With `keep`, every round's checkpoint goes to keep/round-<n>."""
    records: list[dict] = []
    last: dict[str, np.ndarray] = {}

    def on_checkpoint(checkpoint: Checkpoint) -> None:
        last.clear()
        last.update(checkpoint.arrays)
        if keep is not None:
            folder = keep / f"round-{checkpoint.server_round}"
            folder.mkdir(parents=True, exist_ok=True)
            save_checkpoint(folder, checkpoint)

    strategy = make_strategy(config, num_layers(config), records.append, on_checkpoint)
    if state is not None:
        strategy.load_state_dict(state.strategy_state)
        strategy.load_state_arrays(state.strategy_arrays, state.arrays)
    strategy.start(InProcessGrid(num_nodes), to_record(initial), num_rounds=config.rounds, first_round=first_round)
    return records, last


def keep_rounds(config: RunConfig, num_nodes: int, keep: Path) -> list[dict]:
    """Run `config` with `num_nodes` nodes from its initial model, keeping every round's
    checkpoint in keep/round-<n> (reused when the last one is there); the round records
    (empty when reused)."""
    if (keep / f"round-{config.rounds}").is_dir():
        return []
    shutil.rmtree(keep, ignore_errors=True)
    initial = state_to_numpy(method_class(config.strategy).global_model(config, config_labels(config)))
    return _run(config, num_nodes, initial, 1, None, keep)[0]


def rerun_last_round(config: RunConfig, num_nodes: int, keep: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The last round re-run under `config` from the kept checkpoint before it: its round
    record and the arrays after it."""
    before = load_checkpoint(keep / f"round-{config.rounds - 1}")
    records, arrays = _run(config, num_nodes, before.arrays, config.rounds, before, None)
    return records[-1], arrays


def config_labels(config: RunConfig) -> int:
    """The number of labels of the configured task's data."""
    from fedmoe_app.tasks import task_of

    return task_of(config).splits().num_labels


def report(config_file: str, overrides: str, num_nodes: int, keep: Path, variants: list[str], test_rows: int) -> str:
    """The Markdown tables for the run of `config_file` with `overrides`: each variant's
    re-run last round, and the kept one split by tensor group."""
    config = load_config(config_file, overrides)
    keep_rounds(config, num_nodes, keep)
    scored = load_config(config_file, f"{overrides} eval.test-samples={test_rows}")
    evaluate = GlobalEvaluator(scored, method_class(config.strategy).global_model(scored, config_labels(config)))

    def score(arrays: dict[str, np.ndarray]) -> str:
        metrics = evaluate(1, to_record(arrays))
        return f"{100 * metrics['accuracy']:.1f} / {metrics['loss']:.3f}"

    before = load_checkpoint(keep / f"round-{config.rounds - 1}").arrays
    after = load_checkpoint(keep / f"round-{config.rounds}").arrays
    rows = [[f"(round {config.rounds - 1}'s model)", score(before), "-", "-"],
            [f"(round {config.rounds} as run)", score(after), "-", "-"]]
    for variant in variants:
        record, arrays = rerun_last_round(load_config(config_file, f"{overrides} {variant}"), num_nodes, keep)
        rows.append([variant or "the run's settings", score(arrays), f"{record['lr']:.2e}", f"{record['train_loss']:.3f}"])
    changes = change_by_group(before, after)
    split = [[group, f"{changes[group]:.4f}", score(with_group(before, after, group))] for group in changes]
    return "\n\n".join([
        table(["last round re-run with", "global accuracy % / loss", "rate", "clients' train loss"], rows),
        table([f"round {config.rounds - 1}'s model with round {config.rounds}'s", "relative change",
               "global accuracy % / loss"], split)])


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    from flwr.supercore.task_identity import TaskIdentity

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", default="fft_moe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--overrides", default="", help="run-config overrides of the run itself")
    parser.add_argument("--variants", nargs="*", default=[""], help="overrides, one re-run of the last round each")
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--test-rows", type=int, default=2000, help="test rows every model is scored on (0: all)")
    parser.add_argument("--out", default="results/last_round")
    args = parser.parse_args(argv)
    overrides = " ".join(filter(None, [f"seed={args.seed}", f"data.data-dir={args.data_dir}" if args.data_dir else "",
                                       "eval.client=false", args.overrides]))
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1  # messages outside a Flower run
    keep = Path(args.out) / f"{args.strategy}-s{args.seed}" / (args.overrides.replace(" ", "_") or "defaults")
    print(report(f"conf/{args.strategy}.yaml", overrides, args.nodes, keep, args.variants, args.test_rows))


if __name__ == "__main__":
    main()
