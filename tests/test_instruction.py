"""The instruction task: masked loss, option scoring, generation, decoder families with
every method, and its config errors (values by hand, or by the original Hugging Face model)."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fedmoe_app.backbones import DENSE_DECODERS, MOE_DECODERS, load_backbone, load_tokenizer
from fedmoe_app.batches import IGNORE, iterate_batches
from fedmoe_app.config import ConfigError, load_config
from fedmoe_app.methods import METHODS, check_method_for_task, method_class
from fedmoe_app.model import build_model, num_layers, state_to_numpy
from fedmoe_app.records import to_record
from fedmoe_app.rows import DataError
from fedmoe_app.server import GlobalEvaluator
from fedmoe_app.tasks import task_of
from fedmoe_app.tasks.instruction import (causal_lm_loss, encode_choices, encode_rows, extract_answer,
                                          generated_choices, likelihood_choices, sequence_log_likelihoods)
from fedmoe_app.tasks.instruction_data import InstructionRows, prompt_of, read_jsonl
from strategies import make_strategy

from conftest import InProcessGrid

ROW = {"instruction": "Is the sky blue?\n\nAnswer format: answer1/answer2", "input": "",
       "output": "the correct answer is answer2", "answer": "answer2", "source": "toy"}


def instruction_config(overrides: str = "", files: str = "conf/fedavg_lora.yaml,conf/instruction.yaml"):
    return load_config(files, f"train.precision=fp32 {overrides}")


def test_masked_loss_equals_cross_entropy_over_the_output_tokens_by_hand():
    config = instruction_config()
    tokenizer = load_tokenizer("tiny-llama")
    model = build_model(config, 0, "lora")
    encoded = encode_rows(InstructionRows([ROW, {**ROW, "output": "the correct answer is answer1"}]), tokenizer, 96,
                          "alpaca")
    output_tokens = tokenizer(ROW["output"], add_special_tokens=False)["input_ids"]
    targets = [t for t in encoded.labels[0] if t != IGNORE]
    assert targets == output_tokens + [tokenizer.sep_token_id]  # the output and the end token, nothing of the prompt
    batch = next(iterate_batches(encoded, 2, tokenizer.pad_token_id, shuffle=False))
    with torch.no_grad():
        loss = causal_lm_loss(model, batch)
        logits = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    by_hand = []
    for row in range(2):
        for t in range(batch["input_ids"].shape[1] - 1):
            target = int(batch["labels"][row, t + 1])
            if target != IGNORE:
                by_hand.append(-torch.log_softmax(logits[row, t].double(), -1)[target].item())
    assert len(by_hand) == 2 * len(targets)
    assert loss.item() == pytest.approx(float(np.mean(by_hand)), rel=1e-5)


class BigramLM(nn.Module):
    """A causal LM whose next-token logits depend on the current token only: every token is
    followed by `answer` (logit 5), `answer` by `favoured` (9) and `favoured` by the end token (9)."""

    def __init__(self, tokenizer, favoured: str) -> None:
        super().__init__()
        self.vocab = tokenizer.vocab_size
        self.answer, = tokenizer("answer", add_special_tokens=False)["input_ids"]
        self.favoured, = tokenizer.convert_tokens_to_ids([favoured])
        self.end = tokenizer.sep_token_id
        self.device_marker = nn.Parameter(torch.zeros(1))
        self.precision = SimpleNamespace(length_multiple=1)

    def next_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(tokens), self.vocab)
        logits[:, self.answer] = 5.0
        logits[tokens == self.answer, self.favoured] = 9.0
        logits[tokens == self.favoured, self.end] = 9.0
        return logits

    def forward(self, input_ids, attention_mask, positions=None):
        flat = input_ids.reshape(-1)
        return self.next_logits(flat if positions is None else flat[positions])

    def decode_step(self, input_ids, cache=None):
        return self.next_logits(input_ids[0, -1:])[0], cache


@pytest.mark.parametrize("favoured, picked", [("##2", 1), ("##1", 0)])
def test_option_scoring_equals_each_option_scored_by_hand_and_picks_the_likelier(favoured, picked):
    tokenizer = load_tokenizer("tiny-llama")
    model = BigramLM(tokenizer, favoured)
    choices = encode_choices(InstructionRows([ROW]), tokenizer, 96, "alpaca")
    assert choices.option_words == [["answer1", "answer2"]] and choices.answers == [1]
    ids = [pair[0] for pair in choices.options[0]]
    targets = [pair[1] for pair in choices.options[0]]
    from fedmoe_app.batches import EncodedSet

    scores = sequence_log_likelihoods(model, EncodedSet(ids, targets), 2, tokenizer.pad_token_id)
    for seq, target, score in zip(ids, targets, scores):
        by_hand = 0.0
        for t in range(len(seq) - 1):
            if target[t + 1] != IGNORE:  # log-softmax of this row's logits, written out
                logits = model.next_logits(torch.tensor([seq[t]]))[0].double()
                by_hand += (logits[seq[t + 1]] - torch.log(torch.exp(logits).sum())).item()
        assert score == pytest.approx(by_hand, rel=1e-5)
    assert likelihood_choices(model, choices, 2, tokenizer.pad_token_id) == [picked]
    assert generated_choices(model, choices, 4, tokenizer) == [picked]  # greedy: "answer" then the favoured digit


@pytest.mark.parametrize("backbone", ["tiny-llama", "tiny-gpt2", "tiny-olmoe"])
def test_cached_decoding_gives_the_tokens_of_recomputing_the_whole_sequence(backbone):
    experts = "backbone" if backbone == "tiny-olmoe" else "adapter"
    config = instruction_config(f"model.backbone={backbone} moe.experts={experts} seed=3",
                                f"conf/{'hfedmoe' if experts == 'backbone' else 'fft_moe'}.yaml,conf/instruction.yaml")
    torch.manual_seed(3)
    model = build_model(config, 0, "moe")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # adapters away from their zero start, so they change the logits
                p.add_(0.05 * torch.randn_like(p))
    model.train(False)
    ids = torch.tensor([[101, 2054, 2003, 1996, 3007, 1997]])
    cached, step, cache = [], ids, None
    with torch.no_grad():
        for _ in range(5):
            logits, cache = model.decode_step(step, cache)
            recomputed = model(ids, torch.ones_like(ids), positions=torch.tensor([ids.shape[1] - 1]))[0]
            torch.testing.assert_close(logits, recomputed, rtol=1e-4, atol=1e-4)
            cached.append(int(logits.argmax()))
            ids = torch.cat([ids, torch.tensor([[int(recomputed.argmax())]])], dim=1)
            step = torch.tensor([cached[-1:]])
    assert cached == ids[0, 6:].tolist()


def test_answer_extraction_takes_the_first_allowed_answer():
    assert extract_answer("the correct answer is answer2, not answer1", ["answer1", "answer2"]) == 1
    assert extract_answer("True.", ["true", "false"]) == 0
    assert extract_answer("answer12", ["answer1", "answer2"]) == -1  # a whole word, not a prefix


def test_prompt_template_and_long_rows_keep_the_output():
    assert prompt_of(ROW, "alpaca").endswith("### Instruction:\n" + ROW["instruction"] + "\n\n### Response:\n")
    assert "### Input:\nctx" in prompt_of({**ROW, "input": "ctx"}, "alpaca")
    tokenizer = load_tokenizer("tiny-llama")
    long = {**ROW, "instruction": "word " * 400 + ROW["instruction"]}
    encoded = encode_rows(InstructionRows([long]), tokenizer, 40, "alpaca")
    assert len(encoded.input_ids[0]) == 40 and encoded.input_ids[0][0] == tokenizer.cls_token_id
    assert [t for t in encoded.labels[0] if t != IGNORE] == (
        tokenizer(ROW["output"], add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id])


@pytest.mark.parametrize("backbone", MOE_DECODERS)
def test_native_moe_decoder_with_its_own_top_k_and_zero_lora_gives_the_original_logits(backbone):
    config = instruction_config(f"model.backbone={backbone} moe.experts=backbone", "conf/hfedmoe.yaml,conf/instruction.yaml")
    original = load_backbone(backbone, causal_lm=True)
    model = build_model(config, 0, "moe", top_k=original.config.num_experts_per_tok)
    ids = torch.tensor([[101, 2054, 2003, 1996, 3007, 102], [101, 7592, 2088, 102, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = original(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(ours[real], theirs[real], atol=1e-4)


@pytest.mark.parametrize("backbone", DENSE_DECODERS)
def test_a_dense_decoders_moefied_mlp_with_every_expert_is_the_dense_mlp(backbone):
    config = instruction_config(f"model.backbone={backbone} moe.experts=backbone", "conf/hfedmoe.yaml,conf/instruction.yaml")
    original = load_backbone(backbone, causal_lm=True)
    model = build_model(config, 0, "moe", top_k=config.moe.num_experts)
    ids = torch.tensor([[101, 2054, 2003, 1996, 3007, 102]])
    with torch.no_grad():
        assert torch.allclose(model(ids, torch.ones_like(ids)), original(input_ids=ids).logits, atol=1e-4)


APPLICABLE = sorted(name for name, cls in METHODS.items() if cls.adapter != "head")


@pytest.mark.parametrize("backbone", DENSE_DECODERS + MOE_DECODERS)
@pytest.mark.parametrize("strategy", APPLICABLE)
def test_each_decoder_family_learns_with_each_method(commonsense_dir, server_identity, backbone, strategy):
    """Federated in-process (the ClientApp's handlers answer): the global model's held-out loss
    after two rounds is below the initial model's, every reply passes, the records name the
    task's metrics."""
    config = load_config(f"conf/{strategy}.yaml,conf/instruction.yaml", (
        f"model.backbone={backbone} rounds=2 data.data-dir={commonsense_dir} data.max-train-rows=40 "
        "eval.test-samples=3 eval.final-test-samples=3 eval.max-length=64 instruction.benchmarks=[ARC-Easy,boolq] "
        "train.lr=0.01 eval.client=false federation.max-update-ratio=0"))
    model = method_class(strategy).global_model(config, 0)
    records = []
    make_strategy(config, num_layers(config), on_round=records.append).start(
        InProcessGrid(2), to_record(state_to_numpy(model)), num_rounds=2, evaluate_fn=GlobalEvaluator(config, model))
    assert [r["num_replies"] for r in records] == [0, 2, 2] and not any(r["failures"] for r in records)
    assert records[-1]["global_loss"] < records[0]["global_loss"] - 0.5
    assert set(records[-1]["global_accuracy_by_benchmark"]) == {"ARC-Easy", "boolq"}
    assert records[-1]["global_perplexity"] == pytest.approx(math.exp(records[-1]["global_loss"]))


def test_head_only_and_classification_keys_are_config_errors_under_the_instruction_task():
    with pytest.raises(ConfigError, match=r"'strategy' is 'head_only'.*task 'instruction' has no head"):
        check_method_for_task(load_config("conf/head_only.yaml,conf/instruction.yaml"))
    for key, value in (("train.logit-adjustment", "1"), ("calibration.method", "ccvr"), ("data.label-names", "[a]"),
                       ("train.restricted-softmax", "0.5")):
        with pytest.raises(ConfigError, match=rf"'{key}' belongs to the classification task; task is 'instruction'"):
            load_config("conf/instruction.yaml", f"{key}={value}")


def test_jsonl_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROW) + "\nnot json\n")
    with pytest.raises(DataError, match=r"train.jsonl line 2: not JSON"):
        read_jsonl(path)
    path.write_text(json.dumps(ROW) + "\n" + json.dumps({"instruction": "q"}) + "\n")
    with pytest.raises(DataError, match=r"line 2: 'output' must be a non-empty string"):
        read_jsonl(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r"line 1: a row must be a JSON object"):
        read_jsonl(path)


