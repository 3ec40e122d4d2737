"""Seeded comparison of strategies from finished learning runs: per strategy and split, mean
+- sample std over seeds of the final global accuracy and of the personalised accuracy
(mean over clients, worst client, and per tier); paired per-seed differences between
strategies with 95% t-intervals.

Usage: python -m bench.paired --runs results/bench/skew-runs --strategies hfedmoe,fft_moe,fedavg_lora,head_only
       [--partitions dir0.1,dir0.5,iid] [--mix mixed]
Prints Markdown (run directories are named <strategy>-<partition>-<mix>-s<seed>, as the
benchmark suites write them). --runs is such a folder or an archive of it
(docs/runs/issue15/full-runs.tar.gz; bench/archive.py).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from statistics import mean, stdev

from bench.archive import runs_folder
from bench.markdown import table

# Two-sided 95% quantiles of Student's t by degrees of freedom (1-10).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
RUN_NAME = re.compile(r"^(?P<strategy>.+)-(?P<partition>iid|dir[\d.]+)-(?P<mix>\w+)-s(?P<seed>\d+)$")


def final_record(run_dir: Path) -> dict:
    """The last round's record of a finished run."""
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def finished_runs(runs: Path) -> list[tuple[dict[str, str], Path]]:
    """(name fields: strategy, partition, mix, seed; folder) of every finished run in `runs`
    (a folder of runs or an archive of one, `bench.archive.runs_folder`) named as the
    benchmark suites name them, in name order."""
    found = []
    for run_dir in sorted(runs_folder(runs).iterdir()):
        match = RUN_NAME.match(run_dir.name)
        if match and (run_dir / "summary.json").is_file():
            found.append((match.groupdict(), run_dir))
    return found


def collect(runs: Path, mix: str) -> dict[tuple[str, str], dict[int, dict]]:
    """(strategy, partition) -> seed -> last round record, for every finished run of `mix`."""
    found: dict[tuple[str, str], dict[int, dict]] = {}
    for name, run_dir in finished_runs(runs):
        if name["mix"] == mix:
            found.setdefault((name["strategy"], name["partition"]), {})[int(name["seed"])] = final_record(run_dir)
    return found


def spread(values: list[float]) -> str:
    """Mean +- sample std in percent (the mean alone for one value)."""
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * mean(values):.1f} ± {100 * stdev(values):.1f}"


def paired(a: dict[int, float], b: dict[int, float]) -> str:
    """Mean paired difference a - b over the seeds both have, its 95% t-interval, per seed."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if len(diffs) < 2:
        return f"{100 * diffs[0]:+.1f} (1 seed)" if diffs else "-"
    half = T95[len(diffs) - 1] * stdev(diffs) / len(diffs) ** 0.5
    per_seed = ", ".join(f"{100 * d:+.1f}" for d in diffs)
    return f"{100 * mean(diffs):+.1f} ({100 * (mean(diffs) - half):+.1f} .. {100 * (mean(diffs) + half):+.1f}; seeds {per_seed})"


def report(runs: Path, strategies: list[str], partitions: list[str], mix: str) -> str:
    """The Markdown tables."""
    found = collect(runs, mix)
    tiers = sorted({t for records in found.values() for r in records.values() for t in (r.get("client_accuracy") or {})})
    lines = []
    for partition in partitions:
        header = ["strategy", "seeds", "global", "personalised mean", "worst client", *[f"personalised {t}" for t in tiers]]
        rows = []
        for strategy in strategies:
            records = found.get((strategy, partition), {})
            if not records:
                continue
            rs = [records[s] for s in sorted(records)]
            per_tier = [spread([r["client_accuracy"][t] for r in rs if t in (r.get("client_accuracy") or {})] or [float("nan")])
                        for t in tiers]
            rows.append([strategy, str(len(rs)), spread([r["global_accuracy"] for r in rs]),
                         spread([r["client_accuracy_mean"] for r in rs]), spread([r["client_accuracy_worst"] for r in rs]), *per_tier])
        lines += [f"### {partition}, {mix} tiers", "", *table(header, rows).split("\n"), ""]
        first = strategies[0]
        if (first, partition) in found:
            for other in strategies[1:]:
                if (other, partition) not in found:
                    continue
                mine, theirs = found[(first, partition)], found[(other, partition)]
                glob = paired({s: r["global_accuracy"] for s, r in mine.items()},
                              {s: r["global_accuracy"] for s, r in theirs.items()})
                personal = paired({s: r["client_accuracy_mean"] for s, r in mine.items()},
                                  {s: r["client_accuracy_mean"] for s, r in theirs.items()})
                lines.append(f"- {first} - {other}: global {glob}; personalised {personal}")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line: print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="a folder of finished runs, or a .tar.gz of one")
    parser.add_argument("--strategies", required=True)
    parser.add_argument("--partitions", default="dir0.1,dir0.5,iid")
    parser.add_argument("--mix", default="mixed")
    args = parser.parse_args(argv)
    print(report(Path(args.runs), args.strategies.split(","), args.partitions.split(","), args.mix))


if __name__ == "__main__":
    main()
