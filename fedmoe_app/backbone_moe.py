"""Backbone experts put into a model (`moe.experts: backbone`, DESIGN section 2).

- A dense model (BERT-family encoder; Llama / Qwen / SmolLM / GPT-2 decoder): each block's
  FFN is MoE-fied (fedmoe_app/moefy.py): its intermediate neurons split into moe.num-experts
  groups, each a slice of the FFN, and the FFN replaced by a module that runs K of the M
  slices per token plus the FFN's output bias (`MoEfiedOutput` for BERT's output block,
  `MoEfiedMLP` for a decoder's MLP; a gated MLP's slice keeps its gate and up rows together).
- A native MoE decoder (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): each sparse block is
  replaced by `NativeMoEBlock`, which runs the model's own experts (gate_up_proj, down_proj)
  with our router and dispatch; the router starts as the model's, K comes from the node's
  budget instead of the model's top-k, and a shared expert (Qwen2-MoE) stays frozen beside them.

Either way every expert carries a LoRA on its two projections; clients train the LoRAs,
the routers and the head, and the frozen weights never travel. Where the FFNs are is
fedmoe_app/architecture.py's table.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import torch
from torch import nn

from fedmoe_app.adapters import AdapterSlot, RoutingTrace
from fedmoe_app.architecture import BERT, NATIVE_MOE, dense_ffn, ffn_kind, transformer_blocks
from fedmoe_app.config import ConfigError, RunConfig
from fedmoe_app.moe import SparseMoE
from fedmoe_app.moefy import BackboneExperts, dense_ffn_experts, gated, group_neurons, router_from_groups

GROUPING_SEED = 0  # groups are a property of the backbone's weights, the same in every run


@dataclass
class FFNExperts:
    """One layer's FFN as backbone experts: every expert's frozen projections (stacked),
    the router's start, and how the experts are gated."""

    w_in: torch.Tensor  # [M, h, d]
    b_in: torch.Tensor | None  # [M, h]
    w_out: torch.Tensor  # [M, d, g]
    router: torch.Tensor  # [M, d] the router's initial weights
    activation: Callable[[torch.Tensor], torch.Tensor]
    renormalize: bool  # renormalise the chosen gates (k >= 2)
    unit_gates: bool  # straight-through gates of 1 (slices of one dense FFN)
    b_out: torch.Tensor | None = None  # a MoE-fied decoder MLP's output bias, added once per token


class MoEfiedOutput(nn.Module):
    """A BERT-family layer's FFN as backbone experts: `LayerNorm(x + dropout(sum over the
    token's K experts of E_e(x) + b2))`, x being the attention output (the layer's
    intermediate block is an identity, so x arrives as both arguments)."""

    def __init__(self, ffn_output: nn.Module, moe: SparseMoE, trace) -> None:
        super().__init__()
        self.ffn_output = ffn_output  # BertOutput: dense (W2, b2), dropout, LayerNorm
        self.moe = moe
        self.trace = trace

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        out = self.trace.route(self.moe, input_tensor) + self.ffn_output.dense.bias.to(input_tensor.dtype)
        return self.ffn_output.LayerNorm(self.ffn_output.dropout(out) + input_tensor)


class MoEfiedMLP(nn.Module):
    """A decoder block's dense MLP as backbone experts: `dropout(sum over the token's K
    experts of E_e(x) + b2)` (b2 and dropout where the family has them, e.g. GPT-2)."""

    def __init__(self, moe: SparseMoE, trace: RoutingTrace, bias: torch.Tensor | None,
                 dropout: nn.Module | None) -> None:
        super().__init__()
        self.moe = moe
        self.trace = trace
        self.bias = bias
        self.dropout = dropout or nn.Identity()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.trace.route(self.moe, hidden_states)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return self.dropout(out)


class NativeMoEBlock(nn.Module):
    """A native sparse MoE block run as backbone experts, plus its frozen shared expert
    (`sigmoid(shared_expert_gate(x)) * shared_expert(x)`) where the family has one."""

    def __init__(self, block: nn.Module, moe: SparseMoE, trace) -> None:
        super().__init__()
        self.moe = moe
        self.trace = trace
        self.shared_expert = getattr(block, "shared_expert", None)
        self.shared_expert_gate = getattr(block, "shared_expert_gate", None)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.trace.route(self.moe, hidden_states)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(hidden_states)) * self.shared_expert(hidden_states)
        return out


def expert_lora_scale(config: RunConfig, global_rank: int) -> float:
    """The backbone experts' LoRA scale: lora.alpha / the global rank, at every client's rank."""
    return config.lora.alpha / global_rank


