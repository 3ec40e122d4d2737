"""The run configuration: one typed object, loaded from YAML and validated once.

`conf/base.yaml` holds every key with its default, the only place defaults live (the dataclasses
below have none); a strategy file (`conf/fft_moe.yaml`) overrides some of them; `overrides`
("rounds=3 data.alpha=0.1") overrides single keys.
YAML keys are kebab-case, like Flower's run config; fields are their snake_case twins.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import importlib.util
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

APP_DIR = Path(__file__).resolve().parent.parent
CONF_DIR = APP_DIR / "conf"
DEFAULT_CONFIG_FILE = "conf/fft_moe.yaml"  # also pyproject.toml's run-config `config` (a test keeps them equal)


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names it and what is allowed."""


@dataclass(frozen=True)
class ModelConfig:
    """Backbone and head."""

    backbone: str  # 'minilm' (offline package), a hub id, a local path, or a tiny family ('tiny-llama', ...)
    pooling: str  # classification: how the head's input is pooled from the tokens
    gradient_checkpointing: bool  # recompute each block's activations in backward: less memory, more compute


@dataclass(frozen=True)
class MoEConfig:
    """Sparse MoE layers: adapter experts (FFT-MoE) or the backbone's own experts."""

    experts: str  # adapter (new experts beside the frozen FFN) | backbone (the FFN's own experts)
    grouping: str  # backbone experts of a dense FFN: neuron groups by kmeans | contiguous
    num_experts: int
    expert_hidden: int
    renormalize: bool  # renormalise the chosen top-k gate weights to sum to one (k >= 2)
    renormalize_top1: bool  # also with k = 1, where every gate becomes p / p = 1
    init_scale: float  # std of the experts' output projection at initialisation
    eval_top_k: int  # top-k of the global model in server-side evaluation
    usage_momentum: float  # fft_moe: share of the old global expert usage kept each round
    dispatch: str  # auto (fastest for the device and dtype) | loop (reference) | grouped_mm | segmented


@dataclass(frozen=True)
class LoRAConfig:
    """PEFT LoRA adapters (LoRA baselines)."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]  # () = by the backbone's architecture (PEFT's table; q_proj, v_proj)


@dataclass(frozen=True)
class LossConfig:
    """Coefficients of the training loss terms; 0 switches a term off."""

    balance: float
    heterogeneity: float
    z_loss: float


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation."""

    lr: float  # the local learning rate (the peak, under a schedule)
    lr_schedule: str  # constant | cosine | linear: the rate over rounds (fedmoe_app/schedule.py)
    lr_min: float  # the floor a decaying schedule approaches (reached one round after the last)
    warmup_rounds: int  # rounds whose rate rises linearly to lr before the schedule starts
    proximal_mu: float  # FedProx's mu: (mu / 2) ||w - w_global||^2 on the tensors a client trains; 0 = off
    drift_correction: str  # none | scaffold: SCAFFOLD's control variates, held by the server (strategies/control_variates.py)
    weight_decay: float
    threads: int  # torch threads per client process
    device: str  # auto (a GPU when one is visible, else the CPU) | cpu | cuda | cuda:N
    group_by_length: bool  # batches of rows of similar length: less padding, same data
    precision: str  # auto (bf16 / fp16 where the hardware has it, else fp32) | fp32 | bf16 | fp16
    logit_adjustment: float  # tau of the logit-adjusted local loss (+ tau log prior); 0 = plain cross-entropy
    restricted_softmax: float  # FedRS alpha: training logits of the classes a client lacks are scaled by it; 1 = off


DEFAULT_DATASETS = ("auto", "ag_news")  # the datasets a launcher's local copy (--data-dir) holds


@dataclass(frozen=True)
class DataConfig:
    """Dataset source and federated partitioning."""

    dataset: str  # auto | ag_news | rotten_tomatoes | a hub id or a local dataset folder (datasets.load_dataset)
    data_dir: str  # directory with train.csv and test.csv (text,label); '' = none
    partitioner: str  # iid | dirichlet | pathological
    alpha: float
    classes_per_partition: int
    holdout_fraction: float
    max_train_rows: int  # 0 = all rows; else a seeded subsample of the train split
    label_names: tuple[str, ...]  # names of labels 0, 1, ... when CSV labels are names (() = integers)
    partition_by: str  # the column partitions are drawn by ('' = the task's: label, or source for instruction)


