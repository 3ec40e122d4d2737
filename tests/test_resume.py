"""Checkpoint and resume: a server that dies after a random round and is resumed from its
checkpoint ends with exactly the global arrays of a run that never stopped, for every
registered strategy, with the server optimiser's moments, a learning-rate schedule and FedProx (runs in
this process on tiny models, clients served by the
ClientApp's own handlers)."""

import os
import random

import numpy as np
import pytest

from conftest import InProcessGrid
from fedmoe_app.checkpoint import CHECKPOINT_FILE, Checkpoint, checkpoint_round, load_checkpoint, save_checkpoint
from fedmoe_app.config import ConfigError, config_to_yaml, load_config
from fedmoe_app.launch import mark_stopped
from fedmoe_app.methods import method_class
from fedmoe_app.model import num_layers, state_to_numpy
from fedmoe_app.records import from_record, to_record
from fedmoe_app.results import RunResults, this_process
from fedmoe_app.server import resumed_run
from strategies import STRATEGIES, make_strategy

ROUNDS = 3


class ServerDied(Exception):
    """Stands for the server process being killed."""


def tiny_config(strategy, data_dir, extra=""):
    return load_config(f"conf/{strategy}.yaml", (
        f"model.backbone=tiny-bert data.data-dir={data_dir} data.max-train-rows=240 moe.num-experts=4 "
        f"moe.expert-hidden=8 rounds={ROUNDS} eval.client=false federation.min-nodes=3 {extra}"))


def run(config, checkpoint_dir, die_after=None, resume: Checkpoint | None = None):
    """The server side of a run on an in-process grid of 3 nodes; final global arrays."""
    checkpoint_dir.mkdir(exist_ok=True)

    def checkpoint(state: Checkpoint):
        save_checkpoint(checkpoint_dir, state)
        if state.server_round == die_after:
            raise ServerDied(state.server_round)

    strategy = make_strategy(config, num_layers(config), on_checkpoint=checkpoint)
    if resume is None:
        arrays, first_round = state_to_numpy(method_class(config.strategy).global_model(config, 4)), 1
    else:
        strategy.load_state_dict(resume.strategy_state)
        strategy.load_state_arrays(resume.strategy_arrays, resume.arrays)
        arrays, first_round = resume.arrays, resume.server_round + 1
    result = strategy.start(InProcessGrid(3), to_record(arrays), num_rounds=config.rounds, first_round=first_round)
    return from_record(result.arrays)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_resume_after_the_server_dies_ends_as_the_uninterrupted_run(strategy, ag_news_dir, tmp_path, server_identity):
    scaffold = "scaffold" if STRATEGIES[strategy].keeps_parameterisation else "none"  # its control variates resume too
    config = tiny_config(strategy, ag_news_dir, "federation.server-optimizer=adam federation.server-lr=0.01 "
                         f"train.lr-schedule=cosine train.warmup-rounds=1 train.proximal-mu=0.01 "
                         f"train.drift-correction={scaffold}")
    uninterrupted = run(config, tmp_path / "full")
    die_after = random.Random(strategy).randint(1, ROUNDS - 1)  # a random round, the same each time
    with pytest.raises(ServerDied):
        run(config, tmp_path / "killed", die_after=die_after)
    checkpoint = load_checkpoint(tmp_path / "killed")
    assert (checkpoint.server_round, checkpoint.strategy) == (die_after, strategy)
    resumed = run(config, tmp_path / "killed", resume=checkpoint)
    assert set(resumed) == set(uninterrupted)
    for key in uninterrupted:
        np.testing.assert_array_equal(resumed[key], uninterrupted[key], err_msg=key)
    assert load_checkpoint(tmp_path / "killed").server_round == ROUNDS


def test_resume_needs_a_checkpoint_of_ours(tmp_path):
    with pytest.raises(ConfigError, match="has no checkpoint.safetensors"):
        load_checkpoint(tmp_path)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_checkpoint(tmp_path)


def test_a_checkpoint_is_replaced_whole(tmp_path):
    save_checkpoint(tmp_path, Checkpoint(1, "head_only", {"head.weight": np.zeros((2, 2), np.float32)}, {"a": 1}))
    save_checkpoint(tmp_path, Checkpoint(2, "head_only", {"head.weight": np.ones((2, 2), np.float32)}, {"a": 2}))
    loaded = load_checkpoint(tmp_path)
    assert loaded.server_round == 2 and loaded.strategy_state == {"a": 2}
    np.testing.assert_array_equal(loaded.arrays["head.weight"], np.ones((2, 2)))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]  # no temporary file left


