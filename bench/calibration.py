"""Head calibration (`calibration.method: ccvr`) measured on finished runs: each run's final
global adapter is calibrated as a run with ccvr would have done after its last round (every
simulated node's moments from `ClientTask.feature_statistics`, the server's
`calibrated_head`), then scored on the run's own final test rows. Calibration changes only
the head after training, so this equals re-running with ccvr on; only the wire dtype of the
calibrate message differs (the arrays are used in float32 here).

Reports per strategy the run's own final accuracy, the calibrated one, their paired
difference, the lowest class recall before and after, and the paired differences of every
MoE method against every baseline once all are calibrated.

Usage: python -m bench.calibration --runs results/bench/full-runs [--strategies fft_moe,head_only]
       [--partition dir0.1] [--mix mixed] [--out results/calibration]
Writes <out>/calibration.md and calibration.json; runs already measured (by run name) are
read back from calibration.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from bench.archive import runs_folder
from bench.headline import is_moe, lowest_recall
from bench.markdown import table as markdown_table
from bench.paired import finished_runs, paired, spread
from fedmoe_app.calibration import calibrated_head
from fedmoe_app.client import ClientTask
from fedmoe_app.config import ConfigError, config_from_dict, resolve_path
from fedmoe_app.methods import method_class
from fedmoe_app.names import num_labels_of
from fedmoe_app.records import to_record
from fedmoe_app.results import ADAPTER_FILE, CONFIG_FILE, SUMMARY_FILE, load_adapter, to_json_safe
from fedmoe_app.server import GlobalEvaluator
from strategies import STRATEGIES


def calibrate_run(run_dir: Path, num_nodes: int) -> dict:
    """The run's final global arrays calibrated over its `num_nodes` simulated nodes, scored
    on its final test rows: accuracy and per-class recall before (from its summary) and after."""
    # merged over conf/base.yaml: runs written before calibration existed lack its section
    config = config_from_dict(yaml.safe_load((run_dir / CONFIG_FILE).read_text()))
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    arrays, _ = load_adapter(run_dir / ADAPTER_FILE)
    started = time.perf_counter()
    parts = [ClientTask(config, {"partition-id": p, "num-partitions": num_nodes}).feature_statistics(arrays)
             for p in range(num_nodes)]
    settings = config.calibration
    weight, bias = calibrated_head(arrays["head.weight"], arrays["head.bias"], parts, settings.virtual_per_class,
                                   settings.steps, settings.lr, seed=config.seed)
    calibrated = {**arrays, "head.weight": weight, "head.bias": bias}
    model = method_class(config.strategy).global_model(config, num_labels_of(arrays))
    scored = GlobalEvaluator(config, model)(config.rounds, to_record(calibrated))
    return {"run": run_dir.name, "accuracy": summary["final_global_accuracy"],
            "recall": summary.get("final_global_recall"), "calibrated_accuracy": float(scored["accuracy"]),
            "calibrated_recall": [float(r) for r in scored["recall"]], "test_rows": int(scored["num-examples"]),
            "seconds": time.perf_counter() - started}


def table(measured: dict[str, dict[int, dict]]) -> list[str]:
    """Markdown: per strategy (seed -> measurement) before and after calibration, then every
    MoE method against every baseline after calibration."""
    header = ["strategy", "seeds", "global", "calibrated", "calibrated - global (95% CI; seeds)", "lowest recall",
              "lowest recall calibrated"]
    rows = []
    for strategy, runs in measured.items():
        before = {s: r["accuracy"] for s, r in runs.items()}
        after = {s: r["calibrated_accuracy"] for s, r in runs.items()}
        rows.append([strategy, str(len(runs)), spread(list(before.values())), spread(list(after.values())),
                     paired(after, before), spread([lowest_recall(r["recall"]) for r in runs.values()]),
                     spread([lowest_recall(r["calibrated_recall"]) for r in runs.values()])])
    versus = []
    for moe in (s for s in measured if is_moe(s)):
        for baseline in (s for s in measured if not is_moe(s)):
            mine = {s: r["calibrated_accuracy"] for s, r in measured[moe].items()}
            theirs = {s: r["calibrated_accuracy"] for s, r in measured[baseline].items()}
            versus.append([moe, baseline, paired(mine, theirs)])
    return [*markdown_table(header, rows).split("\n"), "",
            *markdown_table(["calibrated MoE method", "calibrated baseline", "difference (95% CI; seeds)"], versus).split("\n")]


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="a folder of finished runs named <strategy>-<partition>-<mix>-s<seed>, "
                        "or a .tar.gz of one (docs/runs keeps no adapter.safetensors, which this needs)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--partition", default="dir0.1")
    parser.add_argument("--mix", default="mixed")
    parser.add_argument("--num-nodes", type=int, default=10, help="simulated nodes the runs had")
    parser.add_argument("--out", default="results/calibration")
    args = parser.parse_args(argv)
    strategies = args.strategies.split(",")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ConfigError(f"--strategies names {unknown}; allowed: {', '.join(sorted(STRATEGIES))}")
    out = resolve_path(args.out)
    try:
        runs = runs_folder(resolve_path(args.runs))
    except FileNotFoundError as error:
        raise ConfigError(f"--runs: {error}") from None
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "calibration.json"
    done = {r["run"]: r for r in json.loads(saved.read_text())["runs"]} if saved.is_file() else {}
    measured: dict[str, dict[int, dict]] = {}
    for name, run_dir in finished_runs(runs):
        if not (name["strategy"] in strategies and (name["partition"], name["mix"]) == (args.partition, args.mix)
                and (run_dir / ADAPTER_FILE).is_file()):
            continue
        if run_dir.name not in done:
            print(f"calibration: {run_dir.name}", flush=True)
            done[run_dir.name] = calibrate_run(run_dir, args.num_nodes)
            saved.write_text(json.dumps(to_json_safe({"runs": list(done.values())}), indent=1))
        measured.setdefault(name["strategy"], {})[int(name["seed"])] = done[run_dir.name]
    measured = {s: measured[s] for s in strategies if s in measured}
    lines = [f"# Head calibration (ccvr) on the final models of {runs.name}, {args.partition} {args.mix}", "",
             *table(measured), ""]
    (out / "calibration.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
