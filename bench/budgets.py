"""Our version of UB-SMoE's table: accuracy of the low tier (rpi4), the high tier
(jetson-orin) and all clients for the compute-budgeted methods and UB-SMoE's ablations, on
AG News at Dirichlet 0.1 and 0.5 with mixed tiers; a step's seconds and counted FLOPs on
the low tier against the high tier (UB-SMoE's "45% less computation"); expert utilisation
with and without Dynamic Modulated Routing; and a smoke run of the MoE methods on a tiny
native MoE model (Mixtral family; its numbers mean nothing, the run must finish).

Usage: python -m bench.budgets --data-dir ../shared/data/ag_news --out results/budgets
       [--seeds 0,1,2] [--rounds 6] [--partitions dir0.1,dir0.5] [--methods hetlora,ub_smoe,...]
       [--sections learning,cost,native] [--smoke]
Writes <out>/budgets.md and budgets.json; finished runs under <out>/budgets-runs/ are reused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import mean

import numpy as np

from bench.client_cost import measure_in_subprocess
from bench.learning import cell_name, simulate
from bench.markdown import table
from bench.paired import report as paired_report
from bench.simulation import LocalSimulation
from bench.suites import PARTITIONS, SMOKE_OVERRIDES
from fedmoe_app.config import ConfigError, resolve_path
from fedmoe_app.results import read_rounds

# label -> (registered strategy, run-config overrides): the methods of the table and the ablations
METHODS = {
    "ub_smoe": ("ub_smoe", ""),
    "ub_smoe-no-dmr": ("ub_smoe", "ub-smoe.dmr=false"),
    "ub_smoe-no-pg": ("ub_smoe", "ub-smoe.pseudo-gradient=false"),
    "hfedmoe": ("hfedmoe", ""),
    "fft_moe": ("fft_moe", ""),
    "hetlora": ("hetlora", ""),
    "flexlora": ("flexlora", ""),
}
LOW, HIGH = "rpi4", "jetson-orin"
NATIVE = "model.backbone=tiny-mixtral moe.num-experts=8 moe.eval-top-k=2 data.max-train-rows=300 eval.test-samples=100"
NUM_CLIENTS = 10


def balance(shares: list[list[float]]) -> dict:
    """How evenly one round's routed tokens spread over the experts ([L][M] shares): the
    coefficient of variation of the shares (0: even) and the share of (layer, expert)
    pairs that got under a tenth of an even share (starved), both over layers."""
    matrix = np.asarray(shares, dtype=np.float64)
    matrix = matrix[matrix.sum(axis=1) > 0]  # layers that routed nothing say nothing
    even = 1.0 / matrix.shape[1]
    return {"cv": float(np.mean(matrix.std(axis=1) / matrix.mean(axis=1))),
            "starved": float(np.mean(matrix < 0.1 * even))}


def utilisation(run_dir: Path) -> dict | None:
    """Mean over a run's trained rounds of `balance` of its routed-token shares, over all
    clients and over the low tier's (None for methods without experts)."""
    rounds = [r for r in read_rounds(run_dir) if r["round"] > 0 and r.get("expert_utilisation")]
    if not rounds:
        return None
    found = {}
    for name, shares_of in (("all", lambda r: r["expert_utilisation"]),
                            (LOW, lambda r: (r.get("expert_utilisation_by_tier") or {}).get(LOW))):
        per_round = [balance(shares_of(r)) for r in rounds if shares_of(r)]
        if per_round:
            found[name] = {key: mean(b[key] for b in per_round) for key in ("cv", "starved")}
    return found


def ranks_by_tier(record: dict) -> dict[str, list[int]] | None:
    """HetLoRA: each tier's clients' ranks for the next round, from a round record (else None)."""
    ranks = record.get("lora_ranks")
    if not ranks:
        return None
    found: dict[str, list[int]] = {}
    for client, rank in sorted(ranks.items()):
        found.setdefault(record["clients"][client]["tier"], []).append(rank)
    return found


