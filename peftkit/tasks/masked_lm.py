"""Masked language modelling: an encoder learns to restore hidden tokens of plain text (domain pre-training).

Every training row gets a fresh mask each epoch, BERT's recipe: ``mlm_probability`` of its ordinary (non-special)
tokens are chosen, at least one per row; of those 80 % become ``[MASK]``, 10 % a random token, 10 % stay. The
loss is the cross-entropy of the chosen tokens only, averaged over every chosen token of an accumulated step.

Why not transformers' ``DataCollatorForLanguageModeling(seed=...)``: its generator is one stream over the run's
batches, so a row's mask depends on the batches before it (a resumed run, or one on two processes, masks
differently). Here each row's mask comes from its own generator, seeded by (``train.seed``, epoch, row index):
fresh every epoch, the same however the rows fall into batches. Eval rows get one fixed mask, seeded by their
tokens, so every evaluation of a run (and of any adapter on the same file) scores the same positions.

The model is ``AutoModelForMaskedLM``. Its vocabulary decoder is tied to the word embeddings and stays the
base's (frozen, full precision, not saved); the transform before it (BERT's ``cls.predictions.transform``: a
dense layer and a LayerNorm, hidden x hidden) is trained and saved with the adapter, because encoders kept for
sentence embeddings (MiniLM) ship without an MLM head, and a transform drawn at random on every load would make
an adapter's outputs differ from one load to the next. An adapter trained here can start a classifier
(``adapter.init_from``): its LoRA weights carry over, the classifier's head is new.

Metrics: masked-token loss, perplexity and accuracy (the top token is the hidden one).
``peftkit predict`` fills the ``[MASK]`` tokens of a text: the ``top_k`` likeliest tokens for each.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Optional

from pydantic import Field

from ..errors import PeftkitError
from .base import HeadOptions, HeadState, TaskHead, encode_text

IGNORE = -100
EVAL_SEED = 0  # the eval mask's seed (with each row's tokens)


class MaskedLMOptions(HeadOptions):
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0, description="share of a row's tokens masked")
    top_k: int = Field(5, ge=1, le=100, description="tokens predicted for each [MASK] by peftkit predict")


def row_seed(*parts: Any) -> int:
    """A generator seed from ``parts`` (stable across processes and Python runs, unlike ``hash``)."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def mask_row(ids: list[int], special: set[int], mask_id: int, vocab: int, probability: float,
             seed: int) -> tuple[list[int], list[int]]:
    """``ids`` with tokens masked BERT's way (80 % ``[MASK]``, 10 % random, 10 % kept), and the labels: the
    original token where one was chosen, -100 elsewhere. Draws from its own generator seeded ``seed`` only."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    candidates = [i for i, t in enumerate(ids) if t not in special]
    draws = torch.rand(len(ids), generator=generator).tolist()
    chosen = [i for i in candidates if draws[i] < probability]
    if not chosen and candidates:  # a short row still teaches something
        chosen = [candidates[int(torch.randint(len(candidates), (1,), generator=generator))]]
    inputs, labels = list(ids), [IGNORE] * len(ids)
    how = torch.rand(len(chosen), generator=generator).tolist()
    replacements = torch.randint(vocab, (len(chosen),), generator=generator).tolist()
    for i, r, token in zip(chosen, how, replacements):
        labels[i] = ids[i]
        if r < 0.8:
            inputs[i] = mask_id
        elif r < 0.9:
            inputs[i] = token
    return inputs, labels


class MaskedLM(TaskHead):
    name = "masked_lm"
    augment_refusal = "the masked words are the targets: the model would learn EDA's swapped and inserted words"
    Options = MaskedLMOptions
    State = HeadState  # nothing learned from the data
    peft_task_type = None  # peft has no masked-LM task type: a plain PeftModel
    auto_class = "AutoModelForMaskedLM"
    pipeline_tag = "fill-mask"
    serve_base = "AutoModelForMaskedLM"
    roles = {"text": ("text", "sentence", "content", "document", "sentence1")}
    required_roles = ("text",)
    # the transform before the tied decoder (BERT, DistilBERT): trained and saved; the rest of the MLM head is the
    # base's own, frozen and kept out of quantization and LoRA (BERT's cls, RoBERTa's lm_head, DistilBERT's vocab_*)
    head_module_names = ("transform", "vocab_transform", "vocab_layer_norm")
    unquantized_modules = ("cls", "lm_head", "vocab_transform", "vocab_layer_norm", "vocab_projector",
                           "predictions", "generator_predictions", "generator_lm_head")
    key_metric = ("perplexity", "min")

    # ---- data ------------------------------------------------------------------------------------------

    def encode(self, rows: dict[str, list], tokenizer: Any, max_length: int) -> dict[str, list]:
        if tokenizer.mask_token_id is None:
            raise PeftkitError("task.type: masked_lm needs a tokenizer with a mask token ([MASK]) and this base's "
                               "has none; use an encoder trained with masked language modelling (BERT, RoBERTa)")
        texts = [str(t) for t in rows["text"] if t is not None and str(t).strip()]
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
        return {"input_ids": [list(ids) for ids in encoded["input_ids"]]}

    def _masked(self, features: list[dict[str, Any]], tokenizer: Any, seeds: list[int]) -> dict[str, Any]:
        import torch

        special = set(tokenizer.all_special_ids)
        width = max(len(f["input_ids"]) for f in features)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(features), width), pad, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        for i, (f, seed) in enumerate(zip(features, seeds)):
            inputs, targets = mask_row(list(f["input_ids"]), special, tokenizer.mask_token_id, len(tokenizer),
                                       self.options.mlm_probability, seed)
            n = len(inputs)
            ids[i, :n] = torch.tensor(inputs)
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(targets)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def collate(self, features: list[dict[str, Any]], tokenizer: Any) -> dict[str, Any]:
        """Eval (and drift-check) batches: each row's fixed mask, seeded by its tokens."""
        return self._masked(features, tokenizer, [row_seed("eval", EVAL_SEED, *f["input_ids"]) for f in features])

    def train_collate(self, features: list[dict[str, Any]], tokenizer: Any, seed: int, epoch: int,
                      rows: list[int]) -> dict[str, Any]:
        return self._masked(features, tokenizer, [row_seed(seed, epoch, row) for row in rows])

    # ---- model -----------------------------------------------------------------------------------------

    def load_model(self, load: Callable[..., Any], tokenizer: Any) -> Any:
        from transformers import AutoModelForMaskedLM

        return load(AutoModelForMaskedLM)

    @staticmethod
    def _token_losses(outputs: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
        """The cross-entropy of each masked token (only those positions' logits are scored) and where they are."""
        import torch.nn.functional as F

        chosen = batch["labels"] != IGNORE
        losses = F.cross_entropy(outputs.logits[chosen].float(), batch["labels"][chosen], reduction="none")
        return losses, chosen

    def loss(self, outputs: Any, batch: dict[str, Any]) -> Any:
        losses, _ = self._token_losses(outputs, batch)
        return losses.sum() / max(losses.numel(), 1)

    def batch_loss_items(self, batch: dict[str, Any]) -> Optional[int]:
        """The masked tokens of the batch: an accumulated step divides by those of all its micro-batches."""
        return int((batch["labels"] != IGNORE).sum())

    def loss_sum(self, outputs: Any, batch: dict[str, Any]) -> Any:
        losses, _ = self._token_losses(outputs, batch)
        return losses.sum()

    # ---- evaluation ------------------------------------------------------------------------------------

    def eval_batch(self, outputs: Any, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        losses, chosen = self._token_losses(outputs, batch)  # the masked positions' logits only: B x L x V is large
        row = chosen.nonzero()[:, 0]
        right = (outputs.logits[chosen].argmax(-1) == batch["labels"][chosen]).long()
        per_row = torch.zeros(chosen.shape[0], device=row.device)
        return {"loss_sum": per_row.index_add(0, row, losses), "tokens": chosen.sum(-1),
                "correct": per_row.long().index_add(0, row, right)}

    def metrics(self, collected: dict[str, Any]) -> dict[str, float]:
        tokens = collected["tokens"].sum().clamp(min=1)
        loss = float(collected["loss_sum"].sum() / tokens)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                "accuracy": float(collected["correct"].sum() / tokens)}

    # ---- serving ---------------------------------------------------------------------------------------

    def serve_encode(self, fields: dict[str, Any], tokenizer: Any, max_length: Optional[int]
                     ) -> tuple[list[int], Optional[list[int]]]:
        self.tokenizer = tokenizer  # the tokenizer that encoded the rows names the predicted tokens
        return encode_text(str(fields["text"]), tokenizer, max_length)

    def shared_head(self, adapter: str, state: dict[str, Any], shared_model: Any) -> tuple[Any, Optional[str]]:
        """The base's MLM head with this adapter's trained transform (the tied decoder is the shared model's)."""
        return mlm_head(adapter, state, shared_model), "tokens"

    def serve_prediction(self, logits: Any, input_ids: Callable[[], list[int]]) -> dict[str, Any]:
        """For each ``[MASK]`` of the text: its ``top_k`` tokens and their probabilities; ``filled``: the text with
        every mask replaced by its likeliest token."""
        import torch

        ids = input_ids()
        tokenizer = self.tokenizer
        positions = [i for i, t in enumerate(ids) if t == tokenizer.mask_token_id]
        filled = list(ids)
        masks = []
        for position in positions:
            probs = torch.softmax(logits[position].float(), -1)
            top = torch.topk(probs, min(self.options.top_k, probs.shape[-1]))
            tokens = [{"token": tokenizer.convert_ids_to_tokens(int(i)), "id": int(i), "score": round(float(p), 6)}
                      for p, i in zip(top.values, top.indices)]
            filled[position] = tokens[0]["id"]
            masks.append({"position": position, "tokens": tokens})
        return {"masks": masks, "filled": tokenizer.decode(filled, skip_special_tokens=True)}


def mlm_head(adapter: str, state: dict[str, Any], shared_model: Any) -> Any:
    """A copy of the shared model's MLM head whose transform holds ``adapter``'s trained weights; the vocabulary
    decoder (tied to the embeddings, the largest part) is shared, not copied. BERT-style heads (``cls.predictions``
    with ``transform``, ``decoder`` and ``bias``) only."""
    import copy

    import torch

    predictions = getattr(getattr(shared_model, "cls", None), "predictions", None)
    if predictions is None or not hasattr(predictions, "transform"):
        raise PeftkitError(f"{adapter}: masked-LM adapters share a base only on BERT-style models (cls.predictions); "
                           f"serve it alone with peftkit.store.loading.load_trained")
    transform = copy.deepcopy(predictions.transform)
    prefix = "cls.predictions.transform."
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if set(own) != set(transform.state_dict()) or len(own) != len(state):
        raise PeftkitError(f"{adapter}: its saved head ({', '.join(sorted(state)) or 'none'}) is not a BERT MLM "
                           "transform; retrain the adapter")
    transform.load_state_dict(own)
    # a Sequential of the adapter's transform and the shared decoder (the server counts only parameters it does
    # not share with the base)
    return torch.nn.Sequential(transform, predictions.decoder).eval().requires_grad_(False)


TASK = MaskedLM
