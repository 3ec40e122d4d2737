"""Client drift: the learning-rate schedule over rounds (by hand; sent by the server, used by
the clients, recorded) and FedProx's proximal term (its gradient by hand, its value through
local training, Flower's FedProx on dense replies)."""

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.serverapp.strategy import FedProx

from conftest import InProcessGrid, local_training_setup
from fedmoe_app import client as client_module
from fedmoe_app.config import ConfigError, load_config
from fedmoe_app.schedule import round_lr
from fedmoe_app.train import ProximalTerm
from server_app import main
from strategies import make_strategy
from tests.test_aggregation import node
from tests.test_server_optimizer import ours, run_flower, run_ours, trained_sets


def train_config(overrides):
    return load_config("conf/fedavg_lora.yaml", overrides).train


def test_schedules_by_hand():
    lr, floor = 1e-3, 1e-4
    cosine = train_config(f"train.lr-schedule=cosine train.lr-min={floor}")
    # 6 rounds: progress (r - 1) / 6; the floor would be round 7's
    expected = [floor + (lr - floor) * (1 + math.cos(math.pi * (r - 1) / 6)) / 2 for r in range(1, 7)]
    assert [round_lr(cosine, r, 6) for r in range(1, 7)] == pytest.approx(expected)
    assert round_lr(cosine, 1, 6) == lr and round_lr(cosine, 4, 6) == pytest.approx((lr + floor) / 2)
    warm_linear = train_config("train.lr-schedule=linear train.warmup-rounds=2")
    assert [round_lr(warm_linear, r, 6) for r in range(1, 7)] == pytest.approx(
        [lr / 3, 2 * lr / 3, lr, 0.75 * lr, 0.5 * lr, 0.25 * lr])
    assert [round_lr(train_config("train.lr-schedule=constant"), r, 6) for r in (1, 6)] == [lr, lr]
    assert round_lr(train_config("train.lr-schedule=constant train.warmup-rounds=1"), 1, 6) == lr / 2  # warm-up too


@pytest.mark.parametrize("overrides, message", [
    ("train.lr=.nan", "'train.lr' is nan; allowed: a number > 0"),
    ("train.lr=-0.5", "'train.lr' is -0.5; allowed: a number > 0"),
    ("train.lr-min=0.01", r"'train.lr-min' is 0.01; allowed: \[0, train.lr = 0.001\]"),
    ("train.warmup-rounds=6", "'train.warmup-rounds' is 6; allowed: 0 .. rounds - 1 = 5"),
    ("train.proximal-mu=-1", "'train.proximal-mu' is -1.0; allowed: a number >= 0"),
    ("train.proximal-mu=.nan", "'train.proximal-mu' is nan"),
    ("train.lr-schedule=step", "'train.lr-schedule'.*allowed: constant, cosine, linear"),
])
def test_bad_schedule_and_proximal_keys_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("conf/fedavg_lora.yaml", overrides)


def test_a_train_message_with_a_bad_rate_is_refused_by_the_client():
    config = load_config("conf/fedavg_lora.yaml")
    assert client_module.train_settings({"lr": 0.02, "proximal-mu": 0.5}, config) == (0.02, 0.5)
    assert client_module.train_settings({}, config) == (config.train.lr, config.train.proximal_mu)
    for bad in ({"lr": float("nan")}, {"lr": 0.0}, {"lr": True}, {"proximal-mu": -1.0}):
        with pytest.raises(ValueError, match="train message entry"):
            client_module.train_settings(bad, config)


def test_the_proximal_gradient_is_mu_times_the_drift_by_hand():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    term = ProximalTerm(params, mu=0.3)
    term.add_gradient()  # w = w_global: a zero gradient where backward left none, a zero value
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params) and term.value_sum.item() == 0.0
    drift = [torch.randn_like(p) for p in params]
    task_grad = torch.randn(3, 4)
    with torch.no_grad():
        for p, d in zip(params, drift):
            p.add_(d)
    params[0].grad, params[1].grad = task_grad.clone(), None  # backward reached the first only
    term.add_gradient()
    torch.testing.assert_close(params[0].grad, task_grad + 0.3 * drift[0])
    torch.testing.assert_close(params[1].grad, 0.3 * drift[1])
    assert term.value_sum.item() == pytest.approx(0.15 * sum(float((d ** 2).sum()) for d in drift), rel=1e-6)


