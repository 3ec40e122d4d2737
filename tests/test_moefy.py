"""MoE-fication of a dense FFN (fedmoe_app/moefy.py): neuron groups, the router's start,
and backbone experts whose sum is the dense FFN."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertModel

from fedmoe_app.moe import SparseMoE
from fedmoe_app.moefy import BackboneExperts, dense_ffn_experts, gated, group_neurons, router_from_groups


def tiny_ffn():
    """The first layer's FFN of a random tiny BERT: W1 [F, d], b1, W2 [d, F], b2, activation."""
    torch.manual_seed(0)
    layer = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).encoder.layer[0]
    return (layer.intermediate.dense.weight, layer.intermediate.dense.bias, layer.output.dense.weight,
            layer.output.dense.bias, layer.intermediate.intermediate_act_fn)


@pytest.mark.parametrize("grouping", ["contiguous", "kmeans"])
def test_groups_partition_the_neurons_into_equal_experts(grouping):
    w1 = tiny_ffn()[0]
    groups = group_neurons(w1, 8, grouping)
    assert groups.shape == (8, 8)
    assert sorted(groups.reshape(-1).tolist()) == list(range(64))
    assert all(row == sorted(row) for row in groups.tolist())
    if grouping == "contiguous":
        assert groups[1].tolist() == list(range(8, 16))


def test_balanced_kmeans_finds_planted_groups():
    torch.manual_seed(1)
    directions = F.normalize(torch.randn(4, 16), dim=1) * 10
    planted = torch.randperm(32).reshape(4, 8)  # neurons of group c point along direction c
    w1 = torch.empty(32, 16)
    for c in range(4):
        w1[planted[c]] = directions[c] + 0.1 * torch.randn(8, 16)
    found = {tuple(row) for row in group_neurons(w1, 4, "kmeans").tolist()}
    assert found == {tuple(sorted(row)) for row in planted.tolist()}


def test_bad_expert_counts_and_groupings_name_the_key():
    w1 = tiny_ffn()[0]
    with pytest.raises(ValueError, match="moe.num-experts is 6; a backbone FFN of 64 neurons"):
        group_neurons(w1, 6, "contiguous")
    with pytest.raises(ValueError, match="moe.grouping is 'random'; allowed: kmeans, contiguous"):
        group_neurons(w1, 8, "random")


