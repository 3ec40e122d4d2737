"""Split a dataset into per-device folders, as real devices would hold their data.

Device i gets `device-<i>/train.csv`: partition i of the train split, cut by the run
config's partitioner (`data.partitioner`, `data.alpha`, seed), so a deployment with N
devices trains on exactly the rows simulation client i of N would; and
`device-<i>/test.csv`: an IID share of the test split (local test data; it also tells the
device every label exists). A SuperNode points at its folder with node_config `data-path`.

Usage: python -m deploy.device_data --config conf/fft_moe.yaml --devices 3 --out DIR
       [--overrides "data.alpha=0.1"] [--data-dir ../shared/data/ag_news]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fedmoe_app.config import RunConfig, load_config
from fedmoe_app.data import load_partition, load_splits
from fedmoe_app.rows import read_csv, write_csv


def device_dir(out_dir: Path, index: int) -> Path:
    """The folder of device `index` under `out_dir`."""
    return out_dir / f"device-{index}"


def _rows(dataset) -> list[tuple[str, int]]:
    return list(zip(dataset["text"][:], dataset["label"][:]))


def split_for_devices(config: RunConfig, num_devices: int, out_dir: Path) -> list[Path]:
    """Write one folder per device (see the module docstring); return the folders."""
    splits = load_splits(config.data, config.seed)
    test = splits.test.shuffle(seed=config.seed)
    folders = []
    for index in range(num_devices):
        folder = device_dir(out_dir, index)
        folder.mkdir(parents=True, exist_ok=True)
        write_csv(folder / "train.csv", _rows(load_partition(config.data, config.seed, index, num_devices)))
        write_csv(folder / "test.csv", _rows(test.shard(num_shards=num_devices, index=index, contiguous=True)))
        folders.append(folder)
    return folders


def main(argv: list[str] | None = None) -> None:
    """Command line: split the configured dataset into per-device folders."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="conf/fft_moe.yaml", help="run config YAML (its data section decides the split)")
    parser.add_argument("--overrides", default="", help="'key=value ...' on top of the config, as in `make run`")
    parser.add_argument("--data-dir", default="", help="folder with train.csv / test.csv (else the config's source)")
    parser.add_argument("--devices", type=int, required=True, help="number of devices (partitions)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write device-<i>/ into")
    args = parser.parse_args(argv)
    environ = {**os.environ, "FEDMOE_DATA_DIR": args.data_dir} if args.data_dir else dict(os.environ)
    config = load_config(args.config, args.overrides, environ)
    for folder in split_for_devices(config, args.devices, args.out):
        print(f"{folder}: {len(read_csv(folder / 'train.csv'))} train rows")


if __name__ == "__main__":
    main()
