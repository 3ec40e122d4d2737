"""A client's text rows without the `datasets` library: `text,label` CSV files, the
held-out slice, label counts, and a device's own data folder (node_config `data-path`).

A ClientApp on a device starts a new process for every message; it reads its CSV with
the csv module so that it never pays for importing `datasets`, `pyarrow` or
`flwr_datasets` (those partition data in simulation and on the server: `fedmoe_app.data`).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


class DataError(ValueError):
    """A dataset could not be found, read or partitioned; the message says where it looked."""


@dataclass(frozen=True)
class TextRows:
    """Rows of a text classification dataset: `rows["text"]` and `rows["label"]` are lists,
    as a `datasets.Dataset`'s columns slice to."""

    texts: list[str]
    labels: list[int]  # 0..num_labels-1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, column: str) -> list:
        if column == "text":
            return self.texts
        if column == "label":
            return self.labels
        raise KeyError(f"TextRows has the columns 'text' and 'label', not {column!r}")

    def select(self, index: Sequence[int]) -> TextRows:
        """The rows at `index`, in that order."""
        return TextRows([self.texts[i] for i in index], [self.labels[i] for i in index])


@dataclass(frozen=True)
class ClientData:
    """One client's rows (TextRows, or another task's rows with `select`): what it trains on and its held-out slice."""

    rows: TextRows  # all of them (another task's rows, e.g. InstructionRows): the device's file in order, or the partition
    train_index: list[int]  # positions in `rows` it trains on
    holdout_index: list[int]  # positions in `rows` held out for personalised evaluation; may be empty
    num_labels: int  # classes of the data (0: rows without labels, e.g. instruction data)
    group_counts: tuple[int, ...]  # rows (train + holdout) per value of the task's partition key: per label
    # for classification, per benchmark for instruction data; what methods may use of a client's data skew
    csv_path: Path | None = None  # the file `rows` were read from (a device), else None

    @property
    def train(self) -> TextRows:
        """The rows it trains on."""
        return self.rows.select(self.train_index)

    @property
    def holdout(self) -> TextRows:
        """The held-out rows."""
        return self.rows.select(self.holdout_index)


