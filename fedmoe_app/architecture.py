"""Where a transformer's blocks and their FFNs live, per architecture: the one table that
adapter experts, MoE-fication (backbone experts) and LoRA's default targets use.

| family | blocks | FFN of a block |
|---|---|---|
| BERT, RoBERTa, MiniLM (encoders) | `encoder.layer[i]` | `intermediate` (W1, act) + `output` (W2, residual, LayerNorm) |
| Llama, Qwen2/3, SmolLM, Mistral (decoders) | `layers[i]` of the base model | `mlp`: gate_proj, up_proj, down_proj, act_fn |
| GPT-2 | `h[i]` of the base model | `mlp`: c_fc, c_proj (Conv1D), act, dropout |
| OLMoE, Qwen2-MoE, Qwen3-MoE, Mixtral | `layers[i]` of the base model | `mlp`: a sparse block (`gate` router, fused `experts`) |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

BERT, GATED_MLP, GPT2_MLP, NATIVE_MOE = "bert", "gated-mlp", "gpt2-mlp", "native-moe"
# Where the blocks of a base model may be, in the order they are looked for.
BLOCK_PATHS = ("encoder.layer", "layers", "h")


def base_model(model: nn.Module) -> nn.Module:
    """The bare transformer of a model (a causal LM's body without its LM head)."""
    return getattr(model, "base_model", model)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of `model` (a bare model or a causal LM), in order; ValueError
    if its architecture is not in the table."""
    base = base_model(model)
    for path in BLOCK_PATHS:
        found = base
        for part in path.split("."):
            found = getattr(found, part, None)
        if isinstance(found, nn.ModuleList) and len(found):
            return list(found)
    raise ValueError(f"{type(model).__name__}: no transformer blocks at {', '.join(BLOCK_PATHS)} of its base model")


def is_native_moe_block(module: nn.Module) -> bool:
    """Whether `module` is a transformers sparse MoE block of the Mixtral / Qwen-MoE / OLMoE
    form: a linear router `gate.weight` [M, d] and fused experts `gate_up_proj`, `down_proj`."""
    experts = getattr(module, "experts", None)
    return (hasattr(getattr(module, "gate", None), "weight") and hasattr(experts, "gate_up_proj")
            and hasattr(experts, "down_proj"))


def ffn_kind(block: nn.Module) -> str | None:
    """The kind of FFN `block` has (BERT, GATED_MLP, GPT2_MLP, NATIVE_MOE), or None."""
    if hasattr(block, "intermediate") and hasattr(block, "output"):
        return BERT
    mlp = getattr(block, "mlp", None)
    if mlp is None:
        return None
    if is_native_moe_block(mlp):
        return NATIVE_MOE
    if all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
        return GATED_MLP
    if hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj"):
        return GPT2_MLP
    return None


@dataclass
class DenseFFN:
    """A dense FFN as `W2 act(W1 x + b1) + b2`, the form MoE-fication splits: `w1` [F, d]
    (for a gated MLP, the gate rows: neurons are grouped by them), `up` [F, d] (gated MLPs:
    the up rows, else None), `b1` [F] or None, `w2` [d, F], `b2` [d] or None, and `act`."""

    w1: torch.Tensor
    up: torch.Tensor | None
    b1: torch.Tensor | None
    w2: torch.Tensor
    b2: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]
    owner: torch.Tensor  # the module's own output weight (w2 may be a transposed view of it): a cache key


def dense_ffn(block: nn.Module) -> DenseFFN:
    """The dense FFN of `block` (BERT, gated-MLP or GPT-2 kind) as `DenseFFN`."""
    kind = ffn_kind(block)
    if kind == BERT:
        dense = block.intermediate.dense
        return DenseFFN(dense.weight, None, dense.bias, block.output.dense.weight, block.output.dense.bias,
                        block.intermediate.intermediate_act_fn, block.output.dense.weight)
    if kind == GATED_MLP:
        mlp = block.mlp
        return DenseFFN(mlp.gate_proj.weight, mlp.up_proj.weight, None, mlp.down_proj.weight, mlp.down_proj.bias,
                        mlp.act_fn, mlp.down_proj.weight)
    if kind == GPT2_MLP:  # Conv1D keeps its weight as [in, out]
        mlp = block.mlp
        return DenseFFN(mlp.c_fc.weight.t(), None, mlp.c_fc.bias, mlp.c_proj.weight.t(), mlp.c_proj.bias, mlp.act,
                        mlp.c_proj.weight)
    raise ValueError(f"{type(block).__name__} has no dense FFN of a known kind (found {kind})")


def count_moe_layers(config, experts: str) -> int:
    """How many MoE layers a model of transformers `config` gets: adapter experts beside every
    block; backbone experts in every block of a dense model, in the sparse blocks of a native
    MoE model (Qwen-MoE's `decoder_sparse_step` and `mlp_only_layers` leave some dense)."""
    layers = config.num_hidden_layers
    if experts == "backbone" and getattr(config, "decoder_sparse_step", None):
        skip = set(getattr(config, "mlp_only_layers", []) or [])
        return sum(1 for i in range(layers) if i not in skip and (i + 1) % config.decoder_sparse_step == 0)
    return layers


def default_lora_targets(model: nn.Module) -> list[str]:
    """The modules LoRA adapts when `lora.target-modules` is empty: PEFT's table for the
    model type (BERT query, value; Llama / Qwen / Mixtral q_proj, v_proj; GPT-2 c_attn), else
    q_proj and v_proj when the model has them."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TABLE

    model_type = getattr(model.config, "model_type", "")
    if TABLE.get(model_type):
        return list(TABLE[model_type])
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if {"q_proj", "v_proj"} <= names:
        return ["q_proj", "v_proj"]
    raise ValueError(f"no default LoRA targets for model type '{model_type}': set lora.target-modules")