def test_resume_is_refused_while_the_runs_server_still_writes_it(tmp_path):
    config = load_config("conf/head_only.yaml", f"results-dir={tmp_path} run-name=busy")
    results = RunResults(tmp_path / "busy", config_to_yaml(config))
    save_checkpoint(results.run_dir, Checkpoint(1, "head_only", {"head.weight": np.zeros((2, 2), np.float32)}, {}))
    results.set_status("running", last_round=1, rounds=3, server=this_process())  # this process: alive
    results.set_status("stopped", reason="Ctrl-C", last_round=1, rounds=3, server=results.status()["server"])
    resume = load_config("conf/head_only.yaml", f"results-dir={tmp_path} resume=busy")
    with pytest.raises(ConfigError, match=f"its ServerApp \\(process {os.getpid()}\\) is still writing"):
        resumed_run(resume)
    results.set_status("stopped", reason="Ctrl-C", last_round=1, rounds=3,
                       server={**this_process(), "started": this_process()["started"] - 1})  # a reused process id
    assert resumed_run(resume)[1].server_round == 1


def test_ctrl_c_marks_a_killed_run_stopped_after_its_last_checkpoint(tmp_path):
    """A ServerApp killed by the SuperLink between round 3's record and its checkpoint (it
    wrote `failed` or nothing): `make run`'s Ctrl-C marks the run stopped after round 2, and
    the resume drops round 3's record and redoes it."""
    config = load_config("conf/head_only.yaml", f"results-dir={tmp_path} run-name=killed rounds=5")
    results = RunResults(tmp_path / "killed", config_to_yaml(config))
    assert checkpoint_round(results.run_dir) == 0
    for round_ in range(4):
        results.log_round({"round": round_})
        if 1 <= round_ <= 2:
            save_checkpoint(results.run_dir, Checkpoint(round_, "head_only", {"head.weight": np.zeros((2, 2), np.float32)}, {}))
    results.set_status("failed", error="stopped", last_round=3)
    mark_stopped(results.run_dir, "123")
    status = results.status()
    assert status["status"] == "stopped" and status["last_round"] == checkpoint_round(results.run_dir) == 2
    resumed = RunResults.resume(results.run_dir, load_checkpoint(results.run_dir).server_round)
    assert [r["round"] for r in resumed.rounds()] == [0, 1, 2]


def _write_status(run_dir, status, n):
    results = RunResults.at(run_dir)
    for i in range(n):
        results.set_status(status, last_round=i)


def test_status_writers_in_two_processes_never_lose_a_stop(tmp_path):
    """The ServerApp writes `running` while Ctrl-C writes `stopped`: read and write are one
    step, so once `stopped` is written no later `running` replaces it."""
    import multiprocessing

    results = RunResults(tmp_path / "race", "a: 1\n")
    context = multiprocessing.get_context("fork")
    writer = context.Process(target=_write_status, args=(results.run_dir, "running", 400))
    writer.start()
    results.set_status("stopped", reason="Ctrl-C", last_round=0)
    writer.join()
    assert writer.exitcode == 0 and results.status()["status"] == "stopped"


@pytest.mark.parametrize("strategy", ["ub_smoe", "hetlora"])
def test_resume_of_an_instruction_run_ends_as_the_uninterrupted_run(strategy, commonsense_dir, tmp_path,
                                                                     server_identity):
    """The same for the causal-LM task (a tiny OLMoE: backbone experts; PEFT LoRA on its attention)."""
    config = load_config(f"conf/{strategy}.yaml,conf/instruction.yaml", (
        f"model.backbone=tiny-olmoe data.data-dir={commonsense_dir} data.max-train-rows=60 rounds={ROUNDS} "
        "eval.client=false federation.min-nodes=3 federation.server-optimizer=adam federation.server-lr=0.01"))
    uninterrupted = run(config, tmp_path / "full")
    with pytest.raises(ServerDied):
        run(config, tmp_path / "killed", die_after=1)
    resumed = run(config, tmp_path / "killed", resume=load_checkpoint(tmp_path / "killed"))
    assert set(resumed) == set(uninterrupted) and not any(k.startswith("head.") for k in resumed)
    for key in uninterrupted:
        np.testing.assert_array_equal(resumed[key], uninterrupted[key], err_msg=key)
