"""Injecting trainable adapters into a frozen backbone: sparse MoE adapter experts beside
every block's FFN (FFT-MoE) and PEFT LoRA. Backbone experts (the FFN's own experts) are
injected by fedmoe_app/backbone_moe.py; where each block's FFN lives is
fedmoe_app/architecture.py's table.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fedmoe_app.architecture import BERT, default_lora_targets, ffn_kind, transformer_blocks
from fedmoe_app.config import ConfigError, RunConfig
from fedmoe_app.moe import BottleneckExperts, RouterOutput, SparseMoE


class RoutingTrace:
    """State of one forward pass shared by the MoE layers: which tokens are real (not
    padding), and the RouterOutput of every layer, in layer order. A pass recomputed in
    backward (gradient checkpointing) adds no second set of routes."""

    def __init__(self) -> None:
        self.token_mask: torch.Tensor | None = None
        self.routes: list[RouterOutput] = []
        self.recording = True

    def start(self, attention_mask: torch.Tensor | None) -> None:
        """Begin a forward pass over a batch with this attention mask."""
        self.token_mask = attention_mask.bool() if attention_mask is not None else None
        self.routes = []
        self.recording = True

    def stop(self) -> None:
        """The forward pass is over: routes of recomputed passes are not kept."""
        self.recording = False

    def route(self, moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
        """Run `moe` on the real tokens of `x` [B, T, d]; padding gets zeros."""
        flat = x.reshape(-1, x.shape[-1])
        mask = self.token_mask
        if mask is None or mask.numel() != flat.shape[0]:  # no mask, or a pass over other tokens
            out, route = moe(flat)
        else:
            index = mask.reshape(-1).nonzero().squeeze(1)
            picked, route = moe(flat[index])
            out = torch.zeros_like(flat).index_copy(0, index, picked.to(flat.dtype))
        if self.recording:
            self.routes.append(route)
        return out.reshape(x.shape)


class AdapterSlot(nn.Module):
    """Holds one layer's MoE so its tensors are named `layers.<i>.moe.*`."""

    def __init__(self, moe: SparseMoE) -> None:
        super().__init__()
        self.moe = moe


class ParallelMoEOutput(nn.Module):
    """A BERT-family block's FFN output with a sparse MoE adapter beside the frozen FFN:
    `LayerNorm(x + FFN(x) + sum_e g_e(x) E_e(x))`, x being the FFN's input."""

    def __init__(self, ffn_output: nn.Module, moe: SparseMoE, trace: RoutingTrace) -> None:
        super().__init__()
        self.ffn_output = ffn_output
        self.moe = moe
        self.trace = trace

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        ffn = self.ffn_output.dropout(self.ffn_output.dense(hidden_states))
        return self.ffn_output.LayerNorm(ffn + self.trace.route(self.moe, input_tensor) + input_tensor)


class ParallelMoEMLP(nn.Module):
    """A decoder block's MLP (dense, or a native sparse MoE block) with a sparse MoE adapter
    beside it: `MLP(x) + sum_e g_e(x) E_e(x)`; the block adds the residual."""

    def __init__(self, mlp: nn.Module, moe: SparseMoE, trace: RoutingTrace) -> None:
        super().__init__()
        self.mlp = mlp
        self.moe = moe
        self.trace = trace

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.mlp(hidden_states)
        if isinstance(out, tuple):  # a sparse block that also returns its router logits
            out = out[0]
        return out + self.trace.route(self.moe, hidden_states).to(out.dtype)


def add_adapter_experts(model: nn.Module, config: RunConfig, held: Sequence[Sequence[int]], top_k: int) -> None:
    """Put a sparse MoE of adapter experts (each d -> h -> d) beside the FFN of every block of
    `model.backbone`, layer i holding `held[i]` and routing each token to `top_k` of them;
    the MoE layers are appended to `model.layers`."""
    blocks = transformer_blocks(model.backbone)
    kinds = [ffn_kind(block) for block in blocks]
    if None in kinds:
        raise ConfigError(f"model.backbone '{config.model.backbone}': a block of {type(blocks[0]).__name__} has no "
                          "FFN of a known kind (fedmoe_app/architecture.py); use another backbone")
    if len(held) != len(blocks):
        raise ValueError(f"held experts given for {len(held)} layers, the model has {len(blocks)}")
    hidden = model.backbone.config.hidden_size
    for block, kind, layer_held in zip(blocks, kinds, held):
        experts = BottleneckExperts(hidden, config.moe.expert_hidden, layer_held, config.moe.init_scale)
        moe = SparseMoE(hidden, config.moe.num_experts, experts, min(top_k, len(layer_held)), config.moe.renormalize,
                        config.moe.renormalize_top1, config.moe.dispatch)
        model.layers.append(AdapterSlot(moe))
        if kind == BERT:
            block.output = ParallelMoEOutput(block.output, moe, model.trace)
        else:
            block.mlp = ParallelMoEMLP(block.mlp, moe, model.trace)


def add_lora(model: nn.Module, config: RunConfig, rank: int, alpha: float) -> None:
    """Inject PEFT LoRA adapters of `rank` (scale alpha / rank) into `model.backbone`'s
    `lora.target-modules` (default: by architecture); the adapters are float32."""
    from peft import LoraConfig, inject_adapter_in_model  # only LoRA needs peft (1-2 s to import)

    targets = list(config.lora.target_modules) or default_lora_targets(model.backbone)
    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=config.lora.dropout, target_modules=targets,
                      fan_in_fan_out=model.backbone.config.model_type == "gpt2")  # GPT-2's Conv1D is [in, out]
    inject_adapter_in_model(lora, model.backbone)
    for param in model.backbone.parameters():  # PEFT gives adapters the base layer's dtype
        if param.requires_grad:
            param.data = param.data.float()
