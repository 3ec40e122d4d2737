"""Backbone experts in whole models: a MoE-fied dense encoder and native MoE models
(tiny random configs of each family) against the dense / native computation, FLOPs that
scale with K / M, and messages that carry only what a node may train, at its rank."""

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedmoe_app.config import ConfigError, load_config
from fedmoe_app.model import build_model, num_layers, trainable_state
from fedmoe_app.backbones import load_backbone
from strategies import make_strategy
from fedmoe_app.records import from_record
from tests.test_aggregation import node, reply

NATIVE = {"tiny-mixtral": 2, "tiny-qwen2-moe": 2, "tiny-olmoe": 2}  # family: the model's own top-k


def config_for(backbone, experts, extra=""):
    return load_config("conf/hfedmoe.yaml", f"model.backbone={backbone} moe.num-experts={experts} "
                                            f"train.precision=fp32 train.device=cpu {extra}")


def batch():
    torch.manual_seed(1)
    ids = torch.randint(1000, 20000, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 7:] = 0  # padding, which no expert sees
    return ids, mask


def hidden_states(model, ids, mask):
    model.trace.start(mask)
    with torch.no_grad():
        return model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("backbone, grouping", [("tiny-bert", "contiguous"), ("tiny-bert", "kmeans"),
                                                ("minilm", "kmeans")])
def test_every_expert_active_with_zero_lora_is_the_dense_encoder(backbone, grouping):
    config = config_for(backbone, 16, f"moe.grouping={grouping}")
    model = build_model(config, 4, "moe", top_k=16)
    ids, mask = batch()
    with torch.no_grad():
        dense = load_backbone(backbone)(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(hidden_states(model, ids, mask)[real], dense[real], atol=1e-5, rtol=1e-5)
    # what trains and travels: LoRAs, routers, head; never a frozen slice
    assert all(k.split(".")[-1] in ("lora_in_a", "lora_in_b", "lora_out_a", "lora_out_b") or
               k.endswith("router.weight") or k.startswith("head.") for k in trainable_state(model))


@pytest.mark.parametrize("backbone", sorted(NATIVE))
def test_a_native_moe_model_runs_as_backbone_experts(backbone):
    config = config_for(backbone, 8)
    native = load_backbone(backbone)
    ids, mask = batch()
    with torch.no_grad():
        reference = native(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    # every expert held, the model's own top-k, zero LoRA: the native model
    model = build_model(config, 4, "moe", top_k=NATIVE[backbone])
    torch.testing.assert_close(hidden_states(model, ids, mask)[real], reference[real], atol=1e-5, rtol=1e-5)
    assert len(model.layers) == num_layers(config) == 2
    # a node's own K and held subset: each token runs K of the held experts
    held = [[1, 4, 6]] * 2
    small = build_model(config, 4, "moe", top_k=1, held=held, lora_rank=4)
    hidden_states(small, ids, mask)
    for route in small.trace.routes:
        assert route.topk_index.shape == (int(real.sum()), 1) and set(route.topk_index.unique().tolist()) <= {1, 4, 6}
    assert {a.shape[0] for k, a in trainable_state(small).items() if k.endswith("lora_in_a")} == {4}
    assert not torch.allclose(hidden_states(small, ids, mask)[real], reference[real])


def test_native_models_need_their_own_expert_count():
    with pytest.raises(ConfigError, match="'moe.num-experts' is 16; model.backbone 'tiny-mixtral' has 8 experts"):
        build_model(config_for("tiny-mixtral", 16), 4, "moe")


def test_ffn_flops_per_token_scale_with_k_over_m():
    config = config_for("tiny-bert", 16, "moe.dispatch=segmented")
    ids, mask = batch()
    tokens, layers, d, g, r = int(mask.sum()), 2, 64, 128 // 16, 16
    per_expert = 2 * (g * d) * 2 + 2 * (r * d + g * r) + 2 * (r * g + d * r)  # two slices, two LoRAs (multiply-adds x 2)
    flops = {}
    for k in (1, 2, 4, 8, 16):
        model = build_model(config, 4, "moe", top_k=k)
        with FlopCounterMode(display=False) as counter:
            hidden_states(model, ids, mask)
        flops[k] = counter.get_total_flops()
    for k in (2, 4, 8, 16):
        assert flops[k] - flops[1] == (k - 1) * tokens * layers * per_expert


def test_a_node_receives_its_experts_loras_at_its_rank_and_its_reply_moves_only_those_ranks():
    config = config_for("tiny-bert", 3)
    strategy = make_strategy(config, num_layers=1)
    strategy.nodes = {1: node(1), 2: dataclasses.replace(node(2), budget=node(2).budget.replace(lora_rank=16))}
    a, b = "layers.0.moe.experts.0.lora_in_a", "layers.0.moe.experts.0.lora_in_b"  # A [16, d=2], B [g=3, 16]
    other = "layers.0.moe.experts.2.lora_in_a"
    strategy.global_arrays = {a: np.zeros((16, 2), np.float32), b: np.zeros((3, 16), np.float32),
                              other: np.zeros((16, 2), np.float32), "layers.0.moe.router.weight": np.zeros((3, 2), np.float32),
                              "head.weight": np.zeros(2, np.float32)}
    strategy.subsets = {"client-1": [[0, 1]], "client-2": [[0, 1]]}
    sent = strategy.arrays_for(strategy.nodes[1], 1)
    assert sent[a].shape == (4, 2) and sent[b].shape == (3, 4) and other not in sent  # rpi4: rank 4, experts 0, 1
    strategy.round.sent_arrays = {1: sent, 2: strategy.arrays_for(strategy.nodes[2], 1)}
    r1 = reply(1, {a: np.full((4, 2), 3, np.float32), b: np.full((3, 4), 3, np.float32)},
               {"num-examples": 30, "routed-tokens": [4, 4, 0], "expert-usage": [0.5, 0.5, 0.0],
                "expert-importance": [0.5, 0.5, 0.0]})
    r2 = reply(2, {a: np.full((16, 2), 7, np.float32), b: np.full((3, 16), 7, np.float32)},
               {"num-examples": 10, "routed-tokens": [4, 4, 0], "expert-usage": [0.5, 0.5, 0.0],
                "expert-importance": [0.5, 0.5, 0.0]})
    arrays, _ = strategy.aggregate_train(1, [r1, r2])
    new = from_record(arrays)
    # ranks 0-3: both nodes, by rows (30 x 3 + 10 x 7) / 40 = 4; ranks 4-15: node 2 alone
    np.testing.assert_allclose(new[a][:4], 4.0)
    np.testing.assert_allclose(new[a][4:], 7.0)
    np.testing.assert_allclose(new[b][:, :4], 4.0)
    np.testing.assert_allclose(new[b][:, 4:], 7.0)


def test_a_native_moe_model_loads_from_a_folder_as_from_the_hub(tmp_path):
    """`model.backbone` as a hub id or a local folder takes the same path
    (AutoModel.from_pretrained): a saved tiny Mixtral comes back as backbone experts."""
    native = load_backbone("tiny-mixtral")
    native.save_pretrained(tmp_path / "mixtral")
    config = config_for(str(tmp_path / "mixtral"), 8)
    assert num_layers(config) == 2
    model = build_model(config, 4, "moe", top_k=2)
    ids, mask = batch()
    with torch.no_grad():
        reference = native(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(hidden_states(model, ids, mask)[real], reference[real], atol=1e-5, rtol=1e-5)
