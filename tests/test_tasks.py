"""Task heads on their own: what they encode, mask and measure."""

from __future__ import annotations

import torch

from peftkit.metrics import macro_f1
from peftkit.tasks import make_task
from peftkit.tasks.causal_lm import IGNORE
from tests import tiny


def test_instruction_prompt_is_masked_and_written_with_the_chat_template(tmp_path):
    tokenizer = tiny.build_tokenizer(tmp_path, chat_template=True)
    task = make_task("causal_lm", {})
    task.state["format"] = "instruction"
    rows = {"prompt": ["say king again"], "input": [""], "response": ["king king king"]}
    out = task.encode(rows, tokenizer, max_length=64)
    ids, labels = out["input_ids"][0], out["labels"][0]
    prompt = task.prompt_ids(tokenizer, "say king again")
    assert tokenizer.decode(prompt).startswith("<|user|> say king again")  # the template wrote it
    assert ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):]
    assert tokenizer.decode(ids[len(prompt):]).split()[:3] == ["king", "king", "king"]


def test_instruction_without_template_and_unmasked(tmp_path):
    tokenizer = tiny.build_tokenizer(tmp_path, chat_template=False)
    task = make_task("causal_lm", {"mask_prompt": False})
    task.state["format"] = "instruction"
    out = task.encode({"prompt": ["say king"], "response": ["king"]}, tokenizer, max_length=64)
    assert out["labels"][0] == out["input_ids"][0]
    assert out["input_ids"][0][-1] == tokenizer.eos_token_id


def test_packed_text_has_no_padding(tmp_path):
    tokenizer = tiny.build_tokenizer(tmp_path)
    task = make_task("causal_lm", {"format": "text"})
    task.state["format"] = "text"
    out = task.encode({"text": ["the king said again"] * 20}, tokenizer, max_length=16)
    assert all(len(ids) == 16 for ids in out["input_ids"]) and len(out["input_ids"]) == 20 * 5 // 16
    batch = task.collate([{"input_ids": i, "labels": l} for i, l in zip(out["input_ids"], out["labels"])], tokenizer)
    assert bool(batch["attention_mask"].all())


def test_lm_loss_counts_only_labelled_tokens():
    task = make_task("causal_lm", {})
    logits = torch.randn(1, 4, 10)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 5]])
    outputs = type("Out", (), {"logits": logits})()
    expected = torch.nn.functional.cross_entropy(logits[0, 1:3], torch.tensor([3, 5]))
    torch.testing.assert_close(task.loss(outputs, {"labels": labels}), expected)
    per_row = task.eval_batch(outputs, {"labels": labels})
    assert per_row["tokens"].tolist() == [2]
    metrics = task.metrics(per_row)
    assert abs(metrics["loss"] - float(expected)) < 1e-6 and abs(metrics["perplexity"] - float(expected.exp())) < 1e-4


def test_lm_loss_per_row_matches_transformers_loss():
    # two rows of different label layouts: each row's loss is its own shifted tokens', and the batch loss equals
    # transformers' causal-LM loss (which peftkit's avoids a logits-sized copy to match)
    from transformers.loss.loss_utils import ForCausalLMLoss

    task = make_task("causal_lm", {})
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[IGNORE, 4, 2, 7, IGNORE], [IGNORE, IGNORE, IGNORE, 1, 9]])
    outputs = type("Out", (), {"logits": logits})()
    torch.testing.assert_close(task.loss(outputs, {"labels": labels}), ForCausalLMLoss(logits, labels, 11))
    per_row = task.eval_batch(outputs, {"labels": labels})
    assert per_row["tokens"].tolist() == [3, 2]
    row1 = torch.nn.functional.cross_entropy(logits[1, 2:4], torch.tensor([1, 9]), reduction="sum")
    torch.testing.assert_close(per_row["loss_sum"][1], row1)


def test_macro_f1_against_hand_computed_values():
    # class 0: tp 1 fp 1 fn 1 -> 0.5; class 1: tp 1 fp 1 fn 1 -> 0.5; class 2: tp 1 -> 1.0
    assert abs(macro_f1([0, 1, 1, 0, 2], [0, 0, 1, 1, 2], 3) - (0.5 + 0.5 + 1.0) / 3) < 1e-9
    assert macro_f1([0, 0], [0, 0], 2) == 1.0  # an absent class does not count
