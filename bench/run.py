"""Run a benchmark suite and write results/bench/<suite>.json, <suite>.md and PNG plots.

Usage: python -m bench --suite quick|skew|full [--data-dir DIR] [--out results/bench]
       [--strategies fft_moe,fedavg_lora] [--fresh] [--smoke]

Finished learning runs, ceilings and scale runs are kept under <out>/<suite>-runs/ and
reused by the next invocation (so a long suite can be resumed); --fresh reruns them.
--smoke runs every section of the suite at its smallest (a tiny random backbone, one round)
to check a setup in minutes; it writes <suite>-smoke.json and its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from statistics import mean, stdev

import flwr
import torch

from bench import kernels, report
from bench.client_cost import measure_in_subprocess
from bench.headline import detail, headline_cells
from bench.learning import run_ceilings, run_cells, strategy_file
from bench.scale import run_scale
from bench.speedups import measure_speedups
from bench.suites import HEADLINE, SUITES, Suite, smoke
from fedmoe_app.budgets import load_tiers
from fedmoe_app.config import ConfigError, RunConfig, load_config, resolve_path
from fedmoe_app.precision import resolve_precision
from fedmoe_app.results import to_json_safe
from fedmoe_app.system import torch_device
from strategies import STRATEGIES

KERNEL_HIDDEN = 384  # MiniLM's hidden size
HEADLINE_KERNEL = (16, 2)  # M and k of the jetson-orin budget with the default 16 experts


def machine() -> dict:
    """The machine the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "flwr": flwr.__version__,
            "os": platform.platform()}


def headline(cells: list[dict], strategy: str) -> dict:
    """Mean and sample std (None with one seed) over seeds of the headline cell (Dirichlet 0.1, mixed tiers)."""
    runs = [c for _, c in sorted(headline_cells(cells, strategy).items())]
    out = {"seeds": [c["seed"] for c in runs]}
    for key in ("final_global_accuracy", "client_accuracy_mean", "client_accuracy_worst"):
        values = [c[key] for c in runs if c[key] is not None]
        out[key] = mean(values) if values else None
        out[f"{key}_std"] = stdev(values) if len(values) > 1 else None
    return out


def strategy_entry(strategy: str, cells: list[dict], ceilings: list[dict], costs: list[dict],
                   peak: float, peak_bf16: float | None = None) -> dict:
    """The per-strategy headline numbers of <suite>.json."""
    head = headline(cells, strategy)
    seed0 = next(c for c in cells if c["strategy"] == strategy and (c["partition"], c["mix"]) == HEADLINE)
    ceiling = next((c for c in ceilings if c["strategy"] == strategy and c["mix"] == HEADLINE[1]), None)
    mine = {c["tier"]: c for c in costs if c["strategy"] == strategy}
    per_tier = lambda key: {tier: cost.get(key) for tier, cost in mine.items()}  # noqa: E731
    return {
        "accuracy": head["final_global_accuracy"],
        "accuracy_std": head["final_global_accuracy_std"],
        "seeds": head["seeds"],
        "client_accuracy_mean": head["client_accuracy_mean"],
        "client_accuracy_worst": head["client_accuracy_worst"],
        "ceiling_accuracy": ceiling["accuracy"] if ceiling else None,
        "rounds_to_target": seed0["rounds_to_target"],
        "bytes_total": seed0["bytes_total"],
        "overhead_ratio": seed0["overhead_ratio"],
        "step_seconds": per_tier("step_seconds"),
        "step_seconds_fp32": per_tier("step_seconds_fp32"),
        "step_gflops": per_tier("step_gflops"),
        "achieved_gflops_per_s": per_tier("achieved_gflops_per_s"),
        "bytes_down": per_tier("bytes_down"),
        "bytes_up": per_tier("bytes_up"),
        "bytes_up_ratio": per_tier("bytes_up_ratio"),
        "full_adapter_bytes": next(iter(mine.values()))["full_adapter_bytes"] if mine else None,
        "peak_rss_mb": per_tier("peak_rss_mb"),
        "matmul_peak_gflops": peak,
        "matmul_peak_gflops_bf16": peak_bf16,
    }


