"""Label-skew remedies and server optimisers in the headline cell (Dirichlet 0.1, mixed
tiers, 10 clients, AG News): each strategy with each variant (a set of run-config
overrides), over seeds; the final global accuracy, its lowest per-class recall and
personalised accuracy, with paired per-seed differences against the same strategy's
`none` variant. It picks the settings the headline benchmark runs every strategy with.

Usage: python -m bench.remedies --data-dir ../shared/data/ag_news --out results/remedies
       [--strategies fft_moe,head_only] [--variants none,la,rs] [--seeds 0] [--rounds 10]
       [--test-samples 500] [--smoke]
Writes <out>/remedies.md and remedies.json; finished runs under <out>/remedies-runs-<rows>-rows/
are reused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.headline import lowest_recall
from bench.learning import cell_metrics, cell_name, simulate
from bench.markdown import table as markdown_table
from bench.paired import paired, spread
from bench.simulation import LocalSimulation
from bench.suites import HEADLINE, PARTITIONS, SMOKE_OVERRIDES
from fedmoe_app.config import ConfigError, resolve_path
from fedmoe_app.results import to_json_safe
from strategies import STRATEGIES

LA = "train.logit-adjustment=1.0"
RS = "train.restricted-softmax=0.5"
# label -> run-config overrides
VARIANTS = {
    "none": "",
    "la": LA,  # balanced softmax (Menon et al.'s logit adjustment with tau = 1)
    "rs": RS,  # FedRS with its paper's alpha
    "la-rs": f"{LA} {RS}",
    "la-avgm": f"{LA} federation.server-optimizer=avgm federation.server-lr=1.0 federation.server-momentum=0.5",
    "la-adam": f"{LA} federation.server-optimizer=adam federation.server-lr=0.003",
    "la-yogi": f"{LA} federation.server-optimizer=yogi federation.server-lr=0.003",
    "ccvr": "calibration.method=ccvr",  # the head refitted after the last round (bench.calibration measures it
    # on finished runs without training again)
}
NUM_CLIENTS = 10


def run_variants(strategies: list[str], variants: list[str], seeds: list[int], rounds: int, test_samples: int,
                 runs_dir: Path, data_dir: str, extra: str, log=print) -> list[dict]:
    """Run (or reuse) every (strategy, variant, seed) in the headline cell; one dict per run."""
    partition, mix = HEADLINE
    found = []
    with LocalSimulation(runs_dir / ".flwr", NUM_CLIENTS) as simulation:
        for seed in seeds:
            for strategy in strategies:
                for variant in variants:
                    name = cell_name(f"{strategy}+{variant}", partition, mix, seed)
                    overrides = " ".join(filter(None, [
                        f"rounds={rounds} seed={seed} run-name={name} eval.every={max(1, rounds // 2)}",
                        f"eval.final-test-samples={test_samples}", f"data.data-dir={data_dir}" if data_dir else "",
                        PARTITIONS[partition], VARIANTS[variant], extra]))
                    run_dir = simulate(simulation, runs_dir, name, strategy, overrides, False, log)
                    metrics = cell_metrics(run_dir, target=0.85)
                    found.append({"strategy": strategy, "variant": variant, "seed": seed,
                                  "global_accuracy": metrics["final_global_accuracy"],
                                  "lowest_recall": lowest_recall(metrics["final_global_recall"]),
                                  "recall": metrics["final_global_recall"], "test_rows": metrics["final_test_rows"],
                                  "client_accuracy_mean": metrics["client_accuracy_mean"], "run_dir": str(run_dir)})
    return found


def table(runs: list[dict]) -> list[str]:
    """Markdown: per strategy and variant, mean +- std over seeds, and the paired difference
    of global accuracy against the strategy's `none` variant."""
    header = ["strategy", "variant", "seeds", "global", "lowest class recall", "personalised", "global - none (95% CI; seeds)"]
    rows = []
    for strategy in dict.fromkeys(r["strategy"] for r in runs):
        none = {r["seed"]: r["global_accuracy"] for r in runs if r["strategy"] == strategy and r["variant"] == "none"}
        for variant in dict.fromkeys(r["variant"] for r in runs):
            mine = [r for r in runs if r["strategy"] == strategy and r["variant"] == variant]
            if not mine:
                continue
            versus = paired({r["seed"]: r["global_accuracy"] for r in mine}, none) if variant != "none" and none else "-"
            rows.append([strategy, variant, str(len(mine)), spread([r["global_accuracy"] for r in mine]),
                         spread([r["lowest_recall"] for r in mine]), spread([r["client_accuracy_mean"] for r in mine]), versus])
    return markdown_table(header, rows).split("\n")


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--out", default="results/remedies")
    parser.add_argument("--strategies", default="fft_moe,head_only")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--test-samples", type=int, default=500, help="rows the final model is scored on (0: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny backbone, one round, one seed: checks the setup")
    args = parser.parse_args(argv)
    strategies, variants = args.strategies.split(","), args.variants.split(",")
    unknown = [s for s in strategies if s not in STRATEGIES] + [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"--strategies / --variants name {unknown}; allowed: {', '.join(sorted(STRATEGIES))} / "
                          f"{', '.join(VARIANTS)}")
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else ""  # runs read it from Flower's app copy
    seeds, rounds, extra = [int(s) for s in args.seeds.split(",")], args.rounds, ""
    if args.smoke:
        seeds, rounds, extra = seeds[:1], 1, SMOKE_OVERRIDES
    out = resolve_path(args.out)
    # runs are reused by name and rounds: scored on other rows, they go to a folder of their own
    runs_dir = out / ("remedies-smoke-runs" if args.smoke else f"remedies-runs-{args.test_samples or 'all'}-rows")
    runs_dir.mkdir(parents=True, exist_ok=True)
    runs = run_variants(strategies, variants, seeds, rounds, args.test_samples, runs_dir, data_dir, extra)
    name = "remedies-smoke" if args.smoke else "remedies"
    (out / f"{name}.json").write_text(json.dumps(to_json_safe({"rounds": rounds, "seeds": seeds, "variants": VARIANTS,
                                                               "runs": runs}), indent=1))
    (out / f"{name}.md").write_text("\n".join([f"# Label-skew remedies, {HEADLINE[0]} {HEADLINE[1]}, {rounds} rounds", "",
                                               *table(runs), ""]))
    print("\n".join(table(runs)))


if __name__ == "__main__":
    main()
