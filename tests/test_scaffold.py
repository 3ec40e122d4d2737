"""SCAFFOLD's control variates (train.drift-correction: scaffold): the client's corrected
gradients and reported mean gradients against a plain loop that reads each parameter's
gradient by its memory offset; the server's c and c - c_i by hand (with a lower-rank
client); the reply contract; the config; what a run sends and keeps. Resume with control
variates is in test_resume.py."""

import numpy as np
import pytest
import torch

from conftest import InProcessGrid, local_training_setup
from fedmoe_app import client as client_module
from fedmoe_app import messages as msg
from fedmoe_app.config import ConfigError, load_config
from fedmoe_app.model import load_state, state_to_numpy, trainable_parameters, trainable_state
from fedmoe_app.records import from_record, to_record
from fedmoe_app.train import train_local
from strategies import make_strategy
from strategies.control_variates import ControlVariates
from strategies.replies import MalformedReply, Reply, decode_train_reply
from tests.test_aggregation import node

LORA_A = "backbone.encoder.layer.0.attention.self.query.lora_A.default.weight"


def gradient_by_offset(view: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The gradient of `view` (a parameter or a view into one, e.g. one expert of a stacked
    tensor), read from its parameter's .grad at the view's memory offset."""
    for p in params:
        start = (view.data_ptr() - p.data_ptr()) // p.element_size()
        if 0 <= start < p.numel() and view.is_contiguous():
            return p.grad.reshape(-1)[start:start + view.numel()].view(view.shape)
    raise KeyError("no parameter holds this view")


@pytest.fixture(scope="module")
def moe_client(ag_news_dir):
    """An FFT-MoE client (stacked experts: named tensors are views) on tiny-bert."""
    return local_training_setup("conf/fft_moe.yaml", f"model.backbone=tiny-bert data.data-dir={ag_news_dir} "
                                "moe.num-experts=4 moe.expert-hidden=8 train.drift-correction=scaffold", 3)


def test_the_client_adds_c_minus_ci_to_its_gradients_and_reports_their_mean_before_it(moe_client):
    client, method, model, start, batches = moe_client
    loss = client.task.batch_loss(client.data, 4)
    generator = np.random.default_rng(0)
    names = sorted(start)
    expert = next(n for n in names if ".moe.experts." in n)  # a view into a stacked tensor
    correction = {n: generator.normal(0, 0.05, start[n].shape).astype(np.float32) for n in (expert, names[-1])}
    lr = 0.01
    load_state(model, start)
    result = train_local(model, batches, len(batches), lr, 0.0, method, loss, correction=correction)
    trained = state_to_numpy(model)

    load_state(model, start)
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sums = {n: np.zeros_like(a) for n, a in start.items()}
    model.train()
    for batch in batches:
        total = loss(model, batch) + method.loss_terms(model)
        model.trace.stop()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        with torch.no_grad():
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            views = trainable_state(model)
            for name in names:
                sums[name] += gradient_by_offset(views[name], params).numpy()
            for name, c in correction.items():
                gradient_by_offset(views[name], params).add_(torch.as_tensor(c))
        method.after_backward(model)
        optimizer.step()
        method.after_step(model)
    model.train(False)
    for name in names:
        np.testing.assert_allclose(trained[name], state_to_numpy(model)[name], rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(result.mean_gradients[name], sums[name] / len(batches), rtol=1e-5, atol=1e-7,
                                   err_msg=name)
    assert any(np.abs(result.mean_gradients[n]).max() > 0 for n in names)
    assert not np.array_equal(trained[expert], start[expert])


def test_the_client_refuses_a_correction_for_a_tensor_it_does_not_train(moe_client):
    client, method, model, start, batches = moe_client
    loss = client.task.batch_loss(client.data, 4)
    with pytest.raises(KeyError, match="which this model does not train"):
        train_local(model, batches[:1], 1, 0.01, 0.0, method, loss, correction={"no.such.tensor": np.zeros(2)})
    name = sorted(start)[0]
    with pytest.raises(ValueError, match="has shape"):
        train_local(model, batches[:1], 1, 0.01, 0.0, method, loss, correction={name: np.zeros(3, np.float32)})


def reply(client_id, gradients, rows):
    return Reply(node(int(client_id[-1])), gradients, {msg.NUM_EXAMPLES: rows}, {}, 0.0, tuple(gradients), gradients)


def test_the_servers_c_and_each_clients_correction_by_hand():
    """Client 1 (100 rows) trained LoRA A at rank 1 of the global 2, client 2 (300 rows) at
    rank 2: c's first rank averages both by rows, its second is client 2's alone."""
    global_arrays = {"head.weight": np.zeros((2, 3), np.float32), LORA_A: np.zeros((2, 4), np.float32)}
    h1, h2 = np.full((2, 3), 1.0, np.float32), np.full((2, 3), 5.0, np.float32)
    a1 = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    a2 = np.array([[5.0, 6.0, 7.0, 8.0], [-1.0, -2.0, -3.0, -4.0]], np.float32)
    control = ControlVariates()
    rows = {"client-1": 100, "client-2": 300}
    control.update([reply("client-1", {"head.weight": h1, LORA_A: a1}, 100),
                    reply("client-2", {"head.weight": h2, LORA_A: a2}, 300)],
                   lambda r: {k: float(rows[r.node.client_id]) for k in r.arrays})
    c = control.global_variate(global_arrays)
    np.testing.assert_allclose(c["head.weight"], np.full((2, 3), (100 * 1 + 300 * 5) / 400))
    np.testing.assert_allclose(c[LORA_A][0], (100 * a1[0] + 300 * a2[0]) / 400)
    np.testing.assert_allclose(c[LORA_A][1], a2[1])
    sent = {"head.weight": global_arrays["head.weight"], LORA_A: global_arrays[LORA_A][:1]}
    correction = control.correction_for("client-1", sent, c)
    np.testing.assert_allclose(correction["head.weight"], c["head.weight"] - h1)
    np.testing.assert_allclose(correction[LORA_A], c[LORA_A][:1] - a1)
    at_rank_2 = control.correction_for("client-1", global_arrays, c)  # it now trains rank 2: its c_i padded
    np.testing.assert_allclose(at_rank_2[LORA_A], c[LORA_A] - np.vstack([a1, np.zeros((1, 4))]))
    assert control.correction_for("client-3", global_arrays, c) == {}  # no reply yet: no correction
    clients, arrays = control.state_arrays()
    restored = ControlVariates()
    restored.load_state_arrays(clients, {**arrays, "m/head.weight": np.ones(1)})
    for key, value in restored.global_variate(global_arrays).items():
        np.testing.assert_array_equal(value, c[key])


def test_a_scaffold_reply_must_carry_the_mean_gradient_of_exactly_what_it_trained():
    sent = {"head.weight": np.zeros((2, 3), np.float32), "head.bias": np.zeros(2, np.float32)}
    metrics = {msg.NUM_EXAMPLES: 10, msg.TRAIN_LOSS: 1.0, msg.STEP_SECONDS: 0.1, msg.PEAK_RSS_MB: 1.0,
               msg.BYTES_DOWN: 1, msg.BYTES_UP: 1}

    def content(gradients):
        from flwr.app import MetricRecord, RecordDict

        records = {msg.ARRAYS: to_record({"head.weight": np.ones((2, 3), np.float32)}), msg.METRICS: MetricRecord(metrics)}
        if gradients is not None:
            records[msg.GRADIENTS] = to_record(gradients)
        return RecordDict(records)

    good = decode_train_reply(node(1), content({"head.weight": np.full((2, 3), 0.5, np.float32)}), sent,
                              with_gradients=True)
    np.testing.assert_array_equal(good.gradients["head.weight"], np.full((2, 3), 0.5))
    for gradients, message in [
        (None, "holds no 'gradients'"),
        ({"head.weight": np.ones((2, 3), np.float32), "head.bias": np.ones(2, np.float32)}, "differ at tensor 'head.bias'"),
        ({"head.weight": np.full((2, 3), np.nan, np.float32)}, "'head.weight' of gradients holds NaN or Inf"),
        ({"head.weight": np.ones((3, 2), np.float32)}, "of gradients has shape"),
    ]:
        with pytest.raises(MalformedReply, match=message):
            decode_train_reply(node(1), content(gradients), sent, with_gradients=True)
    with pytest.raises(MalformedReply, match="it holds record 'gradients'"):
        decode_train_reply(node(1), content({"head.weight": np.ones((2, 3), np.float32)}), sent)


def test_scaffold_is_refused_where_tensors_change_basis_and_for_an_unknown_value():
    with pytest.raises(ConfigError, match="'train.drift-correction' is 'scaffold', but flexlora"):
        make_strategy(load_config("conf/flexlora.yaml", "train.drift-correction=scaffold"), num_layers=1)
    with pytest.raises(ConfigError, match="train.drift-correction"):
        load_config("conf/fft_moe.yaml", "train.drift-correction=feddyn")


def test_a_run_sends_corrections_from_round_2_and_keeps_every_clients_control_variate(
        ag_news_dir, server_identity, monkeypatch):
    config = load_config("conf/hfedmoe.yaml", f"model.backbone=tiny-bert data.data-dir={ag_news_dir} "
                         "data.max-train-rows=240 moe.num-experts=4 moe.expert-hidden=8 rounds=3 eval.client=false "
                         "federation.min-nodes=3 train.drift-correction=scaffold")
    received = []
    real = client_module.train_local

    def spy(*args, **kwargs):
        received.append(kwargs["correction"])
        return real(*args, **kwargs)

    monkeypatch.setattr(client_module, "train_local", spy)
    from fedmoe_app.methods import method_class
    from fedmoe_app.model import num_layers

    strategy = make_strategy(config, num_layers(config))
    rounds = []
    strategy.on_round = lambda record: rounds.append(record)
    sent = []
    configure = strategy.configure_train

    def recording(server_round, arrays, train_config, grid):
        messages = list(configure(server_round, arrays, train_config, grid))
        sent.append([(m.content[msg.ARRAYS], m.content.get(msg.CORRECTION)) for m in messages])
        return messages

    strategy.configure_train = recording
    start = state_to_numpy(method_class(config.strategy).global_model(config, 4))
    strategy.start(InProcessGrid(3), to_record(start), num_rounds=3)
    assert [len(r) for r in sent] == [3, 3, 3]
    assert all(correction is None for _, correction in sent[0])  # nobody has a c_i before its first reply
    assert received[:3] == [{}, {}, {}]
    for arrays, correction in sent[1] + sent[2]:
        keys = set(from_record(correction))
        assert keys and keys <= set(from_record(arrays))
    assert all(c for c in received[3:])
    assert sorted(strategy.control.values) == sorted(n.client_id for n in strategy.nodes.values())
    # rounds[0] is round 0's record; a correction travels from round 2 (as many tensors again, bf16 like fp16)
    assert all(rounds[2]["bytes_down"][c] > rounds[1]["bytes_down"][c] for c in rounds[1]["bytes_down"])
