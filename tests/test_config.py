"""Config loading, validation errors, device tiers and budgets."""

import re
import dataclasses
import typing

import pytest
import yaml

from fedmoe_app.budgets import resolve_budget, tiers_for_population
from fedmoe_app.config import (
    CONF_DIR,
    ConfigError,
    DataConfig,
    RunConfig,
    _build,
    config_from_dict,
    config_from_run_config,
    config_from_yaml,
    config_to_yaml,
    defaults,
    load_config,
)
from strategies import make_strategy


def test_strategy_files_resolve_over_base():
    fft = load_config("conf/fft_moe.yaml")
    lora = load_config("conf/fedavg_lora.yaml")
    assert fft.strategy == "fft_moe" and lora.strategy == "fedavg_lora"
    assert fft.moe.num_experts == 16 and lora.lora.rank == 8


def test_the_moe_methods_train_with_logit_adjustment_on_classification_only():
    # issue 28's measurement chose it for them; a language-model task has no labels to adjust
    for strategy in ("fft_moe", "hfedmoe", "ub_smoe"):
        assert load_config(f"conf/{strategy}.yaml").train.logit_adjustment == 1.0
        instruction = load_config(f"conf/{strategy}.yaml,conf/instruction.yaml")
        assert instruction.task == "instruction" and instruction.train.logit_adjustment == 0.0
    for strategy in ("fedavg_lora", "hetlora", "flexlora", "head_only"):
        assert load_config(f"conf/{strategy}.yaml").train.logit_adjustment == 0.0


def test_overrides_key_by_key():
    config = load_config("conf/fft_moe.yaml", "rounds=3 data.alpha=0.1 loss.heterogeneity=0 lora.target-modules=[query]")
    assert config.rounds == 3 and config.data.alpha == 0.1 and config.loss.heterogeneity == 0.0
    assert config.lora.target_modules == ("query",)


def test_run_config_precedence_and_environment():
    run_config = {"config": "conf/fedavg_lora.yaml", "overrides": "data.data-dir=/b", "results-dir": "/r", "data-dir": "/a"}
    config = config_from_run_config(run_config, {"FEDMOE_DATA_DIR": "/env"})
    assert config.strategy == "fedavg_lora" and config.results_dir == "/r" and config.data.data_dir == "/b"
    assert config_from_run_config({"config": "conf/fft_moe.yaml"}, {"FEDMOE_DATA_DIR": "/env"}).data.data_dir == "/env"
    assert config_from_run_config({"config": "conf/fft_moe.yaml", "data-dir": "/a"}, {"FEDMOE_DATA_DIR": "/env"}).data.data_dir == "/a"


def test_a_named_dataset_is_not_read_from_the_default_datasets_copy():
    # `make run OVERRIDES="data.dataset=<hub id>"` passes the AG News copy as data-dir: the hub id must win
    named = config_from_run_config({"overrides": "data.dataset=org/reviews", "data-dir": "/ag_news"}, {"FEDMOE_DATA_DIR": "/env"})
    assert named.data.dataset == "org/reviews" and named.data.data_dir == ""
    explicit = config_from_run_config({"overrides": "data.dataset=org/reviews data.data-dir=/copy", "data-dir": "/ag_news"})
    assert explicit.data.data_dir == "/copy"  # a folder named for it is still its local copy
    assert config_from_run_config({"overrides": "data.dataset=ag_news", "data-dir": "/ag_news"}).data.data_dir == "/ag_news"


def test_defaults_live_only_in_base_yaml():
    sections = [RunConfig] + [t for t in typing.get_type_hints(RunConfig).values() if dataclasses.is_dataclass(t)]
    assert len(sections) == 13
    for cls in sections:
        for f in dataclasses.fields(cls):
            no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            assert no_default, f"{cls.__name__}.{f.name} has a default; it belongs in conf/base.yaml"


def test_every_config_starts_from_base_yaml():
    base = yaml.safe_load((CONF_DIR / "base.yaml").read_text())
    config = load_config("")
    assert config == config_from_dict({}) and config.rounds == base["rounds"]
    assert config.eval.test_samples == base["eval"]["test-samples"]
    assert config_from_dict({"rounds": 2, "data": {"alpha": 0.1}}).data.partitioner == base["data"]["partitioner"]
    assert defaults(DataConfig, alpha=0.1) == dataclasses.replace(config.data, alpha=0.1)


