"""Causal language modelling: plain text, or instructions with the prompt masked out of the loss.

* ``format: text``: every token is predicted. With ``pack: true`` (default) the texts are joined with the EOS
  token and cut into blocks of ``data.max_length`` tokens, so no compute goes to padding.
* ``format: instruction``: rows with a prompt (``instruction``), an optional ``input`` and a ``response``
  (``output``). The prompt is written with the tokenizer's chat template when it has one (else a plain
  "### Instruction / ### Response" layout) and its tokens get label -100, so only the response is learned.

Metrics: mean token loss and perplexity over the tokens that carry a label.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional

from .base import HeadOptions, HeadState, TaskHead
from .token_loss import IGNORE, TokenLoss


class CausalLMOptions(HeadOptions):
    format: Literal["auto", "text", "instruction"] = "auto"
    mask_prompt: bool = True
    chat_template: Literal["auto", "never"] = "auto"
    pack: bool = True


class CausalLMState(HeadState):
    format: Literal["text", "instruction"]


def _token_ids(encoded: Any) -> list[int]:
    # apply_chat_template returns a list, or a BatchEncoding when transformers defaults to return_dict
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return list(encoded)


class CausalLM(TokenLoss, TaskHead):
    name = "causal_lm"
    augment_refusal = "the text is the target itself: the model would learn to write EDA's swapped and deleted words"
    Options = CausalLMOptions
    State = CausalLMState
    peft_task_type = "CAUSAL_LM"
    generates = True
    roles = {
        "text": ("text", "content", "document"),
        "prompt": ("instruction", "prompt", "question"),
        "input": ("input", "context"),
        "response": ("output", "response", "answer"),
    }
    required_roles = ()
    key_metric = ("perplexity", "min")

    def resolve_columns(self, available: list[str], mapping: dict[str, str], source: str,
                        key: str = "data.") -> dict[str, str]:
        from ..errors import PeftkitError

        resolved = super().resolve_columns(available, mapping, source, key)
        fmt = self.format_for(resolved)
        needed = ("text",) if fmt == "text" else ("prompt", "response")
        for role in needed:
            if role not in resolved:
                raise PeftkitError(
                    f"{key}columns.{role}: task.format {fmt} needs a {role!r} column and {source} has none "
                    f"(its columns: {', '.join(available)}); set {key}columns.{role}: COLUMN"
                )
        self.state["format"] = fmt
        return resolved

    def format_for(self, resolved: dict[str, str]) -> str:
        if self.options.format != "auto":
            return self.options.format
        return "instruction" if "prompt" in resolved and "response" in resolved else "text"

    def encode(self, rows: dict[str, list], tokenizer: Any, max_length: int) -> dict[str, list]:
        if self.state.get("format", "text") == "instruction":
            return self._encode_instructions(rows, tokenizer, max_length)
        texts = [str(t) for t in rows["text"] if t is not None and str(t).strip()]
        if not self.options.pack:
            enc = tokenizer(texts, truncation=True, max_length=max_length)
            return {"input_ids": enc["input_ids"], "labels": [list(ids) for ids in enc["input_ids"]]}
        stream: list[int] = []
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            if tokenizer.eos_token_id is not None:
                stream.append(tokenizer.eos_token_id)
        blocks = [stream[i : i + max_length] for i in range(0, len(stream) - max_length + 1, max_length)]
        if not blocks and stream:
            blocks = [stream]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    def _use_chat_template(self, tokenizer: Any) -> bool:
        return self.options.chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))

    def prompt_text(self, prompt: str, extra: str | None) -> str:
        return f"{prompt}\n\n{extra}" if extra else prompt

    def prompt_ids(self, tokenizer: Any, prompt: str, extra: str | None = None) -> list[int]:
        """Token ids of a prompt ready for the response to follow (used by training and generation)."""
        text = self.prompt_text(prompt, extra)
        if self._use_chat_template(tokenizer):
            messages = [{"role": "user", "content": text}]
            return _token_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        return tokenizer(f"### Instruction:\n{text}\n\n### Response:\n")["input_ids"]

    def _encode_instructions(self, rows: dict[str, list], tokenizer: Any, max_length: int) -> dict[str, list]:
        inputs = rows.get("input") or [None] * len(rows["prompt"])
        all_ids, all_labels = [], []
        for prompt, extra, response in zip(rows["prompt"], inputs, rows["response"]):
            prompt_ids = self.prompt_ids(tokenizer, str(prompt), str(extra) if extra else None)
            if self._use_chat_template(tokenizer):
                messages = [
                    {"role": "user", "content": self.prompt_text(str(prompt), str(extra) if extra else None)},
                    {"role": "assistant", "content": str(response)},
                ]
                full = _token_ids(tokenizer.apply_chat_template(messages, tokenize=True))
                if full[: len(prompt_ids)] != prompt_ids:  # a template that rewrites the prompt: fall back
                    full = prompt_ids + tokenizer(str(response), add_special_tokens=False)["input_ids"]
            else:
                response_ids = tokenizer(str(response), add_special_tokens=False)["input_ids"]
                full = prompt_ids + response_ids + [tokenizer.eos_token_id]
            full = full[:max_length]
            masked = min(len(prompt_ids), len(full)) if self.options.mask_prompt else 0
            labels = [IGNORE] * masked + full[masked:]
            if all(label == IGNORE for label in labels):
                continue  # the prompt alone fills max_length: nothing to learn from this row
            all_ids.append(full)
            all_labels.append(labels)
        return {"input_ids": all_ids, "labels": all_labels}

    def collate(self, features: list[dict[str, Any]], tokenizer: Any) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(features), width), pad, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(f["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def load_model(self, load: Callable[..., Any], tokenizer: Any) -> Any:
        from transformers import AutoModelForCausalLM

        model = load(AutoModelForCausalLM)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model

    @staticmethod
    def _token_losses(outputs: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
        import torch.nn.functional as F

        # Shift the labels, not the logits: slicing logits[:, :-1] and transposing them for cross_entropy makes
        # a copy the size of the logits (batch x length x vocabulary), the largest tensor of the step. Flat
        # logits go to cross_entropy as they are, as transformers' own causal-LM loss does.
        logits = outputs.logits.float()  # no copy when they are float32 already
        targets = F.pad(batch["labels"], (0, 1), value=IGNORE)[:, 1:]
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                                 reduction="none").view_as(targets)
        return losses, targets != IGNORE

    def loss_items(self, row: dict[str, Any]) -> Optional[int]:
        """The tokens the loss counts in this row: every label after the first (each predicts the next token)
        that is not masked. An accumulated step divides by the sum over all its micro-batches and processes, so
        every token weighs the same however the rows fall into micro-batches (Trainer's ``num_items_in_batch``)."""
        return sum(1 for label in row["labels"][1:] if label != IGNORE)


TASK = CausalLM
