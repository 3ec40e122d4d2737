"""Client drift: does each strategy's global model keep what it learned by its last round?

The default run (each strategy's conf file as `make run` runs it: 10 clients, Dirichlet 0.5,
6 rounds, evaluated every round) per seed: final against best global accuracy and last
against lowest global loss, and whether the goals hold (final within 1 point of the best
round, last loss within 0.05 of the lowest).

With `--headline`: the headline cell (Dirichlet 0.1, mixed tiers, 5 seeds x 10 rounds, as
`make bench`'s full suite runs it) with the current defaults, against the same cell run
with older defaults (`--old`, a folder or archive of runs such as
docs/runs/issue15/full-runs.tar.gz): per strategy the seeds' mean and sample std before and
after, and the paired per-seed differences (after - before).

    python -m bench.drift --data-dir ../shared/data/ag_news --out results/drift
    python -m bench.drift --headline --old docs/runs/issue15/full-runs.tar.gz --data-dir ../shared/data/ag_news
    python -m bench.drift --report --runs docs/runs/issue28/default-runs.tar.gz   # tables of finished runs

`--overrides` adds run-config overrides to every run, `--tag` names the folder of runs
(<out>/<tag>-runs; finished runs there are reused), so candidate settings sit side by side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean, stdev

from bench.archive import runs_folder
from bench.headline import finished_cells, headline_cells
from bench.markdown import table
from bench.learning import cell_name, cell_overrides, read_run, simulate
from bench.paired import paired, spread
from bench.simulation import LocalSimulation
from bench.suites import HEADLINE, SUITES
from fedmoe_app.results import best_round
from strategies import STRATEGIES

DEFAULT_CELL = ("dir0.5", "mixed")  # what the conf files run: Dirichlet 0.5, the mixed tiers
ACCURACY_GOAL = 0.01  # final global accuracy within this of the best round's
LOSS_GOAL = 0.05  # last round's global loss within this of the lowest
ROUNDING = 1e-9  # 0.834 - 0.824 is 0.010000000000000009 in floats: 1 point is within 1 point


def drift_of(rounds: list[dict]) -> dict:
    """Final, best (and its round) global accuracy and last and lowest global loss over the
    trained, evaluated rounds of one run, and whether the goals hold."""
    evaluated = [r for r in rounds if r["round"] > 0 and r.get("global_accuracy") is not None]
    best_at, best = best_round(rounds)
    lowest = best_round(rounds, "loss", higher_is_better=False)
    final = evaluated[-1]
    return {
        "final_accuracy": final["global_accuracy"], "best_accuracy": best, "best_round": best_at,
        "final_loss": final.get("global_loss"), "lowest_loss": lowest[1] if lowest else None,
        "accuracy_by_round": [r["global_accuracy"] for r in evaluated],
        "accuracy_goal": best - final["global_accuracy"] <= ACCURACY_GOAL + ROUNDING,
        "loss_goal": lowest is not None and final["global_loss"] - lowest[1] <= LOSS_GOAL + ROUNDING,
    }


def run_default(simulation: LocalSimulation, runs_dir: Path, strategy: str, seed: int, data_dir: str,
                overrides: str, fresh: bool) -> dict:
    """One default run of `strategy` (reused when finished), as `drift_of` rows."""
    name = cell_name(strategy, *DEFAULT_CELL, seed)
    run_dir = simulate(simulation, runs_dir, name, strategy, " ".join(filter(None, [
        f"seed={seed} run-name={name}", f"data.data-dir={data_dir}" if data_dir else "", overrides])), fresh)
    return {"strategy": strategy, "seed": seed, **drift_of(read_run(run_dir)[1])}


def default_table(rows: list[dict]) -> str:
    """Per strategy: each seed's final / best (round) accuracy and last / lowest loss, and the goals."""
    header = ["strategy", "seed", "global accuracy by round (%)", "final / best (round)", "last / lowest loss",
              "final within 1 pt of best", "last loss within 0.05 of lowest"]
    cells = []
    for r in rows:
        by_round = " ".join(f"{100 * a:.1f}" for a in r["accuracy_by_round"])
        loss = f"{r['final_loss']:.3f} / {r['lowest_loss']:.3f}" if r["final_loss"] is not None else "-"
        cells.append([r["strategy"], r["seed"], by_round,
                      f"{100 * r['final_accuracy']:.1f} / {100 * r['best_accuracy']:.1f} ({r['best_round']})", loss,
                      "yes" if r["accuracy_goal"] else "no", "yes" if r["loss_goal"] else "no"])
    return table(header, cells)


