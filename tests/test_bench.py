"""Benchmark plumbing: the cells and overrides it runs, the figures it derives from round
records (checked against hand-computed values), the kernel comparison's fairness, and the
report it writes."""

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import report
from bench.kernels import moe_and_dense
from bench.learning import cell_overrides, first_reaching, mix_overrides, overhead_ratio, sample_steps
from bench import run as bench_run
from bench.run import costs_of_suite, headline, strategy_entry
from bench.suites import HEADLINE, SUITES, smoke
from fedmoe_app.budgets import tiers_for_population
from fedmoe_app.config import load_config
from fedmoe_app.batches import EncodedSet, iterate_batches
from strategies import STRATEGIES


def test_high_tier_mix_puts_every_client_on_the_largest_budget():
    config = load_config("conf/fft_moe.yaml")
    high = load_config("conf/fft_moe.yaml", mix_overrides(config, "high"))
    assert tiers_for_population(10, high.devices.simulation_mix) == ["jetson-orin"] * 10
    assert mix_overrides(config, "mixed") == ""


def test_every_registered_strategy_gets_every_cell_headline_seeds_first():
    suite = SUITES["full"]
    cells = suite.cells()
    assert cells[:5] == [(*HEADLINE, seed) for seed in range(5)]
    assert len(cells) == len(set(cells)) == 3 * 2 + 4  # 3 splits x 2 populations, 4 extra headline seeds
    assert {"fft_moe", "fedavg_lora", "head_only"} <= set(STRATEGIES)
    overrides = cell_overrides(suite, "fedavg_lora", "dir0.1", "high", 2, "/data")
    config = load_config("conf/fedavg_lora.yaml", overrides)
    assert (config.seed, config.rounds, config.data.alpha, config.data.data_dir) == (2, 6, 0.1, "/data")
    assert config.run_name == "fedavg_lora-dir0.1-high-s2" and config.eval.final_test_samples == 500
    # the headline cell: 10 rounds, the final model scored on the whole test split
    config = load_config("conf/fedavg_lora.yaml", cell_overrides(suite, "fedavg_lora", *HEADLINE, 4, "/data"))
    assert (config.rounds, config.eval.final_test_samples, config.run_name) == (10, 0, "fedavg_lora-dir0.1-mixed-s4")


def record(round_, accuracy, train_s, clients):
    return {"round": round_, "global_accuracy": accuracy, "wall_time_s": 10.0 * round_,
            "phase_seconds": {"train": train_s},
            "clients": {str(i): {"num_examples": 1000, "samples_processed": n, "train_seconds": s}
                        for i, (n, s) in enumerate(clients)}}


def headline_cell(strategy, seed, accuracy, recall=None):
    return {"strategy": strategy, "partition": HEADLINE[0], "mix": HEADLINE[1], "seed": seed,
            "final_global_accuracy": accuracy, "final_global_recall": recall}


def test_headline_detail_pairs_every_moe_method_with_every_baseline_by_seed():
    from bench.headline import paired_differences, recall_by_class

    cells = [headline_cell("fft_moe", s, a, [a, 1.0]) for s, a in enumerate([0.80, 0.85, 0.90])]
    cells += [headline_cell("head_only", s, a, [0.5, 0.5]) for s, a in enumerate([0.70, 0.80, 0.75])]
    cells += [headline_cell("flexlora", s, a) for s, a in enumerate([0.81, 0.84])]  # two seeds only
    cells.append({**headline_cell("head_only", 0, 0.1), "partition": "iid"})  # another cell: ignored
    found = {(p["method"], p["baseline"]): p["difference"] for p in paired_differences(cells, ["fft_moe", "head_only", "flexlora"])}
    assert set(found) == {("fft_moe", "head_only"), ("fft_moe", "flexlora")}
    # differences +10, +5, +15: mean 10, sample std 5, half-width t(2) 4.303 * 5 / sqrt(3) = 12.42
    assert found[("fft_moe", "head_only")] == "+10.0 (-2.4 .. +22.4; seeds +10.0, +5.0, +15.0)"
    assert found[("fft_moe", "flexlora")].startswith("+0.0 (")  # -1, +1 over the two shared seeds
    assert recall_by_class(cells, "fft_moe") == pytest.approx([0.85, 1.0])
    assert recall_by_class(cells, "flexlora") is None


