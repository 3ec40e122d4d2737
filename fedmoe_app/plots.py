"""Plots of a run's round records (see results.py for the record schema)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede the pyplot import

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.gridspec import GridSpec  # noqa: E402
from matplotlib.ticker import MaxNLocator, PercentFormatter  # noqa: E402

DPI = 120
MAX_ROUND_LABELS = 16
MAX_ANNOTATED_CELLS = 48


def _series(rounds: list[dict], get) -> tuple[list[int], list[float]]:
    """(round numbers, values) of the rounds where get(record) is a finite number."""
    xs, ys = [], []
    for record in rounds:
        value = get(record)
        if value is not None and math.isfinite(value):
            xs.append(record["round"])
            ys.append(value)
    return xs, ys


def _tiers(rounds: list[dict]) -> list[str]:
    """Tier names found in client_accuracy, in order of first appearance."""
    tiers: list[str] = []
    for record in rounds:
        for tier in record.get("client_accuracy") or {}:
            if tier not in tiers:
                tiers.append(tier)
    return tiers


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _annotate(ax, values: np.ndarray, vmax: float) -> None:
    """Write each cell's share into a heatmap, when the cells are few enough to read."""
    if values.size > MAX_ANNOTATED_CELLS:
        return
    for (row, col), value in np.ndenumerate(values):
        colour = "black" if value > 0.6 * vmax else "white"  # readable on viridis
        ax.text(col, row, f"{value:.0%}", ha="center", va="center", fontsize=8, color=colour)


def _round_axis(ax, rounds: list[dict]) -> None:
    """Integer round ticks spanning every record."""
    all_rounds = [r["round"] for r in rounds] or [0]
    ax.set_xlim(min(all_rounds) - 0.5, max(all_rounds) + 0.5)
    if len(set(all_rounds)) <= MAX_ROUND_LABELS:
        ax.set_xticks(sorted(set(all_rounds)))  # MaxNLocator finds no integer inside [r-0.5, r+0.5]
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)


def plot_accuracy(rounds: list[dict], path: Path, title: str = "", best: tuple[int, float] | None = None) -> Path:
    """Global and personalised (per tier, mean) accuracy per round with the `best` (round,
    global accuracy) marked, and beneath it the global test loss and the clients' training
    loss, as a PNG at `path`."""
    has_loss = any(r.get("global_loss") is not None or r.get("train_loss") is not None for r in rounds)
    if has_loss:
        fig, (ax, ax_loss) = plt.subplots(2, 1, figsize=(7.5, 6), sharex=True, height_ratios=(3, 2))
    else:
        fig, ax = plt.subplots(figsize=(7.5, 4))
    xs, ys = _series(rounds, lambda r: r.get("global_accuracy"))
    ax.plot(xs, ys, "-o", color="black", linewidth=2.5, markersize=5, label="global (test split)", zorder=3)
    colours = plt.get_cmap("tab10")
    for i, tier in enumerate(_tiers(rounds)):
        xs, ys = _series(rounds, lambda r: (r.get("client_accuracy") or {}).get(tier))
        ax.plot(xs, ys, "--o", color=colours(i), linewidth=1.5, markersize=3.5, label=f"clients: {tier}")
    xs, ys = _series(rounds, lambda r: r.get("client_accuracy_mean"))
    if xs:
        ax.plot(xs, ys, "-.s", color="tab:gray", linewidth=1.8, markersize=4, label="clients: mean")
    if best is not None:
        ax.plot(*best, "*", color="gold", markeredgecolor="black", markersize=15, zorder=4,
                label=f"best global: round {best[0]}, {best[1]:.1%}")
    _round_axis(ax, rounds)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.set_ylabel("accuracy")
    if title:
        ax.set_title(title)
    # outside the axes, so it never covers a line
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    if has_loss:
        for key, style, colour, label in (("global_loss", "-o", "black", "global (test split)"),
                                          ("train_loss", "--o", "tab:gray", "clients' training")):
            xs, ys = _series(rounds, lambda r: r.get(key))
            ax_loss.plot(xs, ys, style, color=colour, linewidth=1.8, markersize=3.5, label=label)
        if best is not None:
            ax_loss.axvline(best[0], color="gold", linewidth=1.5, zorder=0)
        _round_axis(ax_loss, rounds)
        ax_loss.set_ylabel("loss")
        ax_loss.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        ax = ax_loss
    ax.set_xlabel("round")
    return _save(fig, path)


def plot_expert_utilisation(rounds: list[dict], path: Path, title: str = "") -> Path | None:
    """Heatmaps of expert utilisation (last round per layer; per round averaged over layers),
    as a PNG at `path`; None (nothing written) if no round has expert_utilisation."""
    used = [r for r in rounds if r.get("expert_utilisation")]
    if not used:
        return None
    last = np.asarray(used[-1]["expert_utilisation"], dtype=float)
    per_round = np.stack([np.asarray(r["expert_utilisation"], dtype=float).mean(axis=0) for r in used])
    num_layers, num_experts = last.shape
    uniform = 1.0 / num_experts

    fig = plt.figure(figsize=(11, 4.2))
    grid = GridSpec(1, 3, figure=fig, width_ratios=[1, 1, 0.04])
    ax_last, ax_rounds, cax = fig.add_subplot(grid[0]), fig.add_subplot(grid[1]), fig.add_subplot(grid[2])
    # one colour scale for both panels so they compare; always include the uniform level
    vmax = max(np.nanmax(last), np.nanmax(per_round), 2 * uniform)
    style = dict(cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")

    image = ax_last.imshow(last, **style)
    _annotate(ax_last, last, vmax)
    ax_last.set_title(f"per layer, round {used[-1]['round']}", fontsize=10)
    ax_last.set_yticks(range(num_layers), [f"layer {i}" for i in range(num_layers)])

    ax_rounds.imshow(per_round, **style)
    _annotate(ax_rounds, per_round, vmax)
    ax_rounds.set_title("per round, mean over layers", fontsize=10)
    step = max(1, math.ceil(len(used) / MAX_ROUND_LABELS))
    ticks = list(range(0, len(used), step))
    ax_rounds.set_yticks(ticks, [str(used[i]["round"]) for i in ticks])
    ax_rounds.set_ylabel("round")

    for ax in (ax_last, ax_rounds):
        ax.set_xticks(range(num_experts))
        ax.tick_params(axis="x", labelsize=8 if num_experts > 8 else 10)
        ax.set_xlabel("expert")

    bar = fig.colorbar(image, cax=cax)
    bar.set_label("share of routed tokens")
    bar.ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    bar.ax.axhline(uniform, color="red", linewidth=2)
    bar.ax.annotate("uniform", xy=(0, uniform), xycoords=("axes fraction", "data"), xytext=(-3, 0),
                    textcoords="offset points", ha="right", va="center", fontsize=8, color="red")

    heading = f"expert utilisation (uniform = 1/{num_experts} = {100 * uniform:.3g}%, red on the colour bar)"
    fig.suptitle(f"{title}: {heading}" if title else heading, fontsize=11)
    return _save(fig, path)