def test_partitions_by_source_give_clients_different_benchmark_mixes(commonsense_dir):
    def mixes(partitioner: str):
        config = load_config("conf/instruction.yaml", f"data.data-dir={commonsense_dir} data.max-train-rows=800 "
                             f"data.partitioner={partitioner} data.alpha=0.1 data.holdout-fraction=0.25")
        task = task_of(task_of(config).completed_config(task_of(config).splits()))  # as the server sends it
        clients = [task.client_data({"partition-id": i, "num-partitions": 4}, i, 4) for i in range(4)]
        assert sum(len(c.rows) for c in clients) == 800
        assert all(len(c.group_counts) == 4 and sum(c.group_counts) == len(c.rows) for c in clients)
        for c in clients:
            assert len(c.holdout_index) == math.floor(0.25 * len(c.rows))
            holdout = task.encode(c, load_tokenizer(config.model.backbone), 128)[1]
            assert len(holdout) == len(c.holdout_index) and all(a >= 0 for a in holdout.answers)
        counts = np.array([c.group_counts for c in clients], dtype=float)
        return counts / counts.sum(axis=1, keepdims=True), counts.sum(axis=0) / counts.sum()

    iid, overall = mixes("iid")
    skewed, _ = mixes("dirichlet")
    assert np.abs(iid - overall).max() < 0.1  # every client about the overall mix of benchmarks
    assert np.abs(skewed - overall).max() > 0.3  # Dirichlet(0.1) over `source`: mixes far from it


