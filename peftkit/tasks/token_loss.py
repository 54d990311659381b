"""The loss and metrics of heads whose loss is a mean over tokens (causal LM, seq2seq): one place, so both heads
normalize over the tokens of a whole accumulated step and report the same loss and perplexity."""

from __future__ import annotations

import math
from typing import Any

IGNORE = -100


class TokenLoss:
    """Mixed into a :class:`~peftkit.tasks.base.TaskHead` that defines ``_token_losses(outputs, batch)``: each
    token's loss and which tokens count, both shaped like the batch's labels."""

    def _token_losses(self, outputs: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
        raise NotImplementedError

    def loss(self, outputs: Any, batch: dict[str, Any]) -> Any:
        losses, counted = self._token_losses(outputs, batch)
        return losses.sum() / counted.sum().clamp(min=1)

    def loss_sum(self, outputs: Any, batch: dict[str, Any]) -> Any:
        losses, _ = self._token_losses(outputs, batch)
        return losses.sum()

    def eval_batch(self, outputs: Any, batch: dict[str, Any]) -> dict[str, Any]:
        losses, counted = self._token_losses(outputs, batch)
        return {"loss_sum": losses.sum(-1), "tokens": counted.sum(-1)}

    def metrics(self, collected: dict[str, Any]) -> dict[str, float]:
        loss = float(collected["loss_sum"].sum() / collected["tokens"].sum().clamp(min=1))
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
