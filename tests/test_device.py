"""The training device: `train.device` resolution, GPU shares in simulation, and (on a
machine with a GPU) a local round on the GPU matching the same round on the CPU."""

import dataclasses

import numpy as np
import pytest
import torch

from bench.simulation import connection_toml, gpu_share
from fedmoe_app.budgets import load_tiers
from fedmoe_app.config import ConfigError, load_config
from fedmoe_app.methods.fft_moe import FFTMoEClient
from fedmoe_app.batches import encode, iterate_batches
from fedmoe_app.data import load_splits
from fedmoe_app.model import build_model, state_to_numpy
from fedmoe_app.backbones import load_tokenizer
from fedmoe_app.system import torch_device
from fedmoe_app.train import train_local
from fedmoe_app.tasks.classification import classifier_loss, evaluate_classifier

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@no_gpu
def test_without_a_gpu_auto_is_the_cpu_and_cuda_is_refused():
    assert torch_device("auto") == torch.device("cpu")
    assert torch_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="'train.device' is 'cuda' but this process sees no GPU"):
        torch_device("cuda")
    assert gpu_share(1) == 0.0  # Ray would wait forever for a GPU share that does not exist


def test_simulated_clients_get_the_gpu_share_asked_for():
    toml = connection_toml(10, cpus_per_client=2, gpus_per_client=0.125)
    assert "options.backend.client-resources.num-cpus = 2\n" in toml
    assert "options.backend.client-resources.num-gpus = 0.125\n" in toml


@needs_gpu
def test_gpu_round_matches_the_cpu_round(ag_news_dir):
    overrides = f"model.backbone=tiny-bert data.data-dir={ag_news_dir} data.max-train-rows=200 moe.num-experts=4 moe.expert-hidden=8"
    results = {}
    for device in ("cpu", "cuda"):
        config = load_config("conf/fft_moe.yaml", f"{overrides} train.device={device}")
        splits = load_splits(config.data, config.seed)
        tokenizer = load_tokenizer(config.model.backbone)
        rows = encode(splits.train, tokenizer, 32)
        batches = list(iterate_batches(rows, 8, tokenizer.pad_token_id, shuffle=True, seed=0, num_batches=3))
        budget = dataclasses.replace(load_tiers(config.devices.file)["jetson-orin"], top_k=2)
        method = FFTMoEClient(config, budget, [30, 0, 0, 10], {"global-usage": [0.25] * 8})
        model = method.build_model(state_to_numpy(build_model(config, splits.num_labels, "moe")))
        assert next(model.parameters()).device.type == device
        trained = train_local(model, batches, 3, 1e-3, 0.0, method, classifier_loss())
        results[device] = (trained, evaluate_classifier(model, batches), state_to_numpy(model), method.routing)
    (cpu, cpu_eval, cpu_state, cpu_routing), (gpu, gpu_eval, gpu_state, gpu_routing) = results["cpu"], results["cuda"]
    assert gpu.loss == pytest.approx(cpu.loss, abs=1e-3)
    np.testing.assert_array_equal(gpu_routing.routed_tokens, cpu_routing.routed_tokens)
    assert gpu_eval.accuracy == pytest.approx(cpu_eval.accuracy, abs=1 / gpu_eval.num_examples)
    for name in cpu_state:
        np.testing.assert_allclose(gpu_state[name], cpu_state[name], atol=1e-3)
