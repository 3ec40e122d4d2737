"""Sparse Mixture-of-Experts: a top-k router over a held expert subset and sparse dispatch.

A layer's held experts live in one module with stacked weights (`BottleneckExperts`), so
their work can run as grouped matrix products; each expert's tensors are still exposed
one by one (`expert_state`) under stable names, so a message can carry any subset.

Dispatch (`SparseMoE.dispatch`):
- `loop`: the reference: for each expert, gather its tokens, run it, scatter back.
- `grouped_mm`: slots sorted by expert, both projections as one `torch._grouped_mm` each.
- `segmented`: slots sorted by expert, one matrix product per expert over its contiguous
  segment (the weights unbound, so no per-expert full-size gradient buffers).
- `auto`: the fastest of these measured for the device and compute dtype
  (`pick_dispatch`; figures in docs/RESULTS.md, `make bench-quick`).
Every implementation computes exactly the k chosen experts per token: compute scales
with k, not with M. Where k is every expert held and the experts offer `forward_all`
(backbone experts), every dispatch but `loop` runs them all on every token as whole-layer
products, with no routing of rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe_app.config import CHOICES

DISPATCHES = CHOICES["moe.dispatch"]


@dataclass
class RouterOutput:
    """Routing of N tokens over M experts."""

    logits: torch.Tensor  # [N, M] raw router logits s = W_R x
    probs: torch.Tensor  # [N, M] softmax over the held experts, 0 for the others
    topk_index: torch.Tensor  # [N, k] chosen experts
    topk_weight: torch.Tensor  # [N, k] their gate weights
    held_mask: torch.Tensor  # [M] bool, the experts this client holds

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """[M] number of routing slots each expert received."""
        return torch.bincount(self.topk_index.reshape(-1), minlength=self.logits.shape[-1])


class TopKRouter(nn.Module):
    """Linear router `W_R x`, softmax restricted to the held experts, top-k; optionally
    with a modulation phi added to each token's candidate logits (`modulate`)."""

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        self.modulation: nn.Parameter | None = None  # phi [M], trainable where set
        self.candidates = 0

    def modulate(self, phi: torch.Tensor, candidates: int) -> None:
        """From now on route by modulated logits (UB-SMoE's Dynamic Modulated Routing): for
        each token, its `candidates` held experts with the largest logits s_i get
        s_i + phi_i, the others keep s_i. `phi` [M] becomes a trainable parameter."""
        self.modulation = nn.Parameter(phi.detach().float().clone().to(self.weight.device))
        self.candidates = candidates

    def forward(
        self, x: torch.Tensor, held_mask: torch.Tensor, top_k: int, renormalize: bool = True
    ) -> RouterOutput:
        """Route tokens `x` [N, d] to `top_k` of the held experts; the gate weights are the
        chosen probabilities, divided by their sum when `renormalize`."""
        logits = F.linear(x, self.weight)
        scores = logits.float()
        if self.modulation is not None:
            held_scores = scores.masked_fill(~held_mask, float("-inf"))
            # past the held experts topk picks masked ones, which the mask below removes again
            candidates = torch.topk(held_scores, min(self.candidates, scores.shape[-1]), dim=-1).indices  # [N, N_p]
            scores = scores + torch.zeros_like(scores).scatter(1, candidates, self.modulation[candidates])
        masked = scores.masked_fill(~held_mask, float("-inf"))
        probs = torch.softmax(masked, dim=-1)
        topk_weight, topk_index = torch.topk(probs, top_k, dim=-1)
        if renormalize:
            topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True)
        return RouterOutput(logits, probs, topk_index, topk_weight, held_mask)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matrix products on `x` run in: autocast's, where it is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _aligned(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` takes these operands: rows of a multiple of 16 bytes."""
    return all(size * x.element_size() % 16 == 0 for size in weight.shape[1:])


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: Sequence[int], dispatch: str) -> torch.Tensor:
    """`x` [S, in] holds consecutive segments of `counts[e]` rows; row r of segment e
    becomes `weight[e] @ x[r]` (weight: [E, out, in]). One grouped product or one
    product per segment (`dispatch`: grouped_mm, where the sizes suit it, | segmented)."""
    if dispatch == "grouped_mm" and _aligned(x, weight):
        offsets = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    outs = [F.linear(part, w) for part, w, n in zip(x.split(list(counts)), weight.unbind(0), counts) if n]
    return torch.cat(outs) if outs else x.new_zeros(0, weight.shape[1])