def test_missing_key_names_it():
    values = yaml.safe_load((CONF_DIR / "base.yaml").read_text())
    del values["eval"]["test-samples"]
    with pytest.raises(ConfigError, match="config key 'eval.test-samples' is missing; conf/base.yaml lists every key"):
        _build(RunConfig, values)
    del values["moe"]
    with pytest.raises(ConfigError, match="config key 'moe' is missing"):
        _build(RunConfig, values)


def test_yaml_round_trip():
    config = load_config("conf/fft_moe.yaml", "rounds=2")
    assert config_from_yaml(config_to_yaml(config)) == config
    # what a client and a resumed run read: a mapping given by override stays as given
    mix = load_config("conf/fft_moe.yaml", "devices.simulation-mix={rpi4: 1.0}")
    assert config_from_yaml(config_to_yaml(mix)).devices.simulation_mix == {"rpi4": 1.0}


@pytest.mark.parametrize(
    "overrides,message",
    [
        ("rounds=2 bogus=1", "unknown config key 'bogus'.*allowed keys"),
        ("data.alhpa=0.1", "unknown config key 'data.alhpa'.*alpha"),
        ("rounds=many", "'rounds' must be an integer"),
        ("data.partitioner=random", "'data.partitioner' is 'random'; allowed: iid, dirichlet, pathological"),
        ("rounds=0", "'rounds' must be >= 1"),
        ("moe.renormalize=3", "'moe.renormalize' must be true or false"),
        ("rounds", "must look like key=value"),
        ("train.device=gpu", "'train.device' is 'gpu'; allowed: auto, cpu, cuda, cuda:N"),
        ("federation.fraction-evaluate=0", "'federation.fraction-evaluate' must be in \\(0, 1\\]"),
        ("federation.server-optimizer=sgd", "'federation.server-optimizer' is 'sgd'; allowed: avg, avgm, adam, yogi"),
        ("federation.server-lr=-1", "'federation.server-lr' is -1.0; allowed: >= 0"),
        ("federation.server-momentum=1", "'federation.server-momentum' is 1.0; allowed: \\[0, 1\\)"),
        ("federation.server-tau=0", "'federation.server-tau' is 0.0; allowed: > 0"),
        ("train.logit-adjustment=-1", "'train.logit-adjustment' is -1.0; allowed: >= 0"),
        ("train.restricted-softmax=1.5", "'train.restricted-softmax' is 1.5; allowed: \\[0, 1\\]"),
        ("eval.final-test-samples=-1", "'eval.final-test-samples' is -1; allowed: >= 0"),
    ],
)
def test_bad_input_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("conf/fft_moe.yaml", overrides)


def test_wire_dtype_defaults_to_fp16_and_rejects_other_values():
    assert load_config("conf/fft_moe.yaml").federation.wire_dtype == "fp16"
    for dtype in ("fp32", "fp16", "bf16"):
        assert load_config("conf/fft_moe.yaml", f"federation.wire-dtype={dtype}").federation.wire_dtype == dtype
    with pytest.raises(ConfigError, match="'federation.wire-dtype' is 'fp8'; allowed: fp32, fp16, bf16"):
        load_config("conf/fft_moe.yaml", "federation.wire-dtype=fp8")


def test_bad_strategy_and_missing_file():
    with pytest.raises(ConfigError, match="'strategy' is 'fedsgd'; allowed: fedavg_lora, fft_moe"):
        make_strategy(load_config("conf/fft_moe.yaml", "strategy=fedsgd"), 6)
    with pytest.raises(ConfigError, match="nope.yaml' does not exist"):
        load_config("conf/nope.yaml")


def test_simulation_mix_is_deterministic_by_largest_remainder():
    mix = {"rpi4": 0.4, "jetson-nano": 0.3, "jetson-orin": 0.3}
    assert tiers_for_population(10, mix) == ["rpi4"] * 4 + ["jetson-nano"] * 3 + ["jetson-orin"] * 3
    # 3 nodes: exact 1.2 / 0.9 / 0.9 -> 1, 0, 0 plus the two largest remainders (nano, orin)
    assert tiers_for_population(3, mix) == ["rpi4", "jetson-nano", "jetson-orin"]
    assert tiers_for_population(7, mix) == tiers_for_population(7, mix)