def test_label_mix_is_each_seeds_partition_of_the_whole_train_split(ag_news_dir):
    from bench.headline import label_mix

    import csv

    with open(ag_news_dir / "train.csv", newline="") as f:
        labels = [int(row["label"]) for row in csv.DictReader(f)]
    mix = label_mix([0, 1], 10, str(ag_news_dir))
    for seed in (0, 1):
        assert len(mix[seed]) == 10 and all(len(counts) == 4 for counts in mix[seed])
        # every training row, once: the clients' rows of each class add up to the file's
        assert [sum(c[k] for c in mix[seed]) for k in range(4)] == [labels.count(k) for k in range(4)]
    assert mix[0] != mix[1]  # the seed draws the partition


def test_headline_detail_names_each_clients_tier_as_the_simulation_assigns_it(ag_news_dir):
    from bench.headline import detail

    cells = [headline_cell("fft_moe", 0, 0.8, [0.8, 0.8]), headline_cell("head_only", 0, 0.7, [0.7, 0.7])]
    found = detail(cells, ["fft_moe", "head_only"], 10, str(ag_news_dir), "", 10)
    # conf/base.yaml's simulation-mix: rpi4 0.4, jetson-nano 0.3, jetson-orin 0.3, by partition id
    assert found["tiers"] == ["rpi4"] * 4 + ["jetson-nano"] * 3 + ["jetson-orin"] * 3
    assert list(found["label_mix"]) == [0] and found["rounds"] == 10
    assert [(p["method"], p["baseline"]) for p in found["paired"]] == [("fft_moe", "head_only")]


def test_round_record_figures_match_hand_computation():
    rounds = [record(1, 0.5, 6.0, [(64, 2.0), (96, 4.0)]), record(2, 0.81, 3.0, [(64, 1.0), (96, 2.0)]),
              record(3, 0.9, 4.0, [(64, 1.0)])]
    assert first_reaching(rounds, 0.8)["round"] == 2
    assert first_reaching(rounds, 0.95) is None
    assert sample_steps(rounds) == 64 + 96 + 64 + 96 + 64
    assert overhead_ratio(rounds) == pytest.approx((6 / 6 + 3 / 3 + 4 / 1) / 3)


def test_headline_is_the_mean_and_spread_over_seeds():
    cells = [{"strategy": "s", "partition": HEADLINE[0], "mix": HEADLINE[1], "seed": seed, "final_global_accuracy": a,
              "client_accuracy_mean": 0.9, "client_accuracy_worst": None} for seed, a in enumerate([0.6, 0.7, 0.8])]
    cells.append({**cells[0], "partition": "iid", "final_global_accuracy": 0.1})  # another cell: ignored
    out = headline(cells, "s")
    assert out["seeds"] == [0, 1, 2]
    assert out["final_global_accuracy"] == pytest.approx(0.7)
    assert out["final_global_accuracy_std"] == pytest.approx(0.1)  # sample std: sqrt((0.1² + 0 + 0.1²) / 2)
    assert out["client_accuracy_worst"] is None and out["client_accuracy_worst_std"] is None
    two = headline([{**cells[0], "final_global_accuracy": 0.5}, {**cells[1], "final_global_accuracy": 0.7}], "s")
    assert two["final_global_accuracy_std"] == pytest.approx(0.1414213562)  # sqrt(0.1² + 0.1²) / 1
    assert headline(cells[:1], "s")["final_global_accuracy_std"] is None  # one seed: no spread