def test_the_router_starts_at_each_groups_mean_pre_activation():
    w1 = tiny_ffn()[0]
    groups = group_neurons(w1, 8, "kmeans")
    x = torch.randn(5, 32)
    expected = torch.stack([(x @ w1.T)[:, g].mean(dim=1) for g in groups], dim=1)  # by hand, group by group
    torch.testing.assert_close(x @ router_from_groups(w1, groups).T, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grouping", ["contiguous", "kmeans"])
def test_all_experts_with_zero_lora_are_the_dense_ffn(grouping):
    w1, b1, w2, b2, act = tiny_ffn()
    groups = group_neurons(w1, 8, grouping)
    experts = BackboneExperts(*dense_ffn_experts(w1, b1, w2, groups), held=range(8), rank=4, scale=8 / 4, activation=act)
    x = torch.randn(7, 32)
    dense = F.linear(act(F.linear(x, w1, b1)), w2, b2)
    moe = sum(experts.forward_one(i, x) for i in range(8)) + b2
    torch.testing.assert_close(moe, dense, rtol=0, atol=1e-5)


def test_an_experts_lora_is_added_to_its_two_slices():
    w1, b1, w2, _, act = tiny_ffn()
    groups = group_neurons(w1, 4, "contiguous")
    experts = BackboneExperts(*dense_ffn_experts(w1, b1, w2, groups), held=[1, 3], rank=2, scale=4 / 2, activation=act)
    with torch.no_grad():
        experts.lora_in_b.normal_()
        experts.lora_out_b.normal_()
    x, s, g = torch.randn(3, 32), 4 / 2, groups[3]  # local expert 1 is global expert 3
    w_in = w1[g] + s * experts.lora_in_b[1] @ experts.lora_in_a[1]
    w_out = w2[:, g] + s * experts.lora_out_b[1] @ experts.lora_out_a[1]
    torch.testing.assert_close(experts.forward_one(1, x), act(x @ w_in.T + b1[g]) @ w_out.T, rtol=1e-5, atol=1e-5)
    assert set(experts.expert_state()) == {f"{e}.{n}" for e in (1, 3) for n in ("lora_in_a", "lora_in_b", "lora_out_a", "lora_out_b")}
    assert not any(name.startswith(("w_", "b_")) for name, _ in experts.named_parameters())  # the slices never train


def backbone_moe(top_k, dispatch, held=range(8), rank=4):
    w1, b1, w2, b2, act = tiny_ffn()
    groups = group_neurons(w1, 8, "kmeans")
    experts = BackboneExperts(*dense_ffn_experts(w1, b1, w2, groups), held=held, rank=rank, scale=8 / rank, activation=act)
    moe = SparseMoE(32, 8, experts, top_k=top_k, dispatch=dispatch, unit_gates=True)
    with torch.no_grad():
        moe.router.weight.copy_(router_from_groups(w1, groups))
    return moe, (w1, b1, w2, b2, act)


@pytest.mark.parametrize("dispatch", ["loop", "segmented", "grouped_mm"])
def test_with_every_expert_chosen_the_moe_is_the_dense_ffn_and_the_router_learns(dispatch):
    moe, (w1, b1, w2, b2, act) = backbone_moe(top_k=8, dispatch=dispatch)
    x = torch.randn(9, 32)
    out, _ = moe(x)
    torch.testing.assert_close(out + b2, F.linear(act(F.linear(x, w1, b1)), w2, b2), rtol=0, atol=1e-5)
    out.square().sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0  # straight-through gates: the task reaches the router


@pytest.mark.parametrize("dispatch", ["loop", "segmented", "grouped_mm"])
def test_top_k_runs_exactly_the_chosen_slices(dispatch):
    moe, _ = backbone_moe(top_k=2, dispatch=dispatch, held=[0, 2, 3, 5, 7])
    with torch.no_grad():
        moe.experts.lora_in_b.normal_()
        moe.experts.lora_out_b.normal_()
    x = torch.randn(11, 32)
    out, route = moe(x)
    local = {e: i for i, e in enumerate(moe.held)}
    dense = torch.stack([sum(moe.experts.forward_one(local[e], x[t:t + 1])[0] for e in route.topk_index[t].tolist())
                         for t in range(11)])  # by hand, token by token
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    assert set(route.topk_index.reshape(-1).tolist()) <= set(moe.held)


@pytest.mark.parametrize("gated_experts", [False, True])
@pytest.mark.parametrize("top_k, held, rank", [
    (5, [0, 2, 3, 5, 7], 4),  # k = every expert held: whole-layer products (forward_all)
    (2, [0, 2, 3, 5, 7], 4),  # sorted slots
])
def test_every_path_equals_the_loop_reference_in_outputs_and_gradients(gated_experts, top_k, held, rank):
    """Against the `loop` reference, outputs and every gradient, with trained-looking LoRAs,
    a held subset, slice experts and SwiGLU-style experts (gate and up rows stacked)."""
    results = {}
    for dispatch in ("loop", "segmented"):
        moe, (w1, b1, w2, _, act) = backbone_moe(top_k=top_k, dispatch=dispatch, held=held, rank=rank)
        if gated_experts:  # each input slice's 8 rows as gate and up halves: act(gate) * up, 4 wide
            w_in, b_in, w_out = dense_ffn_experts(w1, b1, w2, group_neurons(w1, 8, "kmeans"))
            moe.experts = BackboneExperts(w_in, b_in, w_out[:, :, :4], held=held, rank=rank, scale=2,
                                          activation=gated(F.silu))
        torch.manual_seed(3)
        with torch.no_grad():
            moe.experts.lora_in_b.normal_(std=0.1)
            moe.experts.lora_out_b.normal_(std=0.1)
        x = torch.randn(11, 32, requires_grad=True)
        out, _ = moe(x)
        out.square().sum().backward()
        results[dispatch] = (out, x.grad, *(p.grad for p in moe.parameters()))
    for ours, reference in zip(results["segmented"], results["loop"]):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_ffn_flops_per_token_scale_with_k_over_m():
    d, width, rank, tokens = 32, 8, 4, 16
    per_expert = 2 * (2 * d * width) + 2 * (2 * rank * d + 2 * rank * width)  # frozen slices + their LoRAs, per token
    router = 2 * d * 8
    for k in (1, 2, 4, 8):
        moe, _ = backbone_moe(top_k=k, dispatch="segmented")
        with FlopCounterMode(display=False) as counter:
            moe(torch.randn(tokens, 32))
        assert counter.get_total_flops() == tokens * (router + k * per_expert), k
    assert 2 * (2 * d * width) * 8 == 2 * (2 * d * 64)  # all 8 slices: the dense FFN's multiply-adds