class BottleneckExperts(nn.Module):
    """The held adapter experts of one layer: expert `held[i]` is the two-layer bottleneck
    FFN d -> h -> d with weights w_in[i] [h, d], b_in[i], w_out[i] [d, h], b_out[i]."""

    def __init__(self, hidden_size: int, expert_hidden: int, held: Sequence[int], init_scale: float = 0.01) -> None:
        super().__init__()
        self.held = sorted(int(e) for e in held)
        count = len(self.held)
        bound = 1 / math.sqrt(hidden_size)  # nn.Linear's default initialisation
        self.w_in = nn.Parameter(torch.empty(count, expert_hidden, hidden_size).uniform_(-bound, bound))
        self.b_in = nn.Parameter(torch.empty(count, expert_hidden).uniform_(-bound, bound))
        self.w_out = nn.Parameter(torch.empty(count, hidden_size, expert_hidden).normal_(std=init_scale))
        self.b_out = nn.Parameter(torch.zeros(count, hidden_size))

    def expert_state(self, gradients: bool = False) -> dict[str, torch.Tensor]:
        """Each held expert's tensors, as views named `<expert>.w_in.weight` and so on (with
        `gradients`, views of their gradients, which must exist)."""
        w_in, b_in, w_out, b_out = (p.grad if gradients else p for p in (self.w_in, self.b_in, self.w_out, self.b_out))
        state = {}
        for i, expert in enumerate(self.held):
            state[f"{expert}.w_in.weight"] = w_in[i]
            state[f"{expert}.w_in.bias"] = b_in[i]
            state[f"{expert}.w_out.weight"] = w_out[i]
            state[f"{expert}.w_out.bias"] = b_out[i]
        return state

    def forward_one(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Held expert number `i` (local index) on tokens `x` [n, d]."""
        return F.linear(F.gelu(F.linear(x, self.w_in[i], self.b_in[i])), self.w_out[i], self.b_out[i])

    def forward_sorted(self, x: torch.Tensor, counts: Sequence[int], local: torch.Tensor, gate: torch.Tensor,
                       token_gates: torch.Tensor, dispatch: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts on slots sorted by expert. `x` [S, d]: slot inputs, `counts`: slots per
        held expert, `local` [S]: each slot's local expert, `gate` [S]: its gate weight,
        `token_gates` [N, E]: every token's gate per held expert. Returns the gated slot
        outputs without output bias [S, d] and the tokens' gated output bias [N, d], both in
        the compute dtype. The bias is mixed per token, one [N, E] @ [E, d] product (a
        routing cost, like the router's [N, d] @ [d, E]), not per slot: measured, gathering
        and scaling a [S, d] bias per slot costs more."""
        dtype = compute_dtype(x)
        x = x.to(dtype)
        hidden = grouped_linear(x, self.w_in.to(dtype), counts, dispatch) + self.b_in.to(dtype)[local]
        # the gate scales the narrow hidden activations, not the wide outputs
        hidden = F.gelu(hidden) * gate.to(dtype)[:, None]
        out = grouped_linear(hidden, self.w_out.to(dtype), counts, dispatch)
        return out, token_gates.to(dtype) @ self.b_out.to(dtype)


def segment_size(count: int) -> int:
    """`count` rows rounded up to one of few sizes (16, then a number with at most three
    significant bits: 20, 24, 28, 32, 40, ...), at most 25% more."""
    if count <= 16:
        return 16 if count else 0
    shift = count.bit_length() - 3
    return -(-count >> shift) << shift


def pads_segments(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether expert segments are padded to `segment_size` rows: for bf16 / fp16 on a CPU,
    where oneDNN compiles a kernel for every new matrix shape (measured: 861 us per product
    of a new shape against 33 us once compiled, [n, 384] @ [384, 64], one thread) and the
    number of tokens an expert gets changes every batch."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)


def pad_segments(token: torch.Tensor, gate: torch.Tensor, counts: Sequence[int]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Slots sorted by expert (`token`, `gate`, `counts` per expert) with each expert's
    segment padded to `segment_size` rows by slots of token 0 and gate 0, which add
    exactly nothing. Returns token, expert, gate per padded slot and the padded counts."""
    sizes = [segment_size(c) for c in counts]
    device = token.device
    counts_t, sizes_t = torch.tensor(counts, device=device), torch.tensor(sizes, device=device)
    expert_of_slot = torch.repeat_interleave(torch.arange(len(counts), device=device), counts_t)
    shift = (sizes_t.cumsum(0) - sizes_t) - (counts_t.cumsum(0) - counts_t)  # padded start - start
    dest = torch.arange(token.numel(), device=device) + shift[expert_of_slot]
    total = sum(sizes)
    padded_token = token.new_zeros(total).index_copy(0, dest, token)
    padded_gate = gate.new_zeros(total).index_copy(0, dest, gate)
    expert = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes_t)
    return padded_token, expert, padded_gate, sizes


def pick_dispatch(device: torch.device, dtype: torch.dtype) -> str:
    """The fastest dispatch measured for this device and compute dtype (`grouped_mm` needs
    torch >= 2.8 and, on CUDA, a Hopper-class GPU; elsewhere `segmented`)."""
    if not hasattr(torch, "_grouped_mm"):
        return "segmented"
    if device.type == "cuda":
        return "grouped_mm" if torch.cuda.get_device_capability(device)[0] == 9 and dtype == torch.bfloat16 else "segmented"
    # On a CPU grouped_mm was fastest in fp32 and, in two kernel runs of three, in bf16
    # (make bench-quick, docs/RESULTS.md: MoE / dense for M = 16, k = 1, 2, 4: fp32 2.37 /
    # 2.56 / 2.54 against segmented 2.82 / 2.54 / 3.10; bf16 3.99 / 4.16 / 3.96 against
    # 4.18 / 4.39 / 4.52; runs differ by up to 30%).
    return "grouped_mm"




class SparseMoE(nn.Module):
    """Top-k mixture over the experts a client holds, computed sparsely.

    Only the held experts are built (`experts`, one stacked module). Each expert runs on
    exactly the tokens routed to it, so expert compute scales with k, not with M.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        experts: nn.Module,  # BottleneckExperts or moefy.BackboneExperts: held, forward_one, forward_sorted
        top_k: int,
        renormalize: bool = True,
        renormalize_top1: bool = False,
        dispatch: str = "auto",
        unit_gates: bool = False,
    ) -> None:
        super().__init__()
        if not experts.held:
            raise ValueError("a SparseMoE needs at least one held expert")
        if not 1 <= top_k <= len(experts.held):
            raise ValueError(f"top_k={top_k} must be in [1, {len(experts.held)}] (experts held)")
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch is {dispatch!r}; allowed: {', '.join(DISPATCHES)}")
        self.num_experts = num_experts
        self.top_k = top_k
        # With k = 1 a renormalised gate is p / p = 1: the router would get no gradient from
        # the task. Switch Transformer gates top-1 with the raw probability; so do we.
        self.renormalize = renormalize and (top_k > 1 or renormalize_top1)
        self.dispatch = dispatch
        # Backbone experts are slices of one FFN: a chosen slice counts in full (with all M
        # chosen, their sum is the dense FFN), yet the router must learn from the task. So
        # the gate is g / stopgrad(g): 1 forward, the gradient of g backward (straight-through).
        self.unit_gates = unit_gates
        self.router = TopKRouter(hidden_size, num_experts)
        self.experts = experts
        held_mask = torch.zeros(num_experts, dtype=torch.bool)
        held_mask[experts.held] = True
        local_index = torch.full((num_experts,), -1, dtype=torch.long)
        local_index[experts.held] = torch.arange(len(experts.held))
        self.register_buffer("held_mask", held_mask, persistent=False)
        self.register_buffer("local_index", local_index, persistent=False)

    @property
    def held(self) -> list[int]:
        """Global indices of the held experts."""
        return list(self.experts.held)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        """Mix the top-k experts' outputs for tokens `x` [N, d]."""
        route = self.router(x, self.held_mask, self.top_k, self.renormalize)
        gates = route.topk_weight / route.topk_weight.detach() if self.unit_gates else route.topk_weight
        dispatch = self.dispatch
        if dispatch == "auto":
            dispatch = pick_dispatch(x.device, compute_dtype(x))
        if dispatch == "loop":
            return self._loop(x, route, gates), route
        if self.top_k == len(self.held) and hasattr(self.experts, "forward_all"):
            # every token runs every held expert: no routing of rows is needed
            token_gates = torch.zeros(x.shape[0], len(self.held), device=x.device, dtype=gates.dtype)
            return self.experts.forward_all(x, token_gates.scatter(1, self.local_index[route.topk_index], gates)), route
        return self._sorted(x, route, gates, dispatch), route

    def _loop(self, x: torch.Tensor, route: RouterOutput, gates: torch.Tensor) -> torch.Tensor:
        """Reference dispatch: each expert gathers its tokens, runs, and scatters back."""
        local = self.local_index[route.topk_index].reshape(-1)
        order = torch.argsort(local, stable=True)  # slots grouped by expert
        counts = torch.bincount(local, minlength=len(self.held)).tolist()
        token_of_slot = order // self.top_k
        weight_of_slot = gates.reshape(-1)[order]
        out = torch.zeros_like(x)
        start = 0
        for i, count in enumerate(counts):
            if count == 0:
                continue
            tokens = token_of_slot[start : start + count]
            expert_out = self.experts.forward_one(i, x[tokens]) * weight_of_slot[start : start + count, None]
            out.index_add_(0, tokens, expert_out.to(out.dtype))
            start += count
        return out

    def _sorted(self, x: torch.Tensor, route: RouterOutput, gates: torch.Tensor, dispatch: str) -> torch.Tensor:
        """Grouped dispatch: one gather of the slots sorted by expert, the experts' grouped
        work, one scatter-add back to the tokens."""
        local_topk = self.local_index[route.topk_index]  # [N, k]
        local = local_topk.reshape(-1)
        order = torch.argsort(local, stable=True)
        counts = torch.bincount(local, minlength=len(self.held)).tolist()
        token, expert, gate = order // self.top_k, local[order], gates.reshape(-1)[order]
        dtype = compute_dtype(x)
        if pads_segments(x.device, dtype):
            token, expert, gate, counts = pad_segments(token, gate, counts)
        token_gates = torch.zeros(x.shape[0], len(self.held), device=x.device, dtype=gates.dtype)
        token_gates = token_gates.scatter(1, local_topk, gates)
        slot_out, bias = self.experts.forward_sorted(
            x.to(dtype).index_select(0, token), counts, expert, gate, token_gates, dispatch,  # gathered in the compute dtype
        )
        return bias.index_add(0, token, slot_out)