def test_dense_reference_does_the_same_expert_work_as_the_sparse_layer():
    """The kernel ratio is fair: the dense layer's FLOPs equal the sparse layer's expert FLOPs
    (all that differs is routing: the router and the gated output bias, counted by hand)."""
    tokens, d, h, m, k = 64, 32, 8, 8, 2
    moe, dense = moe_and_dense(d, h, m, k, dispatch="segmented")  # the FLOP counter skips grouped_mm
    x = torch.randn(tokens, d)
    with FlopCounterMode(display=False) as sparse_count:
        moe(x)
    with FlopCounterMode(display=False) as dense_count:
        dense(x)
    router = 2 * tokens * d * m
    gated_output_bias = 2 * tokens * m * d  # the experts' output biases mixed by the [N, M] gates
    assert sparse_count.get_total_flops() - router - gated_output_bias == dense_count.get_total_flops() == 2 * tokens * k * 2 * d * h


def test_length_grouped_batches_keep_the_data_and_cut_padding():
    lengths = [3, 17, 5, 12, 9, 2, 16, 7, 11, 4, 15, 6] * 4
    encoded = EncodedSet([[1] * n for n in lengths], list(range(len(lengths))))
    pad = lambda batches: sum(b["attention_mask"].numel() - int(b["attention_mask"].sum()) for b in batches)  # noqa: E731
    plain = list(iterate_batches(encoded, 4, 0, shuffle=True, seed=1))
    grouped = list(iterate_batches(encoded, 4, 0, shuffle=True, seed=1, group_by_length=True))
    assert sorted(int(i) for b in grouped for i in b["labels"]) == list(range(len(lengths)))  # every row once
    assert pad(grouped) < pad(plain)
    assert [b["labels"].tolist() for b in grouped] == [
        b["labels"].tolist() for b in iterate_batches(encoded, 4, 0, shuffle=True, seed=1, group_by_length=True)]
    in_order = list(iterate_batches(encoded, 4, 0, shuffle=False, group_by_length=True))
    widths = [b["input_ids"].shape[1] for b in in_order]
    assert widths == sorted(widths, reverse=True) and pad(in_order) <= pad(grouped)


def results_fixture():
    cost = lambda s, t, step: {"strategy": s, "tier": t, "batch_size": 8, "step_seconds": step, "step_gflops": 10.0,  # noqa: E731
                               "achieved_gflops_per_s": 10.0 / step, "bytes_down": 4e6, "bytes_up": 2e6,
                               "full_adapter_bytes": 8e6, "bytes_up_ratio": 0.25, "peak_rss_mb": 900.0}
    cells = [{"strategy": s, "partition": HEADLINE[0], "mix": HEADLINE[1], "seed": 0, "final_global_accuracy": a,
              "client_accuracy_mean": a, "client_accuracy_worst": a - 0.1, "rounds_to_target": None,
              "time_to_target_s": None, "bytes_total": 1e7, "wall_time_s": 100.0, "overhead_ratio": 0.6,
              "accuracy_by_round": [0.25, a]} for s, a in (("fft_moe", 0.8), ("fedavg_lora", 0.7))]
    costs = [cost(s, t, 0.5) for s in ("fft_moe", "fedavg_lora") for t in ("rpi4", "jetson-orin")]
    ceilings = [{"strategy": s, "mix": HEADLINE[1], "sample_steps": 100, "steps": 4, "accuracy": 0.88, "train_seconds": 9.0}
                for s in ("fft_moe", "fedavg_lora")]
    return {
        "suite": "unit", "date": "2026-11-21 00:00", "seconds": 60.0,
        "machine": {"cpu": "cpu", "cores": 2, "gpu": None, "torch": "x", "flwr": "y"},
        "settings": {"rounds": 1, "num_clients": 10, "target_accuracy": 0.85, "client_threads": 1,
                     "headline": {"partition": HEADLINE[0], "mix": HEADLINE[1]}},
        "matmul_peak_gflops": 50.0,
        "strategies": {s: strategy_entry(s, cells, ceilings, costs, 50.0) for s in ("fft_moe", "fedavg_lora")},
        "kernel": {"cases": [{"num_experts": 16, "top_k": 2, "tokens": 64, "moe_ms": 3.0, "dense_ms": 1.0, "ratio": 3.0}]},
        "cells": cells, "ceilings": ceilings, "client_cost": costs, "scale": [], "speedups": None,
    }


