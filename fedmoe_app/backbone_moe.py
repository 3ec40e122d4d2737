"""Backbone experts put into a model (`moe.experts: backbone`, DESIGN section 2).

- A dense BERT-family encoder (MiniLM, BERT, RoBERTa): each layer's FFN is MoE-fied
  (fedmoe_app/moefy.py): its intermediate neurons split into moe.num-experts groups, the
  layer's intermediate block removed and its output block replaced by `MoEfiedOutput`,
  which runs K of the M slices per token plus the FFN's output bias.
- A native MoE decoder from transformers (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): each
  sparse block (`layer.mlp` with a `gate` router and fused `experts`) is replaced by
  `NativeMoEBlock`, which runs the model's own experts (gate_up_proj, down_proj) with our
  router and dispatch; the router starts as the model's, K comes from the node's budget
  instead of the model's top-k, and a shared expert (Qwen2-MoE) stays frozen beside them.

Either way every expert carries a LoRA on its two projections; clients train the LoRAs,
the routers and the head, and the frozen weights never travel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

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


def is_native_moe_block(module: nn.Module) -> bool:
    """Whether `module` is a transformers sparse MoE block of the Mixtral / Qwen-MoE / OLMoE
    form: a linear router `gate.weight` [M, d] and fused experts `gate_up_proj`, `down_proj`."""
    experts = getattr(module, "experts", None)
    return (hasattr(getattr(module, "gate", None), "weight") and hasattr(experts, "gate_up_proj")
            and hasattr(experts, "down_proj"))


def moe_layer_count(hf_config) -> int:
    """Layers of a transformers config that hold an FFN run as backbone experts: every
    layer of a dense encoder; the sparse layers of a native MoE model."""
    layers = hf_config.num_hidden_layers
    if getattr(hf_config, "decoder_sparse_step", None):  # Qwen2-MoE, Qwen3-MoE
        skip = set(getattr(hf_config, "mlp_only_layers", []) or [])
        return sum(1 for i in range(layers) if i not in skip and (i + 1) % hf_config.decoder_sparse_step == 0)
    return layers


def expert_lora_scale(config: RunConfig, global_rank: int) -> float:
    """The backbone experts' LoRA scale: lora.alpha / the global rank, at every client's rank."""
    return config.lora.alpha / global_rank


def add_backbone_experts(model: nn.Module, config: RunConfig, held: Sequence[Sequence[int]], top_k: int,
                         rank: int, global_rank: int) -> None:
    """Turn `model.backbone`'s FFNs into backbone experts (a dense BERT-family encoder or a
    native MoE model), each layer holding `held[i]`, routing each token to `top_k`, with
    LoRAs of `rank`; the MoE layers are appended to `model.layers` (AdapterSlots)."""
    from fedmoe_app.model import AdapterSlot  # model.py builds on this module

    backbone = model.backbone
    encoder_layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if encoder_layers is not None and all(hasattr(layer, "intermediate") for layer in encoder_layers):
        slots = [(layer, _moefied(layer, config, i)) for i, layer in enumerate(encoder_layers)]
    else:
        decoder_layers = getattr(backbone, "layers", None) or []
        slots = [(layer, _native(layer.mlp, config)) for layer in decoder_layers if is_native_moe_block(layer.mlp)]
    if not slots:
        raise ConfigError(f"model.backbone '{config.model.backbone}': moe.experts 'backbone' needs a BERT-family "
                          "encoder (encoder.layer[i].intermediate) or a native MoE model (Mixtral, Qwen2-MoE, "
                          "Qwen3-MoE, OLMoE); use moe.experts 'adapter' or another backbone")
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
        if ffn.unit_gates:  # a MoE-fied dense FFN
            layer.output = MoEfiedOutput(layer.output, moe, model.trace)
            layer.intermediate = nn.Identity()
        else:
            layer.mlp = NativeMoEBlock(layer.mlp, moe, model.trace)


def _moefied(layer: nn.Module, config: RunConfig, index: int) -> FFNExperts:
    """The experts of a BERT-family layer's FFN (slices, router start, activation); the
    slices are gated by 1 (straight-through), so all M chosen are the dense FFN."""
    w1, b1 = layer.intermediate.dense.weight, layer.intermediate.dense.bias
    w2 = layer.output.dense.weight
    groups = _groups(config.model.backbone, index, w1, config.moe.num_experts, config.moe.grouping)
    w_in, b_in, w_out = _slices(w1, b1, w2, groups)
    return FFNExperts(w_in, b_in, w_out, router_from_groups(w1, groups), layer.intermediate.intermediate_act_fn,
                      renormalize=True, unit_gates=True)


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


def _groups(backbone: str, index: int, w1: torch.Tensor, num_experts: int, grouping: str) -> torch.Tensor:
    """Layer `index`'s neuron groups, computed once per process from the float32 weights (a
    backbone held in bf16 would group borderline neurons differently on different nodes)."""
    key = (backbone, index, num_experts, grouping)
    if key not in _GROUPS:
        if w1.dtype != torch.float32:
            from fedmoe_app.model import load_encoder  # model.py builds on this module

            w1 = load_encoder(backbone).encoder.layer[index].intermediate.dense.weight
        _GROUPS[key] = group_neurons(w1, num_experts, grouping, GROUPING_SEED)
    return _GROUPS[key]


def _slices(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, groups: torch.Tensor) -> tuple:
    """The stacked slices of one FFN, gathered once per process for all the models that
    share its frozen weights."""
    cached = _SLICES.get(id(w1))
    if cached is None or cached[0] is not w1 or not torch.equal(cached[1], groups):
        cached = _SLICES[id(w1)] = (w1, groups, dense_ffn_experts(w1, b1, w2, groups))
    return cached[2]
