"""What MoE-fication costs a frozen encoder before any federated training: the backbone's
FFNs split into M experts, each token running K of them with the router at its start (the
groups' centroids), against the dense encoder. For K / M = 1/8, 1/4, 1/2, 1 and each
grouping: the cosine similarity of the mean-pooled sentence embeddings to the dense ones,
the test accuracy of a centralised linear probe (multinomial logistic regression on the
pooled embeddings, trained on the train split), and the accuracy of a probe trained at K
and applied to dense features (and the other way): what one head shared by devices of
different K loses.

Usage: python -m bench.moefy_loss [--data-dir DIR] [--test-rows 2000] [--out results/bench]
Writes <out>/moefy_loss.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.markdown import table
from bench.run import machine
from fedmoe_app.batches import encode, iterate_batches
from fedmoe_app.config import load_config
from fedmoe_app.data import load_splits
from fedmoe_app.model import AdapterClassifier, build_model
from fedmoe_app.backbones import load_tokenizer

FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1.0)
PROBE_L2 = 1e-3
PROBE_ITERATIONS = 200


@torch.no_grad()
def embeddings(model: AdapterClassifier, encoded, pad_token_id: int, batch_size: int = 64) -> torch.Tensor:
    """[N, d] mean-pooled last hidden states of every row, in row order."""
    out = []
    for batch in iterate_batches(encoded, batch_size, pad_token_id, shuffle=False):
        model.trace.start(batch["attention_mask"])
        with model.precision.autocast(batch["input_ids"].device):
            hidden = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        out.append((hidden.float() * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    """Test accuracy of L2-regularised multinomial logistic regression (L-BFGS) on
    standardised features."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(train_y.max()) + 1
    weight = torch.zeros(train_x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=PROBE_ITERATIONS, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + PROBE_L2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return ((test_x @ weight + bias).argmax(1) == test_y).float().mean().item()


def measure(data_dir: str, test_rows: int, num_experts: int = 16) -> dict:
    """The table's rows: dense, then each grouping x K."""
    config = load_config("conf/hfedmoe.yaml", f"data.data-dir={data_dir} moe.num-experts={num_experts}")
    splits = load_splits(config.data, config.seed)
    tokenizer = load_tokenizer(config.model.backbone)
    max_length = 64  # the tiers' max-length
    test = splits.test.shuffle(seed=config.seed).select(range(min(test_rows, len(splits.test))))
    train_set, test_set = encode(splits.train, tokenizer, max_length), encode(test, tokenizer, max_length)
    train_y, test_y = torch.tensor(train_set.labels), torch.tensor(test_set.labels)
    rows = []
    dense_config = load_config("conf/fft_moe.yaml", f"data.data-dir={data_dir}")
    dense = build_model(dense_config, splits.num_labels, "head")
    started = time.time()
    dense_test = embeddings(dense, test_set, tokenizer.pad_token_id)
    dense_train = embeddings(dense, train_set, tokenizer.pad_token_id)
    accuracy = linear_probe(dense_train, train_y, dense_test, test_y)
    rows.append({"grouping": "dense", "experts_per_token": num_experts, "fraction": 1.0, "cosine": 1.0,
                 "probe_accuracy": accuracy, "probe_at_k_on_dense": accuracy, "probe_dense_at_k": accuracy,
                 "seconds": time.time() - started})
    print(json.dumps(rows[-1]), flush=True)
    for grouping in ("kmeans", "contiguous"):
        for fraction in FRACTIONS:
            started = time.time()
            k = max(1, round(fraction * num_experts))
            grouped = load_config("conf/hfedmoe.yaml", f"data.data-dir={data_dir} moe.num-experts={num_experts} "
                                                       f"moe.grouping={grouping}")
            model = build_model(grouped, splits.num_labels, "moe", top_k=k)
            test_x, train_x = (embeddings(model, encoded, tokenizer.pad_token_id) for encoded in (test_set, train_set))
            cosine = F.cosine_similarity(test_x, dense_test, dim=1).mean().item()
            rows.append({"grouping": grouping, "experts_per_token": k, "fraction": fraction, "cosine": cosine,
                         "probe_accuracy": linear_probe(train_x, train_y, test_x, test_y),
                         "probe_at_k_on_dense": linear_probe(train_x, train_y, dense_test, test_y),
                         "probe_dense_at_k": linear_probe(dense_train, train_y, test_x, test_y),
                         "seconds": time.time() - started})
            print(json.dumps(rows[-1]), flush=True)
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "backbone": config.model.backbone,
            "num_experts": num_experts, "train_rows": len(train_y), "test_rows": len(test_y),
            "precision": dense.precision.name, "threads": torch.get_num_threads(), "rows": rows}


def markdown(result: dict) -> str:
    """The table as Markdown."""
    lines = [f"MoE-fied {result['backbone']}, M = {result['num_experts']}, frozen, router at the groups' centroids; "
             f"linear probe on {result['train_rows']} train rows, scored on {result['test_rows']} test rows "
             f"({result['precision']}, {result['date']}).", ""]
    header = ["grouping", "K / M", "cosine to dense", "probe accuracy", "loss vs dense (points)", "probe at K, dense features",
              "dense probe, features at K"]
    dense = result["rows"][0]["probe_accuracy"]
    rows = [[row["grouping"], f"{row['experts_per_token']}/{result['num_experts']}", f"{row['cosine']:.4f}",
             f"{100 * row['probe_accuracy']:.1f}%", f"{100 * (dense - row['probe_accuracy']):+.1f}",
             f"{100 * row['probe_at_k_on_dense']:.1f}%", f"{100 * row['probe_dense_at_k']:.1f}%"] for row in result["rows"]]
    return "\n".join(lines) + "\n" + table(header, rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Command line: measure and write <out>/moefy_loss.json and .md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--test-rows", type=int, default=2000)
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    result = measure(args.data_dir, args.test_rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "moefy_loss.json").write_text(json.dumps(result, indent=2))
    (out / "moefy_loss.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
