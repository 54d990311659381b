"""Heads on a sequence's pooled representation: one linear layer of ``width`` outputs.

They load through transformers' ``AutoModelForSequenceClassification`` (an encoder's pooled ``[CLS]`` and its
``classifier``, a decoder's last token and its ``score``), and differ only in what a row's target is, the loss of
a row, and how outputs become predictions and metrics: classification (a label id, cross-entropy), regression (a
number, squared error), multi-label classification (a 0/1 vector, a sigmoid per label). Each of them defines
those parts here. Because every head of this family is one linear layer over the same pooled features, several
can share one adapter as slices of one layer (``multi_task.py``): the reason they are one family.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Callable, ClassVar, Optional

from ..errors import PeftkitError
from .base import TaskHead


class PooledHead(TaskHead):
    peft_task_type = "SEQ_CLS"
    roles = {
        "text": ("text", "sentence", "sentence1", "question", "question1", "premise"),
        "text_pair": ("text_pair", "sentence2", "question2", "hypothesis"),
        "label": ("label", "labels", "Label", "class"),
    }
    required_roles = ("text", "label")
    head_module_names = ("classifier", "score", "classification_head")  # BERT, decoders, T5
    serve_fields = ("text", "text_pair")
    problem_type: ClassVar[str]  # transformers' config.problem_type, for users who load the model with labels

    # ---- what a head of this family defines ------------------------------------------------------------

    @property
    @abstractmethod
    def width(self) -> int:
        """How many outputs the linear head has (known once fitted)."""

    @abstractmethod
    def output_labels(self) -> list[str]:
        """The name of each output, in order: the model's ``id2label``."""

    @abstractmethod
    def target(self, value: Any) -> Any:
        """A row's label cell as the target the loss reads (an int, a float or a list of 0/1)."""

    @abstractmethod
    def target_tensor(self, targets: list[Any]) -> Any:
        """The targets of a batch as the tensor :meth:`row_losses` takes."""

    @abstractmethod
    def row_losses(self, logits: Any, targets: Any) -> Any:
        """Each row's loss (a tensor of one value per row) from its ``width`` outputs."""

    @abstractmethod
    def eval_rows(self, logits: Any, targets: Any) -> dict[str, Any]:
        """Per-row tensors (loss and predictions) that :meth:`metrics` reads."""

    # in a multi-task batch every row's target is a float vector of ``target_width`` (multi_task.py)
    target_width: ClassVar[Optional[int]] = 1  # None: one float per output

    def target_floats(self, target: Any) -> list[float]:
        return [float(t) for t in target] if isinstance(target, list) else [float(target)]

    def targets_from_floats(self, floats: Any) -> Any:
        """The inverse of :meth:`target_floats` over a batch: a ``(rows, target_width)`` float tensor in, the
        tensor :meth:`target_tensor` makes out."""
        return floats[:, 0]

    # ---- the family's common parts -----------------------------------------------------------------------

    def encode(self, rows: dict[str, list], tokenizer: Any, max_length: int) -> dict[str, list]:
        pair = rows.get("text_pair")
        features = tokenizer(
            [str(t) for t in rows["text"]],
            [str(t) for t in pair] if pair is not None else None,
            truncation=True,
            max_length=max_length,
        )
        if "label" in rows:
            features["labels"] = [self.target(v) for v in rows["label"]]
        return dict(features)

    def collate(self, features: list[dict[str, Any]], tokenizer: Any) -> dict[str, Any]:
        inputs = [{k: v for k, v in f.items() if k != "labels"} for f in features]
        batch = dict(tokenizer.pad(inputs, return_tensors="pt"))
        if features and "labels" in features[0]:
            batch["labels"] = self.target_tensor([f["labels"] for f in features])
        return batch

    def load_model(self, load: Callable[..., Any], tokenizer: Any) -> Any:
        from transformers import AutoModelForSequenceClassification

        names = self.output_labels()
        model = load(
            AutoModelForSequenceClassification,
            num_labels=self.width,
            id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)},
            problem_type=self.problem_type,
        )
        if model.config.pad_token_id is None:  # decoder models pool at the last non-pad token
            model.config.pad_token_id = tokenizer.pad_token_id
        return model

    def init_outputs(self, layer: Any, offset: int) -> None:
        """Set this head's outputs (``layer``'s rows from ``offset``) before training, when it starts anywhere
        but at transformers' random init; a trained adapter's saved head replaces them when it loads."""

    def loss(self, outputs: Any, batch: dict[str, Any]) -> Any:
        return self.row_losses(outputs.logits.float(), batch["labels"]).mean()

    def eval_batch(self, outputs: Any, batch: dict[str, Any]) -> dict[str, Any]:
        return self.eval_rows(outputs.logits.float(), batch["labels"])

    # ---- serving ---------------------------------------------------------------------------------------

    def serve_encode(self, fields: dict[str, Any], tokenizer: Any, max_length: Optional[int]
                     ) -> tuple[list[int], Optional[list[int]]]:
        rows = {"text": [fields["text"]]}
        if fields.get("text_pair") is not None:
            rows["text_pair"] = [fields["text_pair"]]
        enc = self.encode(rows, tokenizer, max_length)
        types = enc.get("token_type_ids")
        return list(enc["input_ids"][0]), list(types[0]) if types is not None else None

    def shared_head(self, adapter: str, state: dict[str, Any], shared_model: Any) -> tuple[Any, Optional[str]]:
        """The adapter's own head (peft's modules_to_save would be one module shared by all adapters): one linear
        layer, or T5's dense -> tanh -> out_proj."""
        if {k.split(".", 1)[1] for k in state} == set(T5_HEAD):
            return t5_head(adapter, state, self.width)
        return linear_head(adapter, self.name, state, shared_model, self.width)