def learning(labels: list[str], partitions: list[str], seeds: list[int], rounds: int, runs_dir: Path,
             data_dir: str, extra: str, log) -> list[dict]:
    """Run (or reuse) every (method, partition, seed); one dict per run."""
    runs = []
    with LocalSimulation(runs_dir / ".flwr", NUM_CLIENTS) as simulation:
        for partition in partitions:
            for seed in seeds:
                for label in labels:
                    strategy, overrides = METHODS[label]
                    name = cell_name(label, partition, "mixed", seed)
                    every = " ".join(filter(None, [
                        f"rounds={rounds} seed={seed} run-name={name}", f"data.data-dir={data_dir}" if data_dir else "",
                        PARTITIONS[partition], overrides, extra]))
                    run_dir = simulate(simulation, runs_dir, name, strategy, every, False, log)
                    last = read_rounds(run_dir)[-1]
                    runs.append({"method": label, "partition": partition, "seed": seed,
                                 "global_accuracy": last["global_accuracy"], "client_accuracy": last["client_accuracy"],
                                 "client_accuracy_mean": last["client_accuracy_mean"],
                                 "client_accuracy_worst": last["client_accuracy_worst"],
                                 "ranks_by_tier": ranks_by_tier(last), "utilisation": utilisation(run_dir),
                                 "run_dir": str(run_dir)})
    return runs


def costs(labels: list[str], data_dir: str, extra: str) -> list[dict]:
    """One fresh client process per (strategy, tier) for the low and high tier."""
    strategies = list(dict.fromkeys(METHODS[label][0] for label in labels))
    overrides = " ".join(filter(None, [f"data.data-dir={data_dir}" if data_dir else "", extra]))
    return [measure_in_subprocess(s, tier, overrides) for s in strategies for tier in (LOW, HIGH)]


def native_smoke(data_dir: str, runs_dir: Path, log) -> list[dict]:
    """Two rounds of each MoE method on a tiny native Mixtral (3 clients): did it finish, and how."""
    found = []
    with LocalSimulation(runs_dir / ".flwr-native", 3) as simulation:
        for strategy in ("ub_smoe", "hfedmoe"):
            name = f"native-{strategy}"
            overrides = " ".join(filter(None, [f"rounds=2 run-name={name}", NATIVE,
                                               f"data.data-dir={data_dir}" if data_dir else ""]))
            run_dir = simulate(simulation, runs_dir, name, strategy, overrides, False, log)
            last = read_rounds(run_dir)[-1]
            found.append({"strategy": strategy, "rounds": last["round"], "failures": last["failures"],
                          "global_accuracy": last["global_accuracy"], "client_accuracy": last["client_accuracy"]})
    return found


def cost_table(found: list[dict]) -> list[str]:
    """Markdown: per strategy, low and high tier step seconds and GFLOPs (own batch and the
    common 8 x 64 shape) and their ratios."""
    header = ["strategy", "K low / high", "s/step low / high (own batch)", "GFLOP/step low / high",
              "s/step at 8 x 64 low / high", "ratio", "GFLOP at 8 x 64 low / high", "ratio", "FFN share low / high"]
    rows = []
    for strategy in dict.fromkeys(c["strategy"] for c in found):
        low = next(c for c in found if c["strategy"] == strategy and c["tier"] == LOW)
        high = next(c for c in found if c["strategy"] == strategy and c["tier"] == HIGH)
        rows.append([strategy, f"{low['experts_per_token']} / {high['experts_per_token']}",
                     f"{low['step_seconds']:.3f} / {high['step_seconds']:.3f}", f"{low['step_gflops']:.1f} / {high['step_gflops']:.1f}",
                     f"{low['reference_step_seconds']:.3f} / {high['reference_step_seconds']:.3f}",
                     f"{low['reference_step_seconds'] / high['reference_step_seconds']:.2f}",
                     f"{low['reference_step_gflops']:.2f} / {high['reference_step_gflops']:.2f}",
                     f"{low['reference_step_gflops'] / high['reference_step_gflops']:.2f}",
                     f"{100 * low['reference_ffn_share']:.0f}% / {100 * high['reference_ffn_share']:.0f}%"])
    return table(header, rows).split("\n")


