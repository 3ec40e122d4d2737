"""Instruction tuning of a frozen causal LM (the setting of UB-SMoE's and HFedMoE's papers).

- Rows: JSONL `instruction`, `input`, `output` (optional `answer`, `source`),
  fedmoe_app/tasks/instruction_data.py; partitions by `source` (the benchmark) by default.
- Encoding: the prompt (template `instruction.prompt-template`), then the output and the
  end-of-sequence token; the loss is the mean cross-entropy over the output tokens alone
  (the prompt masked out). A row too long for max-length loses the start of its prompt.
- Model: the causal LM with its own LM head, both frozen; only adapters train.
- Metrics: multiple-choice accuracy (primary; the macro mean over benchmarks, and each
  benchmark's), held-out loss over the output tokens and its perplexity. Accuracy follows
  LLM-Adapters: by `likelihood`, the allowed answer (the `Answer format: a/b` line) whose
  output text has the highest log-likelihood after the prompt (summed over its tokens); or
  by `generate`, greedy generation and the first allowed answer word in it.
- Per-client statistics: rows per benchmark (`group_counts`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from fedmoe_app import messages as msg
from fedmoe_app.backbones import end_of_sequence_id
from fedmoe_app.batches import IGNORE, EncodedSet
from fedmoe_app.rows import ClientData, DataError, split_holdout
from fedmoe_app.tasks.base import ACCURACY, LOSS, BatchLoss, Metric, Task
from fedmoe_app.tasks.instruction_data import (InstructionRows, device_train_jsonl, load_instruction_splits,
                                               option_output, options_of, prompt_of, read_jsonl, write_jsonl)
from fedmoe_app.train import model_device, to_device

PERPLEXITY = Metric("perplexity", False, 1.0, math.inf, "ppl")
BENCHMARK_ACCURACY = "accuracy.{benchmark}"  # MetricRecord key of one benchmark's accuracy


@dataclass(frozen=True)
class ChoiceSet:
    """Rows to score: the gold sequences (`targets`, for loss and perplexity) and, per row, its
    prompt's token ids (for generation), each allowed answer's sequence (input ids, targets:
    the answer's output tokens), the answer words, the index of the right one (-1: the row
    has no answer among them) and its benchmark."""

    targets: EncodedSet
    prompts: list[list[int]]
    options: list[list[tuple[list[int], list[int]]]]
    option_words: list[list[str]]
    answers: list[int]
    benchmarks: list[str]

    def __len__(self) -> int:
        return len(self.prompts)


def start_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer itself puts before a text (Llama's bos, BERT's [CLS];
    none for GPT-2 or Qwen)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    marked = tokenizer("x")["input_ids"]
    return marked[:marked.index(plain[0])] if plain and plain[0] in marked else []


def encode_pair(prompt: str, output: str, tokenizer, max_length: int, eos: bool = True) -> tuple[list[int], list[int]]:
    """(input ids, targets) of `prompt` followed by `output` (and the end-of-sequence token):
    targets are IGNORE over the start token and the prompt, the token ids over the output.
    The text is tokenised whole and the prompt's tokens counted apart, so the output's
    tokens are those the model reads in training. Longer than `max_length`: the start of the
    prompt goes first, then the end of the output."""
    start = start_ids(tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + output, add_special_tokens=False)["input_ids"]
    cut = len(prompt_ids) if full[:len(prompt_ids)] == prompt_ids else _common_prefix(prompt_ids, full)
    prompt_ids, output_ids = full[:cut], full[cut:] + ([end_of_sequence_id(tokenizer)] if eos else [])
    room = max_length - len(start)
    output_ids = output_ids[:max(1, room - 1)]
    prompt_ids = prompt_ids[len(prompt_ids) - max(0, room - len(output_ids)):] if room > len(output_ids) else []
    ids = start + prompt_ids + output_ids
    return ids, [IGNORE] * (len(start) + len(prompt_ids)) + output_ids


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_rows(rows: InstructionRows, tokenizer, max_length: int, template: str) -> EncodedSet:
    """Input ids and per-token targets (the output's tokens; IGNORE elsewhere) of every row."""
    pairs = [encode_pair(prompt_of(row, template), row["output"], tokenizer, max_length) for row in rows.rows]
    return EncodedSet([ids for ids, _ in pairs], [targets for _, targets in pairs])


def encode_choices(rows: InstructionRows, tokenizer, max_length: int, template: str) -> ChoiceSet:
    """The ChoiceSet of `rows`: gold sequences, prompts, and each row's allowed answers."""
    prompts, options, words, answers = [], [], [], []
    for row in rows.rows:
        prompt = prompt_of(row, template)
        allowed = options_of(row)
        start, prompt_ids = start_ids(tokenizer), tokenizer(prompt, add_special_tokens=False)["input_ids"]
        prompts.append(start + prompt_ids[-(max_length - len(start)):])
        options.append([encode_pair(prompt, option_output(row, option), tokenizer, max_length, eos=False)
                        for option in allowed])
        words.append(allowed)
        answers.append(allowed.index(row["answer"]) if row.get("answer") in allowed else -1)
    return ChoiceSet(encode_rows(rows, tokenizer, max_length, template), prompts, options, words, answers,
                     [row["source"] for row in rows.rows])


def target_log_probs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each target token [P], the row of each [P]) of a batch whose
    `labels` are per-token targets (IGNORE elsewhere): position t's logits score token t + 1."""
    targets = batch["labels"][:, 1:]
    picked = targets != IGNORE
    rows, steps = picked.nonzero(as_tuple=True)
    width = batch["input_ids"].shape[1]
    logits = model(batch["input_ids"], batch["attention_mask"], positions=rows * width + steps)
    return -F.cross_entropy(logits, targets[picked], reduction="none"), rows


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the batch's target tokens (the outputs; prompts are masked)."""
    log_probs, _ = target_log_probs(model, batch)
    return -log_probs.mean()


