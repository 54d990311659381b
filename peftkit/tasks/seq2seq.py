"""Sequence-to-sequence generation on an encoder-decoder base (T5, FLAN-T5, BART): a source text in, a target out.

Rows have a ``source`` (columns ``source``, ``input``, ``question``, ...) and a ``target`` (``target``, ``output``,
``answer``, ...). ``task.prefix`` is put before every source, as T5 was trained ("summarize: ", "translate English
to German: "). The encoder reads the source; the decoder reads the target shifted right by one (starting with the
model's ``decoder_start_token_id``) and is trained to predict every target token, so the loss is the mean
cross-entropy over the target's tokens, whatever their count per row (``loss_items``: an accumulated step weighs
every token the same, as the causal-LM head does).

Metrics: mean token loss and perplexity over all eval rows; exact match and ROUGE-L F1 (``peftkit/text_metrics.py``)
of the greedy generations for the first ``task.eval_generate_rows`` eval rows against their targets.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from pydantic import Field

from ..text_metrics import generation_scores
from .base import HeadOptions, HeadState, StateText, TaskHead
from .token_loss import IGNORE, TokenLoss


class Seq2SeqOptions(HeadOptions):
    prefix: StateText = Field("", description="text put before every source, e.g. 'summarize: '")
    max_target_length: Optional[int] = Field(None, ge=1, description="target tokens kept; default data.max_length")
    eval_generate_rows: int = Field(32, ge=0, description="eval rows generated for exact match and ROUGE-L")
    max_new_tokens: int = Field(64, ge=1, description="the longest generation at eval")


class Seq2SeqState(HeadState):
    decoder_start_token_id: Optional[int] = None  # the model's, known once it loads; starts every decoder input


class Seq2Seq(TokenLoss, TaskHead):
    name = "seq2seq"
    augment_refusal = ("an edited input may no longer match its target output (a summary, a translation), and the "
                       "target is not augmented")
    Options = Seq2SeqOptions
    State = Seq2SeqState
    peft_task_type = "SEQ_2_SEQ_LM"
    generates = True
    roles = {
        "source": ("source", "input", "question", "text", "document"),
        "target": ("target", "output", "answer", "summary"),
    }
    required_roles = ("source", "target")
    key_metric = ("perplexity", "min")

    # ---- data ------------------------------------------------------------------------------------------

    def source_ids(self, text: str, tokenizer: Any, max_length: Optional[int]) -> list[int]:
        """A source's token ids as the encoder reads them (with ``task.prefix``): training and serving alike."""
        enc = tokenizer(self.options.prefix + text, truncation=max_length is not None, max_length=max_length)
        return list(enc["input_ids"])

    def encode(self, rows: dict[str, list], tokenizer: Any, max_length: int) -> dict[str, list]:
        sources = [self.options.prefix + str(s) for s in rows["source"]]
        features = dict(tokenizer(sources, truncation=True, max_length=max_length))
        if "target" in rows:
            target_length = self.options.max_target_length or max_length
            targets = tokenizer(text_target=[str(t) for t in rows["target"]], truncation=True,
                                max_length=target_length)
            features["labels"] = [list(ids) for ids in targets["input_ids"]]
        return {"input_ids": features["input_ids"], "attention_mask": features["attention_mask"],
                **({"labels": features["labels"]} if "labels" in features else {})}

    def collate(self, features: list[dict[str, Any]], tokenizer: Any) -> dict[str, Any]:
        """Right-padded encoder inputs; the labels padded with -100 and, shifted right, the decoder's inputs."""
        import torch

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), pad, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            ids[i, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[i, :len(f["input_ids"])] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if "labels" in features[0]:
            target_width = max(len(f["labels"]) for f in features)
            labels = torch.full((len(features), target_width), IGNORE, dtype=torch.long)
            for i, f in enumerate(features):
                labels[i, :len(f["labels"])] = torch.tensor(f["labels"])
            start = self.state.get("decoder_start_token_id")
            decoder = torch.full_like(labels, pad)
            decoder[:, 0] = pad if start is None else start
            decoder[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE, pad)
            batch["labels"] = labels
            batch["decoder_input_ids"] = decoder
            # the decoder's own padding is masked too, so a row's outputs do not depend on its batch
            batch["decoder_attention_mask"] = (torch.arange(target_width) < (labels != IGNORE).sum(-1, keepdim=True)
                                               ).long()
        return batch

    # ---- model -----------------------------------------------------------------------------------------

    def load_model(self, load: Callable[..., Any], tokenizer: Any) -> Any:
        from transformers import AutoModelForSeq2SeqLM

        from ..errors import PeftkitError

        try:
            model = load(AutoModelForSeq2SeqLM)
        except ValueError as exc:  # a decoder-only or encoder-only config has no seq2seq class
            raise PeftkitError(f"task.type: seq2seq needs an encoder-decoder base (T5, FLAN-T5, BART): {exc}"
                               ) from None
        start = model.config.decoder_start_token_id
        if start is None:
            start = model.config.pad_token_id if model.config.pad_token_id is not None else tokenizer.pad_token_id
        self.state["decoder_start_token_id"] = int(start)
        return model

    def _token_losses(self, outputs: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
        import torch.nn.functional as F

        logits = outputs.logits.float()  # position t predicts label t: the decoder inputs are already shifted
        labels = batch["labels"]
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                                 reduction="none").view_as(labels)
        return losses, labels != IGNORE

    def loss_items(self, row: dict[str, Any]) -> Optional[int]:
        """Every target token of the row is predicted once (the decoder inputs are the labels shifted right)."""
        return sum(1 for label in row["labels"] if label != IGNORE)

    # ---- evaluation ------------------------------------------------------------------------------------


    def eval_with_model(self, model: Any, tokenizer: Any, rows: Any) -> dict[str, float]:
        """Greedy generations for the first ``eval_generate_rows`` rows, scored against their targets."""
        n = min(self.options.eval_generate_rows, len(rows))
        if n == 0:
            return {}
        sources = [rows[i]["input_ids"] for i in range(n)]
        predictions = self.generate(model, tokenizer, sources)
        references = [tokenizer.decode([t for t in rows[i]["labels"] if t != IGNORE], skip_special_tokens=True)
                      for i in range(n)]
        return generation_scores(predictions, references)

    def generate(self, model: Any, tokenizer: Any, sources: list[list[int]], batch_size: int = 16) -> list[str]:
        """Greedy continuations of encoded sources, as text (the model's own special tokens left out)."""
        import torch

        device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        texts = []
        for start in range(0, len(sources), batch_size):
            chunk = [{"input_ids": ids} for ids in sources[start:start + batch_size]]
            batch = {k: v.to(device) for k, v in self.collate(chunk, tokenizer).items()}
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=self.options.max_new_tokens, do_sample=False,
                                     num_beams=1, pad_token_id=pad,
                                     decoder_start_token_id=self.state.get("decoder_start_token_id"))
            texts += [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out]
        return texts

    # ---- serving ---------------------------------------------------------------------------------------

    def serve_encode(self, fields: dict[str, Any], tokenizer: Any, max_length: Optional[int]
                     ) -> tuple[list[int], Optional[list[int]]]:
        return self.source_ids(str(fields["text"]), tokenizer, max_length), None


TASK = Seq2Seq
