"""`train.precision`: what `auto` picks on each kind of hardware (capabilities mocked),
bf16 training steps with finite float32 gradients, and bf16 against fp32 forwards."""

import numpy as np
import pytest
import torch

from fedmoe_app import precision as precision_module
from fedmoe_app.config import ConfigError, load_config
from fedmoe_app.batches import encode, iterate_batches
from fedmoe_app.data import load_splits
from fedmoe_app.model import build_model, trainable_parameters, trainable_state
from fedmoe_app.backbones import load_tokenizer
from fedmoe_app.precision import resolve_precision
from fedmoe_app.budgets import load_tiers
from fedmoe_app.methods.base import ClientMethod
from fedmoe_app.train import train_local
from fedmoe_app.tasks.classification import classifier_loss, evaluate_classifier

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
SAPPHIRE_RAPIDS = {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
COOPER_LAKE = {"avx512f", "avx512_bf16"}
NEOVERSE_V1 = {"fp", "asimd", "asimdhp", "bf16", "i8mm"}  # e.g. AWS Graviton3
CORTEX_A72 = {"fp", "asimd", "evtstrm", "crc32", "cpuid"}  # Raspberry Pi 4
SKYLAKE = {"avx512f", "avx2", "fma"}


@pytest.fixture
def cpu_with(monkeypatch):
    """Pretend this CPU has the given feature flags."""
    def set_flags(flags):
        monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset(flags))
    return set_flags


@pytest.fixture
def gpu_with(monkeypatch):
    """Pretend the GPU has the given compute capability."""
    def set_capability(capability, name="GPU"):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return set_capability


@pytest.mark.parametrize("flags,expected", [
    (SAPPHIRE_RAPIDS, "bf16"), (COOPER_LAKE, "bf16"), (NEOVERSE_V1, "bf16"), (CORTEX_A72, "fp32"), (SKYLAKE, "fp32"),
])
def test_auto_on_a_cpu_picks_bf16_only_with_bf16_instructions(cpu_with, flags, expected):
    cpu_with(flags)
    picked = resolve_precision("auto", CPU)
    assert picked.name == expected
    assert picked.reason.startswith("train.precision auto: this CPU has")


@pytest.mark.parametrize("capability,name,expected", [
    ((8, 7), "Orin", "bf16"), ((9, 0), "H100", "bf16"), ((8, 6), "RTX 3090", "bf16"),
    ((7, 5), "T4", "fp16"), ((7, 2), "Xavier", "fp16"), ((5, 3), "Jetson Nano", "fp16"),
    ((6, 1), "GTX 1080", "fp32"), ((5, 2), "Maxwell", "fp32"),
])
def test_auto_on_a_gpu_picks_by_compute_capability(gpu_with, capability, name, expected):
    gpu_with(capability, name)
    picked = resolve_precision("auto", CUDA)
    assert picked.name == expected and name in picked.reason


def test_bf16_where_the_hardware_lacks_it_is_an_error_naming_the_key(cpu_with, gpu_with):
    cpu_with(CORTEX_A72)
    with pytest.raises(ConfigError, match="'train.precision' is 'bf16' but this CPU lacks .*allowed here: auto, fp32"):
        resolve_precision("bf16", CPU)
    gpu_with((7, 5), "T4")
    with pytest.raises(ConfigError, match="'train.precision' is 'bf16' but T4"):
        resolve_precision("bf16", CUDA)
    with pytest.raises(ConfigError, match="'train.precision' is 'fp8'; allowed: auto, fp32, bf16, fp16"):
        resolve_precision("fp8", CPU)


def test_explicit_fp32_is_always_allowed(cpu_with):
    cpu_with(CORTEX_A72)
    assert resolve_precision("fp32", CPU).name == "fp32"


@pytest.fixture(scope="module")
def batches(ag_news_dir):
    config = load_config("conf/fft_moe.yaml", f"model.backbone=tiny-bert data.data-dir={ag_news_dir} data.max-train-rows=200")
    splits = load_splits(config.data, config.seed)
    tokenizer = load_tokenizer(config.model.backbone)
    rows = encode(splits.train, tokenizer, 32)
    return list(iterate_batches(rows, 16, tokenizer.pad_token_id, shuffle=True, seed=0, num_batches=3))


