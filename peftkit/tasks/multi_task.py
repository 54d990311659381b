"""Several data sets in one adapter, each with its own head: the shared adapter learns from all of them, and a
row's loss, prediction and metrics come from its own data set's head.

A recipe asks for it with ``data.also`` (``data.heads: per_dataset``, the default): the task section is the first
data set's head, ``data.also[i].task`` another's (default: the task section's type, fitted to that data set's own
labels), so a classifier and a regressor can share one adapter, and labels spelled alike in two data sets (SST-2's
"1" = positive, MRPC's "1" = paraphrase) stay two outputs. peftkit builds this head from the recipe; it is never
named in ``task.type``.

Every head of the pooled family is one linear layer over the same pooled features, so the heads are slices of
one linear layer of the summed width: the model is transformers' ``AutoModelForSequenceClassification`` with
``num_labels`` = that sum (its ``id2label`` names each output ``data set:label``), which any peft user loads;
each row's loss and metrics read only its own head's slice (rows carry their data set's index, ``task_id``).
Metrics: each data set's own as ``name/metric``, and ``score``, the mean of their key metrics.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import PeftkitError
from .base import HeadOptions, HeadState, StateText, TaskHead
from .pooled import PooledHead, linear_head, output_layer


def _pooled_head(task_type: str) -> type[PooledHead]:
    from . import task_types

    head = task_types().get(task_type)
    if head is None or not issubclass(head, PooledHead):
        pooled = sorted(name for name, h in task_types().items() if issubclass(h, PooledHead))
        raise ValueError(f"a {task_type} head cannot share an adapter with other data sets' heads; one head per "
                         f"data set is for the heads on a pooled representation: {', '.join(pooled)}")
    return head


class SubTask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StateText
    type: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> "SubTask":
        _pooled_head(self.type).Options.model_validate(self.options)
        return self


class MultiTaskOptions(HeadOptions):
    tasks: list[SubTask] = Field(min_length=2)


class SubState(HeadState):
    name: StateText
    type: str
    state: dict[str, Any]

    @field_validator("state")
    @classmethod
    def _typed_by_its_head(cls, state: dict[str, Any], info: Any) -> dict[str, Any]:
        task_type = info.data.get("type")
        if task_type is not None:
            _pooled_head(task_type).State.model_validate(state)
        return state


class MultiTaskState(HeadState):
    heads: list[SubState]


class MultiTask(TaskHead):
    name = "multi_task"
    internal = True
    Options = MultiTaskOptions
    State = MultiTaskState
    peft_task_type = "SEQ_CLS"
    roles = PooledHead.roles
    required_roles = PooledHead.required_roles
    head_module_names = PooledHead.head_module_names
    serve_fields = PooledHead.serve_fields
    key_metric = ("score", "max")
    reports_per_source = True
    options: MultiTaskOptions

    def __init__(self, options: MultiTaskOptions, state: Optional[dict[str, Any]] = None):
        super().__init__(options, state)
        from . import make_task

        saved = {s["name"]: s["state"] for s in self.state.get("heads", [])}
        self.heads: list[PooledHead] = [make_task(t.type, t.options, saved.get(t.name))  # type: ignore[misc]
                                        for t in options.tasks]
        self.names = [t.name for t in options.tasks]

    def for_source(self, index: int) -> TaskHead:
        return self.heads[index]

    def fit(self, train_rows: Any, eval_rows: Any, eval_source: str) -> None:
        """Each data set's head is fitted to its own rows (``core/data.py``); this gathers what they learned."""
        if eval_rows is not None and train_rows is None:
            raise PeftkitError(f"{eval_source}: a multi-task adapter's rows need their data set's head; evaluate "
                               f"each data set with its own adapter run, or read the per-data-set metrics "
                               f"({', '.join(f'{n}/...' for n in self.names)}) in the adapter's history")
        self.state = {"heads": [{"name": n, "type": h.name, "state": dict(h.state)}
                                for n, h in zip(self.names, self.heads)]}

    # ---- the heads as slices of one layer ---------------------------------------------------------------

    def _slices(self) -> list[slice]:
        out, start = [], 0
        for head in self.heads:
            out.append(slice(start, start + head.width))
            start += head.width
        return out

    @property
    def width(self) -> int:
        return sum(head.width for head in self.heads)

    @property
    def target_width(self) -> int:
        return max(head.target_width or head.width for head in self.heads)

    def output_labels(self) -> list[str]:
        return [f"{name}:{label}" for name, head in zip(self.names, self.heads) for label in head.output_labels()]

    # ---- data ------------------------------------------------------------------------------------------

    def encode(self, rows: dict[str, list], tokenizer: Any, max_length: int) -> dict[str, list]:
        sources = [int(s) for s in rows["source"]]  # pooled with text columns, it may come back as text
        n = len(sources)
        out: dict[str, list] = {}
        for index in sorted(set(sources)):
            at = [i for i, s in enumerate(sources) if s == index]
            # a column another data set has (a second sentence) is empty in this one's rows
            part = {k: [v[i] for i in at] for k, v in rows.items()
                    if k != "source" and any(v[i] is not None for i in at)}
            encoded = self.heads[index].encode(part, tokenizer, max_length)
            if "labels" in encoded:
                width = self.target_width
                floats = [self.heads[index].target_floats(t) for t in encoded["labels"]]
                encoded["labels"] = [f + [0.0] * (width - len(f)) for f in floats]
            encoded["task_id"] = [index] * len(at)
            for key, values in encoded.items():
                column = out.setdefault(key, [None] * n)
                for i, value in zip(at, values):
                    column[i] = value
        return out

    def collate(self, features: list[dict[str, Any]], tokenizer: Any) -> dict[str, Any]:
        import torch

        inputs = [{k: v for k, v in f.items() if k not in ("labels", "task_id")} for f in features]
        batch = dict(tokenizer.pad(inputs, return_tensors="pt"))
        batch["task_id"] = torch.tensor([f["task_id"] for f in features])
        if features and "labels" in features[0]:
            batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.float32)
        return batch

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if k not in ("labels", "task_id")}

    # ---- model, loss, metrics --------------------------------------------------------------------------

    def load_model(self, load: Callable[..., Any], tokenizer: Any) -> Any:
        from transformers import AutoModelForSequenceClassification

        names = self.output_labels()
        model = load(AutoModelForSequenceClassification, num_labels=self.width, id2label=dict(enumerate(names)),
                     label2id={name: i for i, name in enumerate(names)})
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        layer = output_layer(model, self.head_module_names)
        if layer is not None:
            for head, part in zip(self.heads, self._slices()):
                head.init_outputs(layer, part.start)
        return model

    def _row_losses(self, logits: Any, targets: Any, task_id: Any) -> Any:
        import torch

        losses = torch.zeros(len(task_id), dtype=logits.dtype, device=logits.device)
        for index, (head, part) in enumerate(zip(self.heads, self._slices())):
            rows = task_id == index
            if rows.any():
                losses[rows] = head.row_losses(logits[rows, part], head.targets_from_floats(targets[rows]))
        return losses

    def loss(self, outputs: Any, batch: dict[str, Any]) -> Any:
        return self._row_losses(outputs.logits.float(), batch["labels"], batch["task_id"]).mean()

    def eval_batch(self, outputs: Any, batch: dict[str, Any]) -> dict[str, Any]:
        return {"logits": outputs.logits.float(), "labels": batch["labels"], "task_id": batch["task_id"]}

    def metrics(self, collected: dict[str, Any]) -> dict[str, float]:
        logits, targets, task_id = collected["logits"], collected["labels"], collected["task_id"]
        metrics: dict[str, float] = {}
        keys = []
        for index, (name, head, part) in enumerate(zip(self.names, self.heads, self._slices())):
            rows = task_id == index
            if not rows.any():
                continue
            own = head.metrics(head.eval_rows(logits[rows, part], head.targets_from_floats(targets[rows])))
            metrics.update({f"{name}/{key}": value for key, value in own.items()})
            metric, direction = head.key_metric
            keys.append(own[metric] if direction == "max" else -own[metric])
        metrics["score"] = sum(keys) / len(keys) if keys else 0.0
        metrics["loss"] = float(self._row_losses(logits, targets, task_id).mean()) if len(task_id) else 0.0
        return metrics

    # ---- serving ---------------------------------------------------------------------------------------

    def shared_head(self, adapter: str, state: dict[str, Any], shared_model: Any) -> tuple[Any, Optional[str]]:
        return linear_head(adapter, self.name, state, shared_model, self.width)

    def serve_encode(self, fields: dict[str, Any], tokenizer: Any, max_length: Optional[int]
                     ) -> tuple[list[int], Optional[list[int]]]:
        return self.heads[0].serve_encode(fields, tokenizer, max_length)

    def serve_views(self) -> list[str]:
        return list(self.names)

    def serve_prediction(self, logits: Any, input_ids: Callable[[], list[int]]) -> dict[str, Any]:
        """Every data set's prediction for the row, under its name (``adapter:name`` serves one of them)."""
        return {name: head.serve_prediction(logits[part], input_ids)
                for name, head, part in zip(self.names, self.heads, self._slices())}


TASK = MultiTask