def test_gradient_checkpointing_gives_the_same_step_and_routes_each_layer_once(commonsense_dir):
    """With model.gradient-checkpointing the blocks recompute in backward: the same loss and
    gradients as without, and the routing trace holds each layer's routes once."""
    tokenizer = load_tokenizer("tiny-llama")
    encoded = encode_rows(InstructionRows([ROW, {**ROW, "output": "the correct answer is answer1"}]), tokenizer, 96,
                          "alpaca")
    batch = next(iterate_batches(encoded, 2, tokenizer.pad_token_id, shuffle=False))
    grads = {}
    for checkpointing in (False, True):
        config = load_config("conf/fft_moe.yaml,conf/instruction.yaml",
                             f"train.precision=fp32 model.gradient-checkpointing={str(checkpointing).lower()}")
        model = build_model(config, 0, "moe", top_k=2).train()
        calls, route = [], model.trace.route
        model.trace.route = lambda moe, x: calls.append(1) or route(moe, x)
        loss = causal_lm_loss(model, batch)
        model.trace.stop()
        loss.backward()
        assert len(model.trace.routes) == num_layers(config) == 2
        assert len(calls) == (4 if checkpointing else 2)  # checkpointed blocks ran again in backward
        grads[checkpointing] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-6)
    assert grads[True][1].keys() == grads[False][1].keys() and grads[True][1]
    for name, grad in grads[False][1].items():
        assert torch.allclose(grads[True][1][name], grad, atol=1e-6), name