def bf16_peak(threads: int, device: torch.device) -> float | None:
    """The measured bf16 matmul peak where the hardware computes in bf16, else None."""
    try:
        resolve_precision("bf16", device)
    except ConfigError:
        return None
    return kernels.matmul_peak_gflops(threads=threads, device=device, dtype=torch.bfloat16)


def measure_with_fp32(strategy: str, tier: str, overrides: str) -> dict:
    """Client cost at the configured precision, with `step_seconds_fp32` from the same
    measurement in float32 (a second fresh process)."""
    cost = measure_in_subprocess(strategy, tier, overrides)
    fp32 = cost if cost["precision"] == "fp32" else measure_in_subprocess(strategy, tier, f"{overrides} train.precision=fp32")
    return {**cost, "step_seconds_fp32": fp32["step_seconds"]}


def measure_costs(suite: Suite, strategies: list[str], config: RunConfig, tiers: list[str], overrides: str, log=print) -> dict:
    """The cost sections, measured together so that their figures share one machine state:
    matmul peaks, the sparse MoE kernel, client cost per strategy and tier, and the
    optimisations' before/after."""
    device = torch_device(config.train.device)
    precision = resolve_precision(config.train.precision, device)
    log(f"bench: matmul peaks and sparse MoE kernel on {device}; {precision.reason}")
    peak = kernels.matmul_peak_gflops(threads=config.train.threads, device=device)
    peak_bf16 = bf16_peak(config.train.threads, device)
    # every core only means something on a CPU; a GPU's one figure is `peak`
    peak_all = kernels.matmul_peak_gflops(threads=os.cpu_count() or 1) if device.type == "cpu" else None
    precisions = [resolve_precision("fp32", device)] + ([precision] if precision.name != "fp32" else [])
    kernel_rows = kernels.kernel_cases(KERNEL_HIDDEN, config.moe.expert_hidden, suite.kernel_cases, suite.kernel_tokens,
                                       precisions, threads=config.train.threads, device=device)
    log("bench: client cost per strategy and tier, at the resolved precision and at fp32")
    costs = [measure_with_fp32(s, t, overrides) for s in strategies for t in tiers[:suite.cost_tiers or None]]
    speedups = None
    if suite.speedups:
        log("bench: before/after of the optimisations")
        speedups = measure_speedups(config, tiers[-1])
    return {"strategies": strategies, "overrides": overrides, "measured": time.strftime("%Y-%m-%d %H:%M"), "device": str(device),
            "precision": precision.name, "precision_reason": precision.reason, "matmul_peak_gflops": peak,
            "matmul_peak_gflops_bf16": peak_bf16, "matmul_peak_gflops_all_cores": peak_all, "kernel_cases": kernel_rows,
            "client_cost": costs, "speedups": speedups}


def costs_of_suite(suite: Suite, strategies: list[str], config: RunConfig, tiers: list[str], overrides: str, runs_dir: Path,
                   fresh: bool, log=print) -> dict:
    """`measure_costs`, kept in <runs>/costs.json and reused (like finished runs) while the
    strategies, the device and the overrides are the same."""
    path = runs_dir / "costs.json"
    if not fresh and path.is_file():
        saved = json.loads(path.read_text())
        same = (saved["strategies"], saved["device"], saved["overrides"]) == (strategies, str(torch_device(config.train.device)), overrides)
        if same:
            log(f"bench: cost sections reused from {path} (measured {saved['measured']})")
            return saved
    costs = measure_costs(suite, strategies, config, tiers, overrides, log)
    path.write_text(json.dumps(to_json_safe(costs), indent=2) + "\n")
    return costs


