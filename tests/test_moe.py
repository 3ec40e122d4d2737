"""Sparse MoE dispatch against a dense reference, and compute that scales with k."""

import pytest
import torch

from fedmoe_app.moe import BottleneckExpert, SparseMoE

D, H = 8, 5


def make_moe(num_experts, held, top_k, seed=0):
    torch.manual_seed(seed)
    experts = {e: BottleneckExpert(D, H, init_scale=0.5) for e in held}
    return SparseMoE(D, num_experts, experts, top_k)


def dense_reference(moe, x):
    """Every held expert on every token, mixed by a dense [N, M] gate matrix."""
    logits = x @ moe.router.weight.T
    logits = logits.masked_fill(~moe.held_mask, float("-inf"))
    probs = torch.softmax(logits, -1)
    weight, index = torch.topk(probs, moe.top_k, -1)
    weight = weight / weight.sum(-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(1, index, weight)
    out = torch.zeros_like(x)
    for e in moe.held:
        out = out + gates[:, e : e + 1] * moe.experts[str(e)](x)
    return out


@pytest.mark.parametrize(
    "num_experts,held,top_k",
    [(6, range(6), 1), (6, range(6), 2), (8, [1, 4, 6], 2), (8, [2, 5], 1)],
)
def test_sparse_dispatch_matches_dense_reference(num_experts, held, top_k):
    moe = make_moe(num_experts, list(held), top_k)
    x = torch.randn(37, D)
    sparse, route = moe(x)
    torch.testing.assert_close(sparse, dense_reference(moe, x), atol=1e-5, rtol=1e-5)
    # only held experts are chosen, and the gate weights are renormalised
    assert set(route.topk_index.unique().tolist()) <= set(held)
    torch.testing.assert_close(route.topk_weight.sum(-1), torch.ones(37))
    unheld = [e for e in range(num_experts) if e not in held]
    assert torch.all(route.probs[:, unheld] == 0)


def test_sparse_gradients_match_dense_reference():
    moe = make_moe(8, [0, 2, 3, 7], 2)
    x = torch.randn(23, D, requires_grad=True)
    moe(x)[0].pow(2).sum().backward()
    sparse_grads = [p.grad.clone() for p in moe.parameters()] + [x.grad.clone()]
    moe.zero_grad()
    x.grad = None
    dense_reference(moe, x).pow(2).sum().backward()
    dense_grads = [p.grad for p in moe.parameters()] + [x.grad]
    for s, d in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(s, d, atol=1e-5, rtol=1e-5)


def count_expert_rows(moe, x):
    rows = []
    hooks = [e.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[0])) for e in moe.experts.values()]
    moe(x)
    for h in hooks:
        h.remove()
    return sum(rows)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_expert_compute_scales_with_k_not_m(top_k):
    x = torch.randn(50, D)
    for num_experts in (4, 16, 64):
        moe = make_moe(num_experts, range(num_experts), top_k)
        # each token is processed by exactly k experts: N * k rows, whatever M is
        assert count_expert_rows(moe, x) == 50 * top_k


def test_top_k_larger_than_held_is_rejected():
    with pytest.raises(ValueError, match="top_k"):
        make_moe(8, [1, 2], 3)
