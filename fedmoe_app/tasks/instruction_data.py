"""Instruction data: JSONL rows of `instruction`, `input`, `output` (optional `answer` and
`source`), read from a local folder (train.jsonl, test/<benchmark>.jsonl) or a hub dataset,
and the prompt templates. A device reads its own train.jsonl with the json module only.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from fedmoe_app.config import DataConfig, resolve_path
from fedmoe_app.rows import DataError

REQUIRED = ("instruction", "output")
COLUMNS = ("instruction", "input", "output", "answer", "source")
# LLM-Adapters' (and Alpaca's) prompt template; the model learns the response after it.
TEMPLATES = {
    "alpaca": ("Below is an instruction that describes a task. Write a response that appropriately completes "
               "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"),
    "alpaca-input": ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                     "{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
    "plain": "{instruction}\n",
    "plain-input": "{instruction}\n{input}\n",
}
ANSWER_FORMAT = re.compile(r"Answer format:\s*([^\n]+)")


def prompt_of(row: dict, template: str) -> str:
    """The prompt of `row` under `template` (alpaca | plain), with its input when it has one."""
    name = f"{template}-input" if row.get("input") else template
    return TEMPLATES[name].format(instruction=row["instruction"], input=row.get("input", ""))


def options_of(row: dict) -> list[str]:
    """The answers a row allows, from its instruction's `Answer format: a/b/c` line (LLM-Adapters'
    format), else its own answer alone; [] when it has neither."""
    found = ANSWER_FORMAT.search(row["instruction"])
    if found:
        return [option.strip() for option in found.group(1).split("/") if option.strip()]
    return [row["answer"]] if row.get("answer") else []


def option_output(row: dict, option: str) -> str:
    """The output text `row` would have with `option` as its answer."""
    answer, output = row.get("answer") or "", row["output"]
    if not answer or answer not in output:
        return option
    cut = output.rindex(answer)  # the answer word is the output's last mention of it
    return output[:cut] + option + output[cut + len(answer):]


@dataclass(frozen=True)
class InstructionRows:
    """Instruction rows (dicts with every column of COLUMNS); `rows["source"]` is a column list."""

    rows: list[dict]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, column: str) -> list:
        if column not in COLUMNS:
            raise KeyError(f"instruction rows have the columns {', '.join(COLUMNS)}, not {column!r}")
        return [row[column] for row in self.rows]

    def select(self, index: Sequence[int]) -> InstructionRows:
        """The rows at `index`, in that order."""
        return InstructionRows([self.rows[i] for i in index])


def _row(value, where: str) -> dict:
    """One checked row (every column a string; answer and source may be missing)."""
    if not isinstance(value, dict):
        raise DataError(f"{where}: a row must be a JSON object with {', '.join(REQUIRED)}")
    for key in REQUIRED:
        if not isinstance(value.get(key), str) or not value[key].strip():
            raise DataError(f"{where}: '{key}' must be a non-empty string, got {value.get(key)!r}")
    row = {key: value.get(key) or "" for key in COLUMNS}
    for key in COLUMNS:
        if not isinstance(row[key], str):
            raise DataError(f"{where}: '{key}' must be a string, got {row[key]!r}")
    return row


def read_jsonl(path: Path, default_source: str = "") -> InstructionRows:
    """The rows of a JSONL file (`source` defaulting to `default_source`); DataError naming
    the file and line of a row that is not a JSON object with the required strings."""
    rows = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from error
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {number}: not JSON ({error.msg})") from error
        row = _row(value, f"{path} line {number}")
        row["source"] = row["source"] or default_source
        rows.append(row)
    return InstructionRows(rows)


@dataclass(frozen=True)
class InstructionSplits:
    """The training rows (a datasets.Dataset, so flwr-datasets partitions it) and the test
    rows of each benchmark."""

    train: object  # datasets.Dataset with the columns of COLUMNS
    tests: dict[str, InstructionRows]
    source: str
    num_labels: int = 0  # a causal LM has no classifier head
    label_names: tuple[str, ...] = ()


def _dataset(rows: InstructionRows):
    import datasets
    import pyarrow as pa

    return datasets.Dataset(pa.table({column: pa.array(rows[column], pa.string()) for column in COLUMNS}))


def _local(directory: Path) -> tuple[InstructionRows, dict[str, InstructionRows]]:
    train = directory / "train.jsonl"
    if not train.is_file():
        raise DataError(f"data.data-dir is '{directory}', which holds no train.jsonl (instruction, input, output)")
    tests = {path.stem: read_jsonl(path, path.stem) for path in sorted((directory / "test").glob("*.jsonl"))}
    if (directory / "test.jsonl").is_file():
        tests["test"] = read_jsonl(directory / "test.jsonl", "test")
    return read_jsonl(train, "train"), tests


def _hub(name: str) -> tuple[InstructionRows, dict[str, InstructionRows]]:
    from fedmoe_app.data import load_hub  # the hub's reachability check, shared with classification

    loaded = load_hub(name)
    if "train" not in loaded:
        raise DataError(f"hub dataset '{name}' needs a 'train' split; has {list(loaded)}")
    splits = {}
    for split in ("train", "test"):
        if split in loaded:
            splits[split] = InstructionRows([_row(dict(r), f"hub dataset '{name}' split '{split}' row {i}")
                                             for i, r in enumerate(loaded[split])])
    tests: dict[str, list[dict]] = {}
    for row in splits.get("test", InstructionRows([])).rows:
        tests.setdefault(row["source"] or "test", []).append(row)
    return splits["train"], {name: InstructionRows(rows) for name, rows in sorted(tests.items())}


@lru_cache(maxsize=4)
def load_instruction_splits(data: DataConfig, seed: int, benchmarks: tuple[str, ...]) -> InstructionSplits:
    """The training rows (a seeded subsample of data.max-train-rows) and the test rows of the
    benchmarks asked for (all when `benchmarks` is empty), from data.data-dir or the hub id
    data.dataset."""
    if data.data_dir:
        directory = resolve_path(data.data_dir)
        train, tests = _local(directory)
        source = f"instruction data '{data.dataset}' from {directory}"
    else:
        try:
            train, tests = _hub(data.dataset)
        except DataError:
            raise
        except Exception as error:
            raise DataError(f"instruction dataset '{data.dataset}' not found: data.data-dir is empty and the hub "
                            f"failed ({type(error).__name__}: {' '.join(str(error).split())[:200]})") from error
        source = f"instruction data from the Hugging Face hub ({data.dataset})"
    if len(train) == 0:
        raise DataError(f"the training rows of {source} are empty")
    missing = [b for b in benchmarks if b not in tests]
    if missing:
        raise DataError(f"config key 'instruction.benchmarks' names {missing}; {source} has test benchmarks "
                        f"{sorted(tests) or 'none'}")
    tests = {name: rows for name, rows in tests.items() if not benchmarks or name in benchmarks}
    dataset = _dataset(train)
    if 0 < data.max_train_rows < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(data.max_train_rows))
    return InstructionSplits(dataset, tests, source)


def write_jsonl(path: Path, rows: InstructionRows) -> None:
    """Write `rows` to a JSONL file, atomically (a concurrent reader never sees half a file)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows.rows), encoding="utf-8")
    tmp.replace(path)


def device_train_jsonl(data_path: str) -> Path:
    """The train.jsonl of a device's `data-path` folder (an error naming the folder if missing)."""
    path = Path(data_path).expanduser() / "train.jsonl"
    if not path.is_file():
        raise DataError(f"node_config 'data-path' is '{data_path}', which holds no train.jsonl")
    return path