def cache_dir() -> Path:
    """fedmoe's cache directory: $FEDMOE_CACHE_DIR, else $XDG_CACHE_HOME/fedmoe, else ~/.cache/fedmoe."""
    if os.environ.get("FEDMOE_CACHE_DIR"):
        return Path(os.environ["FEDMOE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedmoe"


# ---------------------------------------------------------------------------- CSV files


def read_csv(path: Path, label_names: Sequence[str] = ()) -> TextRows:
    """A `text,label` CSV file's rows: every text non-empty, every label an integer >= 0 or,
    with `label_names`, one of them (its index). DataError naming the file and line otherwise."""
    texts, raw, lines = read_raw_csv(path)
    return TextRows(texts, label_ids(path, raw, lines, label_names))


def read_raw_csv(path: Path) -> tuple[list[str], list[str], list[int]]:
    """(texts, labels as written, line numbers) of a `text,label` CSV file with at least its
    header; DataError naming the file (and line) if it is empty, has another header, or a
    row has no text or no label."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise DataError(f"{path} is empty; it needs the header text,label and one row per example")
        if not {"text", "label"} <= set(reader.fieldnames):
            raise DataError(f"{path} must have the header text,label; found {','.join(reader.fieldnames)!r}")
        texts, labels, lines = [], [], []
        for row in reader:
            line = reader.line_num  # the row's last line (a quoted text may span several)
            text, label = (row["text"] or "").strip(), (row["label"] or "").strip()
            if not text:
                raise DataError(f"{path} line {line}: the text is empty")
            if not label:
                raise DataError(f"{path} line {line}: the label is empty")
            texts.append(row["text"])
            labels.append(label)
            lines.append(line)
    return texts, labels, lines


def integer_labels(raw: Sequence[str]) -> bool:
    """Whether every label as written is an integer >= 0."""
    return all(label.isdigit() for label in raw)


def label_ids(path: Path, raw: Sequence[str], lines: Sequence[int], label_names: Sequence[str] = ()) -> list[int]:
    """The ids of labels as written: integers as they are, names by their index in
    `label_names`; DataError naming the file and line of the first that is neither."""
    if label_names:
        index = {name: i for i, name in enumerate(label_names)}
        for label, line in zip(raw, lines):
            if label not in index:
                raise DataError(f"{path} line {line}: label {label!r} is not one of data.label-names {list(label_names)}")
        return [index[label] for label in raw]
    for label, line in zip(raw, lines):
        if not label.isdigit():
            raise DataError(f"{path} line {line}: label must be an integer >= 0, got {label!r} "
                            "(labels that are names need data.label-names, or a local dataset folder)")
    return [int(label) for label in raw]


def count_rows(path: Path) -> int:
    """How many rows (records, not lines: a text may hold newlines) a CSV file has below its header."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader, None)  # the header
        return sum(1 for row in reader if row)  # csv.DictReader skips blank lines too


def write_csv(path: Path, rows: list[tuple[str, int]]) -> None:
    """Write `text,label` rows to a CSV file, atomically."""
    # Write then rename, so a concurrent reader (another client process) never sees half a file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    tmp.replace(path)


# ---------------------------------------------------------------------------- a client's rows


def label_counts(rows, num_labels: int) -> tuple[int, ...]:
    """How many rows of each label 0..num_labels-1 (`rows`: TextRows or a datasets.Dataset)."""
    counts = [0] * num_labels
    for label in rows["label"][:]:
        counts[label] += 1
    return tuple(counts)


def holdout_size(num_rows: int, fraction: float) -> int:
    """How many of `num_rows` rows are held out (none when fewer than one, or all, would be)."""
    size = math.floor(num_rows * fraction)
    return size if 1 <= size < num_rows else 0


def split_holdout(num_rows: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Positions of the rows trained on and held out: the same split as
    `datasets.Dataset.train_test_split(test_size=holdout_size(...), seed=seed)`."""
    size = holdout_size(num_rows, fraction)
    if size == 0:
        return list(range(num_rows)), []
    permutation = np.random.default_rng(seed).permutation(num_rows).tolist()
    return permutation[size:], permutation[:size]


def client_data(rows: TextRows, fraction: float, seed: int, num_labels: int, csv_path: Path | None = None) -> ClientData:
    """`rows` with `fraction` of them held out (none if too few rows)."""
    train_index, holdout_index = split_holdout(len(rows), fraction, seed)
    return ClientData(rows, train_index, holdout_index, num_labels, label_counts(rows, num_labels), csv_path)


def device_train_csv(data_path: str) -> Path:
    """The train.csv of a device's `data-path` folder (an error naming the folder if missing)."""
    path = Path(data_path).expanduser() / "train.csv"
    if not path.is_file():
        raise DataError(f"node_config 'data-path' is '{data_path}', which holds no train.csv (text,label)")
    return path


def device_client_data(data_path: str, fraction: float, seed: int, label_names: Sequence[str] = ()) -> ClientData:
    """A device's own train.csv with its held-out slice (labels that are names mapped by
    `label_names`, data.label-names of the run); the number of labels is counted over
    train.csv and, if there is one, test.csv."""
    path = device_train_csv(data_path)
    rows = read_csv(path, label_names)
    if len(rows) == 0:
        raise DataError(f"node_config 'data-path' is '{data_path}', whose train.csv has no rows")
    labels = list(rows.labels)
    if (path.parent / "test.csv").is_file():
        labels += read_csv(path.parent / "test.csv", label_names).labels
    return client_data(rows, fraction, seed, max(labels) + 1, path.resolve())


def device_train_rows(data_path: str, fraction: float) -> int:
    """How many rows a device trains on (its training file less the held-out slice), without
    reading the rows, or importing a task: train.csv's records (classification), else
    train.jsonl's non-empty lines (instruction data). A query answers with it."""
    folder = Path(data_path).expanduser()
    if not (folder / "train.csv").is_file() and (folder / "train.jsonl").is_file():
        path = folder / "train.jsonl"
        with path.open(encoding="utf-8") as f:
            num_rows = sum(1 for line in f if line.strip())
    else:
        path = device_train_csv(data_path)
        num_rows = count_rows(path)
    if num_rows == 0:
        raise DataError(f"node_config 'data-path' is '{data_path}', whose {path.name} has no rows")
    return num_rows - holdout_size(num_rows, fraction)