@dataclass(frozen=True)
class InstructionConfig:
    """The instruction-tuning task of causal LMs (fedmoe_app/tasks/instruction.py)."""

    prompt_template: str  # alpaca (LLM-Adapters' template) | plain
    scoring: str  # multiple-choice accuracy by: likelihood (of each allowed answer) | generate (greedy, answer extracted)
    max_new_tokens: int  # generate: tokens generated per row
    benchmarks: tuple[str, ...]  # test benchmarks (files test/<name>.jsonl) scored; () = every one
    groups: tuple[str, ...]  # values of the partition column clients count their rows by (); () = the training
    # rows' (the server fills them in and sends them to devices, whose own rows may lack some)


@dataclass(frozen=True)
class FederationConfig:
    """Sampling and fault tolerance."""

    fraction_train: float
    fraction_evaluate: float
    min_nodes: int
    min_reply_fraction: float
    round_timeout: float
    wire_dtype: str  # tensors on the wire: fp32 | fp16 | bf16 (aggregation is float32)
    max_update_ratio: float  # reject updates with RMS over this times the round's median of others (0 = off)
    server_optimizer: str  # the server's step from the aggregate: avg | avgm | adam | yogi (strategies/server_optimizer.py)
    server_lr: float  # eta of avgm, adam, yogi; 0 = Flower's default for the optimiser
    server_momentum: float  # avgm's momentum; adam's and yogi's beta_1
    server_beta2: float  # adam's and yogi's beta_2
    server_tau: float  # adam's and yogi's tau (adaptivity)


@dataclass(frozen=True)
class DevicesConfig:
    """Device tiers and the simulated mix."""

    file: str
    simulation_mix: dict[str, float]  # share of simulated clients in each tier


@dataclass(frozen=True)
class FaultsConfig:
    """Client faults injected in simulation (fedmoe_app/faults.py)."""

    share: float  # share of the simulated clients that fault each round (at least one if > 0)
    kinds: tuple[str, ...]  # raise | hang | garbage


@dataclass(frozen=True)
class EvalConfig:
    """Server-side and client-side evaluation."""

    every: int
    test_samples: int  # 0 = the whole test split
    final_test_samples: int  # the last round's evaluation; 0 = the whole test split
    batch_size: int
    max_length: int  # 0: what training uses, the largest max-length of the device tiers
    client: bool


@dataclass(frozen=True)
class CalibrationConfig:
    """Server-side head calibration after the last round (fedmoe_app/calibration.py)."""

    method: str  # none | ccvr (nodes send per-class feature moments; the server refits the head)
    virtual_per_class: int  # virtual features drawn per class
    steps: int  # full-batch Adam steps of the head's refit
    lr: float


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, server and clients alike. Defaults live in conf/base.yaml only."""

    strategy: str
    task: str  # classification | instruction (fedmoe_app/tasks)
    rounds: int
    seed: int
    run_name: str  # '' = <strategy>-<timestamp>
    results_dir: str
    resume: str  # run-name of a stopped run to continue from its checkpoint ('' = a new run)
    model: ModelConfig
    moe: MoEConfig
    lora: LoRAConfig
    loss: LossConfig
    train: TrainConfig
    data: DataConfig
    federation: FederationConfig
    devices: DevicesConfig
    eval: EvalConfig
    calibration: CalibrationConfig
    faults: FaultsConfig
    instruction: InstructionConfig
    method: Any  # the strategy's own section (e.g. `hfedmoe:`, MethodSection), or None; also config.<its name>

    def __getattr__(self, name: str) -> Any:
        """The strategy's own section by its name (`config.hfedmoe`), as `method`."""
        section = METHOD_SECTIONS.get(self.__dict__.get("strategy", ""))
        if section is not None and name == section.attribute:
            return self.method
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


@dataclass(frozen=True)
class MethodSection:
    """A method's own config section: its YAML key, the dataclass its keys build, the check
    of their values (raising ConfigError), and the file holding its defaults (the method's
    conf file). Registered by the method's client half (`register_method_section`)."""

    strategy: str
    key: str  # e.g. 'ub-smoe'
    cls: type
    check: Callable[[Any], None]
    defaults_file: str  # e.g. 'conf/ub_smoe.yaml'
    choices: Mapping[str, tuple] = dataclasses.field(default_factory=dict)  # dotted key -> allowed values

    @property
    def attribute(self) -> str:
        """The section's name on a RunConfig (`ub_smoe`)."""
        return self.key.replace("-", "_")