def tiny_config(ag_news_dir, precision, **extra):
    overrides = " ".join([f"model.backbone=tiny-bert data.data-dir={ag_news_dir} moe.num-experts=4 moe.expert-hidden=8",
                          f"train.precision={precision}", *(f"{k}={v}" for k, v in extra.items())])
    return load_config("conf/fft_moe.yaml", overrides)


@pytest.mark.parametrize("adapter", ["moe", "lora", "head"])
def test_a_bf16_step_gives_finite_float32_gradients_to_every_trainable_tensor(cpu_with, ag_news_dir, batches, adapter):
    cpu_with(SAPPHIRE_RAPIDS)  # autocast runs on any CPU; this only lets the config ask for it
    model = build_model(tiny_config(ag_news_dir, "bf16"), 4, adapter, top_k=2)
    assert model.precision.name == "bf16"
    assert all(p.dtype == torch.bfloat16 for p in model.backbone.parameters() if not p.requires_grad)
    logits = model(batches[0]["input_ids"], batches[0]["attention_mask"])  # the model autocasts itself
    assert logits.dtype == torch.float32
    torch.nn.functional.cross_entropy(logits, batches[0]["labels"]).backward()
    params = trainable_parameters(model)
    assert params and all(p.dtype == torch.float32 for p in params)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
            # LoRA's B starts at zero, so A gets no gradient on the first step (PEFT's design)
            assert p.grad.abs().sum() > 0 or "lora_A" in name, name


def test_a_bf16_round_keeps_trainable_tensors_and_optimiser_state_in_float32(cpu_with, ag_news_dir, batches):
    cpu_with(SAPPHIRE_RAPIDS)
    config = tiny_config(ag_news_dir, "bf16")
    model = build_model(config, 4, "moe", top_k=2)
    before = {k: v.detach().clone() for k, v in trainable_state(model).items()}
    method = ClientMethod(config, load_tiers(config.devices.file)["rpi4"], [], {})  # the task loss alone
    result = train_local(model, batches, 3, 1e-2, 0.0, method, classifier_loss())
    assert np.isfinite(result.loss) and result.steps == 3
    after = trainable_state(model)
    assert all(v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


# Tolerance of bf16 against fp32: bf16 keeps 8 significant bits, so each rounding is off by
# at most 2^-9 (0.2%) relative; through 6 transformer layers these add up like a random walk
# over hundreds of roundings per value. Measured on MiniLM: the mean-pooled embeddings differ
# by 1-2% relative (L2) and keep a cosine similarity above 0.999; we allow 4% and 0.995.
def test_the_bf16_forward_matches_the_fp32_forward(cpu_with, ag_news_dir):
    cpu_with(SAPPHIRE_RAPIDS)
    outputs = {}
    for precision in ("fp32", "bf16"):
        config = load_config("conf/fft_moe.yaml", f"data.data-dir={ag_news_dir} train.precision={precision}")
        splits = load_splits(config.data, config.seed)
        tokenizer = load_tokenizer(config.model.backbone)
        rows = encode(splits.test.select(range(64)), tokenizer, 64)
        batch = next(iterate_batches(rows, 64, tokenizer.pad_token_id, shuffle=False))
        model = build_model(config, 4, "moe", top_k=2)
        with torch.no_grad(), model.precision.autocast(CPU):
            model(batch["input_ids"], batch["attention_mask"])
            hidden = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        outputs[precision] = (hidden.float() * mask).sum(1) / mask.sum(1)
        outputs[precision + "-eval"] = evaluate_classifier(model, [batch])
    fp32, bf16 = outputs["fp32"], outputs["bf16"]
    relative = ((bf16 - fp32).norm(dim=1) / fp32.norm(dim=1)).max().item()
    cosine = torch.nn.functional.cosine_similarity(bf16, fp32, dim=1).min().item()
    assert relative < 0.04 and cosine > 0.995, (relative, cosine)
    assert outputs["bf16-eval"].loss == pytest.approx(outputs["fp32-eval"].loss, rel=0.02)