def test_report_writes_tables_and_plots(tmp_path):
    results = results_fixture()
    entry = results["strategies"]["fft_moe"]
    assert entry["step_seconds"] == {"rpi4": 0.5, "jetson-orin": 0.5}
    assert entry["achieved_gflops_per_s"]["rpi4"] == pytest.approx(20.0)
    assert entry["ceiling_accuracy"] == 0.88 and entry["overhead_ratio"] == 0.6
    json.dumps(results)  # the results dict is plain JSON
    path = report.write(results, tmp_path)
    text = path.read_text()
    assert "| fft_moe | 80.0 | 80.0 | 70.0 | 88.0 | not reached |" in text  # one seed: no spread
    assert "global acc % (± sample std over seeds)" in text
    results["strategies"]["fft_moe"].update(seeds=[0, 1], accuracy=0.6, accuracy_std=0.1414213562)  # 0.5, 0.7
    assert "| fft_moe | 60.0 ± 14.1 |" in report.headline_table(results)
    assert "| fft_moe | rpi4 | 8 | 0.50 | - | 10.0 | 20.0 | 40.0 | - |" in text
    results["headline"] = {"paired": [{"method": "fft_moe", "baseline": "head_only", "difference": "+1.0 (1 seed)"}],
                           "recall": {"fft_moe": [0.9, 0.5], "head_only": None}, "rounds": 10, "test_rows": [7600],
                           "label_mix": {0: [[3, 0], [1, 2]]}}
    detail = report.headline_detail(results)
    assert "scored on 7600 test rows, after 10 rounds" in detail and "| fft_moe | head_only | +1.0 (1 seed) |" in detail
    assert "| fft_moe | 90.0 | 50.0 |" in detail and "| 0 | 1 | 1 / 2 |" in detail
    results["headline"]["tiers"] = ["rpi4", "jetson-orin"]
    assert "| 0 | 1 (jetson-orin) | 1 / 2 |" in report.headline_detail(results)
    for name in ("unit_accuracy.png", "unit_matrix.png", "unit_costs.png", "unit_kernel.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_head_only_baseline_trains_and_sends_only_the_classifier():
    from fedmoe_app.methods import METHODS
    from fedmoe_app.model import trainable_state

    config = load_config("conf/head_only.yaml", "model.backbone=tiny-bert")
    model = METHODS["head_only"].global_model(config, 4)
    assert set(trainable_state(model)) == {"head.weight", "head.bias"}


def test_a_smoke_suite_is_each_suite_at_its_smallest_and_writes_apart():
    for name, suite in SUITES.items():
        small = smoke(suite)
        assert small.name == f"{name}-smoke" and small.rounds == 1 and small.cells() == [(*HEADLINE, 0)]
        assert small.headline_rounds == 1
        assert len(small.kernel_cases) == 1 and small.cost_tiers == 1 and len(small.scale_populations) <= 1
        assert small.speedups == suite.speedups  # every section of the suite still runs
        config = load_config("conf/fft_moe.yaml", small.overrides)
        assert config.model.backbone == "tiny-bert" and config.data.max_train_rows == 300


def test_cost_sections_are_kept_and_reused_until_the_strategies_change_or_fresh(tmp_path, monkeypatch):
    measured = []

    def fake_measure(suite, strategies, config, tiers, overrides, log=print):
        measured.append((list(strategies), overrides))
        return {"strategies": strategies, "overrides": overrides, "device": "cpu", "measured": f"call {len(measured)}"}

    monkeypatch.setattr(bench_run, "measure_costs", fake_measure)
    config = load_config("conf/fft_moe.yaml")  # train.device auto: cpu here
    quiet = lambda text: None  # noqa: E731
    costs = lambda strategies, overrides="", fresh=False: costs_of_suite(  # noqa: E731
        SUITES["full"], strategies, config, [], overrides, tmp_path, fresh, quiet)
    first, again = costs(["fft_moe", "head_only"]), costs(["fft_moe", "head_only"])
    assert first == again and first["measured"] == "call 1"
    assert json.loads((tmp_path / "costs.json").read_text()) == first
    assert costs(["head_only"])["measured"] == "call 2"
    assert costs(["head_only"], fresh=True)["measured"] == "call 3"
    assert costs(["head_only"], "train.threads=2")["measured"] == "call 4"
    assert measured == [(["fft_moe", "head_only"], ""), (["head_only"], ""), (["head_only"], ""),
                        (["head_only"], "train.threads=2")]


def fake_run(runs, name, records):
    """A finished run folder as the suites write it: metrics.jsonl, summary.json, config.yaml."""
    run_dir = runs / name
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "summary.json").write_text(json.dumps({"final_global_accuracy": records[-1]["global_accuracy"]}))
    (run_dir / "config.yaml").write_text(f"run-name: {name}\n")
    return run_dir


