"""Split a dataset into per-device folders, as real devices would hold their data.

Device i gets partition i of the train split, cut by the run config's partitioner
(`data.partitioner`, `data.alpha`, `data.partition-by`, seed), so a deployment with N
devices trains on exactly the rows simulation client i of N would, in the files its task
reads (fedmoe_app/tasks): text classification `device-<i>/train.csv` and `test.csv` (an
IID share of the test split: local test data, which also tells the device every label
exists); instruction tuning `device-<i>/train.jsonl`. A SuperNode points at its folder with
node_config `data-path`.

Usage: python -m deploy.device_data --config conf/fft_moe.yaml --devices 3 --out DIR
       [--overrides "data.alpha=0.1"] [--data-dir ../shared/data/ag_news]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fedmoe_app.config import RunConfig, load_config
from fedmoe_app.data import partition_of_split
from fedmoe_app.rows import device_train_rows
from fedmoe_app.tasks import task_of


def device_dir(out_dir: Path, index: int) -> Path:
    """The folder of device `index` under `out_dir`."""
    return out_dir / f"device-{index}"


def split_for_devices(config: RunConfig, num_devices: int, out_dir: Path) -> list[Path]:
    """Write one folder per device (see the module docstring); return the folders."""
    task = task_of(config)
    train = task.splits().train
    folders = []
    for index in range(num_devices):
        folder = device_dir(out_dir, index)
        folder.mkdir(parents=True, exist_ok=True)
        partition = partition_of_split(train, config.data, config.seed, index, num_devices, task.partition_column())
        task.write_device_data(folder, partition, index, num_devices)
        folders.append(folder)
    return folders


def main(argv: list[str] | None = None) -> None:
    """Command line: split the configured dataset into per-device folders."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="conf/fft_moe.yaml", help="run config YAML (its data section decides the split)")
    parser.add_argument("--overrides", default="", help="'key=value ...' on top of the config, as in `make run`")
    parser.add_argument("--data-dir", default="", help="the default dataset's local copy (AG News: train.csv / test.csv)")
    parser.add_argument("--devices", type=int, required=True, help="number of devices (partitions)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write device-<i>/ into")
    args = parser.parse_args(argv)
    environ = {**os.environ, "FEDMOE_DATA_DIR": args.data_dir} if args.data_dir else dict(os.environ)
    config = load_config(args.config, args.overrides, environ)
    for folder in split_for_devices(config, args.devices, args.out):
        rows = device_train_rows(str(folder), config.data.holdout_fraction)
        print(f"{folder}: {rows} train rows (and its held-out slice)")


if __name__ == "__main__":
    main()
