"""The model a client trains: a frozen Hugging Face backbone, trainable adapters, and the
task's output (a classification head, or the causal LM's own frozen LM head).

Adapters are sparse MoE layers (`moe`: adapter experts beside every block's FFN,
fedmoe_app/adapters.py, or the FFN's own experts with a LoRA each,
fedmoe_app/backbone_moe.py), PEFT LoRA (`lora`), or none (`head`: only the classification
head trains). Loading backbones is fedmoe_app/backbones.py; the tensor names a message
carries are fedmoe_app/names.py.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fedmoe_app.adapters import RoutingTrace, add_adapter_experts, add_lora
from fedmoe_app.architecture import base_model, count_moe_layers
from fedmoe_app.backbone_moe import add_backbone_experts
from fedmoe_app.backbones import frozen_backbone, hf_config, share_weights_copy
from fedmoe_app.budgets import max_lora_rank
from fedmoe_app.config import ConfigError, RunConfig
from fedmoe_app.moe import BottleneckExperts, SparseMoE
from fedmoe_app.moefy import BackboneExperts
from fedmoe_app.precision import Precision, resolve_precision
from fedmoe_app.system import torch_device

ADAPTERS = ("moe", "lora", "head")


class AdapterModel(nn.Module):
    """A frozen backbone with adapters: their MoE layers (`layers`, named `layers.<i>.moe.*`),
    the routing trace they share, and the precision forward computes in."""

    def __init__(self, backbone: nn.Module, precision: Precision = Precision("fp32", "default")) -> None:
        super().__init__()
        # `layers` is registered before `backbone` so shared MoE modules take its names.
        self.layers = nn.ModuleList()
        self.trace = RoutingTrace()
        self.backbone = backbone
        self.precision = precision  # forward autocasts to it
        self.backbone.requires_grad_(False)
        self.checkpointing = False

    def train(self, mode: bool = True) -> "AdapterModel":
        """Train mode for adapters and head; the frozen backbone stays in eval mode (no
        dropout), its blocks recomputing in backward when gradient checkpointing is on."""
        super().train(mode)
        self.backbone.eval()
        if self.checkpointing and mode:
            for module in self.backbone.modules():
                if getattr(module, "gradient_checkpointing", False):
                    module.training = True  # transformers checkpoints a block only in training mode
        return self

    def enable_checkpointing(self) -> None:
        """Recompute each transformer block's activations in backward (less memory)."""
        self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.checkpointing = True

    @property
    def moe_layers(self) -> list[SparseMoE]:
        """The MoE of every layer, in layer order (empty for LoRA)."""
        return [slot.moe for slot in self.layers]