def test_an_archive_of_runs_reads_as_the_folder_it_was_packed_from(tmp_path, capsys):
    """docs/runs keeps each benchmark's runs as one .tar.gz; bench.paired (and through it
    bench.headline and bench.calibration) read it as they read the folder."""
    import tarfile

    from bench import paired
    from bench.archive import runs_folder

    folder = tmp_path / "full-runs"
    last = lambda acc, mean: {"round": 2, "global_accuracy": acc, "client_accuracy_mean": mean,  # noqa: E731
                              "client_accuracy_worst": mean - 0.1, "client_accuracy": {"rpi4": mean}}
    fake_run(folder, "fft_moe-dir0.1-mixed-s0", [{"round": 1, "global_accuracy": 0.5}, last(0.8, 0.9)])
    fake_run(folder, "head_only-dir0.1-mixed-s0", [{"round": 1, "global_accuracy": 0.4}, last(0.7, 0.75)])
    (folder / "head_only-dir0.1-mixed-s1").mkdir()  # unfinished (no summary.json): skipped by both
    (folder / "costs.json").write_text("{}")  # not a run: skipped by both
    archive = tmp_path / "full-runs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)

    assert runs_folder(folder) == folder
    unpacked = runs_folder(archive)
    assert unpacked != folder and runs_folder(archive) == unpacked  # extracted once per process
    from_folder, from_archive = paired.finished_runs(folder), paired.finished_runs(archive)
    assert [name for name, _ in from_archive] == [name for name, _ in from_folder] == [
        {"strategy": "fft_moe", "partition": "dir0.1", "mix": "mixed", "seed": "0"},
        {"strategy": "head_only", "partition": "dir0.1", "mix": "mixed", "seed": "0"}]
    for (_, mine), (_, theirs) in zip(from_archive, from_folder):
        assert mine.name == theirs.name and mine.parent == unpacked
        assert (mine / "metrics.jsonl").read_bytes() == (theirs / "metrics.jsonl").read_bytes()
    found = paired.collect(archive, "mixed")
    assert found == paired.collect(folder, "mixed")
    assert found[("fft_moe", "dir0.1")][0]["global_accuracy"] == 0.8  # the last round's record
    assert found[("head_only", "dir0.1")][0]["client_accuracy_mean"] == 0.75

    paired.main(["--runs", str(archive), "--strategies", "fft_moe,head_only", "--partitions", "dir0.1"])
    printed = capsys.readouterr().out
    assert printed == paired.report(folder, ["fft_moe", "head_only"], ["dir0.1"], "mixed") + "\n"
    assert "| fft_moe | 1 | 80.0 | 90.0 | 80.0 | 90.0 |" in printed
    assert "- fft_moe - head_only: global +10.0 (1 seed); personalised +15.0 (1 seed)" in printed
    with pytest.raises(FileNotFoundError, match="neither a folder of runs nor an archive"):
        runs_folder(tmp_path / "missing.tar.gz")


