"""Markdown tables and PNG plots of a benchmark results dict (<suite>.json)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.markdown import table  # noqa: E402


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _mb(value) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}"


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def headline_table(results: dict) -> str:
    """Per strategy: the headline cell's accuracies (mean ± sample std over seeds) and the ceiling."""
    rows = []
    for name, s in results["strategies"].items():
        std = f" ± {100 * s['accuracy_std']:.1f}" if len(s["seeds"]) > 1 and s["accuracy_std"] is not None else ""
        rows.append([name, f"{_pct(s['accuracy'])}{std}", _pct(s["client_accuracy_mean"]), _pct(s["client_accuracy_worst"]),
                     _pct(s["ceiling_accuracy"]), s["rounds_to_target"] or "not reached", _mb(s["bytes_total"]),
                     ",".join(map(str, s["seeds"]))])
    target = _pct(results["settings"]["target_accuracy"])
    return table(["strategy", "global acc % (± sample std over seeds)", "personalised mean %", "worst client %",
                  "centralised ceiling %", f"rounds to {target}%", "MB moved", "seeds"], rows)


def headline_detail(results: dict) -> str:
    """The headline cell's paired differences, per-class recall and label mix per client."""
    detail = results.get("headline")
    if not detail:
        return ""
    rows = [[p["method"], p["baseline"], p["difference"]] for p in detail["paired"]]
    parts = [f"Final global models scored on {', '.join(map(str, detail['test_rows'])) or '-'} test rows, "
             f"after {detail['rounds']} rounds.", "### Paired per-seed differences of global accuracy (points; 95% t-interval)",
             table(["MoE method", "baseline", "method - baseline"], rows)]
    recall = {s: r for s, r in detail["recall"].items() if r}
    if recall:
        classes = max(len(r) for r in recall.values())
        parts += ["### Recall per class of the final global model (mean over seeds, %)",
                  table(["strategy", *[f"class {c}" for c in range(classes)]],
                        [[s, *[_pct(v) for v in r]] for s, r in recall.items()])]
    tiers = detail.get("tiers") or []
    mix_rows = [[seed, f"{client} ({tiers[client]})" if client < len(tiers) else client, " / ".join(map(str, counts))]
                for seed, clients in detail["label_mix"].items() for client, counts in enumerate(clients)]
    parts += ["### Label mix per client (rows of class 0 / 1 / 2 / ..., train and held-out)",
              table(["seed", "client (partition, tier)", "rows per class"], mix_rows)]
    return "\n\n".join(parts)


def matrix_table(results: dict) -> str:
    """Every learning run."""
    rows = [[c["strategy"], c["partition"], c["mix"], c["seed"], _pct(c["final_global_accuracy"]),
             _pct(c["client_accuracy_mean"]), _pct(c["client_accuracy_worst"]), c["rounds_to_target"] or "-",
             _num(c["time_to_target_s"], 0), _mb(c["bytes_total"]), _num(c["wall_time_s"], 0)]
            for c in results["cells"]]
    return table(["strategy", "split", "tiers", "seed", "global %", "personalised %", "worst %", "rounds to target",
                  "s to target", "MB moved", "wall s"], rows)


def ceiling_table(results: dict) -> str:
    """The centralised ceilings."""
    rows = [[c["strategy"], c["mix"], c["sample_steps"], c["steps"], _pct(c["accuracy"]), _num(c["train_seconds"], 0)]
            for c in results["ceilings"]]
    return table(["strategy", "tiers matched", "sample-steps", "steps (batch 32)", "accuracy %", "train s"], rows)


def cost_table(results: dict) -> str:
    """Per strategy and tier: step time (resolved precision and fp32), FLOPs, share of the
    fp32 and bf16 matmul peaks, bytes, memory."""
    peak, peak_bf16 = results["matmul_peak_gflops"], results.get("matmul_peak_gflops_bf16")
    precision = results.get("precision", "fp32")
    rows = [[c["strategy"], c["tier"], c["batch_size"], _num(c["step_seconds"]), _num(c.get("step_seconds_fp32")),
             _num(c["step_gflops"], 1), _num(c["achieved_gflops_per_s"], 1), _pct(c["achieved_gflops_per_s"] / peak),
             _pct(c["achieved_gflops_per_s"] / peak_bf16) if peak_bf16 else "-", _mb(c["bytes_down"]),
             _mb(c["bytes_up"]), _num(c["bytes_up_ratio"], 3), _num(c["peak_rss_mb"], 0)]
            for c in results["client_cost"]]
    return table(["strategy", "tier", "batch", f"s/step ({precision})", "s/step (fp32)", "GFLOP/step", "GFLOP/s",
                  "% of fp32 peak", "% of bf16 peak", "MB down", "MB up", "up / full set", "peak RSS MB"], rows)


