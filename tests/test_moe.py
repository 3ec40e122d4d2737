"""Sparse MoE dispatch against a dense reference, every implementation, and compute that
scales with k."""

import pytest
import torch

from fedmoe_app import moe as moe_module
from fedmoe_app.config import load_config
from fedmoe_app.model import build_model, load_state, state_to_numpy, trainable_state
from fedmoe_app.moe import BottleneckExperts, SparseMoE, pad_segments, pick_dispatch, segment_size

D, H = 8, 4  # H * 4 bytes a multiple of 16: grouped_mm takes it
DISPATCHES = ("loop", "grouped_mm", "segmented")


def make_moe(num_experts, held, top_k, dispatch="loop", seed=0):
    torch.manual_seed(seed)
    return SparseMoE(D, num_experts, BottleneckExperts(D, H, list(held), init_scale=0.5), top_k, dispatch=dispatch)


def expert(moe, e, x):
    """Expert `e` written out from its named tensors (independent of the stacked layout)."""
    t = moe.experts.expert_state()
    hidden = torch.nn.functional.gelu(x @ t[f"{e}.w_in.weight"].T + t[f"{e}.w_in.bias"])
    return hidden @ t[f"{e}.w_out.weight"].T + t[f"{e}.w_out.bias"]


def dense_reference(moe, x):
    """Every held expert on every token, mixed by a dense [N, M] gate matrix."""
    logits = x @ moe.router.weight.T
    logits = logits.masked_fill(~moe.held_mask, float("-inf"))
    probs = torch.softmax(logits, -1)
    weight, index = torch.topk(probs, moe.top_k, -1)
    if moe.top_k > 1:  # top-1 gates with the raw probability (Switch Transformer)
        weight = weight / weight.sum(-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(1, index, weight)
    out = torch.zeros_like(x)
    for e in moe.held:
        out = out + gates[:, e : e + 1] * expert(moe, e, x)
    return out


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize(
    "num_experts,held,top_k",
    [(6, range(6), 1), (6, range(6), 2), (8, [1, 4, 6], 2), (8, [2, 5], 1), (16, range(16), 4)],
)
def test_sparse_dispatch_matches_dense_reference(num_experts, held, top_k, dispatch):
    moe = make_moe(num_experts, held, top_k, dispatch)
    x = torch.randn(37, D)
    sparse, route = moe(x)
    torch.testing.assert_close(sparse, dense_reference(moe, x), atol=1e-5, rtol=1e-5)
    # only held experts are chosen; top-k gates are renormalised, a top-1 gate is its probability
    assert set(route.topk_index.unique().tolist()) <= set(held)
    expected = torch.ones(37) if top_k > 1 else route.probs.max(-1).values
    torch.testing.assert_close(route.topk_weight.sum(-1), expected)
    unheld = [e for e in range(num_experts) if e not in held]
    assert torch.all(route.probs[:, unheld] == 0)


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_sparse_gradients_match_dense_reference(dispatch):
    moe = make_moe(8, [0, 2, 3, 7], 2, dispatch)
    x = torch.randn(23, D, requires_grad=True)
    moe(x)[0].pow(2).sum().backward()
    sparse_grads = [p.grad.clone() for p in moe.parameters()] + [x.grad.clone()]
    moe.zero_grad()
    x.grad = None
    dense_reference(moe, x).pow(2).sum().backward()
    dense_grads = [p.grad for p in moe.parameters()] + [x.grad]
    for s, d in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(s, d, atol=1e-5, rtol=1e-5)


def test_segment_sizes_are_few_and_waste_at_most_a_quarter():
    assert [segment_size(c) for c in (0, 1, 16, 17, 21, 33, 100, 129, 4096)] == [0, 16, 16, 20, 24, 40, 112, 160, 4096]
    sizes = {segment_size(c) for c in range(1, 4097)}
    assert len(sizes) == 33  # 16, then 4 sizes per doubling up to 4096
    assert all(c <= segment_size(c) <= max(16, 1.25 * c) for c in range(1, 4097))


def test_padding_the_segments_changes_nothing_but_their_sizes():
    token, gate, counts = torch.tensor([4, 0, 2, 5, 1]), torch.tensor([0.5, 0.2, 0.3, 0.9, 0.1]), [2, 0, 3]
    padded_token, expert, padded_gate, sizes = pad_segments(token, gate, counts)
    assert sizes == [16, 0, 16]
    assert expert.tolist() == [0] * 16 + [2] * 16
    assert padded_token[:2].tolist() == [4, 0] and padded_token[16:19].tolist() == [2, 5, 1]
    assert padded_gate[:2].tolist() == pytest.approx([0.5, 0.2]) and padded_gate[16:19].tolist() == pytest.approx([0.3, 0.9, 0.1])
    assert padded_gate[2:16].eq(0).all() and padded_gate[19:].eq(0).all()


@pytest.mark.parametrize("dispatch", ["grouped_mm", "segmented"])
def test_padded_segments_match_the_dense_reference_with_gradients(dispatch, monkeypatch):
    monkeypatch.setattr(moe_module, "pads_segments", lambda device, dtype: True)  # as bf16 on a CPU, in fp32
    moe = make_moe(8, [0, 2, 3, 7], 2, dispatch)
    x = torch.randn(45, D, requires_grad=True)
    out = moe(x)[0]
    torch.testing.assert_close(out, dense_reference(moe, x), atol=1e-5, rtol=1e-5)
    out.pow(2).sum().backward()
    sparse_grads = [p.grad.clone() for p in moe.parameters()] + [x.grad.clone()]
    moe.zero_grad()
    x.grad = None
    dense_reference(moe, x).pow(2).sum().backward()
    for s, d in zip(sparse_grads, [p.grad for p in moe.parameters()] + [x.grad]):
        torch.testing.assert_close(s, d, atol=1e-5, rtol=1e-5)


def test_an_expert_that_gets_no_tokens_gets_zero_gradient():
    moe = make_moe(4, range(4), 1, "grouped_mm")
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[1, 0] = 10.0  # every token with x[0] > 0 goes to expert 1, else expert 0
    x = torch.randn(20, D).abs()
    moe(x)[0].sum().backward()
    assert torch.all(moe.experts.w_in.grad[2:] == 0) and moe.experts.w_in.grad[1].abs().sum() > 0


def expert_rows(moe, x):
    """Rows of expert work one forward pass does: inputs of every expert product."""
    rows = []
    original_linear, original_one = moe_module.grouped_linear, moe.experts.forward_one

    def counting_linear(inputs, weight, counts, dispatch):
        rows.append(inputs.shape[0])
        return original_linear(inputs, weight, counts, dispatch)

    def counting_one(i, inputs):
        rows.append(2 * inputs.shape[0])  # both projections, like grouped_linear's two calls
        return original_one(i, inputs)

    moe_module.grouped_linear, moe.experts.forward_one = counting_linear, counting_one
    try:
        moe(x)
    finally:
        moe_module.grouped_linear, moe.experts.forward_one = original_linear, original_one
    return sum(rows) // 2


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_expert_compute_scales_with_k_not_m(top_k, dispatch):
    x = torch.randn(50, D)
    for num_experts in (4, 16, 64):
        moe = make_moe(num_experts, range(num_experts), top_k, dispatch)
        # each token is processed by exactly k experts: N * k rows, whatever M is
        assert expert_rows(moe, x) == 50 * top_k


@pytest.mark.parametrize("renormalize_top1,moves", [(False, True), (True, False)])
def test_top1_router_gets_a_gradient_from_the_task_loss_alone(renormalize_top1, moves):
    torch.manual_seed(0)
    moe = SparseMoE(D, 8, BottleneckExperts(D, H, [0, 2, 5, 7], init_scale=0.5), 1, renormalize_top1=renormalize_top1)
    x = torch.randn(40, D)
    moe(x)[0].pow(2).sum().backward()  # a task loss; no auxiliary term
    largest = moe.router.weight.grad.abs().max().item()
    # raw probability: the gate carries the task's gradient to the router; renormalised,
    # every gate is p / p = 1 and the router's gradient is rounding noise
    assert (largest > 1e-2) if moves else (largest < 1e-5)


def test_top_k_larger_than_held_is_rejected():
    with pytest.raises(ValueError, match="top_k"):
        make_moe(8, [1, 2], 3)


def test_auto_dispatch_is_a_measured_implementation():
    assert pick_dispatch(torch.device("cpu"), torch.float32) in DISPATCHES
    assert pick_dispatch(torch.device("cpu"), torch.bfloat16) in DISPATCHES


def test_stacked_experts_are_named_one_by_one_and_load_in_place():
    config = load_config("conf/fft_moe.yaml", "model.backbone=tiny-bert moe.num-experts=8 moe.expert-hidden=4")
    model = build_model(config, 4, "moe", held=[[1, 6], [0, 3]], top_k=1)
    state = trainable_state(model)
    assert "layers.0.moe.experts.6.w_out.bias" in state and "layers.1.moe.experts.3.w_in.weight" in state
    assert not any(k.endswith("experts.w_in") for k in state)
    assert state["layers.0.moe.experts.6.w_in.weight"].shape == (4, 64)  # [h, d] like nn.Linear
    arrays = state_to_numpy(model)
    arrays["layers.0.moe.experts.6.w_in.weight"][:] = 7.0
    load_state(model, arrays)
    stacked = model.layers[0].moe.experts.w_in
    assert torch.all(stacked[1] == 7.0) and not torch.any(stacked[0] == 7.0)
