"""What the headline cell (Dirichlet 0.1, mixed tiers) reports beside mean +- std: paired
per-seed differences of every MoE method against every baseline (95% t-intervals), the
final global model's recall per class, and each seed's label mix per client.

`make bench` writes it into its report; on its own, from a folder of finished runs (or a
.tar.gz of one, such as docs/runs/issue15/full-runs.tar.gz):
Usage: python -m bench.headline --runs results/bench/full-runs --data-dir ../shared/data/ag_news
       [--strategies fft_moe,head_only]
Prints Markdown.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from statistics import mean

from bench.archive import runs_folder
from bench.learning import cell_metrics, strategy_file
from bench.paired import finished_runs, paired, spread
from bench.suites import HEADLINE, PARTITIONS
from fedmoe_app.budgets import tiers_for_population
from fedmoe_app.config import ConfigError, load_config, resolve_path
from fedmoe_app.data import load_client_data
from fedmoe_app.methods import method_class


def headline_cells(cells: list[dict], strategy: str) -> dict[int, dict]:
    """seed -> the strategy's headline run."""
    return {c["seed"]: c for c in cells if c["strategy"] == strategy and (c["partition"], c["mix"]) == HEADLINE}


def is_moe(strategy: str) -> bool:
    """Whether a registered method trains sparse MoE experts."""
    return method_class(strategy).adapter == "moe"


def paired_differences(cells: list[dict], strategies: list[str]) -> list[dict]:
    """Every MoE method against every baseline: the paired difference of final global
    accuracy over the seeds both ran, as `bench.paired.paired` writes it."""
    found = []
    for moe in (s for s in strategies if is_moe(s)):
        mine = {seed: c["final_global_accuracy"] for seed, c in headline_cells(cells, moe).items()}
        for baseline in (s for s in strategies if not is_moe(s)):
            theirs = {seed: c["final_global_accuracy"] for seed, c in headline_cells(cells, baseline).items()}
            found.append({"method": moe, "baseline": baseline, "difference": paired(mine, theirs)})
    return found


def recall_by_class(cells: list[dict], strategy: str) -> list[float] | None:
    """Mean over seeds of the final global model's recall of each class (None without records)."""
    recalls = [c["final_global_recall"] for c in headline_cells(cells, strategy).values() if c.get("final_global_recall")]
    if not recalls:
        return None
    by_class = [[r[i] for r in recalls if r[i] is not None] for i in range(len(recalls[0]))]
    return [mean(values) if values else None for values in by_class]


def lowest_recall(recall: list[float | None] | None) -> float:
    """The lowest of a model's per-class recalls (classes without test rows left out; NaN without any)."""
    values = [r for r in (recall or []) if r is not None and not math.isnan(r)]
    return min(values) if values else math.nan


def label_mix(seeds: list[int], num_clients: int, data_dir: str, overrides: str = "") -> dict[int, list[list[int]]]:
    """seed -> per client (partition id order) its rows of each label, train and held-out
    together, as the headline cell partitions the data for that seed."""
    mix = {}
    for seed in seeds:
        config = load_config(strategy_file("head_only"), " ".join(filter(None, [
            f"seed={seed}", PARTITIONS[HEADLINE[0]], f"data.data-dir={data_dir}" if data_dir else "", overrides])))
        mix[seed] = [list(load_client_data(config.data, seed, client, num_clients).group_counts)
                     for client in range(num_clients)]
    return mix


def detail(cells: list[dict], strategies: list[str], num_clients: int, data_dir: str, overrides: str,
           rounds: int) -> dict:
    """The headline section of a suite's results: paired differences, recall per class,
    each client's tier and label mix, rounds and the test rows the final models were scored on."""
    head = [c for c in cells if (c["partition"], c["mix"]) == HEADLINE]
    mix = load_config(strategy_file("head_only"), overrides).devices.simulation_mix
    return {
        "tiers": tiers_for_population(num_clients, mix),
        "paired": paired_differences(cells, strategies),
        "recall": {s: recall_by_class(cells, s) for s in strategies},
        "label_mix": label_mix(sorted({c["seed"] for c in head}), num_clients, data_dir, overrides),
        "rounds": rounds,
        "test_rows": sorted({c["final_test_rows"] for c in head if c.get("final_test_rows")}),
    }


def finished_cells(runs: Path, strategies: list[str]) -> list[dict]:
    """The headline cell's finished runs in `runs`, as `bench.learning.run_cells` lists cells."""
    return [{**name, "seed": int(name["seed"]), "run_dir": str(run_dir), **cell_metrics(run_dir, target=0.8)}
            for name, run_dir in finished_runs(runs)
            if name["strategy"] in strategies and (name["partition"], name["mix"]) == HEADLINE]


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    from bench.markdown import table
    from bench.report import headline_detail
    from strategies import STRATEGIES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="a folder of finished runs, or a .tar.gz of one")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--num-clients", type=int, default=10)
    args = parser.parse_args(argv)
    strategies = args.strategies.split(",")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ConfigError(f"--strategies names {unknown}; allowed: {', '.join(sorted(STRATEGIES))}")
    try:
        runs = runs_folder(resolve_path(args.runs))
    except FileNotFoundError as error:
        raise ConfigError(f"--runs: {error}") from None
    cells = finished_cells(runs, strategies)
    strategies = [s for s in strategies if any(c["strategy"] == s for c in cells)]
    rows = []
    for strategy in strategies:
        mine = [c for _, c in sorted(headline_cells(cells, strategy).items())]
        rows.append([strategy, spread([c["final_global_accuracy"] for c in mine]),
                     spread([c["client_accuracy_mean"] for c in mine]), spread([c["client_accuracy_worst"] for c in mine]),
                     ",".join(str(c["seed"]) for c in mine)])
    rounds = max((c["rounds"] for c in cells), default=0)
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else ""
    section = detail(cells, strategies, args.num_clients, data_dir, "", rounds)
    print(table(["strategy", "global %", "personalised mean %", "worst client %", "seeds"], rows))
    print()
    print(headline_detail({"headline": section}))


if __name__ == "__main__":
    main()