# the tensors of T5ForSequenceClassification's head: dense -> tanh -> out_proj, on the decoder's last EOS state
T5_HEAD = ("dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias")


def t5_head(adapter: str, state: dict[str, Any], width: int) -> tuple[Any, Optional[str]]:
    """T5's classification head rebuilt from an adapter's saved tensors; pooled at the last EOS token ("eos")."""
    import torch
    from torch import nn

    root = next(iter(state)).split(".")[0]
    dense, out = state[f"{root}.dense.weight"], state[f"{root}.out_proj.weight"]
    if out.shape[0] != width:
        raise PeftkitError(f"{adapter}: its head has {out.shape[0]} outputs but its metadata describes {width}; "
                           "the adapter folder is inconsistent")
    head = nn.Sequential(nn.Linear(dense.shape[1], dense.shape[0], dtype=dense.dtype), nn.Tanh(),
                         nn.Linear(out.shape[1], out.shape[0], dtype=out.dtype))
    with torch.no_grad():
        for index, name in ((0, "dense"), (2, "out_proj")):
            head[index].weight.copy_(state[f"{root}.{name}.weight"])
            head[index].bias.copy_(state[f"{root}.{name}.bias"])
    return head.eval().requires_grad_(False), "eos"


def linear_head(adapter: str, kind: str, state: dict[str, Any], shared_model: Any, width: int
                ) -> tuple[Any, Optional[str]]:
    """A linear layer rebuilt from an adapter's saved head tensors, and the pooling its model applied before it."""
    import torch
    from torch import nn

    roots = sorted({k.split(".")[0] for k in state})
    shapes = {k.split(".", 1)[1] for k in state}
    if len(roots) != 1 or not shapes <= {"weight", "bias"} or "weight" not in shapes:
        raise PeftkitError(
            f"{adapter}: its {kind} head ({', '.join(sorted(state)) or 'none saved'}) is not one linear layer; "
            "shared serving supports BERT-style pooled heads and decoder score heads"
        )
    root = roots[0]
    weight = state[f"{root}.weight"]
    bias = state.get(f"{root}.bias")
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    if width != weight.shape[0]:
        raise PeftkitError(f"{adapter}: its head has {weight.shape[0]} outputs but its metadata describes {width}; "
                           "the adapter folder is inconsistent")
    # BERT-style models classify the pooled [CLS] output; decoders (score) the last non-pad token's state
    pooled = getattr(shared_model, "pooler", None) is not None and root == "classifier"
    return head.eval().requires_grad_(False), "pooler" if pooled else "last_token"


def output_layer(model: Any, head_names: tuple[str, ...]) -> Any:
    """The last linear layer of a model's pooled head (``classifier``, ``score``, or a head module's
    ``out_proj``), or None when the model has none of those."""
    from torch import nn

    for name in head_names:
        module = getattr(model, name, None)
        if isinstance(module, nn.Linear):
            return module
        if module is not None:
            linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
            if linears:
                return linears[-1]
    return None