def run_suite(suite: Suite, strategies: list[str], out_dir: Path, data_dir: str, fresh: bool) -> dict:
    """Every section of `suite`; the results dict (also written to <out>/<suite>.json)."""
    runs_dir = out_dir / f"{suite.name}-runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    log = lambda text: print(f"[{time.time() - started:6.0f} s] {text}", flush=True)  # noqa: E731
    base_overrides = " ".join(filter(None, [f"data.data-dir={data_dir}" if data_dir else "", suite.overrides]))
    config = load_config(strategy_file(strategies[0]), base_overrides)
    tiers = list(load_tiers(config.devices.file))
    measured = costs_of_suite(suite, strategies, config, tiers, base_overrides, runs_dir, fresh, log)
    peak, peak_bf16, kernel_rows = measured["matmul_peak_gflops"], measured["matmul_peak_gflops_bf16"], measured["kernel_cases"]
    costs = measured["client_cost"]
    cells = run_cells(suite, strategies, runs_dir, data_dir, fresh, log)
    ceilings = run_ceilings(suite, strategies, cells, runs_dir, data_dir, fresh, log)
    scale = run_scale(suite, strategies, runs_dir, data_dir, fresh, log)
    headline_detail = detail(cells, strategies, suite.num_clients, data_dir, suite.overrides,
                             suite.headline_rounds or suite.rounds)
    headline_kernel = next((r for r in kernel_rows if (r["num_experts"], r["top_k"]) == HEADLINE_KERNEL and r["auto"]
                            and r["precision"] == measured["precision"]), kernel_rows[0])
    results = {
        "suite": suite.name,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "settings": {"rounds": suite.rounds, "headline_rounds": suite.headline_rounds or suite.rounds,
                     "headline_overrides": suite.headline_overrides, "num_clients": suite.num_clients, "target_accuracy": suite.target_accuracy,
                     "headline": {"partition": HEADLINE[0], "mix": HEADLINE[1]}, "overrides": suite.overrides,
                     "client_threads": config.train.threads, "device": measured["device"], "tiers": tiers},
        "costs_measured": measured["measured"],
        "precision": measured["precision"],
        "precision_reason": measured["precision_reason"],
        "matmul_peak_gflops": peak,
        "matmul_peak_gflops_bf16": peak_bf16,
        "matmul_peak_gflops_all_cores": measured["matmul_peak_gflops_all_cores"],
        "strategies": {s: strategy_entry(s, cells, ceilings, costs, peak, peak_bf16) for s in strategies},
        "headline": headline_detail,
        "kernel": {"moe_dispatch_ratio": headline_kernel["ratio"], "dispatch": headline_kernel["dispatch"],
                   "hidden": KERNEL_HIDDEN,
                   "expert_hidden": config.moe.expert_hidden, "cases": kernel_rows},
        "cells": cells,
        "ceilings": ceilings,
        "client_cost": costs,
        "scale": scale,
        "speedups": measured["speedups"],
        "seconds": time.time() - started,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{suite.name}.json").write_text(json.dumps(to_json_safe(results), indent=2) + "\n")
    report.write(results, out_dir)
    log(f"bench: wrote {out_dir / (suite.name + '.json')} and {out_dir / (suite.name + '.md')}")
    return results


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="quick")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--strategies", default="", help="comma-separated; default: every registered strategy")
    parser.add_argument("--fresh", action="store_true", help="rerun finished runs instead of reusing them")
    parser.add_argument("--smoke", action="store_true", help="the suite at its smallest: checks a setup, measures nothing")
    args = parser.parse_args(argv)
    if args.suite not in SUITES:
        raise ConfigError(f"--suite is {args.suite!r}; allowed: {', '.join(SUITES)}")
    strategies = [s for s in args.strategies.split(",") if s] or list(STRATEGIES)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ConfigError(f"--strategies names {unknown}; allowed: {', '.join(STRATEGIES)}")
    suite = smoke(SUITES[args.suite]) if args.smoke else SUITES[args.suite]
    run_suite(suite, strategies, resolve_path(args.out), args.data_dir, args.fresh)
    return 0