class InstructionTask(Task):
    """Instruction tuning of causal LMs (see the module docstring)."""

    name = "instruction"
    causal_lm = True
    partition_key = "source"
    metrics = (ACCURACY, LOSS, PERPLEXITY)
    client_metrics = (ACCURACY, LOSS)

    def splits(self):
        """Training rows and the test benchmarks (cached per process)."""
        return load_instruction_splits(self.config.data, self.config.seed, self.config.instruction.benchmarks)

    def client_data(self, node_config: Mapping[str, Any], partition_id: int, num_partitions: int) -> ClientData:
        """A device's own train.jsonl, else its simulated partition (by data.partition-by)."""
        data_path = str(node_config.get(msg.DATA_PATH, ""))
        column = self.partition_column()
        if data_path:
            rows = read_jsonl(device_train_jsonl(data_path), "train")
            if len(rows) == 0:
                raise DataError(f"node_config 'data-path' is '{data_path}', whose train.jsonl has no rows")
        else:
            from fedmoe_app.data import partition_of_split

            rows = _rows_of(partition_of_split(self.splits().train, self.config.data, self.config.seed, partition_id,
                                               num_partitions, column))
        groups = self.config.instruction.groups or sorted(set(rows[column]))
        train_index, holdout_index = split_holdout(len(rows), self.config.data.holdout_fraction, self.config.seed)
        return ClientData(rows, train_index, holdout_index, 0, tuple(rows[column].count(g) for g in groups))

    def completed_config(self, splits):
        """The run's config with `instruction.groups` set from the training rows (when empty),
        so every client, a device too, counts its rows over the same groups."""
        if self.config.instruction.groups:
            return self.config
        groups = tuple(sorted(set(splits.train[self.partition_column()][:])))
        return dataclasses.replace(self.config, instruction=dataclasses.replace(self.config.instruction, groups=groups))

    def encode(self, data: ClientData, tokenizer, max_length: int) -> tuple[EncodedSet, ChoiceSet]:
        """The training rows' token ids and targets; the held-out rows as a ChoiceSet."""
        template = self.config.instruction.prompt_template
        return (encode_rows(data.rows.select(data.train_index), tokenizer, max_length, template),
                encode_choices(data.rows.select(data.holdout_index), tokenizer, max_length, template))

    def write_device_data(self, folder, partition, index: int, num_devices: int) -> None:
        """train.jsonl: the partition's rows, one JSON object a line."""
        write_jsonl(Path(folder) / "train.jsonl", _rows_of(partition))

    def test_set(self, max_samples: int, tokenizer, max_length: int) -> ChoiceSet:
        """Every benchmark's test rows (a seeded subsample of `max_samples` of each), one ChoiceSet."""
        rows = []
        for name, bench in self.splits().tests.items():
            index = range(len(bench))
            if 0 < max_samples < len(bench):
                index = sorted(np.random.default_rng(self.config.seed).permutation(len(bench))[:max_samples].tolist())
            rows += bench.select(list(index)).rows
        return encode_choices(InstructionRows(rows), tokenizer, max_length, self.config.instruction.prompt_template)

    def batch_loss(self, data: ClientData, num_labels: int) -> BatchLoss:
        """Cross-entropy over the output tokens."""
        return causal_lm_loss

    def evaluate(self, model: torch.nn.Module, choices: ChoiceSet, batch_size: int) -> dict[str, Any]:
        """Accuracy (macro mean over benchmarks, and per benchmark), loss and perplexity of
        the gold outputs, and the rows accuracy is scored on (those with an answer among their
        options: a node whose rows have none reports 0 rows, and its evaluation is left out)."""
        if len(choices) == 0:
            return {msg.NUM_EXAMPLES: 0, msg.ACCURACY: math.nan, msg.LOSS: math.nan, PERPLEXITY.name: math.nan}
        pad = self.pad_token_id()
        loss = mean_target_loss(model, self.batches(choices.targets, batch_size, pad, shuffle=False,
                                                    length_multiple=model.precision.length_multiple))
        if self.config.instruction.scoring == "generate":
            picked = generated_choices(model, choices, self.config.instruction.max_new_tokens, self.tokenizer())
        else:
            picked = likelihood_choices(model, choices, batch_size, pad)
        by_benchmark = benchmark_accuracy(choices, picked)
        answered = sum(1 for answer in choices.answers if answer >= 0)  # rows accuracy is scored on
        metrics = {msg.NUM_EXAMPLES: answered, msg.LOSS: loss, PERPLEXITY.name: math.exp(min(loss, 700.0)),
                   msg.ACCURACY: float(np.mean(list(by_benchmark.values()))) if by_benchmark else math.nan}
        metrics.update({BENCHMARK_ACCURACY.format(benchmark=b): a for b, a in by_benchmark.items()})
        return metrics

    def record_fields(self, metrics: Mapping[str, Any] | None) -> dict[str, Any]:
        """Accuracy, loss, perplexity and `global_accuracy_by_benchmark`."""
        fields = super().record_fields(metrics)
        prefix = BENCHMARK_ACCURACY.format(benchmark="")
        fields["global_accuracy_by_benchmark"] = (
            {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)} if metrics else None)
        return fields