def test_the_run_records_kept_in_docs_are_small_archives_the_reports_read():
    """docs/runs keeps one archive per benchmark (issue 27); each stays far below 2 MB and
    reads as a folder of finished runs: the headline cell's 35 runs among the full suite's."""
    from bench.paired import finished_runs
    from fedmoe_app.config import APP_DIR

    archives = sorted((APP_DIR / "docs" / "runs").rglob("*.tar.gz"))
    assert [a.relative_to(APP_DIR / "docs" / "runs").as_posix() for a in archives] == [
        "issue14/budgets-runs.tar.gz", "issue15/full-runs.tar.gz", "issue15/remedies-runs-500-rows.tar.gz",
        "issue28/default-runs.tar.gz", "issue28/fulltest-runs.tar.gz", "issue28/headline-nola-runs.tar.gz",
        "issue28/headline-runs.tar.gz", "issue28/la-runs.tar.gz", "issue28/mu0.1-runs.tar.gz",
        "issue28/scaffold-runs.tar.gz"]
    assert all(a.stat().st_size < 2_000_000 for a in archives)
    runs = {a.name: finished_runs(a) for a in archives}
    assert len(runs["budgets-runs.tar.gz"]) == 42 and len(runs["remedies-runs-500-rows.tar.gz"]) == 9
    assert len(runs["default-runs.tar.gz"]) == 21 and len(runs["mu0.1-runs.tar.gz"]) == 9
    assert len(runs["scaffold-runs.tar.gz"]) == 9 and len(runs["fulltest-runs.tar.gz"]) == 7  # 2 to go (issue 28)
    assert len(runs["la-runs.tar.gz"]) == 9 and len(runs["headline-nola-runs.tar.gz"]) == 6
    assert len(runs["headline-runs.tar.gz"]) == 24  # at today's defaults: MoE seeds 0-2, the baselines 0-3 (head-only 0-2) so far
    headline = [name for name, _ in runs["full-runs.tar.gz"] if (name["partition"], name["mix"]) == HEADLINE]
    assert len(headline) == 35 and {n["seed"] for n in headline} == {"0", "1", "2", "3", "4"}


def test_drift_compares_final_with_best_and_the_headline_seeds_with_older_runs():
    from bench.drift import drift_of, headline_table
    from bench.headline import finished_cells

    rounds = [{"round": 0, "global_accuracy": 0.9, "global_loss": 0.1},
              {"round": 1, "global_accuracy": 0.80, "global_loss": 0.50},
              {"round": 2, "global_accuracy": 0.88, "global_loss": 0.36},
              {"round": 3, "global_accuracy": 0.871, "global_loss": 0.40}]
    found = drift_of(rounds)
    assert (found["best_round"], found["final_accuracy"], found["lowest_loss"]) == (2, 0.871, 0.36)
    assert found["accuracy_goal"] and found["loss_goal"]  # 0.9 points and 0.04 of loss: within the goals
    assert not drift_of(rounds[:3] + [{"round": 3, "global_accuracy": 0.869, "global_loss": 0.42}])["accuracy_goal"]
    cells = finished_cells(Path("docs/runs/issue15/full-runs.tar.gz"), ["fft_moe"])
    row = headline_table(cells, cells, ["fft_moe"]).splitlines()[-1]
    # the archive against itself: the same spread, a std ratio of 1, every paired difference 0
    # final accuracies 69.4, 73.4, 69.7, 40.8, 64.4: mean 63.5, sample std 13.1
    assert row.startswith("| fft_moe | 63.5 ± 13.1 | 63.5 ± 13.1 | 1.00 | +0.0 (+0.0 .. +0.0; seeds +0.0, +0.0, +0.0, +0.0, +0.0)")


def test_drift_cost_times_each_correction_on_the_same_client(ag_news_dir):
    """One step per variant on FedAvg-LoRA's MiniLM: 6 layers x (query, value) x (A, B) LoRA
    tensors and the head's weight and bias are trained, and each variant has a step time."""
    from bench.drift_cost import VARIANTS, step_seconds

    found = step_seconds("fedavg_lora", str(ag_news_dir), steps=1, repeats=1, mu=0.01)
    assert found["tensors"] == 6 * 2 * 2 + 2
    assert all(found[v] > 0 for v in VARIANTS)
