"""Backbone experts from a dense FFN ("MoE-fication", DESIGN section 2).

A transformer layer's FFN `W2 act(W1 x + b1) + b2` is split by its intermediate neurons
into M equal groups S_e: expert e computes `W2[:, S_e] act(W1[S_e, :] x + b1[S_e])`, so the
sum over all M experts (plus b2) is the dense FFN, and a token that runs K experts costs
K / M of its FFN. Groups are contiguous slices or balanced k-means clusters of W1's rows
(neurons with similar input weights fire together, as in MoEfication, Zhang et al. 2022).
The router starts from the groups' centroids: its logit for expert e is the mean
pre-activation of e's neurons (bias left out), so before any training it picks the groups
whose neurons are the most excited.

The frozen slices never travel; each expert carries a LoRA on its two slices (`BackboneExperts`),
which is what clients train. `BackboneExperts` also runs a native MoE model's experts
(SwiGLU-style, `gated`), which are already such pairs of projections.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe_app.moe import compute_dtype, grouped_linear

GROUPINGS = ("kmeans", "contiguous")
KMEANS_ITERATIONS = 20


def balanced_kmeans(rows: torch.Tensor, k: int, seed: int, iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """[k, n / k] row indices: `rows` [n, d] in k clusters of equal size. Each iteration
    assigns rows to clusters under the size cap (`balanced_assignment`), then moves each
    centroid to its rows' mean."""
    n = rows.shape[0]
    generator = torch.Generator().manual_seed(seed)
    centroids = rows[torch.randperm(n, generator=generator)[:k]].clone()
    for _ in range(iterations):
        cluster_of = balanced_assignment(torch.cdist(rows, centroids), n // k)
        moved = torch.stack([rows[cluster_of == c].mean(0) for c in range(k)])
        if torch.equal(moved, centroids):
            break
        centroids = moved
    return torch.stack([torch.nonzero(cluster_of == c).squeeze(1) for c in range(k)])


def balanced_assignment(distance: torch.Tensor, size: int) -> torch.Tensor:
    """[n] cluster of each row given `distance` [n, k], each cluster taking `size` rows: in
    rounds, every unassigned row asks for its nearest cluster with room, and each cluster
    takes the nearest of the rows asking, as many as it has room for (at most k rounds)."""
    n, k = distance.shape
    cluster_of = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((k,), size, dtype=torch.long)
    while (cluster_of < 0).any():
        free = torch.nonzero(cluster_of < 0).squeeze(1)
        near = distance[free].masked_fill(room[None, :] == 0, float("inf")).min(dim=1)
        by_distance = torch.argsort(near.values, stable=True)
        order = by_distance[torch.argsort(near.indices[by_distance], stable=True)]  # by cluster, nearest first
        wanted = near.indices[order]
        first_of_cluster = torch.searchsorted(wanted, wanted, right=False)
        taken = (torch.arange(len(order)) - first_of_cluster) < room[wanted]
        cluster_of[free[order[taken]]] = wanted[taken]
        room -= torch.bincount(wanted[taken], minlength=k)
    return cluster_of


def group_neurons(w1: torch.Tensor, num_experts: int, grouping: str, seed: int = 0) -> torch.Tensor:
    """[M, F / M] indices of the FFN's intermediate neurons in each expert, each row sorted:
    `contiguous` slices, or `kmeans` (balanced k-means on the rows of `w1` [F, d])."""
    neurons = w1.shape[0]
    if grouping not in GROUPINGS:
        raise ValueError(f"moe.grouping is {grouping!r}; allowed: {', '.join(GROUPINGS)}")
    if num_experts < 1 or neurons % num_experts:
        raise ValueError(f"moe.num-experts is {num_experts}; a backbone FFN of {neurons} neurons splits into a "
                         f"divisor of {neurons} equal experts")
    if grouping == "contiguous":
        return torch.arange(neurons).reshape(num_experts, -1)
    groups = balanced_kmeans(F.normalize(w1.detach().float(), dim=1), num_experts, seed)
    return groups.sort(dim=1).values


def router_from_groups(w1: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """[M, d] router weights: row e is the mean of W1's rows in group e, so the logit of
    expert e is its neurons' mean pre-activation (without bias)."""
    return w1.detach().float()[groups].mean(dim=1)


def dense_ffn_experts(w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, groups: torch.Tensor,
                      up: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The M experts of a dense FFN `W2 act(W1 x + b1)` split by neuron `groups` [M, g], as
    stacked frozen slices: w_in [M, g, d] = W1[S_e], b_in [M, g] = b1[S_e] (None without b1),
    w_out [M, d, g] = W2[:, S_e]. A gated FFN `W2 (act(W1 x) * (U x))` gives w_in [M, 2g, d],
    the gate rows W1[S_e] then the up rows U[S_e] (the order `gated` splits them in)."""
    w_in = w1.detach()[groups]
    if up is not None:
        w_in = torch.cat([w_in, up.detach()[groups]], dim=1)
    return (w_in.clone(), b1.detach()[groups].clone() if b1 is not None else None,
            w2.detach()[:, groups].permute(1, 0, 2).clone())


def gated(activation: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gated activation of SwiGLU-style experts (Mixtral, Qwen-MoE, OLMoE) whose input
    projection stacks gate and up rows: `act(gate) * up` of its two halves."""
    def glu(pre: torch.Tensor) -> torch.Tensor:
        gate, up = pre.chunk(2, dim=-1)
        return activation(gate) * up
    return glu


class BackboneExperts(nn.Module):
    """The held backbone experts of one FFN, each a frozen pair of projections with a LoRA on
    each. Expert e computes `w_out[e] act(w_in[e] x + b_in[e])` (act may be gated, taking
    the [2g] pre-activation to [g]). Built from all M experts' stacked tensors, it keeps
    the held ones as buffers (they never train or travel): w_in [E, h, d], b_in [E, h]
    (zeros if None), w_out [E, d, g]. The LoRAs, rank r, scale s:
    `w_in[e] + s B_in A_in` and `w_out[e] + s B_out A_out`; B starts at zero, so a fresh
    expert computes its frozen projections exactly. `scale` is the same at every rank (the
    global LoRA scale), so the first r ranks of a rank-R LoRA are a rank-r LoRA."""

    def __init__(self, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor, held: Sequence[int],
                 rank: int, scale: float, activation: Callable[[torch.Tensor], torch.Tensor], seed: int = 0) -> None:
        super().__init__()
        self.held = sorted(int(e) for e in held)
        every = len(self.held) == w_in.shape[0]
        pick = (lambda t: t.detach()) if every else (lambda t: t.detach()[self.held])  # all held: shared, no copy
        self.register_buffer("w_in", pick(w_in))  # [E, h, d]
        self.register_buffer("b_in", pick(b_in) if b_in is not None else w_in.new_zeros(len(self.held), w_in.shape[1]))
        self.register_buffer("w_out", pick(w_out))  # [E, d, g]
        # the output slices side by side, [d, E * g] (the dense W2 when all M are held), for `forward_all`
        self.register_buffer("w_out_all", self.w_out.permute(1, 0, 2).reshape(w_out.shape[1], -1), persistent=False)
        count, in_width, hidden, out_width = len(self.held), w_in.shape[1], w_in.shape[2], w_out.shape[2]
        self.scale = scale
        self.activation = activation
        generator = torch.Generator().manual_seed(seed)
        # PEFT's LoRA initialisation: A as nn.Linear's default (Kaiming uniform), B zero
        self.lora_in_a = nn.Parameter(torch.empty(count, rank, hidden).uniform_(
            -1 / math.sqrt(hidden), 1 / math.sqrt(hidden), generator=generator))
        self.lora_in_b = nn.Parameter(torch.zeros(count, in_width, rank))
        self.lora_out_a = nn.Parameter(torch.empty(count, rank, out_width).uniform_(
            -1 / math.sqrt(out_width), 1 / math.sqrt(out_width), generator=generator))
        self.lora_out_b = nn.Parameter(torch.zeros(count, hidden, rank))

    @property
    def rank(self) -> int:
        """The LoRA rank of these experts."""
        return self.lora_in_a.shape[1]

    def expert_state(self, gradients: bool = False) -> dict[str, torch.Tensor]:
        """Each held expert's trainable tensors, as views named `<expert>.lora_in_a` and so on
        (with `gradients`, views of their gradients, which must exist)."""
        names = ("lora_in_a", "lora_in_b", "lora_out_a", "lora_out_b")
        tensors = {name: getattr(self, name).grad if gradients else getattr(self, name) for name in names}
        return {f"{expert}.{name}": tensors[name][i] for i, expert in enumerate(self.held) for name in names}

    def forward_one(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Held expert number `i` (local index) on tokens `x` [n, d] (without the FFN's b2)."""
        pre = F.linear(x, self.w_in[i], self.b_in[i]) + self.scale * F.linear(F.linear(x, self.lora_in_a[i]), self.lora_in_b[i])
        hidden = self.activation(pre)
        return F.linear(hidden, self.w_out[i]) + self.scale * F.linear(F.linear(hidden, self.lora_out_a[i]), self.lora_out_b[i])

    def forward_all(self, x: torch.Tensor, token_gates: torch.Tensor) -> torch.Tensor:
        """Every held expert on every token `x` [N, d], expert i's hidden activations scaled by
        `token_gates[:, i]` ([N, E]); [N, d] in the compute dtype. Each projection of all
        held experts is one matrix product (with all M held, the dense FFN's), the LoRAs
        batched products: no gather, sort or scatter, for budgets where K is every expert held."""
        dtype = compute_dtype(x)
        x = x.to(dtype)
        count, width, hidden_size = self.w_in.shape
        tokens, rank = x.shape[0], self.rank
        pre = F.linear(x, self.w_in.to(dtype).reshape(count * width, hidden_size), self.b_in.to(dtype).reshape(-1))
        down = F.linear(x, self.lora_in_a.to(dtype).reshape(count * rank, hidden_size)).view(tokens, count, rank)
        pre = pre.view(tokens, count, width) + self.scale * torch.einsum("ner,ehr->neh", down, self.lora_in_b.to(dtype))
        hidden = self.activation(pre) * token_gates.to(dtype)[:, :, None]  # [N, E, g]
        out = F.linear(hidden.reshape(tokens, -1), self.w_out_all.to(dtype))
        down = torch.einsum("neg,erg->ner", hidden, self.lora_out_a.to(dtype))
        return out + self.scale * torch.einsum("ner,edr->nd", down, self.lora_out_b.to(dtype))

    def forward_sorted(self, x: torch.Tensor, counts: Sequence[int], local: torch.Tensor, gate: torch.Tensor,
                       token_gates: torch.Tensor, dispatch: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts on slots sorted by expert (the interface of moe.BottleneckExperts):
        `x` [S, d] slot inputs, `counts` slots per held expert, `local` [S] each slot's local
        expert, `gate` [S] its gate. Returns the gated slot outputs [S, d] and zeros [N, d]
        (a slice has no output bias: the FFN's b2 is added once per token, outside)."""
        dtype = compute_dtype(x)
        x = x.to(dtype)

        def lora(inputs: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            down = grouped_linear(inputs, a.to(dtype), counts, dispatch)
            return self.scale * grouped_linear(down, b.to(dtype), counts, dispatch)

        pre = grouped_linear(x, self.w_in.to(dtype), counts, dispatch) + self.b_in.to(dtype)[local]
        hidden = self.activation(pre + lora(x, self.lora_in_a, self.lora_in_b)) * gate.to(dtype)[:, None]
        out = grouped_linear(hidden, self.w_out.to(dtype), counts, dispatch) + lora(hidden, self.lora_out_a, self.lora_out_b)
        return out, out.new_zeros(token_gates.shape[0], out.shape[1])
