"""Regression: one number per sentence or sentence pair (STS-B's similarity 0-5, a rating, a price).

One output over the pooled representation (``AutoModelForSequenceClassification`` with ``num_labels=1`` and
``problem_type="regression"``, as transformers builds it). Loss: mean squared error, or Huber's (``loss: huber``),
which weighs outliers less. Metrics: Pearson and Spearman correlation, MSE and MAE (``peftkit/metrics.py``); the
key metric is Pearson's, as GLUE reports STS-B. Predictions are numbers.

The output layer's bias starts at the mean of the training targets (``start_at_mean``, on by default). A freshly
initialised head outputs about 0 for every row, and Adam moves a bias by about the learning rate per step, so a
head that must first travel to STS-B's mean of 2.7 spends its first thousands of steps there instead of on the
differences between rows; see the measurement in ``benchmarks/results/regression/``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Optional

from pydantic import Field

from ..errors import PeftkitError
from ..metrics import regression_scores
from .base import HeadOptions, HeadState
from .pooled import PooledHead, output_layer


class RegressionOptions(HeadOptions):
    loss: Literal["mse", "huber"] = "mse"
    huber_delta: float = Field(1.0, gt=0, description="where Huber's loss turns from squared to linear")
    start_at_mean: bool = Field(True, description="the output's bias starts at the training targets' mean")


class RegressionState(HeadState):
    mean: float  # of the training targets
    std: float


def _number(value: Any, where: str, row: int) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or isinstance(value, bool):
        raise PeftkitError(f"{where}: row {row + 1} has {value!r} as its target, which is not a finite number; "
                           "regression needs a number in every row (fix that row, or use task.type: classification)")
    return number


class Regression(PooledHead):
    name = "regression"
    augment_refusal = ("a score moves with the words (STS-B's similarity of two sentences changes when one loses, "
                       "swaps or gains words), so the copies would carry wrong targets")
    Options = RegressionOptions
    State = RegressionState
    problem_type = "regression"
    roles = {**PooledHead.roles, "label": ("label", "labels", "score", "target", "value", "Label")}
    key_metric = ("pearson", "max")
    options: RegressionOptions

    @property
    def width(self) -> int:
        return 1

    def output_labels(self) -> list[str]:
        return ["score"]

    def fit(self, train_rows: Any, eval_rows: Any, eval_source: str) -> None:
        if "mean" not in self.state:
            values = [_number(v, "data.train", i) for i, v in enumerate(train_rows["label"])]
            mean = sum(values) / len(values)
            spread = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
            if spread == 0:
                raise PeftkitError(f"data.train: every target is {values[0]:g}; regression needs targets that vary")
            self.state.update(mean=mean, std=spread)
        if eval_rows is not None:
            for i, value in enumerate(eval_rows["label"]):
                _number(value, eval_source, i)

    def target(self, value: Any) -> float:
        return float(value)

    def target_tensor(self, targets: list[Any]) -> Any:
        import torch

        return torch.tensor(targets, dtype=torch.float32)

    def load_model(self, load: Callable[..., Any], tokenizer: Any) -> Any:
        model = super().load_model(load, tokenizer)
        layer = output_layer(model, self.head_module_names)
        if layer is not None:
            self.init_outputs(layer, 0)
        return model

    def init_outputs(self, layer: Any, offset: int) -> None:
        import torch

        if self.options.start_at_mean and layer.bias is not None and "mean" in self.state:
            with torch.no_grad():
                layer.bias[offset].fill_(self.state["mean"])

    def row_losses(self, logits: Any, targets: Any) -> Any:
        import torch.nn.functional as F

        predicted = logits[:, 0]
        if self.options.loss == "huber":
            return F.huber_loss(predicted, targets, delta=self.options.huber_delta, reduction="none")
        return (predicted - targets) ** 2

    def eval_rows(self, logits: Any, targets: Any) -> dict[str, Any]:
        return {"loss": self.row_losses(logits, targets), "pred": logits[:, 0], "target": targets}

    def metrics(self, collected: dict[str, Any]) -> dict[str, float]:
        scores = regression_scores(collected["pred"].tolist(), collected["target"].tolist())
        return {**scores, "loss": float(collected["loss"].mean())}

    def serve_prediction(self, logits: Any, input_ids: Callable[[], list[int]]) -> dict[str, Any]:
        return {"score": round(float(logits[0]), 6)}


TASK = Regression
