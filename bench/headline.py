"""What the headline cell (Dirichlet 0.1, mixed tiers) reports beside mean +- std: paired
per-seed differences of every MoE method against every baseline (95% t-intervals), the
final global model's recall per class, and each seed's label mix per client."""

from __future__ import annotations

from statistics import mean

from bench.learning import strategy_file
from bench.paired import paired
from bench.suites import HEADLINE, PARTITIONS
from fedmoe_app.config import load_config
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


def label_mix(seeds: list[int], num_clients: int, data_dir: str, overrides: str = "") -> dict[int, list[list[int]]]:
    """seed -> per client (partition id order) its rows of each label, train and held-out
    together, as the headline cell partitions the data for that seed."""
    mix = {}
    for seed in seeds:
        config = load_config(strategy_file("head_only"), " ".join(filter(None, [
            f"seed={seed}", PARTITIONS[HEADLINE[0]], f"data.data-dir={data_dir}" if data_dir else "", overrides])))
        mix[seed] = [list(load_client_data(config.data, seed, client, num_clients).label_counts)
                     for client in range(num_clients)]
    return mix