def add_backbone_experts(model: nn.Module, config: RunConfig, held: Sequence[Sequence[int]], top_k: int,
                         rank: int, global_rank: int) -> None:
    """Turn `model.backbone`'s FFNs into backbone experts (a dense model's FFNs MoE-fied: a
    BERT-family encoder, a Llama / Qwen / GPT-2 style decoder; or a native MoE model's
    sparse blocks), each layer holding `held[i]`, routing each token to `top_k`, with
    LoRAs of `rank`; the MoE layers are appended to `model.layers` (AdapterSlots)."""
    blocks = transformer_blocks(model.backbone)
    kinds = [ffn_kind(block) for block in blocks]
    if NATIVE_MOE in kinds:  # a native MoE model: its sparse blocks (dense ones, e.g. Qwen's mlp_only_layers, stay)
        slots = [(block, _native(block.mlp, config)) for block, kind in zip(blocks, kinds) if kind == NATIVE_MOE]
    elif None not in kinds:
        causal_lm = model.backbone.get_output_embeddings() is not None  # a causal LM's weights load as one
        slots = [(block, _moefied(block, config, i, causal_lm)) for i, block in enumerate(blocks)]
    else:
        raise ConfigError(f"model.backbone '{config.model.backbone}': moe.experts 'backbone' needs blocks with a "
                          "dense FFN (BERT-family, Llama / Qwen / GPT-2 style) or native MoE blocks (Mixtral, "
                          "Qwen-MoE, OLMoE); use moe.experts 'adapter' or another backbone")
    if len(held) != len(slots):
        raise ValueError(f"held experts given for {len(held)} layers, the model has {len(slots)} MoE layers")
    scale = expert_lora_scale(config, global_rank)
    for (layer, ffn), layer_held in zip(slots, held):
        experts = BackboneExperts(ffn.w_in, ffn.b_in, ffn.w_out, layer_held, rank, scale, ffn.activation, seed=config.seed)
        moe = SparseMoE(ffn.router.shape[1], config.moe.num_experts, experts, min(top_k, len(layer_held)),
                        ffn.renormalize, config.moe.renormalize_top1, config.moe.dispatch, unit_gates=ffn.unit_gates)
        with torch.no_grad():
            moe.router.weight.copy_(ffn.router)
        model.layers.append(AdapterSlot(moe))
        if not ffn.unit_gates:
            layer.mlp = NativeMoEBlock(layer.mlp, moe, model.trace)
        elif ffn_kind(layer) == BERT:  # a MoE-fied encoder FFN
            layer.output = MoEfiedOutput(layer.output, moe, model.trace)
            layer.intermediate = nn.Identity()
        else:  # a MoE-fied decoder MLP
            layer.mlp = MoEfiedMLP(moe, model.trace, ffn.b_out, getattr(layer.mlp, "dropout", None))


def _moefied(layer: nn.Module, config: RunConfig, index: int, causal_lm: bool) -> FFNExperts:
    """The experts of a dense block's FFN (slices, router start, activation); the slices are
    gated by 1 (straight-through), so all M chosen are the dense FFN. A gated MLP's neurons
    are grouped by their gate rows and each slice holds its gate rows, then its up rows."""
    ffn = dense_ffn(layer)
    groups = _groups(config.model.backbone, index, ffn.w1, config.moe.num_experts, config.moe.grouping, causal_lm)
    w_in, b_in, w_out = _slices(ffn, groups)
    activation = gated(ffn.act) if ffn.up is not None else ffn.act
    return FFNExperts(w_in, b_in, w_out, router_from_groups(ffn.w1, groups), activation, renormalize=True,
                      unit_gates=True, b_out=ffn.b2)


def _native(block: nn.Module, config: RunConfig) -> FFNExperts:
    """The experts of a native sparse MoE block (its own projections and router); gates
    renormalised over the chosen K as the family does (Mixtral always, Qwen / OLMoE by
    `norm_topk_prob`)."""
    experts, router = block.experts, block.gate
    if router.weight.shape[0] != config.moe.num_experts:
        raise ConfigError(f"config key 'moe.num-experts' is {config.moe.num_experts}; model.backbone "
                          f"'{config.model.backbone}' has {router.weight.shape[0]} experts per layer: set it to that")
    return FFNExperts(experts.gate_up_proj, None, experts.down_proj, router.weight.detach().float(),
                      gated(experts.act_fn), renormalize=getattr(router, "norm_topk_prob", True), unit_gates=False)


_GROUPS: dict[tuple, torch.Tensor] = {}
_SLICES: dict[int, tuple] = {}


def _groups(backbone: str, index: int, w1: torch.Tensor, num_experts: int, grouping: str, causal_lm: bool) -> torch.Tensor:
    """Layer `index`'s neuron groups, computed once per process from the float32 weights (a
    backbone held in bf16 would group borderline neurons differently on different nodes)."""
    key = (backbone, index, num_experts, grouping)
    if key not in _GROUPS:
        if w1.dtype != torch.float32:
            w1 = _float32_ffn_rows(backbone, causal_lm)[index]
        _GROUPS[key] = group_neurons(w1, num_experts, grouping, GROUPING_SEED)
    return _GROUPS[key]


@lru_cache(maxsize=1)
def _float32_ffn_rows(backbone: str, causal_lm: bool) -> list[torch.Tensor]:
    """Every block's FFN input rows (`DenseFFN.w1`) of the backbone loaded in float32, once."""
    from fedmoe_app.backbones import load_backbone

    return [dense_ffn(block).w1.detach().clone() for block in transformer_blocks(load_backbone(backbone, causal_lm))]


def _slices(ffn, groups: torch.Tensor) -> tuple:
    """The stacked slices (w_in, b_in, w_out) of one dense FFN, gathered once per process for
    all the models that share its frozen weights."""
    cached = _SLICES.get(id(ffn.owner))
    if cached is None or cached[0] is not ffn.owner or not torch.equal(cached[1], groups):
        cached = _SLICES[id(ffn.owner)] = (ffn.owner, groups, dense_ffn_experts(ffn.w1, ffn.b1, ffn.w2, groups, ffn.up))
    return cached[2]
