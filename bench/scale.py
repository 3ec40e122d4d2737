"""Server cost against population size: the same rounds with 10 clients sampled (for
training and for evaluation) out of N virtual clients; round time and the ServerApp's
peak memory should not grow with N."""

from __future__ import annotations

from pathlib import Path

from bench.learning import read_run, simulate
from bench.simulation import LocalSimulation
from bench.suites import Suite

SAMPLED = 10


def scale_overrides(suite: Suite, population: int, run_name: str, data_dir: str) -> str:
    """Run-config overrides of one scale run: `SAMPLED` of `population` clients per round
    on an IID split (a Dirichlet split of 6,000 rows over 1,000 clients leaves some empty)."""
    return " ".join(filter(None, [
        f"rounds={suite.scale_rounds} run-name={run_name} data.partitioner=iid",
        f"federation.fraction-train={SAMPLED / population} federation.fraction-evaluate={SAMPLED / population}",
        f"federation.min-nodes={SAMPLED}",
        f"data.data-dir={data_dir}" if data_dir else "", suite.overrides,
    ]))


def run_scale(suite: Suite, strategies: list[str], runs_dir: Path, data_dir: str, fresh: bool,
              log=print) -> list[dict]:
    """Per strategy and population: mean round seconds (train and evaluation phases) and
    the ServerApp's peak resident memory."""
    rows = []
    for population in suite.scale_populations:
        with LocalSimulation(runs_dir / f".flwr-{population}", population) as simulation:
            for strategy in strategies:
                name = f"scale-{strategy}-n{population}"
                overrides = scale_overrides(suite, population, name, data_dir)
                run_dir = simulate(simulation, runs_dir, name, strategy, overrides, fresh, log)
                _, rounds = read_run(run_dir)
                trained = [r for r in rounds if r["round"] > 0]
                rows.append({
                    "strategy": strategy, "num_clients": population, "sampled": SAMPLED,
                    "round_seconds": sum(sum(r["phase_seconds"].values()) for r in trained) / len(trained),
                    "train_phase_seconds": sum(r["phase_seconds"]["train"] for r in trained) / len(trained),
                    "server_peak_rss_mb": trained[-1]["server_peak_rss_mb"],
                    "replies": [r["num_replies"] for r in trained],
                })
    return rows