@pytest.fixture(scope="module")
def lora_client(ag_news_dir):
    """A dense-LoRA client on tiny-bert."""
    return local_training_setup("conf/fedavg_lora.yaml", f"model.backbone=tiny-bert data.data-dir={ag_news_dir}", 2)


def test_the_reported_proximal_term_is_the_mean_over_steps_of_mu_half_the_squared_drift(lora_client):
    """Two local steps: the term is 0 at the first (w = w_global) and (mu / 2) ||w1 - w0||^2 at
    the second, w1 being what one step alone gives from the same start."""
    from fedmoe_app.model import load_state, state_to_numpy
    from fedmoe_app.train import train_local

    client, method, model, start, batches = lora_client
    loss = client.task.batch_loss(client.data, 4)
    mu = 50.0
    load_state(model, start)
    one = train_local(model, batches[:1], 1, 0.01, 0.0, method, loss, proximal_mu=mu)
    assert one.proximal_term == 0.0
    moved = state_to_numpy(model)
    squared = sum(float(((moved[k] - start[k]).astype(np.float64) ** 2).sum()) for k in start)
    assert squared > 0
    load_state(model, start)
    two = train_local(model, batches, 2, 0.01, 0.0, method, loss, proximal_mu=mu)
    assert two.proximal_term == pytest.approx((0.0 + mu / 2 * squared) / 2, rel=1e-4)


@pytest.fixture(scope="module")
def moe_client(ag_news_dir):
    """An FFT-MoE client on tiny-bert (stacked expert tensors)."""
    return local_training_setup("conf/fft_moe.yaml", f"model.backbone=tiny-bert data.data-dir={ag_news_dir} "
                                "moe.num-experts=4 moe.expert-hidden=8", 2)


