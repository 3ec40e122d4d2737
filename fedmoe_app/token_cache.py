"""Token ids of a device's train.csv, cached on disk between ClientApp processes.

On a SuperNode every message starts a new process; without the cache each one would
tokenise the whole train.csv again. An entry is `<cache_dir()>/tokens/<csv>-<key>.npz`
(NumPy arrays only, read with allow_pickle=False): `<key>` hashes the CSV's absolute path,
size and mtime, the tokenizer's name_or_path and vocabulary size, and the max length, so a
changed file or setting misses; `<csv>` hashes the path alone, so a new entry replaces
the older ones of the same file. An entry that cannot be read, whose stored key differs,
or whose rows do not match the CSV's (count, labels, token ids in the vocabulary) is
rebuilt, never trusted. Entries are written atomically (a temporary file, then a rename).
Delete the folder to clear the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from fedmoe_app.batches import EncodedSet, encode
from fedmoe_app.rows import TextRows, cache_dir

FORMAT = 1  # bump when the stored arrays change meaning


def cache_key(csv_path: Path, tokenizer, max_length: int) -> str:
    """The JSON text that identifies one cache entry (hashed into its file name, and stored in it)."""
    stat = csv_path.stat()
    return json.dumps({
        "format": FORMAT,
        "csv": str(csv_path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "tokenizer": str(tokenizer.name_or_path),
        "vocab_size": int(tokenizer.vocab_size),
        "max_length": int(max_length),
    }, sort_keys=True)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def entry_path(csv_path: Path, key: str) -> Path:
    """Where the entry of `key` (a key of `csv_path`) is stored."""
    return cache_dir() / "tokens" / f"{_digest(str(csv_path.resolve()))}-{_digest(key)}.npz"


def encode_csv(csv_path: Path, rows: TextRows, tokenizer, max_length: int) -> EncodedSet:
    """`encode(rows, tokenizer, max_length)` of the rows read from `csv_path` (all of them,
    in file order), from the cache when a valid entry exists, else computed and stored."""
    key = cache_key(csv_path, tokenizer, max_length)
    path = entry_path(csv_path, key)
    cached = _load(path, key, rows, len(tokenizer))
    if cached is not None:
        return cached
    encoded = encode(rows, tokenizer, max_length)
    _store(path, key, encoded)
    return encoded


def _load(path: Path, key: str, rows: TextRows, vocab: int) -> EncodedSet | None:
    """The entry at `path` if it is readable, stored under `key` and matches `rows`, else None."""
    try:
        with np.load(path, allow_pickle=False) as entry:
            stored_key, ids, offsets, labels = (entry[name] for name in ("key", "ids", "offsets", "labels"))
    except Exception:  # missing, truncated, corrupted (the zip's CRC fails) or foreign: rebuild it
        return None
    valid = (
        str(stored_key) == key
        and offsets.ndim == ids.ndim == labels.ndim == 1
        and all(a.dtype.kind in "iu" for a in (ids, offsets, labels))
        and len(offsets) == len(rows) + 1
        and offsets[0] == 0 and offsets[-1] == len(ids) and bool(np.all(np.diff(offsets) >= 0))
        and labels.tolist() == rows.labels
        and (len(ids) == 0 or (int(ids.min()) >= 0 and int(ids.max()) < vocab))
    )
    if not valid:
        return None
    flat, cuts = ids.tolist(), offsets.tolist()
    return EncodedSet([flat[a:b] for a, b in zip(cuts[:-1], cuts[1:])], labels.tolist())


def _store(path: Path, key: str, encoded: EncodedSet) -> None:
    """Write the entry atomically; a cache that cannot be written is skipped."""
    lengths = [len(row) for row in encoded.input_ids]
    arrays = {
        "key": np.array(key),
        "ids": np.array([i for row in encoded.input_ids for i in row], dtype=np.int32),
        "offsets": np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),
        "labels": np.array(encoded.labels, dtype=np.int64),
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as f:
            np.savez(f, **arrays)
        tmp.replace(path)
        for older in path.parent.glob(f"{path.name.split('-')[0]}-*.npz"):  # the same CSV, other keys
            if older != path:
                older.unlink(missing_ok=True)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