def test_causal_lm_updates_travel_in_each_wire_dtype(commonsense_dir, server_identity):
    """One round of UB-SMoE on a tiny Qwen3-MoE with each wire dtype: every reply passes, a
    16-bit wire carries half the bytes, and the round moves the global model as the float32
    wire does (the clients start from 16-bit rounded values, so the same to within 5%)."""
    from fedmoe_app.records import from_record

    moves, sent = {}, {}
    for wire in ("fp32", "fp16", "bf16"):
        config = load_config("conf/ub_smoe.yaml,conf/instruction.yaml", (
            f"model.backbone=tiny-qwen3-moe rounds=1 data.data-dir={commonsense_dir} data.max-train-rows=40 "
            f"eval.client=false federation.wire-dtype={wire} train.precision=fp32"))
        initial = state_to_numpy(method_class("ub_smoe").global_model(config, 0))
        records = []
        result = make_strategy(config, num_layers(config), on_round=records.append).start(
            InProcessGrid(2), to_record(initial), num_rounds=1)
        assert records[-1]["num_replies"] == 2 and records[-1]["failures"] == 0
        sent[wire] = sum(records[-1]["bytes_down"].values())
        final = from_record(result.arrays)
        moves[wire] = np.concatenate([(final[k] - initial[k]).ravel() for k in sorted(initial)])
    assert max(sent["fp16"], sent["bf16"]) < 0.55 * sent["fp32"]  # half, but for the arrays' headers
    assert np.linalg.norm(moves["fp32"]) > 0
    for wire in ("fp16", "bf16"):
        assert np.linalg.norm(moves[wire] - moves["fp32"]) < 0.05 * np.linalg.norm(moves["fp32"]), wire


def test_rows_without_an_answer_score_no_accuracy_and_the_tokenizer_decides_the_start():
    tokenizer = load_tokenizer("tiny-llama")
    assert task_of(instruction_config()).name == "instruction"
    from fedmoe_app.config import TASKS
    from fedmoe_app.tasks import TASKS as REGISTERED
    from fedmoe_app.tasks.instruction import start_ids
    from fedmoe_app.tasks.instruction_data import option_output

    assert tuple(REGISTERED) == TASKS  # the config's choices are the registered tasks
    assert start_ids(tokenizer) == [tokenizer.cls_token_id]  # what BERT's tokenizer puts first
    assert option_output({"output": "answer1 is wrong: the answer is answer1", "answer": "answer1"}, "answer2") == (
        "answer1 is wrong: the answer is answer2")
    model = BigramLM(tokenizer, "##2")
    unanswered = encode_choices(InstructionRows([{**ROW, "instruction": "Say hello.", "answer": ""}]), tokenizer, 96,
                                "alpaca")
    task = task_of(instruction_config())
    metrics = task.evaluate(model, unanswered, 4)
    assert metrics["num-examples"] == 0 and math.isnan(metrics["accuracy"]) and metrics["loss"] > 0
    answered = task.evaluate(model, encode_choices(InstructionRows([ROW, ROW]), tokenizer, 96, "alpaca"), 4)
    assert answered["num-examples"] == 2 and answered["accuracy"] == 1.0  # the bigram prefers answer2
