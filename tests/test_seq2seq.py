"""The seq2seq head without training: text metrics against hand-computed cases, encoding, the target-token loss and
its normalization, options and column errors, and the eval hook that scores generations."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from peftkit.core.evaluation import model_metrics
from peftkit.errors import PeftkitError
from peftkit.tasks import make_task, validate_task_options
from peftkit.text_metrics import exact_match, generation_scores, lcs_length, rouge_l
from tests.tiny_t5 import EOS_ID, build_t5_tokenizer

# ---- ROUGE-L and exact match, each case worked by hand ----------------------------------------------------


@pytest.mark.parametrize("prediction, reference, common, expected", [
    # LCS "the cat on the mat" = 5 of 6 and 6: P = R = 5/6
    ("the cat sat on the mat", "the cat is on the mat", 5, 5 / 6),
    # LCS "a c" = 2; P = 2/4, R = 2/3, F = 2 (1/2)(2/3) / (1/2 + 2/3) = 4/7
    ("a b c d", "a c e", 2, 4 / 7),
    # order counts: "b a" against "a b" shares a subsequence of one token; P = R = 1/2
    ("b a", "a b", 1, 1 / 2),
    # a repeated token is matched once per occurrence: LCS "x x" = 2; P = 2/2, R = 2/4, F = 2/3
    ("x x", "x y x y", 2, 2 / 3),
    ("nothing shared", "at all", 0, 0.0),
    ("same words here", "same  words\there ", 3, 1.0),
])
def test_rouge_l_matches_hand_computed_f1(prediction, reference, common, expected):
    assert lcs_length(prediction.split(), reference.split()) == common
    assert lcs_length(reference.split(), prediction.split()) == common
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)


def test_rouge_l_and_exact_match_edge_cases():
    assert rouge_l("", "") == 1.0 and rouge_l("", "a") == 0.0 and rouge_l("a", "") == 0.0
    assert exact_match(" a  b ", "a b") == 1.0
    assert exact_match("Paris", "paris") == 0.0  # case is kept
    assert exact_match("a b", "a b c") == 0.0
    scores = generation_scores(["a b", "a b c d", "x"], ["a b", "a c e", "y"])
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["rougeL"] == pytest.approx((1 + 4 / 7 + 0) / 3)
    assert generation_scores([], []) == {"exact_match": 0.0, "rougeL": 0.0}


# ---- encoding and batches ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_t5_tokenizer(tmp_path_factory.mktemp("t5tok"))


def _head(**options):
    head = make_task("seq2seq", options)
    head.state["decoder_start_token_id"] = 0
    return head


def test_encode_puts_the_prefix_before_the_source_and_the_target_in_the_labels(tokenizer):
    head = _head(prefix="copy: ", max_target_length=3)
    rows = {"source": ["the king said", "a film"], "target": ["the king", "a film was very good"]}
    enc = head.encode(rows, tokenizer, max_length=16)
    vocab = tokenizer.get_vocab()
    assert enc["input_ids"][0] == [vocab["copy:"], vocab["the"], vocab["king"], vocab["said"], EOS_ID]
    assert enc["labels"][0] == [vocab["the"], vocab["king"], EOS_ID]
    assert enc["labels"][1] == [vocab["a"], vocab["film"], EOS_ID]  # cut at max_target_length, EOS kept
    # serving encodes a source as training did
    assert head.serve_encode({"text": "the king said"}, tokenizer, 16) == (enc["input_ids"][0], None)


def test_collate_masks_padding_and_shifts_the_labels_into_the_decoder_inputs(tokenizer):
    head = _head()
    head.state["decoder_start_token_id"] = 7  # not the pad id: the start token comes from the model's config
    batch = head.collate([{"input_ids": [10, 11, 4], "labels": [20, 21, 22, 4]},
                          {"input_ids": [12, 4], "labels": [23, 4]}], tokenizer)
    assert batch["input_ids"].tolist() == [[10, 11, 4], [12, 4, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[20, 21, 22, 4], [23, 4, -100, -100]]
    assert batch["decoder_input_ids"].tolist() == [[7, 20, 21, 22], [7, 23, 4, 0]]
    assert batch["decoder_attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert set(head.model_inputs(batch)) == {"input_ids", "attention_mask", "decoder_input_ids",
                                             "decoder_attention_mask"}  # never the labels


def test_loss_counts_target_tokens_only_and_accumulates_per_token(tokenizer):
    head = _head()
    torch.manual_seed(0)
    rows = [{"input_ids": [10, 4], "labels": [20, 21, 22, 4]}, {"input_ids": [12, 4], "labels": [23, 4]},
            {"input_ids": [13, 4], "labels": [24, 25, 4]}]
    logits = {i: torch.randn(1, len(r["labels"]), 32) for i, r in enumerate(rows)}

    def outputs(index):  # the logits each row would get, padded like the batch
        width = max(len(rows[i]["labels"]) for i in index)
        padded = [torch.cat([logits[i], torch.full((1, width - logits[i].shape[1], 32), 99.0)], 1) for i in index]
        return SimpleNamespace(logits=torch.cat(padded))

    by_hand = [float(torch.nn.functional.cross_entropy(logits[i][0], torch.tensor(r["labels"]), reduction="sum"))
               for i, r in enumerate(rows)]
    assert [head.loss_items(r) for r in rows] == [4, 2, 3]
    whole = head.collate(rows, tokenizer)
    # the padded positions (logit 99) are outside the loss
    assert float(head.loss(outputs([0, 1, 2]), whole)) == pytest.approx(sum(by_hand) / 9, rel=1e-6)
    # micro-batches [0, 1] and [2], each summed and divided by the step's 9 tokens, give the whole batch's mean
    first, second = head.collate(rows[:2], tokenizer), head.collate(rows[2:], tokenizer)
    summed = head.loss_sum(outputs([0, 1]), first) + head.loss_sum(outputs([2]), second)
    assert float(summed / 9) == pytest.approx(sum(by_hand) / 9, rel=1e-6)
    # the mean of the two micro-batch means (rows weighed by batch) would differ
    assert float((head.loss(outputs([0, 1]), first) + head.loss(outputs([2]), second)) / 2) != pytest.approx(
        sum(by_hand) / 9, rel=1e-3)
    collected = head.eval_batch(outputs([0, 1, 2]), whole)
    assert collected["tokens"].tolist() == [4, 2, 3]
    metrics = head.metrics(collected)
    assert metrics["loss"] == pytest.approx(sum(by_hand) / 9, rel=1e-6)
    assert metrics["perplexity"] == pytest.approx(math.exp(sum(by_hand) / 9), rel=1e-5)


# ---- options and columns ------------------------------------------------------------------------------------


def test_options_and_columns_are_checked_with_their_key_paths():
    assert validate_task_options("seq2seq", {"prefx": "summarize: "}) == [
        "task.prefx: unknown key; did you mean `prefix`?"]
    assert validate_task_options("seq2seq", {"eval_generate_rows": -1}) == [
        "task.eval_generate_rows: input should be greater than or equal to 0 (got -1)"]
    assert validate_task_options("seq2seq", {"prefix": "a\nb"})[0].startswith("task.prefix: string should match")
    assert validate_task_options("seq2seq", {"prefix": "summarize: ", "max_new_tokens": 16}) == []
    head = make_task("seq2seq", {})
    assert head.resolve_columns(["question", "answer", "id"], {}, "qa.tsv") == {"source": "question",
                                                                               "target": "answer"}
    assert head.resolve_columns(["input", "output"], {}, "f.json") == {"source": "input", "target": "output"}
    with pytest.raises(PeftkitError) as err:
        head.resolve_columns(["source", "summary_text"], {}, "train.tsv")
    assert str(err.value) == ("data.columns.target: no column for 'target' in train.tsv (its columns: source, "
                              "summary_text); set data.columns.target: COLUMN")


# ---- the eval hook: generations scored against the targets ------------------------------------------------


class _Writer(torch.nn.Module):
    """Stands in for a model: "writes" fixed token ids, and records how it was called."""

    def __init__(self, outputs):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.outputs, self.calls = outputs, []

    def generate(self, **kwargs):
        self.calls.append({"training": self.training, **kwargs})
        rows = kwargs["input_ids"].shape[0]
        taken, self.outputs = self.outputs[:rows], self.outputs[rows:]
        width = max(len(t) for t in taken)
        return torch.tensor([t + [0] * (width - len(t)) for t in taken])


def test_eval_with_model_scores_the_first_rows_generations(tokenizer):
    vocab = tokenizer.get_vocab()
    ids = lambda text: [vocab[w] for w in text.split()]  # noqa: E731
    head = _head(eval_generate_rows=3, max_new_tokens=5)
    rows = [{"input_ids": [10, 4], "labels": ids("the king said") + [EOS_ID]},
            {"input_ids": [11, 4], "labels": ids("a film was good") + [EOS_ID]},
            {"input_ids": [12, 4], "labels": ids("river") + [EOS_ID]},
            {"input_ids": [13, 4], "labels": ids("town") + [EOS_ID]}]  # past eval_generate_rows: never generated
    # generations start with the decoder start (pad, a special token) and end at EOS
    model = _Writer([[0] + ids("the king said") + [EOS_ID], [0] + ids("a was") + [EOS_ID], [0] + ids("town")])
    model.train()
    metrics = model_metrics(model, head, tokenizer, rows)
    # row 1 exact; row 2 "a was" against "a film was good": LCS 2, P 1, R 1/2, F 2/3; row 3 nothing shared
    assert metrics == pytest.approx({"exact_match": 1 / 3, "rougeL": (1 + 2 / 3 + 0) / 3})
    assert model.training  # restored after the hook ran the model in eval mode
    call = model.calls[0]
    assert not call["training"] and call["max_new_tokens"] == 5 and call["do_sample"] is False
    assert call["input_ids"].shape[0] == 3  # only the first eval_generate_rows rows
    assert call["decoder_start_token_id"] == 0 and "labels" not in call
    assert model_metrics(model, _head(eval_generate_rows=0), tokenizer, rows) == {}
