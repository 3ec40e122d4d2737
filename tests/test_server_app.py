"""The ServerApp's whole run in this process (clients served by the ClientApp's handlers on
an in-process grid): labels written as names reach every client and the results."""

import csv
import json

from flwr.app import Context, RecordDict

from conftest import InProcessGrid
from server_app import main

NAMES = ["world", "sports", "business", "science"]  # AG News's classes, written as names


def named_copy(source, target, rows):
    """The first `rows` rows of each AG News file with their labels written as names."""
    target.mkdir()
    for split in ("train", "test"):
        with open(source / f"{split}.csv", newline="") as f, open(target / f"{split}.csv", "w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["text", "label"])
            for i, row in enumerate(csv.DictReader(f)):
                if i == rows:
                    break
                writer.writerow([row["text"], NAMES[int(row["label"])]])


def test_labels_that_are_names_run_end_to_end_and_are_saved(ag_news_dir, tmp_path, server_identity):
    named_copy(ag_news_dir, tmp_path / "named", 300)
    run_config = {"config": "conf/head_only.yaml", "results-dir": str(tmp_path / "results"),
                  "data-dir": str(tmp_path / "named"),
                  "overrides": "model.backbone=tiny-bert rounds=1 run-name=named federation.min-nodes=3 eval.test-samples=50"}
    main(InProcessGrid(3), Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))
    run_dir = tmp_path / "results" / "named"
    assert json.loads((run_dir / "labels.json").read_text()) == {"0": "business", "1": "science", "2": "sports", "3": "world"}
    assert "label-names:\n  - business\n  - science\n  - sports\n  - world" in (run_dir / "config.yaml").read_text()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "complete"
    record = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["num_replies"] == 3 and record["failures"] == 0


def test_global_evaluation_scores_the_last_round_on_its_own_rows_with_per_class_recall(ag_news_dir):
    import torch

    from fedmoe_app.config import load_config
    from fedmoe_app.data import load_test_set
    from fedmoe_app.model import build_model, state_to_numpy
    from fedmoe_app.backbones import load_tokenizer
    from fedmoe_app.records import to_record
    from fedmoe_app.server import GlobalEvaluator

    config = load_config("conf/head_only.yaml", f"model.backbone=tiny-bert data.data-dir={ag_news_dir} rounds=2 "
                         "eval.test-samples=40 eval.final-test-samples=90")
    torch.manual_seed(3)
    model = build_model(config, 4, "head")
    arrays = to_record(state_to_numpy(model))
    evaluator = GlobalEvaluator(config, model)
    assert evaluator(1, arrays)["num-examples"] == 40
    final = evaluator(2, arrays)
    assert final["num-examples"] == 90
    # per-class recall, recomputed row by row
    tokenizer = load_tokenizer(config.model.backbone)
    test = load_test_set(config.data, config.seed, 90)
    hits, rows = [0] * 4, [0] * 4
    with torch.no_grad():
        for text, label in zip(test["text"], test["label"]):
            ids = tokenizer(text, truncation=True, max_length=64, return_tensors="pt")
            predicted = int(model(ids["input_ids"], ids["attention_mask"]).argmax(-1))
            hits[label] += predicted == label
            rows[label] += 1
    for got, h, n in zip(final["recall"], hits, rows):
        assert got == h / n if n else got != got  # NaN: no test row of the class
    assert final["accuracy"] == sum(hits) / 90
