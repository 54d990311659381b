"""Multi-label classification: each row has any number of labels from a fixed set (topics, tags, emotions).

A row's labels are a list (JSON, JSONL, parquet) or text split at ``separator`` (``"sports,politics"`` in a csv);
an empty cell or list is a row with no label. One sigmoid per label over the pooled representation
(``problem_type="multi_label_classification"``), binary cross-entropy averaged over the labels, and a label is
predicted when its probability reaches ``threshold``. Metrics: micro F1 (the key metric), macro F1, subset
accuracy and Hamming accuracy (``peftkit/metrics.py``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from pydantic import Field

from ..errors import PeftkitError
from ..metrics import multilabel_scores
from .base import HeadOptions, HeadState, StateText
from .pooled import PooledHead


class MultiLabelOptions(HeadOptions):
    labels: Optional[list[str]] = Field(None, min_length=1, description="label names in output order; default sorted")
    separator: str = Field(",", min_length=1, description="between the labels of a text cell")
    threshold: float = Field(0.5, gt=0, lt=1, description="a label is predicted from this probability on")


class MultiLabelState(HeadState):
    labels: list[StateText]


class MultiLabel(PooledHead):
    name = "multi_label"
    augment_refusal = None  # each label a class of the whole text, as in classification
    Options = MultiLabelOptions
    State = MultiLabelState
    problem_type = "multi_label_classification"
    roles = {**PooledHead.roles, "label": ("labels", "label", "tags", "categories", "topics")}
    optional_cells = ("label",)  # an empty cell is a row with no label
    key_metric = ("micro_f1", "max")
    target_width = None  # one float per label in a multi-task batch
    options: MultiLabelOptions

    @property
    def labels(self) -> list[str]:
        return self.state["labels"]

    @property
    def width(self) -> int:
        return len(self.labels)

    def output_labels(self) -> list[str]:
        return list(self.labels)

    def label_set(self, value: Any) -> list[str]:
        """A label cell as its labels: a list as it is, text split at the separator, empty for nothing."""
        if value is None or (isinstance(value, float) and value != value):
            return []
        items = value if isinstance(value, (list, tuple)) else str(value).split(self.options.separator)
        return [str(item).strip() for item in items if str(item).strip()]

    def fit(self, train_rows: Any, eval_rows: Any, eval_source: str) -> None:
        if "labels" not in self.state:
            seen = {label for cell in train_rows["label"] for label in self.label_set(cell)}
            if self.options.labels:
                stray = sorted(seen - set(self.options.labels))
                if stray:
                    raise PeftkitError(f"data.train: label {stray[0]!r} is not in task.labels; add it to task.labels "
                                       "or fix the data")
                self.state["labels"] = list(self.options.labels)
            else:
                self.state["labels"] = sorted(seen)
            if not self.labels:
                raise PeftkitError("data.train: no row has a label; multi-label classification needs labelled rows")
        if eval_rows is not None:
            known = set(self.labels)
            for i, cell in enumerate(eval_rows["label"]):
                stray = [label for label in self.label_set(cell) if label not in known]
                if stray:
                    raise PeftkitError(f"{eval_source}: row {i + 1} has label {stray[0]!r}, which the training data "
                                       "does not have; fix that row or list the label in task.labels")

    def target(self, value: Any) -> list[int]:
        present = set(self.label_set(value))
        return [int(label in present) for label in self.labels]

    def target_tensor(self, targets: list[Any]) -> Any:
        import torch

        return torch.tensor(targets, dtype=torch.float32).reshape(len(targets), self.width)

    def target_floats(self, target: Any) -> list[float]:
        return [float(t) for t in target]

    def targets_from_floats(self, floats: Any) -> Any:
        return floats[:, : self.width]

    def row_losses(self, logits: Any, targets: Any) -> Any:
        import torch.nn.functional as F

        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1)

    def eval_rows(self, logits: Any, targets: Any) -> dict[str, Any]:
        import torch

        predicted = (torch.sigmoid(logits) >= self.options.threshold).long()
        return {"loss": self.row_losses(logits, targets), "pred": predicted, "label": targets.long()}

    def metrics(self, collected: dict[str, Any]) -> dict[str, float]:
        scores = multilabel_scores(collected["pred"].tolist(), collected["label"].tolist())
        return {**scores, "loss": float(collected["loss"].mean())}

    def serve_prediction(self, logits: Any, input_ids: Callable[[], list[int]]) -> dict[str, Any]:
        import torch

        probs = torch.sigmoid(logits).tolist()
        return {"labels": [label for label, p in zip(self.labels, probs) if p >= self.options.threshold],
                "probs": {label: round(p, 6) for label, p in zip(self.labels, probs)}}


TASK = MultiLabel