def test_budget_from_partition_tier_and_overrides():
    config = load_config("conf/fft_moe.yaml")
    assert resolve_budget({"partition-id": 0, "num-partitions": 10}, config).tier == "rpi4"
    assert resolve_budget({"partition-id": 9, "num-partitions": 10}, config).tier == "jetson-orin"
    budget = resolve_budget({"partition-id": 0, "num-partitions": 10, "device-tier": "jetson-nano", "top-k": 1}, config)
    assert (budget.tier, budget.experts_held, budget.top_k) == ("jetson-nano", 8, 1)
    small = load_config("conf/fft_moe.yaml", "moe.num-experts=4")
    assert resolve_budget({"device-tier": "jetson-orin"}, small).experts_held == 4


def test_unknown_tier_is_a_clear_error():
    config = load_config("conf/fft_moe.yaml")
    with pytest.raises(ConfigError, match="'device-tier' is 'pi-zero'; allowed: rpi4, jetson-nano, jetson-orin"):
        resolve_budget({"device-tier": "pi-zero"}, config)


def test_the_default_config_file_is_written_once_for_flower_and_python():
    import tomllib

    from fedmoe_app.config import APP_DIR, DEFAULT_CONFIG_FILE

    pyproject = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"]["config"] == DEFAULT_CONFIG_FILE


def test_an_override_may_be_a_mapping_with_spaces_and_it_replaces_the_default():
    from fedmoe_app.config import split_overrides

    assert split_overrides("rounds=3  devices.simulation-mix={rpi4: 0.5, jetson-orin: 0.5} data.alpha=0.1") == [
        "rounds=3", "devices.simulation-mix={rpi4: 0.5, jetson-orin: 0.5}", "data.alpha=0.1"]
    config = load_config("conf/fft_moe.yaml", "devices.simulation-mix={rpi4: 1.0} rounds=2")
    assert config.devices.simulation_mix == {"rpi4": 1.0} and config.rounds == 2  # not merged into the default mix
    assert load_config("conf/fft_moe.yaml", 'run-name="a b"').run_name == "a b"


@pytest.mark.parametrize("overrides,message", [
    ("devices.simulation-mix={rpi4: 1.0", "unclosed '}'"),
    ("rounds=3]", "unbalanced ']'"),
    ("rounds", "must look like key=value"),
    ("data.alpha=@x", "override 'data.alpha': value '@x' is not valid YAML"),
])
def test_a_bad_override_is_a_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("conf/fft_moe.yaml", overrides)


def test_fault_injection_is_off_by_default_and_checked():
    assert load_config().faults.share == 0.0
    with pytest.raises(ConfigError, match=r"'faults.kinds' is \['explode'\]; allowed: a non-empty list of raise, hang, garbage"):
        load_config("conf/fft_moe.yaml", "faults.kinds=[explode]")
    with pytest.raises(ConfigError, match=r"'faults.share' is 1.5; allowed: \[0, 1\]"):
        load_config("conf/fft_moe.yaml", "faults.share=1.5")


def test_a_methods_own_section_lives_with_the_method_and_its_conf_file():
    # defaults come from the method's conf file, also when only `strategy` names the method
    from fedmoe_app.methods.ub_smoe_config import UBSMoEConfig

    named = load_config("conf/fft_moe.yaml", "strategy=ub_smoe ub-smoe.momentum=0.5")
    assert isinstance(named.method, UBSMoEConfig) and named.ub_smoe is named.method
    assert (named.ub_smoe.momentum, named.ub_smoe.candidates) == (0.5, 2.0)  # 2.0: conf/ub_smoe.yaml's default
    assert config_from_yaml(config_to_yaml(named)) == named and "ub-smoe:" in config_to_yaml(named)
    assert load_config("conf/fedavg_lora.yaml").method is None
    with pytest.raises(AttributeError):
        load_config("conf/fft_moe.yaml").ub_smoe  # another method's section is not there
    with pytest.raises(ConfigError, match="config section 'hetlora' belongs to strategy 'hetlora'; strategy is 'fft_moe'"):
        load_config("conf/fft_moe.yaml", "hetlora.decay=0.5")
    with pytest.raises(ConfigError, match=r"config key 'ub-smoe.momentum' is 1.0; allowed: \[0, 1\)"):
        load_config("conf/ub_smoe.yaml", "ub-smoe.momentum=1.0")