def same_shape_table(results: dict) -> str:
    """Per strategy and tier, at one batch and length for every tier: experts per token,
    seconds and FLOPs per step, the FFN's share of the forward FLOPs, and each tier's
    step time against the strategy's largest tier (last in the devices file)."""
    costs = [c for c in results["client_cost"] if "reference_step_seconds" in c]
    top = {}
    for c in costs:
        top[c["strategy"]] = c  # tiers run in devices-file order, the largest last
    rows = [[c["strategy"], c["tier"], f"{c['reference_batch']} x {c['max_length']}", c.get("experts_per_token") or "-",
             _num(c["reference_step_seconds"], 3), _num(c["reference_step_gflops"], 2), _pct(c["reference_ffn_share"]),
             _num(c["reference_step_seconds"] / top[c["strategy"]]["reference_step_seconds"]),
             _num(c["reference_step_gflops"] / top[c["strategy"]]["reference_step_gflops"])] for c in costs]
    return table(["strategy", "tier", "batch x length", "experts / token", "s/step", "GFLOP/step", "FFN share",
                  "s/step vs largest tier", "FLOPs vs largest tier"], rows)


def kernel_table(results: dict) -> str:
    """Sparse MoE against the dense layer doing the same k experts' work."""
    rows = [[r["num_experts"], r["top_k"], r["tokens"], r.get("precision", "fp32"),
             r.get("dispatch", "loop") + (" (auto)" if r.get("auto") else ""), _num(r["moe_ms"], 1),
             _num(r["dense_ms"], 1), _num(r["ratio"])] for r in results["kernel"]["cases"]]
    return table(["experts M", "top-k", "tokens", "precision", "dispatch", "MoE fwd+bwd ms",
                  "dense (k experts' work) ms", "ratio"], rows)


def scale_table(results: dict) -> str:
    """Server cost against population."""
    rows = [[r["strategy"], r["num_clients"], r["sampled"], _num(r["round_seconds"], 1), _num(r["train_phase_seconds"], 1),
             _num(r["server_peak_rss_mb"], 0)] for r in results["scale"]]
    return table(["strategy", "virtual clients", "sampled", "round s", "train phase s", "server peak RSS MB"], rows)


def speedup_table(results: dict) -> str:
    """Before/after of the optimisations."""
    s = results.get("speedups")
    if not s:
        return ""
    ev, tr = s["evaluation"], s["training_step"]
    rows = [
        ["global evaluation (s)", _num(ev["before"]["seconds"]), _num(ev["after"]["seconds"]), _num(ev["speedup"]),
         f"{_pct(ev['before']['real_token_share'])} -> {_pct(ev['after']['real_token_share'])}"],
        [f"training step, {tr['tier']} (s)", _num(tr["before"]["step_seconds"]), _num(tr["after"]["step_seconds"]),
         _num(tr["speedup"]), f"{_pct(tr['before']['real_token_share'])} -> {_pct(tr['after']['real_token_share'])}"],
    ]
    return table(["what", "before", "after", "speedup", "real (non-pad) tokens %"], rows)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def grouped_bars(ax, groups: list[str], series: dict[str, list[float]], ylabel: str) -> None:
    """One bar per (group, series), the series side by side within each group."""
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups)
    ax.set(ylabel=ylabel)
    ax.legend(fontsize=8)


def plot_accuracy(results: dict, path: Path) -> Path:
    """Global accuracy by round of the headline cell (seed 0) per strategy, ceilings dashed."""
    head = results["settings"]["headline"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in results["cells"]:
        if (c["partition"], c["mix"], c["seed"]) == (head["partition"], head["mix"], 0):
            evaluated = [(r, a) for r, a in enumerate(c["accuracy_by_round"]) if a is not None]
            line, = ax.plot(*zip(*evaluated), marker="o", label=c["strategy"])
            ceiling = next((x for x in results["ceilings"] if x["strategy"] == c["strategy"] and x["mix"] == head["mix"]), None)
            if ceiling:
                ax.axhline(ceiling["accuracy"], ls="--", color=line.get_color(), lw=1)
    ax.set(xlabel="round", ylabel="global test accuracy",
           title=f"{head['partition']}, {head['mix']} tiers (dashed: centralised ceiling)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_matrix(results: dict, path: Path) -> Path:
    """Final global accuracy of every (split, tiers) cell per strategy, seed 0."""
    cells = [c for c in results["cells"] if c["seed"] == 0]
    groups = list(dict.fromkeys((c["partition"], c["mix"]) for c in cells))
    accuracy = {(c["strategy"], c["partition"], c["mix"]): c["final_global_accuracy"] or 0.0 for c in cells}
    series = {s: [accuracy.get((s, *g), 0.0) for g in groups] for s in results["strategies"]}
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups)), 4))
    grouped_bars(ax, [f"{p}\n{m}" for p, m in groups], series, "final global accuracy")
    ax.set(ylim=(0, 1), title="learning matrix (seed 0)")
    return _save(fig, path)