METHOD_SECTIONS: dict[str, MethodSection] = {}  # strategy name -> its section


def register_method_section(section: MethodSection) -> None:
    """Make `section` the strategy's own config section (a method's client half calls this)."""
    METHOD_SECTIONS[section.strategy] = section


FAULT_KINDS = ("raise", "hang", "garbage")

TASKS = ("classification", "instruction")

CHOICES = {
    "task": TASKS,
    "instruction.prompt-template": ("alpaca", "plain"),
    "instruction.scoring": ("likelihood", "generate"),
    "model.pooling": ("mean", "cls"),
    "data.partitioner": ("iid", "dirichlet", "pathological"),
    "federation.wire-dtype": ("fp32", "fp16", "bf16"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.lr-schedule": ("constant", "cosine", "linear"),
    "train.drift-correction": ("none", "scaffold"),
    "moe.dispatch": ("auto", "loop", "grouped_mm", "segmented"),
    "moe.experts": ("adapter", "backbone"),
    "moe.grouping": ("kmeans", "contiguous"),
    "federation.server-optimizer": ("avg", "avgm", "adam", "yogi"),
    "calibration.method": ("none", "ccvr"),
}


def _to_key(name: str) -> str:
    return name.replace("_", "-")


def _check_type(path: str, value: Any, annotation: Any) -> Any:
    """Return `value` converted to `annotation`, or raise ConfigError naming `path`."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{path}' must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{path}' must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{path}' must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(f"config key '{path}' must be a string, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config key '{path}' must be a list of strings, got {value!r}")
        return tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' must be a mapping, got {value!r}")
        return {str(k): _check_type(f"{path}.{k}", v, float) for k, v in value.items()}
    raise TypeError(f"unsupported annotation {annotation} for {path}")  # a bug, not input


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a kebab-case mapping, rejecting unknown and missing keys."""
    hints = typing.get_type_hints(cls)
    fields = {_to_key(f.name): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"section '{prefix[:-1]}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' in {where}; "
            f"allowed keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for key, f in fields.items():
        path, annotation = prefix + key, hints[f.name]
        if cls is RunConfig and f.name == "method":
            kwargs[f.name] = None  # built by _validate, from the strategy's own section
            continue
        if key not in values:
            raise ConfigError(f"config key '{path}' is missing; conf/base.yaml lists every key with its default "
                              "(a method's own section: the method's conf file)")
        if dataclasses.is_dataclass(annotation):
            if not isinstance(values[key], dict):
                raise ConfigError(f"config key '{path}' must be a section (a mapping)")
            kwargs[f.name] = _build(annotation, values[key], path + ".")
        else:
            kwargs[f.name] = _check_type(path, values[key], annotation)
        allowed = CHOICES.get(path) or next((c.choices[path] for c in METHOD_SECTIONS.values() if path in c.choices), None)
        if allowed and kwargs[f.name] not in allowed:
            raise ConfigError(f"config key '{path}' is {kwargs[f.name]!r}; allowed: {', '.join(allowed)}")
    return cls(**kwargs)


class Replacement(dict):
    """A mapping given as one override's value: it replaces the key's value, not merges into it."""


def _merge(base: dict, update: dict) -> dict:
    """Deep-merge `update` into a copy of `base` (a Replacement replaces)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Replacement):
            merged[key] = dict(value)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def split_overrides(text: str) -> list[str]:
    """The `key=value` items of an overrides string: split at spaces outside brackets,
    braces and quotes, so a value may be a YAML mapping or list with spaces in it."""
    items, current, closing, quote = [], "", [], ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "{[":
            closing.append("}" if char == "{" else "]")
        elif char in "}]":
            if not closing or closing.pop() != char:
                raise ConfigError(f"overrides '{text}': unbalanced '{char}'")
        elif char.isspace() and not closing:
            items, current = items + [current] if current else items, ""
            continue
        current += char
    if closing or quote:
        raise ConfigError(f"overrides '{text}': unclosed {quote or closing[-1]!r}")
    return items + [current] if current else items


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse 'rounds=3 data.alpha=0.1 devices.simulation-mix={rpi4: 1.0}' into a nested
    mapping; values are YAML (a mapping value replaces the key's whole mapping)."""
    nested: dict[str, Any] = {}
    for item in split_overrides(text):
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. data.alpha=0.1)")
        dotted, raw = item.split("=", 1)
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or "not YAML"
            raise ConfigError(f"override '{dotted}': value {raw!r} is not valid YAML ({problem})") from error
        node[leaf] = Replacement(value) if isinstance(value, dict) else value
    return nested


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys")
    return data


def resolve_path(path: str | Path) -> Path:
    """Resolve a path given in config: absolute as is, relative to the app directory."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else APP_DIR / path


def load_config(
    config_file: str = DEFAULT_CONFIG_FILE, overrides: str | dict = "", environ: Mapping[str, str] | None = None,
    local_copy: str = "",
) -> RunConfig:
    """Load base.yaml, then `config_file` (several comma-separated files: each over the one
    before, e.g. a method's file then a task's), then `overrides`; validate; return the RunConfig.

    `local_copy` (a launcher's `--data-dir`), else FEDMOE_DATA_DIR in `environ` (the
    server's environment, read here and nowhere else), is the folder of the default dataset:
    it fills `data.data-dir` only when that is empty and `data.dataset` is `auto` or
    `ag_news`, so a dataset named explicitly is never silently read from it.
    """
    merged = _base_values()
    for name in (part.strip() for part in config_file.split(",") if part.strip()):
        merged = _merge(merged, _read_yaml(resolve_path(name)))
    extra = parse_overrides(overrides) if isinstance(overrides, str) else overrides
    merged = _merge(merged, extra)
    local_copy = local_copy or (environ or {}).get("FEDMOE_DATA_DIR", "")
    data = merged.get("data") or {}
    if local_copy and not data.get("data-dir") and data.get("dataset") in DEFAULT_DATASETS:
        merged = _merge(merged, {"data": {"data-dir": local_copy}})
    return _validate(merged)


@functools.lru_cache(maxsize=1)
def _base_yaml() -> dict[str, Any]:
    return _read_yaml(CONF_DIR / "base.yaml")


def _base_values() -> dict[str, Any]:
    """A fresh copy of conf/base.yaml: every key with its default."""
    return copy.deepcopy(_base_yaml())


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Validate a nested kebab-case mapping, merged over conf/base.yaml, into a RunConfig."""
    return _validate(_merge(_base_values(), values))


def all_method_sections() -> list[MethodSection]:
    """Every method's own section (each methods/<name>_config.py imported)."""
    folder = Path(__file__).resolve().parent / "methods"
    for path in sorted(folder.glob("*_config.py")):
        _method_section(path.stem[: -len("_config")])
    return list(METHOD_SECTIONS.values())


def _method_section(strategy: str) -> MethodSection | None:
    """The strategy's own config section: the one fedmoe_app/methods/<strategy>_config.py
    registers, if the method has that file (imported here, without torch)."""
    if strategy not in METHOD_SECTIONS and strategy.isidentifier():
        module = f"fedmoe_app.methods.{strategy}_config"
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
    return METHOD_SECTIONS.get(strategy)


def _validate(values: dict[str, Any]) -> RunConfig:
    strategy = values.get("strategy")
    section = _method_section(strategy) if isinstance(strategy, str) else None
    values = dict(values)
    for other in all_method_sections():
        if other is not section and other.key in values:
            raise ConfigError(f"config section '{other.key}' belongs to strategy '{other.strategy}'; strategy is "
                              f"{strategy!r}: remove it, or set strategy to '{other.strategy}'")
    own = values.pop(section.key, None) if section else None
    config = _build(RunConfig, {**values, "method": None})
    if section is not None:
        defaults_of = _read_yaml(resolve_path(section.defaults_file)).get(section.key) or {}
        if own is not None and not isinstance(own, dict):
            raise ConfigError(f"config key '{section.key}' must be a section (a mapping)")
        built = _build(section.cls, _merge(defaults_of, own or {}), section.key + ".")
        section.check(built)
        config = dataclasses.replace(config, method=built)
    _check_ranges(config)
    return config


def defaults(cls: type, **changes: Any) -> Any:
    """RunConfig or one of its sections (e.g. DataConfig) as in conf/base.yaml, with `changes` (snake_case fields)."""
    config = config_from_dict({})
    if cls is not RunConfig:
        names = [f.name for f in dataclasses.fields(RunConfig) if typing.get_type_hints(RunConfig)[f.name] is cls]
        if not names:
            raise TypeError(f"{cls.__name__} is not a section of RunConfig")
        config = getattr(config, names[0])
    return dataclasses.replace(config, **changes)


def _check_ranges(config: RunConfig) -> None:
    positive = {
        "rounds": config.rounds,
        "moe.num-experts": config.moe.num_experts,
        "moe.expert-hidden": config.moe.expert_hidden,
        "moe.eval-top-k": config.moe.eval_top_k,
        "lora.rank": config.lora.rank,
        "eval.every": config.eval.every,
        "eval.batch-size": config.eval.batch_size,
        "federation.min-nodes": config.federation.min_nodes,
        "calibration.virtual-per-class": config.calibration.virtual_per_class,
        "calibration.steps": config.calibration.steps,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {value}")
    if not 0.0 < config.federation.fraction_train <= 1.0:
        raise ConfigError("config key 'federation.fraction-train' must be in (0, 1]")
    if not 0.0 < config.federation.fraction_evaluate <= 1.0:
        raise ConfigError("config key 'federation.fraction-evaluate' must be in (0, 1]")
    if not 0.0 < config.federation.min_reply_fraction <= 1.0:
        raise ConfigError("config key 'federation.min-reply-fraction' must be in (0, 1]")
    if not 0.0 <= config.data.holdout_fraction < 1.0:
        raise ConfigError("config key 'data.holdout-fraction' must be in [0, 1)")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", config.train.device):
        raise ConfigError(f"config key 'train.device' is {config.train.device!r}; allowed: auto, cpu, cuda, cuda:N")
    if config.eval.max_length < 0:
        raise ConfigError(f"config key 'eval.max-length' must be >= 0 (0: as in training), got {config.eval.max_length}")
    if not 0.0 <= config.moe.usage_momentum < 1.0:
        raise ConfigError(f"config key 'moe.usage-momentum' is {config.moe.usage_momentum}; allowed: [0, 1)")
    if not 0.0 <= config.faults.share <= 1.0:
        raise ConfigError(f"config key 'faults.share' is {config.faults.share}; allowed: [0, 1]")
    unknown = [k for k in config.faults.kinds if k not in FAULT_KINDS]
    if unknown or not config.faults.kinds:
        raise ConfigError(f"config key 'faults.kinds' is {list(config.faults.kinds)}; allowed: a non-empty list of "
                          f"{', '.join(FAULT_KINDS)}")
    if config.federation.max_update_ratio < 0:
        raise ConfigError(f"config key 'federation.max-update-ratio' is {config.federation.max_update_ratio}; "
                          "allowed: >= 0 (0 = off)")
    fed = config.federation
    if fed.server_lr < 0:
        raise ConfigError(f"config key 'federation.server-lr' is {fed.server_lr}; "
                          "allowed: >= 0 (0: Flower's default for the optimiser)")
    for key in ("server_momentum", "server_beta2"):
        if not 0.0 <= getattr(fed, key) < 1.0:
            raise ConfigError(f"config key 'federation.{_to_key(key)}' is {getattr(fed, key)}; allowed: [0, 1)")
    if fed.server_tau <= 0:
        raise ConfigError(f"config key 'federation.server-tau' is {fed.server_tau}; allowed: > 0")
    _check_schedule(config)
    if config.train.logit_adjustment < 0:
        raise ConfigError(f"config key 'train.logit-adjustment' is {config.train.logit_adjustment}; allowed: >= 0 (0 = off)")
    if not 0.0 <= config.train.restricted_softmax <= 1.0:
        raise ConfigError(f"config key 'train.restricted-softmax' is {config.train.restricted_softmax}; "
                          "allowed: [0, 1] (1 = off)")
    for key in ("test_samples", "final_test_samples"):
        if getattr(config.eval, key) < 0:
            raise ConfigError(f"config key 'eval.{_to_key(key)}' is {getattr(config.eval, key)}; allowed: >= 0 (0 = all)")
    if config.data.alpha <= 0:
        raise ConfigError("config key 'data.alpha' must be > 0")
    if config.calibration.lr <= 0:
        raise ConfigError(f"config key 'calibration.lr' is {config.calibration.lr}; allowed: > 0")
    for key in ("balance", "heterogeneity", "z_loss"):
        if getattr(config.loss, key) < 0:
            raise ConfigError(f"config key 'loss.{_to_key(key)}' must be >= 0")
    if config.instruction.max_new_tokens < 1:
        raise ConfigError(f"config key 'instruction.max-new-tokens' is {config.instruction.max_new_tokens}; allowed: >= 1")
    _check_task_keys(config)


# Keys that mean something for one task only: (key, its value when off, the task it belongs to).
TASK_ONLY_KEYS = (
    ("train.logit-adjustment", lambda c: c.train.logit_adjustment == 0.0, "classification"),
    ("train.restricted-softmax", lambda c: c.train.restricted_softmax == 1.0, "classification"),
    ("calibration.method", lambda c: c.calibration.method == "none", "classification"),
    ("data.label-names", lambda c: not c.data.label_names, "classification"),
)


def _check_schedule(config: RunConfig) -> None:
    """ConfigError naming the first key of the learning-rate schedule or the proximal term
    out of its range (NaN included)."""
    train = config.train
    if not (math.isfinite(train.lr) and train.lr > 0):
        raise ConfigError(f"config key 'train.lr' is {train.lr}; allowed: a number > 0")
    if not 0 <= train.lr_min <= train.lr:
        raise ConfigError(f"config key 'train.lr-min' is {train.lr_min}; allowed: [0, train.lr = {train.lr}]")
    if not 0 <= train.warmup_rounds < config.rounds:
        raise ConfigError(f"config key 'train.warmup-rounds' is {train.warmup_rounds}; "
                          f"allowed: 0 .. rounds - 1 = {config.rounds - 1}")
    if not (math.isfinite(train.proximal_mu) and train.proximal_mu >= 0):
        raise ConfigError(f"config key 'train.proximal-mu' is {train.proximal_mu}; allowed: a number >= 0 (0 = off)")


def _check_task_keys(config: RunConfig) -> None:
    """A key that belongs to another task than `task` must stay off (a ConfigError names it)."""
    for key, off, task in TASK_ONLY_KEYS:
        if config.task != task and not off(config):
            raise ConfigError(f"config key '{key}' belongs to the {task} task; task is '{config.task}', "
                              f"where it has no meaning: leave it at its default")


def config_to_dict(config: Any) -> dict[str, Any]:
    """The kebab-case nested mapping of a config (inverse of config_from_dict)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(config, RunConfig) and f.name == "method":
            if value is not None:
                out[METHOD_SECTIONS[config.strategy].key] = config_to_dict(value)
            continue
        if dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, types.MappingProxyType):
            value = dict(value)
        out[_to_key(f.name)] = value
    return out


def config_to_yaml(config: RunConfig) -> str:
    """The resolved config as YAML text (what results/<run>/config.yaml holds)."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def config_from_yaml(text: str) -> RunConfig:
    """Parse the YAML text written by config_to_yaml. It is a whole resolved config, read
    as it is: merged over conf/base.yaml, a mapping such as devices.simulation-mix would
    gain the default's keys."""
    values = yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ConfigError("a resolved config must be a mapping of keys")
    return _validate(values)


RUN_CONFIG_KEYS = ("config", "overrides", "results-dir", "data-dir")


def run_config_string(config: str, overrides: str, results_dir: str, data_dir: str) -> str:
    """The app's `flwr run --run-config` value (the four keys of pyproject.toml)."""
    return f"config='{config}' overrides='{overrides}' results-dir='{results_dir}' data-dir='{data_dir}'"


def config_from_run_config(run_config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> RunConfig:
    """The RunConfig a Flower run asks for: its `config` file, then `results-dir` when
    given, then the `overrides` string (highest precedence); `data-dir` is the default
    dataset's local copy (see load_config)."""
    launch: dict[str, Any] = {}
    if run_config.get("results-dir"):
        launch["results-dir"] = run_config["results-dir"]
    extra = _merge(launch, parse_overrides(str(run_config.get("overrides", ""))))
    return load_config(str(run_config.get("config", DEFAULT_CONFIG_FILE)), extra, environ,
                       str(run_config.get("data-dir") or ""))
