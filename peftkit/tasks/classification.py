"""Sequence classification: single sentences or sentence pairs, any number of labels.

Labels may be written as names (``entailment``) or numbers (``0``/``1``) in the data; either way they are
mapped to ids in a fixed order (``task.labels`` if given, else sorted) that is stored with the adapter and in
the model config's ``id2label``. Loss: cross-entropy. Metrics: accuracy, macro-F1, Matthews correlation
(``peftkit/metrics.py``) and loss.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from pydantic import Field, field_validator

from ..errors import PeftkitError
from ..metrics import classification_scores
from .base import HeadOptions, HeadState, StateText, TaskHead


def _label_key(value: Any) -> str:
    # 1 and "1" and 1.0 are the same label in a TSV read as numbers or as text
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _first_repeated(values: list[str]) -> Optional[str]:
    repeated = sorted({v for v in values if values.count(v) > 1})
    return repeated[0] if repeated else None


def display_labels(state: dict[str, Any]) -> list[str]:
    """The labels as users read them: ``task.label_names`` where given (SST-2's 1 -> positive), else the data's."""
    names = state.get("label_names") or {}
    return [names.get(label, label) for label in state.get("labels", [])]


class ClassificationOptions(HeadOptions):
    labels: Optional[list[str]] = Field(None, min_length=2, description="label names in id order; default sorted")
    label_names: Optional[dict[str, str]] = Field(
        None, description="names shown for the data's labels (predictions, id2label, cards), e.g. {0: negative}")

    @field_validator("label_names", mode="before")
    @classmethod
    def _names_by_label(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        names = {_label_key(k): v for k, v in value.items()}
        repeated = _first_repeated([str(v) for v in names.values()])
        if repeated is not None:
            raise ValueError(f"{repeated!r} names two labels; give each label its own name")
        return names

    @field_validator("labels", mode="before")
    @classmethod
    def _as_names(cls, value: Any) -> Any:
        # `labels: [0, 1]` in YAML are numbers; the data's 0/1 labels are matched as text either way
        if not isinstance(value, list):
            return value
        names = [_label_key(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in value]
        repeated = _first_repeated([n for n in names if isinstance(n, str)])
        if repeated is not None:
            raise ValueError(f"{repeated!r} is listed twice; list each label once")
        return names


class ClassificationState(HeadState):
    labels: list[StateText]  # in id order
    label_names: Optional[dict[str, StateText]] = None


def _shown(labels: list[str], limit: int = 10) -> str:
    more = f", ... ({len(labels)} in all)" if len(labels) > limit else ""
    return ", ".join(labels[:limit]) + more


def _sorted_labels(values: set[str]) -> list[str]:
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(values)


class Classification(TaskHead):
    name = "classification"
    Options = ClassificationOptions
    State = ClassificationState
    peft_task_type = "SEQ_CLS"
    roles = {
        "text": ("text", "sentence", "sentence1", "question", "question1", "premise"),
        "text_pair": ("text_pair", "sentence2", "question2", "hypothesis"),
        "label": ("label", "labels", "Label", "class"),
    }
    required_roles = ("text", "label")
    head_module_names = ("classifier", "score")
    serve_fields = ("text", "text_pair")
    key_metric = ("accuracy", "max")

    @property
    def labels(self) -> list[str]:
        return self.state["labels"]

    def fit(self, train_rows: Any, eval_rows: Any, eval_source: str) -> None:
        if "labels" not in self.state:
            seen = {_label_key(v) for v in train_rows["label"]}
            self.state["labels"] = list(self.options.labels) if self.options.labels else _sorted_labels(seen)
            unknown = sorted(seen - set(self.state["labels"]))
            if unknown:
                raise PeftkitError(
                    f"data.train: label {unknown[0]!r} is not in task.labels ({_shown(self.labels)}); "
                    "add it to task.labels or fix the data"
                )
        if self.options.label_names and "label_names" not in self.state:
            stray = sorted(set(self.options.label_names) - set(self.labels))
            if stray:
                raise PeftkitError(f"task.label_names: {stray[0]!r} is not a label of the data "
                                   f"({_shown(self.labels)}); name the data's labels as the label column writes them")
            self.state["label_names"] = dict(self.options.label_names)
        if len(self.labels) < 2:
            raise PeftkitError(f"data.train: only one label ({self.labels[0]!r}) in the training data; "
                               "classification needs at least two")
        if eval_rows is not None:
            known = set(self.labels)
            where = "task.labels" if self.options.labels else "the training data"
            for i, value in enumerate(eval_rows["label"]):
                if _label_key(value) not in known:
                    raise PeftkitError(
                        f"{eval_source}: row {i + 1} has label {_label_key(value)!r}, which {where} does not have "
                        f"({_shown(self.labels)}); fix that row or list the label in task.labels"
                    )

    def encode(self, rows: dict[str, list], tokenizer: Any, max_length: int) -> dict[str, list]:
        pair = rows.get("text_pair")
        features = tokenizer(
            [str(t) for t in rows["text"]],
            [str(t) for t in pair] if pair is not None else None,
            truncation=True,
            max_length=max_length,
        )
        ids = {name: i for i, name in enumerate(self.labels)}
        if "label" in rows:
            features["labels"] = [ids[_label_key(v)] for v in rows["label"]]
        return dict(features)

    def collate(self, features: list[dict[str, Any]], tokenizer: Any) -> dict[str, Any]:
        return tokenizer.pad(features, return_tensors="pt")

    def load_model(self, load: Callable[..., Any], tokenizer: Any) -> Any:
        from transformers import AutoModelForSequenceClassification

        shown = display_labels(self.state)
        model = load(
            AutoModelForSequenceClassification,
            num_labels=len(shown),
            id2label=dict(enumerate(shown)),
            label2id={name: i for i, name in enumerate(shown)},
        )
        if model.config.pad_token_id is None:  # decoder models pool at the last non-pad token
            model.config.pad_token_id = tokenizer.pad_token_id
        return model

    def loss(self, outputs: Any, batch: dict[str, Any]) -> Any:
        import torch.nn.functional as F

        return F.cross_entropy(outputs.logits.float(), batch["labels"])

    def eval_batch(self, outputs: Any, batch: dict[str, Any]) -> dict[str, Any]:
        import torch.nn.functional as F

        logits = outputs.logits.float()
        return {
            "loss": F.cross_entropy(logits, batch["labels"], reduction="none"),
            "pred": logits.argmax(-1),
            "label": batch["labels"],
        }

    def metrics(self, collected: dict[str, Any]) -> dict[str, float]:
        preds = collected["pred"].tolist()
        labels = collected["label"].tolist()
        return {**classification_scores(preds, labels, len(self.labels)), "loss": float(collected["loss"].mean())}

    # ---- serving --------------------------------------------------------------------------------------

    def serve_encode(self, fields: dict[str, Any], tokenizer: Any, max_length: Optional[int]
                     ) -> tuple[list[int], Optional[list[int]]]:
        rows = {"text": [fields["text"]]}
        if fields.get("text_pair") is not None:
            rows["text_pair"] = [fields["text_pair"]]
        enc = self.encode(rows, tokenizer, max_length)
        types = enc.get("token_type_ids")
        return list(enc["input_ids"][0]), list(types[0]) if types is not None else None

    def shared_head(self, adapter: str, state: dict[str, Any], shared_model: Any) -> tuple[Any, Optional[str]]:
        """The adapter's own linear head (peft's modules_to_save would be one module shared by all adapters)."""
        import torch
        from torch import nn

        roots = sorted({k.split(".")[0] for k in state})
        shapes = {k.split(".", 1)[1] for k in state}
        if len(roots) != 1 or not shapes <= {"weight", "bias"} or "weight" not in shapes:
            raise PeftkitError(
                f"{adapter}: its classification head ({', '.join(sorted(state)) or 'none saved'}) is not one linear "
                "layer; shared serving supports BERT-style pooled classifiers and decoder score heads"
            )
        root = roots[0]
        weight = state[f"{root}.weight"]
        bias = state.get(f"{root}.bias")
        head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
        with torch.no_grad():
            head.weight.copy_(weight)
            if bias is not None:
                head.bias.copy_(bias)
        if len(self.state.get("labels", [])) != weight.shape[0]:
            raise PeftkitError(f"{adapter}: its head has {weight.shape[0]} outputs but its metadata lists "
                               f"{len(self.state.get('labels', []))} labels; the adapter folder is inconsistent")
        # BERT-style models classify the pooled [CLS] output; decoders (score) the last non-pad token's state
        pooled = getattr(shared_model, "pooler", None) is not None and root == "classifier"
        return head.eval().requires_grad_(False), "pooler" if pooled else "last_token"

    def serve_prediction(self, logits: Any, input_ids: Callable[[], list[int]]) -> dict[str, Any]:
        import torch

        labels = display_labels(self.state)
        probs = torch.softmax(logits, -1).tolist()
        return {"label": labels[int(logits.argmax())],
                "probs": {label: round(p, 6) for label, p in zip(labels, probs)}}


TASK = Classification