def headline_table(old: list[dict], new: list[dict], strategies: list[str]) -> str:
    """Per strategy: final global accuracy over seeds before and after (mean +- sample std),
    the ratio of the stds, and the paired per-seed differences after - before."""
    header = ["strategy", "before: final accuracy (%)", "after", "std after / before",
              "paired after - before (95% CI; per seed)"]
    rows = []
    for strategy in strategies:
        before = {s: c["final_global_accuracy"] for s, c in headline_cells(old, strategy).items()}
        after = {s: c["final_global_accuracy"] for s, c in headline_cells(new, strategy).items()}
        if not after:
            continue
        ratio = (f"{stdev(after.values()) / stdev(before.values()):.2f}"
                 if len(after) > 1 and len(before) > 1 and stdev(before.values()) > 0 else "-")
        rows.append([strategy, spread(list(before.values())) if before else "-", spread(list(after.values())),
                     ratio, paired(after, before)])
    return table(header, rows)


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--out", default="results/drift")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--seeds", default="", help="default: 0,1,2 (default run), 0-4 (--headline)")
    parser.add_argument("--overrides", default="", help="run-config overrides added to every run")
    parser.add_argument("--tag", default="", help="names the folder of runs: <out>/<tag>-runs")
    parser.add_argument("--headline", action="store_true")
    parser.add_argument("--old", default="docs/runs/issue15/full-runs.tar.gz", help="--headline: the runs before")
    parser.add_argument("--report", action="store_true", help="only the tables of finished runs")
    parser.add_argument("--runs", default="", help="--report: a folder or archive of runs (default <out>/<tag>-runs)")
    parser.add_argument("--fresh", action="store_true", help="rerun finished runs")
    args = parser.parse_args(argv)
    strategies = args.strategies.split(",")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"--strategies names {unknown}; allowed: {', '.join(sorted(STRATEGIES))}")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(range(5 if args.headline else 3))
    kind = "headline" if args.headline else "default"
    out = Path(args.out)
    runs_dir = (out / f"{args.tag or kind}-runs").resolve()  # the ServerApp runs in the app bundle's folder
    if args.report and args.runs:
        runs_dir = runs_folder(args.runs)
    runs_dir.mkdir(parents=True, exist_ok=True)
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else ""
    if args.headline:
        if not args.report:
            suite = SUITES["full"]
            with LocalSimulation(runs_dir / ".flwr", suite.num_clients) as simulation:
                for seed in seeds:
                    for strategy in strategies:
                        overrides = cell_overrides(suite, strategy, *HEADLINE, seed, data_dir)
                        simulate(simulation, runs_dir, cell_name(strategy, *HEADLINE, seed), strategy,
                                 f"{overrides} {args.overrides}".strip(), args.fresh)
        old = finished_cells(runs_folder(args.old), strategies)
        table = headline_table(old, finished_cells(runs_dir, strategies), strategies)
    else:
        rows = []
        if args.report:
            for strategy in strategies:
                for seed in seeds:
                    run_dir = runs_dir / cell_name(strategy, *DEFAULT_CELL, seed)
                    if (run_dir / "summary.json").is_file():
                        rows.append({"strategy": strategy, "seed": seed, **drift_of(read_run(run_dir)[1])})
        else:
            with LocalSimulation(runs_dir / ".flwr", 10) as simulation:
                for seed in seeds:
                    for strategy in strategies:
                        rows.append(run_default(simulation, runs_dir, strategy, seed, data_dir, args.overrides,
                                                args.fresh))
                        (out / f"{args.tag or kind}.json").write_text(json.dumps(rows, indent=1) + "\n")
        rows.sort(key=lambda r: (strategies.index(r["strategy"]), r["seed"]))
        table = default_table(rows)
        met = [r for r in rows if r["accuracy_goal"] and r["loss_goal"]]
        table += f"\n\nBoth goals met by {len(met)} of {len(rows)} runs."
        if rows:
            table += (f" Mean over runs of best - final accuracy: "
                      f"{100 * mean(r['best_accuracy'] - r['final_accuracy'] for r in rows):.2f} points.")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag or kind}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
