"""What each benchmark suite runs: `quick` (minutes, the headline cell), `skew` (the headline cell
with 5 seeds x 6 rounds, IID and Dirichlet 0.5 beside it) and `full` (the protocol that ranks
methods: the headline cell with 5 seeds x 10 rounds scored on the whole test split, the rest
of the matrix at 6 rounds, and every cost section)."""

from __future__ import annotations

from dataclasses import dataclass, replace

# Data splits of the learning matrix: name -> run-config overrides.
PARTITIONS = {
    "iid": "data.partitioner=iid",
    "dir0.5": "data.partitioner=dirichlet data.alpha=0.5",
    "dir0.1": "data.partitioner=dirichlet data.alpha=0.1",
}
# Device populations: `mixed` is devices.simulation-mix of the config; `high` puts every
# client on the tier with the largest budget.
MIXES = ("mixed", "high")
HEADLINE = ("dir0.1", "mixed")
EVAL_HALFWAY = "eval.every=5"  # 10-round headline runs: evaluated after rounds 5 and 10 (and before training)


@dataclass(frozen=True)
class Suite:
    """One benchmark suite's sizes."""

    name: str
    rounds: int
    partitions: tuple[str, ...]
    mixes: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)  # every cell
    headline_seeds: tuple[int, ...] = (0,)  # the headline cell (dir0.1, mixed)
    headline_rounds: int = 0  # rounds of the headline cell (0: `rounds`)
    headline_overrides: str = ""  # applied to the headline cell's runs besides `overrides`
    num_clients: int = 10
    target_accuracy: float = 0.8  # rounds and wall time to reach it
    scale_populations: tuple[int, ...] = ()  # virtual clients, 10 sampled per round
    scale_rounds: int = 2
    kernel_cases: tuple[tuple[int, int], ...] = ((16, 2),)  # (experts M, top-k)
    kernel_tokens: int = 2048
    speedups: bool = False  # measure the optimisations before/after
    cost_tiers: int = 0  # client cost of the first N tiers of conf/devices.yaml (0: every tier)
    overrides: str = ""  # applied to every run of the suite

    def cells(self) -> list[tuple[str, str, int]]:
        """(partition, mix, seed) of every learning run, headline first."""
        cells = [(*HEADLINE, seed) for seed in self.headline_seeds]
        for partition in self.partitions:
            for mix in self.mixes:
                cells += [(partition, mix, s) for s in self.seeds if (partition, mix, s) not in cells]
        return cells


SUITES = {
    "quick": Suite(
        name="quick", rounds=2, partitions=(HEADLINE[0],), mixes=(HEADLINE[1],),
        kernel_cases=((4, 1), (16, 1), (16, 2), (16, 4)),
    ),
    # The label-skew protocol: the headline cell with 5 seeds x 6 rounds, IID and Dirichlet
    # 0.5 with seed 0 beside it (where a method's lead must not be lost).
    "skew": Suite(
        name="skew", rounds=6, partitions=("iid", "dir0.5"), mixes=(HEADLINE[1],), headline_seeds=(0, 1, 2, 3, 4),
        kernel_cases=((16, 2),),
    ),
    # The protocol that ranks methods (issue 15): the headline cell with 5 seeds x 10 rounds,
    # its final models scored on the whole test split; the rest of the matrix at 6 rounds.
    "full": Suite(
        name="full", rounds=6, partitions=tuple(PARTITIONS), mixes=MIXES, headline_seeds=(0, 1, 2, 3, 4),
        headline_rounds=10, headline_overrides=f"eval.final-test-samples=0 {EVAL_HALFWAY}",
        scale_populations=(10, 100, 1000), speedups=True,
        kernel_cases=((4, 1), (8, 1), (8, 2), (16, 1), (16, 2), (16, 4), (32, 2), (64, 2)),
    ),
}

# A tiny random backbone and a few hundred rows: every section runs, in about a minute.
SMOKE_OVERRIDES = ("model.backbone=tiny-bert data.max-train-rows=300 eval.test-samples=100 eval.final-test-samples=100 "
                   "moe.num-experts=4 moe.expert-hidden=8")


def smoke(suite: Suite) -> Suite:
    """`suite` at its smallest, to check a setup end to end before a long run (its numbers
    mean nothing): a tiny random backbone, one round, seed 0, the headline cell, the first
    kernel case, tier and scale population; results go to <suite>-smoke.json."""
    return replace(
        suite, name=f"{suite.name}-smoke", rounds=1, headline_rounds=1, headline_overrides="", partitions=(HEADLINE[0],), mixes=(HEADLINE[1],), seeds=(0,),
        headline_seeds=(0,), scale_populations=suite.scale_populations[:1], scale_rounds=1,
        kernel_cases=suite.kernel_cases[:1], kernel_tokens=256, cost_tiers=1, overrides=f"{suite.overrides} {SMOKE_OVERRIDES}".strip(),
    )