def utilisation_table(runs: list[dict]) -> list[str]:
    """Markdown: per MoE method and partition, mean +- range over seeds of the balance figures."""
    header = ["method", "split", "seeds", "routed-token CV, all clients (0 = even)", "starved experts", "CV, rpi4 clients",
              "starved, rpi4"]
    rows = []
    for label in dict.fromkeys(r["method"] for r in runs):
        for partition in dict.fromkeys(r["partition"] for r in runs):
            mine = [r["utilisation"] for r in runs if r["method"] == label and r["partition"] == partition and r["utilisation"]]
            if not mine:
                continue
            cells = []
            for name in ("all", LOW):
                of = [u[name] for u in mine if name in u]
                cells += [f"{mean(u['cv'] for u in of):.3f}", f"{100 * mean(u['starved'] for u in of):.1f}%"] if of else ["-", "-"]
            rows.append([label, partition, str(len(mine)), *cells])
    return table(header, rows).split("\n")


def rank_table(runs: list[dict]) -> list[str]:
    """Markdown: the ranks HetLoRA's clients ended at, per split and tier, over seeds."""
    rows = []
    for partition in dict.fromkeys(r["partition"] for r in runs):
        found = [r["ranks_by_tier"] for r in runs if r["partition"] == partition and r.get("ranks_by_tier")]
        if found:
            cells = [", ".join(str(x) for ranks in found for x in ranks.get(tier, [])) for tier in ("rpi4", "jetson-nano", "jetson-orin")]
            rows.append([partition, *cells])
    return table(["split", "rpi4", "jetson-nano", "jetson-orin"], rows).split("\n")


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--out", default="results/budgets")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--partitions", default="dir0.1,dir0.5")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sections", default="learning,cost,native")
    parser.add_argument("--smoke", action="store_true", help="tiny backbone, one round, one seed: checks the setup")
    args = parser.parse_args(argv)
    labels, partitions = args.methods.split(","), args.partitions.split(",")
    unknown = [x for x in labels if x not in METHODS] + [p for p in partitions if p not in PARTITIONS]
    if unknown:
        raise ConfigError(f"--methods / --partitions name {unknown}; allowed: {', '.join(METHODS)} / {', '.join(PARTITIONS)}")
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else ""  # runs read it from Flower's app copy
    seeds, rounds, extra = [int(s) for s in args.seeds.split(",")], args.rounds, ""
    if args.smoke:
        seeds, rounds, extra = seeds[:1], 1, SMOKE_OVERRIDES
    out = resolve_path(args.out)
    runs_dir = out / "budgets-runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    log = lambda text: print(f"[{time.time() - started:6.0f} s] {text}", flush=True)  # noqa: E731
    sections = args.sections.split(",")
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "seeds": seeds, "rounds": rounds, "extra": extra}
    lines = [f"# Compute budgets: UB-SMoE's table on AG News ({results['date']})", ""]
    if "learning" in sections:
        results["runs"] = learning(labels, partitions, seeds, rounds, runs_dir, data_dir, extra, log)
        lines += ["## Accuracy (global; personalised per tier and over all clients)", "",
                  paired_report(runs_dir, labels, partitions, "mixed"), "## Expert utilisation", "",
                  *utilisation_table(results["runs"]), "",
                  "## HetLoRA: each client's rank after the last round (all seeds; tiers start at 4, 8, 16)", "",
                  *rank_table(results["runs"]), ""]
    if "cost" in sections:
        log("bench: client cost, low and high tier")
        results["costs"] = costs(labels, data_dir, extra)
        lines += ["## Cost of a local step, low tier (rpi4) against high tier (jetson-orin)", "",
                  *cost_table(results["costs"]), ""]
    if "native" in sections:
        results["native"] = native_smoke(data_dir, runs_dir, log)
        lines += ["## Smoke run on a tiny native MoE (Mixtral family, 2 rounds, 3 clients)", "",
                  *[f"- {n['strategy']}: {n['rounds']} rounds, {n['failures']} failures, global accuracy "
                    f"{n['global_accuracy']}" for n in results["native"]], ""]
    (out / "budgets.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "budgets.md").write_text("\n".join(lines) + "\n")
    log(f"bench: wrote {out / 'budgets.md'}")


if __name__ == "__main__":
    main()