@torch.no_grad()
def mean_target_loss(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Mean cross-entropy per target token over `batches` (NaN without targets)."""
    model.train(False)
    device = model_device(model)
    total, count = 0.0, 0
    for batch in batches:
        log_probs, _ = target_log_probs(model, to_device(batch, device))
        total -= log_probs.sum().item()
        count += log_probs.numel()
    return total / count if count else math.nan


@torch.no_grad()
def sequence_log_likelihoods(model: torch.nn.Module, encoded: EncodedSet, batch_size: int, pad_token_id: int,
                             length_multiple: int = 1) -> list[float]:
    """The summed log-probability of each sequence's targets, in the order of `encoded`."""
    from fedmoe_app.batches import iterate_batches

    model.train(False)
    device = model_device(model)
    scores: list[float] = []
    for batch in iterate_batches(encoded, batch_size, pad_token_id, shuffle=False, length_multiple=length_multiple):
        log_probs, rows = target_log_probs(model, to_device(batch, device))
        sums = torch.zeros(batch["input_ids"].shape[0], device=device).index_add_(0, rows, log_probs.float())
        scores += sums.tolist()
    return scores


def likelihood_choices(model: torch.nn.Module, choices: ChoiceSet, batch_size: int, pad_token_id: int) -> list[int]:
    """Per row, the index of the allowed answer whose output is most likely after the prompt (-1: none)."""
    sequences = [(row, index, pair) for row, options in enumerate(choices.options) for index, pair in enumerate(options)]
    encoded = EncodedSet([pair[0] for _, _, pair in sequences], [pair[1] for _, _, pair in sequences])
    scores = sequence_log_likelihoods(model, encoded, batch_size, pad_token_id, model.precision.length_multiple)
    best: list[tuple[float, int]] = [(-math.inf, -1)] * len(choices)
    for (row, index, _), score in zip(sequences, scores):
        if score > best[row][0]:
            best[row] = (score, index)
    return [index for _, index in best]


@torch.no_grad()
def generated_choices(model: torch.nn.Module, choices: ChoiceSet, max_new_tokens: int, tokenizer) -> list[int]:
    """Per row, the allowed answer greedy generation names first (-1: none), one row at a time
    (no padding, so every architecture's positions are right; each step reuses the previous
    steps' attention keys and values)."""
    model.train(False)
    device = model_device(model)
    eos = end_of_sequence_id(tokenizer)
    picked = []
    for prompt, words in zip(choices.prompts, choices.option_words):
        step, cache, generated = torch.tensor([prompt], device=device), None, []
        for _ in range(max_new_tokens):
            logits, cache = model.decode_step(step, cache)
            generated.append(int(logits.argmax()))
            if generated[-1] == eos:
                break
            step = torch.tensor([generated[-1:]], device=device)
        picked.append(extract_answer(tokenizer.decode(generated, skip_special_tokens=True), words))
    return picked


def extract_answer(text: str, words: list[str]) -> int:
    """The index of the allowed answer word that appears first in `text` (-1: none), as
    LLM-Adapters extracts answers from generations."""
    found = [(m.start(), i) for i, word in enumerate(words) for m in [re.search(rf"\b{re.escape(word)}\b", text, re.I)] if m]
    return min(found)[1] if found else -1


def benchmark_accuracy(choices: ChoiceSet, picked: list[int]) -> dict[str, float]:
    """Per benchmark, the share of its rows with an answer whose pick is right."""
    right: dict[str, list[bool]] = {}
    for benchmark, answer, pick in zip(choices.benchmarks, choices.answers, picked):
        if answer >= 0:
            right.setdefault(benchmark, []).append(pick == answer)
    return {b: float(np.mean(r)) for b, r in sorted(right.items())}


def _rows_of(dataset) -> InstructionRows:
    """The rows of a datasets.Dataset with the instruction columns."""
    return InstructionRows([dict(zip(dataset.column_names, values))
                            for values in zip(*(dataset[c][:] for c in dataset.column_names))])