@pytest.mark.parametrize("setup", ["lora_client", "moe_client"])
def test_training_with_the_proximal_term_matches_the_term_differentiated_by_autograd(setup, request):
    """The reference: AdamW on task loss + (mu / 2) ||w - w_global||^2, the term on the
    autograd graph; train_local adds its gradient after backward instead."""
    from fedmoe_app.model import load_state, state_to_numpy, trainable_parameters
    from fedmoe_app.train import train_local

    client, method, model, start, batches = request.getfixturevalue(setup)
    loss = client.task.batch_loss(client.data, 4)
    mu, lr, decay = 5.0, 0.01, 0.01
    load_state(model, start)
    train_local(model, batches, 2, lr, decay, method, loss, proximal_mu=mu)
    trained = state_to_numpy(model)

    load_state(model, start)
    params = trainable_parameters(model)
    anchor = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=decay)
    model.train()
    for batch in batches:
        total = loss(model, batch) + method.loss_terms(model)
        total = total + (mu / 2) * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
        model.trace.stop()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        method.after_backward(model)
        optimizer.step()
        method.after_step(model)
    model.train(False)
    reference = state_to_numpy(model)
    moved = [k for k in start if not np.array_equal(reference[k], start[k])]
    assert moved
    for key in start:
        np.testing.assert_allclose(trained[key], reference[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_dense_lora_with_a_proximal_term_aggregates_as_flowers_fedprox():
    start = trained_sets(1, seed=7)[0][0]
    rounds = trained_sets(3)
    expected = run_flower(FedProx(proximal_mu=0.1), start, rounds)
    strategy = make_strategy(load_config("conf/fedavg_lora.yaml", "train.proximal-mu=0.1"), num_layers=1)
    strategy.nodes = {i: node(i) for i in range(1, 4)}
    strategy.global_arrays = {k: a.copy() for k, a in start.items()}
    got = run_ours(strategy, rounds)
    for round_expected, round_got in zip(expected, got):
        for key in round_expected:
            np.testing.assert_allclose(round_got[key], round_expected[key], rtol=1e-5, atol=1e-6)


def test_train_messages_carry_the_rounds_rate_and_flowers_proximal_mu_key(ag_news_dir, server_identity):
    config = load_config("conf/fedavg_lora.yaml", f"model.backbone=tiny-bert data.data-dir={ag_news_dir} "
                         "train.proximal-mu=0.1 train.lr-schedule=cosine federation.min-nodes=3")
    strategy = ours("", {})
    strategy.config = config
    grid = InProcessGrid(3)
    arrays = ArrayRecord({})
    flower = list(FedProx(proximal_mu=0.1, min_available_nodes=3).configure_train(1, arrays, ConfigRecord(), grid))
    mine = list(strategy.configure_train(3, arrays, ConfigRecord(), grid))
    assert len(mine) == 3
    for message in mine:
        assert message.content["config"]["proximal-mu"] == flower[0].content["config"]["proximal-mu"] == 0.1
        assert message.content["config"]["lr"] == pytest.approx(round_lr(config.train, 3, config.rounds))


def test_a_run_sends_records_and_trains_with_each_rounds_rate(ag_news_dir, tmp_path, server_identity, monkeypatch):
    used = []
    real = client_module.train_local

    def spy(*args, **kwargs):
        used.append((args[3], kwargs["proximal_mu"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(client_module, "train_local", spy)
    overrides = ("model.backbone=tiny-bert rounds=3 run-name=drift federation.min-nodes=2 eval.test-samples=40 "
                 "data.max-train-rows=240 eval.client=false train.lr-schedule=cosine train.lr-min=0.0001 "
                 "train.proximal-mu=0.5")
    run_config = {"config": "conf/fedavg_lora.yaml", "results-dir": str(tmp_path), "data-dir": str(ag_news_dir),
                  "overrides": overrides}
    main(InProcessGrid(2), Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))
    config = load_config("conf/fedavg_lora.yaml", overrides)
    rates = [round_lr(config.train, r, 3) for r in (1, 2, 3)]
    assert sorted(used) == sorted((lr, 0.5) for lr in rates for _ in range(2))  # two clients a round
    records = [json.loads(line) for line in (tmp_path / "drift" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records[1:]] == pytest.approx(rates)
    assert all(r["proximal_term"] > 0 for r in records[1:])
    assert all(c["proximal_term"] > 0 for r in records[1:] for c in r["clients"].values())
    summary = json.loads((tmp_path / "drift" / "summary.json").read_text())
    trained = {r["round"]: r["global_accuracy"] for r in records[1:]}
    assert summary["best_round"] == max(trained, key=lambda r: (trained[r], -r))
    assert summary["best_global_accuracy"] == trained[summary["best_round"]]


def test_the_last_round_rerun_from_its_checkpoint_is_the_run_and_moves_the_model_only_by_training(
        ag_news_dir, server_identity, tmp_path):
    """bench.last_round's premise: re-running the last round from the checkpoint before it
    gives the run's own last round, and at a rate of ~0 it leaves the model where it was."""
    from bench.last_round import change_by_group, keep_rounds, rerun_last_round, with_group
    from fedmoe_app.checkpoint import load_checkpoint
    from fedmoe_app.names import router_layer

    overrides = (f"model.backbone=tiny-bert data.data-dir={ag_news_dir} data.max-train-rows=240 moe.num-experts=4 "
                 "moe.expert-hidden=8 rounds=2 eval.client=false federation.min-nodes=3")
    config = load_config("conf/fft_moe.yaml", overrides)
    keep_rounds(config, 3, tmp_path)
    before, after = (load_checkpoint(tmp_path / f"round-{r}").arrays for r in (1, 2))
    _, again = rerun_last_round(config, 3, tmp_path)
    for key in after:
        np.testing.assert_allclose(again[key], after[key], rtol=1e-5, atol=1e-7, err_msg=key)
    _, still = rerun_last_round(load_config("conf/fft_moe.yaml", f"{overrides} train.lr=0.000000000001"), 3, tmp_path)
    moved, stayed = change_by_group(before, after), change_by_group(before, still)
    assert set(moved) == {"experts", "routers", "rest"} and min(moved.values()) > 0
    assert all(stayed[group] < 1e-6 * moved[group] for group in moved)
    hybrid = with_group(before, after, "routers")
    assert all((hybrid[k] is after[k]) == (router_layer(k) is not None) for k in before)
