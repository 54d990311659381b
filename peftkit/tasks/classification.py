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
from .base import HeadOptions, HeadState, StateText
from .pooled import PooledHead


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


class Classification(PooledHead):
    name = "classification"
    augment_refusal = None  # the paper's setting: a class of the whole text, kept by small word edits
    Options = ClassificationOptions
    State = ClassificationState
    problem_type = "single_label_classification"
    key_metric = ("accuracy", "max")

    @property
    def labels(self) -> list[str]:
        return self.state["labels"]

    @property
    def width(self) -> int:
        return len(self.labels)

    def output_labels(self) -> list[str]:
        return display_labels(self.state)

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

    def target(self, value: Any) -> int:
        ids = self.__dict__.get("_ids")
        if ids is None or len(ids) != len(self.labels):
            ids = self.__dict__["_ids"] = {name: i for i, name in enumerate(self.labels)}
        return ids[_label_key(value)]

    def target_tensor(self, targets: list[Any]) -> Any:
        import torch

        return torch.tensor(targets, dtype=torch.long)

    def targets_from_floats(self, floats: Any) -> Any:
        return floats[:, 0].round().long()

    def row_losses(self, logits: Any, targets: Any) -> Any:
        import torch.nn.functional as F

        return F.cross_entropy(logits, targets, reduction="none")

    def loss(self, outputs: Any, batch: dict[str, Any]) -> Any:
        import torch.nn.functional as F

        # the mean of row_losses, computed as before the pooled family existed (cross_entropy's own mean), so that
        # runs stay bit-identical to the stored benchmark runs
        return F.cross_entropy(outputs.logits.float(), batch["labels"])

    def eval_rows(self, logits: Any, targets: Any) -> dict[str, Any]:
        return {"loss": self.row_losses(logits, targets), "pred": logits.argmax(-1), "label": targets}

    def metrics(self, collected: dict[str, Any]) -> dict[str, float]:
        preds = collected["pred"].tolist()
        labels = collected["label"].tolist()
        return {**classification_scores(preds, labels, len(self.labels)), "loss": float(collected["loss"].mean())}

    def serve_prediction(self, logits: Any, input_ids: Callable[[], list[int]]) -> dict[str, Any]:
        import torch

        labels = display_labels(self.state)
        probs = torch.softmax(logits, -1).tolist()
        return {"label": labels[int(logits.argmax())],
                "probs": {label: round(p, 6) for label, p in zip(labels, probs)}}


TASK = Classification