def plot_costs(results: dict, path: Path) -> Path:
    """Seconds per local step and MB up per round, per tier and strategy."""
    costs = {(c["strategy"], c["tier"]): c for c in results["client_cost"]}
    tiers = list(dict.fromkeys(t for _, t in costs))
    strategies = list(dict.fromkeys(s for s, _ in costs))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, scale, label) in zip(axes, (("step_seconds", 1, "seconds per local step"),
                                              ("bytes_up", 1e6, "MB up per round"))):
        grouped_bars(ax, tiers, {s: [costs[s, t][key] / scale for t in tiers] for s in strategies}, label)
    return _save(fig, path)


def plot_kernel(results: dict, path: Path) -> Path:
    """Sparse MoE / dense time ratio for each (M, k)."""
    cases = results["kernel"]["cases"]
    groups = list(dict.fromkeys((r.get("precision", "fp32"), r["num_experts"], r["top_k"]) for r in cases))
    series = {}
    for r in cases:
        series.setdefault(r.get("dispatch", "loop"), {})[(r.get("precision", "fp32"), r["num_experts"], r["top_k"])] = r["ratio"]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups)), 3.5))
    grouped_bars(ax, [f"{p}\nM={m} k={k}" for p, m, k in groups],
                 {name: [values.get(g, 0.0) for g in groups] for name, values in series.items()}, "")
    ax.axhline(1.0, color="k", lw=1)
    ax.set(ylabel="MoE / dense fwd+bwd time", title="sparse dispatch cost (1.0 = free)")
    return _save(fig, path)


def write(results: dict, out_dir: Path) -> Path:
    """<suite>.md with every table, and <suite>_*.png; returns the Markdown path."""
    name = results["suite"]
    plots = {
        "accuracy": plot_accuracy(results, out_dir / f"{name}_accuracy.png"),
        "matrix": plot_matrix(results, out_dir / f"{name}_matrix.png"),
        "costs": plot_costs(results, out_dir / f"{name}_costs.png"),
        "kernel": plot_kernel(results, out_dir / f"{name}_kernel.png"),
    }
    m = results["machine"]
    sections = [
        f"# fedmoe benchmark: {name}",
        f"{results['date']}; {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}; torch {m['torch']}, "
        f"flwr {m['flwr']}; {results['settings'].get('headline_rounds', results['settings']['rounds'])} rounds in the "
        f"headline cell, {results['settings']['rounds']} elsewhere, {results['settings']['num_clients']} clients; "
        f"suite took {results['seconds'] / 60:.0f} min.",
        "## Headline: Dirichlet 0.1, mixed tiers", headline_table(results), headline_detail(results),
        f"![accuracy]({plots['accuracy'].name})",
        "## Learning matrix", matrix_table(results), f"![matrix]({plots['matrix'].name})",
        "## Centralised ceilings (same backbone and adapters, all data, same sample-steps)", ceiling_table(results),
        f"## Client cost per tier (one client process, {results['settings']['client_threads']} thread; "
        f"precision {results.get('precision', 'fp32')}; matmul peak {results['matmul_peak_gflops']:.0f} GFLOP/s fp32, "
        f"{_num(results.get('matmul_peak_gflops_bf16'), 0)} GFLOP/s bf16)", cost_table(results), f"![costs]({plots['costs'].name})",
        "## Client cost per tier at one batch and length", same_shape_table(results),
        "## Sparse MoE dispatch", kernel_table(results), f"![kernel]({plots['kernel'].name})",
    ]
    if results["scale"]:
        sections += ["## Server cost against population", scale_table(results)]
    if results.get("speedups"):
        sections += ["## Optimisations, before and after (one run)", speedup_table(results)]
    path = out_dir / f"{name}.md"
    path.write_text("\n\n".join(sections) + "\n")
    return path