class AdapterClassifier(AdapterModel):
    """Frozen encoder + adapters + linear head on the pooled output."""

    def __init__(self, backbone: nn.Module, num_labels: int, pooling: str = "mean",
                 precision: Precision = Precision("fp32", "default")) -> None:
        super().__init__(backbone, precision)
        self.pooling = pooling
        self.head = nn.Linear(backbone.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits [B, C] in float32, computed in the model's precision; this pass's
        routing is left in `self.trace.routes`."""
        pooled = self.features(input_ids, attention_mask)
        with self.precision.autocast(input_ids.device):
            return self.head(pooled).float()

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The head's input [B, D] in float32: the adapted encoder's pooled output."""
        self.trace.start(attention_mask)
        with self.precision.autocast(input_ids.device):
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
            if self.pooling == "cls":
                return hidden[:, 0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class AdapterCausalLM(AdapterModel):
    """Frozen causal LM (its LM head frozen too) + adapters."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits in float32, computed in the model's precision: [B, T, V], or only
        at `positions` ([P] flat indices into B * T), [P, V], so a loss over a few target
        tokens never materialises logits over the whole sequence. Routing: `self.trace.routes`."""
        self.trace.start(attention_mask)
        with self.precision.autocast(input_ids.device):
            hidden = base_model(self.backbone)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if positions is not None:
                hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
            return self.backbone.get_output_embeddings()(hidden).float()

    def decode_step(self, input_ids: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
        """One step of decoding an unpadded row: the next-token logits [V] (float32) after
        `input_ids` [1, T] (the whole prompt on the first step, then the one new token), and
        the attention keys and values of everything so far (Hugging Face's cache) for the next step."""
        self.trace.start(None)
        with self.precision.autocast(input_ids.device):
            out = base_model(self.backbone)(input_ids=input_ids, cache=cache, use_cache=True)
            logits = self.backbone.get_output_embeddings()(out.last_hidden_state[0, -1])
        return logits.float(), out.cache


def num_layers(config: RunConfig) -> int:
    """Number of MoE layers of the configured backbone (adapter experts: every block; backbone
    experts: every block of a dense model, the sparse blocks of a native MoE model)."""
    return count_moe_layers(hf_config(config.model.backbone), config.moe.experts)


def build_model(
    config: RunConfig,
    num_labels: int,
    adapter: str,
    held: Sequence[Sequence[int]] | None = None,
    top_k: int | None = None,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
) -> AdapterModel:
    """A fresh model with `adapter` ('moe', 'lora' or 'head') on a copy of the cached backbone:
    a classifier of `num_labels` classes (task classification) or a causal LM (task
    instruction, `num_labels` unused).

    For 'moe', `held` lists the experts each layer holds (default: all) and `top_k` the
    experts per token (default: moe.eval-top-k); the experts are adapters or the backbone's
    own (moe.experts), the latter with LoRAs of `lora_rank` (default: the largest lora-rank
    of the device tiers, the global rank). For 'lora', `lora_rank` defaults to lora.rank
    and `lora_alpha` (PEFT's scale is alpha / rank) to lora.alpha. Initial values are
    seeded by `config.seed` (the same on every device); the model is on `train.device`
    and computes in `train.precision` (the frozen backbone held in that precision, the
    trainable tensors in float32).
    """
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter is {adapter!r}; allowed: {', '.join(ADAPTERS)}")
    device = torch_device(config.train.device)
    precision = resolve_precision(config.train.precision, device)
    from fedmoe_app.tasks import task_of  # tasks build on this module

    causal_lm = task_of(config).causal_lm
    backbone = share_weights_copy(frozen_backbone(config.model.backbone, device, precision.dtype, causal_lm))
    if causal_lm:
        _check_plain_lm_head(config.model.backbone, backbone.config)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        if causal_lm:
            model = AdapterCausalLM(backbone, precision)
        else:
            model = AdapterClassifier(backbone, num_labels, config.model.pooling, precision)
        if adapter == "moe":
            every = list(range(config.moe.num_experts))
            held = held if held is not None else [every] * num_layers(config)
            if config.moe.experts == "backbone":
                global_rank = max_lora_rank(config)
                add_backbone_experts(model, config, held, top_k or config.moe.eval_top_k, lora_rank or global_rank,
                                     global_rank)
            else:
                add_adapter_experts(model, config, held, top_k or config.moe.eval_top_k)
        elif adapter == "lora":
            add_lora(model, config, lora_rank or config.lora.rank, lora_alpha or config.lora.alpha)
    if config.model.gradient_checkpointing:
        model.enable_checkpointing()
    return model.to(device).train(False)


# Config fields of families whose LM head output is post-processed (Gemma2's softcapping,
# Cohere's and Granite's logit scaling): AdapterCausalLM applies the LM head alone.
SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _check_plain_lm_head(name: str, hf_config) -> None:
    """ConfigError if the model post-processes its LM head's logits, which AdapterCausalLM does not."""
    for field in SCALED_LOGITS:
        if getattr(hf_config, field, None) not in (None, 1.0):
            raise ConfigError(f"model.backbone '{name}' scales its logits ({field}={getattr(hf_config, field)}), "
                              "which the instruction task does not apply; use a Llama, Qwen, SmolLM, GPT-2, OLMoE, "
                              "Qwen-MoE or Mixtral model")


def trainable_state(model: nn.Module, gradients: bool = False) -> dict[str, torch.Tensor]:
    """The trainable tensors by their stable names; a stacked expert module's tensors
    appear expert by expert (`layers.3.moe.experts.7.w_in.weight`), as views. With
    `gradients`: their gradients, named and viewed alike (every trainable tensor must have one)."""
    state = {}
    expert_modules = (BottleneckExperts, BackboneExperts)
    for prefix, module in model.named_modules():
        if isinstance(module, expert_modules):
            state.update({f"{prefix}.{name}": view for name, view in module.expert_state(gradients).items()})
    stacked = {id(p) for m in model.modules() if isinstance(m, expert_modules) for p in m.parameters()}
    state.update({name: p.grad if gradients else p for name, p in model.named_parameters()
                  if p.requires_grad and id(p) not in stacked})
    return state


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimiser updates."""
    return [p for p in model.parameters() if p.requires_grad]


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """The trainable tensors as NumPy arrays (copies)."""
    return {name: p.detach().cpu().numpy().copy() for name, p in trainable_state(model).items()}


def load_state(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy `arrays` into the model's trainable tensors; the names must match exactly."""
    params = trainable_state(model)
    missing = sorted(set(params) - set(arrays))
    extra = sorted(set(arrays) - set(params))
    if missing or extra:
        raise KeyError(f"arrays do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(torch.as_tensor(arrays[name]))
