"""What a task head is: the seam between data, model and loss.

A head names the data columns it reads (its *roles*), learns what it must from the training data (a label
map, say) into ``state`` (saved with the adapter), turns rows into token ids, builds the model class it
needs, and computes its loss and metrics from the model's raw outputs. The training loop never looks inside
a batch, which is why AdaLoRA's orthogonal regularization can be added to any head's loss in one place.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Annotated, Any, Callable, ClassVar, Optional

from pydantic import BaseModel, ConfigDict, StringConstraints

from ..errors import PeftkitError

if TYPE_CHECKING:
    import torch


class HeadOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


# text stored in peftkit.json that may land in a model card: one line, no control characters, no backquote
StateText = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f`]*$")]


class HeadState(BaseModel):
    """The schema of what a head learns from the data (``TaskHead.state``), saved in ``peftkit.json`` and checked
    on every read like the rest of it: strict, no unknown keys, finite numbers. Each head declares its own
    subclass as ``State``, so a new head's state is typed in the head's own file."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)


class TaskHead(ABC):
    name: ClassVar[str]
    Options: ClassVar[type[HeadOptions]]
    State: ClassVar[type[HeadState]] = HeadState  # what ``state`` may hold once fitted (checked on save and load)
    peft_task_type: ClassVar[Optional[str]]  # None: a head peft has no task type for (see auto_class)
    # role -> column names tried, in order, when data.columns does not map the role
    roles: ClassVar[dict[str, tuple[str, ...]]]
    required_roles: ClassVar[tuple[str, ...]]
    # required roles whose cells may be empty (a multi-label row without labels): their column must exist
    optional_cells: ClassVar[tuple[str, ...]] = ()
    # modules that belong to the head: trained in full, saved with the adapter, never quantized
    head_module_names: ClassVar[tuple[str, ...]] = ()
    key_metric: ClassVar[tuple[str, str]]  # (metric, "max" or "min")
    internal: ClassVar[bool] = False  # built by peftkit from a recipe (multi-task), never named in task.type
    reports_per_source: ClassVar[bool] = False  # its metrics already say each data set's (``name/metric``)
    # why EDA's word edits (data.augment) would not keep this head's labels true, or None where they do; a new
    # head is refused until it says otherwise
    augment_refusal: ClassVar[Optional[str]] = "EDA's word edits are only known to keep a whole text's class"

    def __init__(self, options: HeadOptions, state: Optional[dict[str, Any]] = None):
        self.options = options
        self.state: dict[str, Any] = dict(state or {})

    # ---- data ------------------------------------------------------------------------------------------

    def resolve_columns(self, available: list[str], mapping: dict[str, str], source: str,
                        key: str = "data.") -> dict[str, str]:
        """Map each role this head reads to a column of ``source``; roles without a column are left out.
        ``key`` is the recipe section the mapping came from (``data.also[0].`` for a second data set)."""
        unknown = sorted(set(mapping) - set(self.roles))
        if unknown:
            raise PeftkitError(
                f"{key}columns: {', '.join(unknown)} is not a role of task {self.name}; "
                f"its roles are: {', '.join(self.roles)}"
            )
        resolved: dict[str, str] = {}
        for role, candidates in self.roles.items():
            if role in mapping:
                if mapping[role] not in available:
                    raise PeftkitError(
                        f"{key}columns.{role}: column {mapping[role]!r} is not in {source} "
                        f"(its columns: {', '.join(available)}); fix the name"
                    )
                resolved[role] = mapping[role]
                continue
            found = next((c for c in candidates if c in available), None)
            if found is not None:
                resolved[role] = found
        missing = [r for r in self.required_roles if r not in resolved]
        if missing:
            role = missing[0]
            raise PeftkitError(
                f"{key}columns.{role}: no column for {role!r} in {source} (its columns: {', '.join(available)}); "
                f"set {key}columns.{role}: COLUMN"
            )
        return resolved

    def for_source(self, index: int) -> "TaskHead":
        """The head that reads, fits and encodes data set ``index`` of a recipe (``data.also``): this head, unless
        each data set has its own (``multi_task.py``)."""
        return self

    def filled_roles(self) -> tuple[str, ...]:
        """The roles whose every cell must hold a value (checked when the data loads)."""
        return tuple(role for role in self.required_roles if role not in self.optional_cells)

    def fit(self, train_rows: Any, eval_rows: Any, eval_source: str) -> None:
        """Learn from the raw (role-named) data what the head needs; check the eval data against it."""

    @abstractmethod
    def encode(self, rows: dict[str, list], tokenizer: Any, max_length: int) -> dict[str, list]:
        """Batched: role-named columns in, model features (``input_ids`` ...) out. May change the row count."""

    @abstractmethod
    def collate(self, features: list[dict[str, Any]], tokenizer: Any) -> dict[str, "torch.Tensor"]:
        """Pad a list of encoded rows into a batch."""

    # ---- model -----------------------------------------------------------------------------------------

    def output_labels(self) -> list[str]:
        """The names of the model's outputs, in order, for its config's ``id2label`` (and model cards); empty for
        a head whose outputs are no label map (a language model's vocabulary)."""
        return []

    @abstractmethod
    def load_model(self, load: Callable[..., Any], tokenizer: Any) -> Any:
        """Build the model, calling ``load(auto_class, **from_pretrained_kwargs)``."""

    def model_inputs(self, batch: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
        return {k: v for k, v in batch.items() if k != "labels"}

    @abstractmethod
    def loss(self, outputs: Any, batch: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        """The head's training loss from the model's raw outputs (the model is never given the labels)."""

    def loss_items(self, row: dict[str, Any]) -> Optional[int]:
        """How many items of one encoded training row the loss averages over, for a loss that is a mean over
        items of different counts per row (tokens); None (the default): the loss is a mean over rows, and each
        micro-batch of an accumulated step weighs the same, as ``Trainer`` weighs them."""
        return None

    def loss_sum(self, outputs: Any, batch: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        """The loss summed over its items (only for heads whose :meth:`loss_items` counts them)."""
        raise NotImplementedError(f"{type(self).__name__} averages its loss over rows")

    # ---- evaluation ------------------------------------------------------------------------------------

    @abstractmethod
    def eval_batch(self, outputs: Any, batch: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
        """Per-row tensors from one eval batch (gathered across processes before :meth:`metrics`)."""

    @abstractmethod
    def metrics(self, collected: dict[str, "torch.Tensor"]) -> dict[str, float]:
        """The task's metrics from all eval rows' tensors, concatenated."""

    def eval_with_model(self, model: Any, tokenizer: Any, rows: Any) -> dict[str, float]:
        """Metrics that need the model itself beyond one forward pass per batch (generation, say), from the encoded
        eval ``rows``; called in eval mode without gradients, after :meth:`metrics`. Default: none."""
        return {}

    # ---- hooks of heads whose base keeps a head of its own (masked LM): each default leaves other heads as they are

    # modules of the base's own output head: never quantized, never adapted by LoRA, frozen unless also named in
    # head_module_names (a masked LM's tied vocabulary decoder stays the base's)
    unquantized_modules: ClassVar[tuple[str, ...]] = ()
    # the transformers auto class of the head's model and the hub's pipeline tag, for heads peft has no task type
    # for (peft_task_type None); None: peft's pairing for peft_task_type
    auto_class: ClassVar[Optional[str]] = None
    pipeline_tag: ClassVar[Optional[str]] = None
    # the auto class the multi-adapter server loads the shared base with for this head's adapters; None: the
    # base's body (AutoModel) for an encoder, AutoModelForCausalLM for a decoder
    serve_base: ClassVar[Optional[str]] = None

    def train_collate(self, features: list[dict[str, Any]], tokenizer: Any, seed: int, epoch: int,
                      rows: list[int]) -> dict[str, "torch.Tensor"]:
        """A training batch of encoded rows ``rows`` (their indices in the training set) in epoch ``epoch``: by
        default :meth:`collate`. A head whose inputs are drawn afresh every epoch (a masked LM's mask) draws them
        here from ``seed``, ``epoch`` and the row indices, so a run (resumed or on several processes) reproduces."""
        return self.collate(features, tokenizer)

    def batch_loss_items(self, batch: dict[str, "torch.Tensor"]) -> Optional[int]:
        """How many items a collated training batch's loss sums over (:meth:`loss_sum`), for a head whose count is
        known only once the batch is drawn (a masked LM's masked tokens); None (the default): the sum of
        :meth:`loss_items` over its rows, or a mean over rows."""
        return None

    # ---- serving: many adapters on one shared base (peftkit.serve.serving) --------------------------------------
    # A head says here what a request row holds, how it is encoded, what module the shared base applies for
    # it and what a prediction is, so the server names no head: a new head is one file in tasks/.

    serve_fields: ClassVar[tuple[str, ...]] = ("text",)  # the request fields a served row may carry
    generates: ClassVar[bool] = False  # whether `generate` serves adapters of this head

    def serve_encode(self, fields: dict[str, Any], tokenizer: Any, max_length: Optional[int]
                     ) -> tuple[list[int], Optional[list[int]]]:
        """One request row as token ids and token type ids (None when the tokenizer has none)."""
        return encode_text(str(fields["text"]), tokenizer, max_length)

    def shared_head(self, adapter: str, state: dict[str, "torch.Tensor"], shared_model: Any
                    ) -> tuple[Any, Optional[str]]:
        """The module applied to this adapter's rows on the shared base, built from its saved head tensors, and
        its pooling ("pooler", "last_token", or "tokens": every token, as a masked LM); (None, None) for a head
        that predicts with the base's own output."""
        if state:
            raise PeftkitError(f"{adapter}: a {self.name} adapter with trained modules {sorted(state)} cannot share "
                               "a base; serve it alone")
        return None, None

    def serve_views(self) -> list[str]:
        """Names under which one part of this head's prediction is served as ``adapter:name`` (a multi-task
        adapter's data sets); :meth:`serve_prediction` then returns a dict keyed by them. Empty: none."""
        return []

    def serve_prediction(self, logits: "torch.Tensor", input_ids: Callable[[], list[int]]) -> dict[str, Any]:
        """One row's prediction from its output (``input_ids``: the row's ids, encoded on demand)."""
        return score_text(logits, input_ids())


def encode_text(text: str, tokenizer: Any, max_length: Optional[int]) -> tuple[list[int], Optional[list[int]]]:
    enc = tokenizer(text, truncation=max_length is not None, max_length=max_length)
    types = enc.get("token_type_ids")
    return list(enc["input_ids"]), list(types) if types is not None else None


def score_text(logits: "torch.Tensor", ids: list[int]) -> dict[str, Any]:
    """A language model's mean next-token loss on a text, and its perplexity (for the base's own rows too)."""
    import math

    import torch

    target = torch.tensor(ids[1:])
    loss = float(torch.nn.functional.cross_entropy(logits[:-1], target)) if len(ids) > 1 else float("nan")
    return {"loss": round(loss, 6), "perplexity": round(math.exp(min(loss, 50.0)), 4)}
