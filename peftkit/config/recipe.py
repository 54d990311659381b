"""The recipe: a typed description of one fine-tuning run, loaded from YAML.

A recipe has seven sections: ``base`` (which model), ``quantization`` (how its frozen weights are stored),
``adapter`` (LoRA or AdaLoRA, or none for full fine-tuning), ``task`` (the head and its loss), ``data``,
``train`` and ``output``. Every section rejects unknown keys with a suggestion, and :func:`load_recipe`
reports every problem at once, each with its key path, before anything heavy is imported.

``extends: parent.yaml`` (relative to the file) inherits a recipe and deep-merges this one over it;
``--set a.b=c`` overrides any field, the value parsed as YAML.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, ValidationError, field_validator,
                      model_validator)

from ..errors import PeftkitError, RecipeError
from .recipe_errors import Refused, SectionProblems, describe_error

Dtype = Literal["float32", "bfloat16", "float16"]


# No count in a recipe needs more: a bigger one is a typo (or 99999999999999999999) that would overflow later.
MAX_INT = 2**31 - 1


def _expects(annotation: Any, kind: type) -> bool:
    """Whether a field is typed ``kind`` or ``Optional[kind]`` (fields with a validator of their own are not)."""
    return annotation is kind or set(typing.get_args(annotation)) == {kind, type(None)}


class Section(BaseModel):
    # NaN and infinity are never a setting (`lr: .inf` would train to an all-NaN adapter)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _plain_numbers(cls, data: Any) -> Any:
        """Refuse true/false for a number (pydantic reads `epochs: true` as 1.0) and integers past MAX_INT.

        The value is swapped for a :class:`Refused` that no number field accepts, so the field fails in its own
        place, beside every other problem of the recipe (recipe_errors words it from the reason).
        """
        if not isinstance(data, dict):
            return data
        checked = dict(data)
        for key, value in data.items():
            field = cls.model_fields.get(key)
            if field is None or not isinstance(value, (int, float)):
                continue
            integer = _expects(field.annotation, int)
            if isinstance(value, bool) and (integer or _expects(field.annotation, float)):
                checked[key] = Refused(f"must be a number, not {str(value).lower()}")
            elif integer and not isinstance(value, bool) and abs(value) > MAX_INT:
                checked[key] = Refused(f"must be at most {MAX_INT} (got {value!r})")
        return checked


class BaseModelSection(Section):
    """Which pretrained model to start from."""

    model: str = Field(description="a packaged model name (minilm, smollm2-135m), a local folder, or a hub id")
    revision: Optional[str] = None
    dtype: Dtype = "float32"
    trust_remote_code: bool = Field(False, description="run the Python code shipped in the model's folder")
    allow_pickle: bool = Field(False, description="load pickled weights (pytorch_model.bin), which can run code, "
                                                  "when the folder has no safetensors")

    @field_validator("model")
    @classmethod
    def _named(cls, model: str) -> str:
        if not model.strip():
            raise ValueError("empty; name a packaged model (minilm, smollm2-135m), a local model folder or a hub id")
        return model


class QuantizationSection(Section):
    """How the frozen base weights are stored: not at all (``bits: null``), LLM.int8, or 4-bit NF4/FP4."""

    bits: Optional[Literal[4, 8]] = None
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Dtype = "float32"
    skip_modules: list[str] = Field(default_factory=list, description="extra modules kept in full precision")
    # FSDP shards only floating tensors: to shard 4-bit weights, pack them into the base's dtype (QLoRA + FSDP)
    quant_storage: Literal["uint8", "float32", "bfloat16", "float16"] = Field(
        "uint8", description="dtype the packed 4-bit weights are stored in; a float one lets FSDP shard them")


def _target_modules(value: Any) -> Any:
    # one message for the whole union instead of one per member ("literal['all-linear']", "list[str]")
    if value == "all-linear" or (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
        return value
    hint = f"; for one module write [{value}]" if isinstance(value, str) else ""
    raise ValueError(f"use all-linear or a list of module names such as [query, value] (got {value!r}){hint}")


def _phase_length(value: Any) -> Any:
    if isinstance(value, str):  # YAML 1.1 reads 1e-1 as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"use a whole number of steps or a fraction in [0, 1) (got {value!r})")
    if isinstance(value, float) and not 0 <= value < 1:
        raise ValueError(f"a fraction of training must be in [0, 1) (got {value}); or give a whole number of steps")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"a number of steps must be >= 0 (got {value})")
    return value


TargetModules = Annotated[Union[Literal["all-linear"], list[str]], BeforeValidator(_target_modules)]
# An AdaLoRA phase length: an int counts optimizer steps, a float in [0, 1) is a fraction of training.
PhaseLength = Annotated[Union[StrictInt, float], BeforeValidator(_phase_length)]


class LoraSection(Section):
    method: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, le=4096)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: TargetModules = "all-linear"
    layers: Optional[list[int]] = Field(None, description="indices of the layers to adapt; default all")
    use_rslora: bool = False
    use_dora: bool = False
    init_from: Optional[str] = Field(None, description="a registered adapter whose weights start this one (transfer)")
    init_head: Literal["auto", "keep", "reinit"] = Field(
        "auto", description="with init_from: keep its task head, start a new one, or keep it when the labels match"
    )
    rank_pattern_from: Optional[str] = Field(
        None, description="a registered AdaLoRA adapter (or its LoRA conversion) whose per-module ranks to reuse"
    )
    # issue 14's levers for quantized bases, through peft (peftkit.core.lora_init,
    # peftkit.train.trainer.build_optimizer); the defaults are peft's plain LoRA until the data-size sweep
    # measures them
    init: Literal["default", "gaussian", "loftq", "olora", "pissa"] = Field(
        "default", description="how A and B start: peft's default (B = 0), gaussian, or loftq on a 4-bit base "
                               "(olora and pissa are refused: peft rewrites the base weight)"
    )
    loraplus_lr_ratio: Optional[float] = Field(
        None, gt=0, description="LoRA+: the B matrices learn at this multiple of train.lr (peft suggests >= 1)"
    )


class AdaLoraSection(Section):
    """AdaLoRA (Zhang et al. 2023): SVD-shaped adapters whose ranks are pruned to a budget while training.

    Defaults differ from LoRA's on purpose (measured and explained in ``peftkit.core.adalora``): P and Q start
    orthonormal, alpha is 128 and the adapter learns at twice ``train.lr``; its dropout is LoRA's.
    """

    method: Literal["adalora"] = "adalora"
    init_r: int = Field(12, ge=1, le=4096)
    target_r: int = Field(8, ge=1, le=4096, description="average final rank per adapted module")
    lora_alpha: float = Field(128.0, gt=0)
    # LoRA's dropout (issue 14, benchmarks/results/sweep/, MiniLM on SST-2, 3 seeds, the rule's training length):
    # without it AdaLoRA trailed LoRA by 2.3 points on 250 rows (73.6 against 75.9 %; the careful peer's AdaLoRA
    # trailed its LoRA alike, 74.3 against 76.5) and by 0.6 on 4,000 (83.0 against 83.6); with 0.05 it reaches
    # 75.9, 79.0, 81.0 and 83.6 % on 250, 500, 1,000 and 4,000 rows (LoRA 75.9, 78.1, 81.2, 83.6), the peer's
    # 76.0, 78.7, 80.0, 83.1
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: TargetModules = "all-linear"
    layers: Optional[list[int]] = None
    lr_scale: float = Field(2.0, gt=0, description="the adapter's learning rate as a multiple of train.lr")
    init_from: Optional[str] = Field(None, description="a registered adapter whose weights start this one (transfer)")
    init_head: Literal["auto", "keep", "reinit"] = Field(
        "auto", description="with init_from: keep its task head, start a new one, or keep it when the labels match"
    )
    warmup: PhaseLength = Field(0.1, description="steps (int) or fraction (float) before pruning starts")
    final: PhaseLength = Field(0.3, description="steps or fraction at the end with ranks fixed")
    interval: int = Field(1, ge=1, description="optimizer steps between two reallocations")
    orth_reg_weight: float = Field(0.1, ge=0)
    orth_reg_form: Literal["squared", "norm"] = Field(
        "squared", description="the regularizer: the paper's squared Frobenius norm, or peft's unsquared one "
                               "(which holds short runs at chance; see peftkit.core.adalora.orthogonal_regularization)"
    )
    orthogonal_init: bool = Field(True, description="start P and Q orthonormal rather than peft's N(0, 0.02)")
    beta1: float = Field(0.85, gt=0, lt=1)
    beta2: float = Field(0.85, gt=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> "AdaLoraSection":
        problems = []
        if self.target_r >= self.init_r:  # peft's allocator fails when there is no rank to prune
            problems.append(
                ("target_r", f"{self.target_r} must be < init_r ({self.init_r}), or AdaLoRA has nothing to prune; "
                             "lower target_r, raise init_r, or use method: lora")
            )
        if isinstance(self.warmup, float) and isinstance(self.final, float) and self.warmup + self.final >= 1:
            problems.append(("warmup", f"warmup + final ({self.warmup} + {self.final}) leaves no room for pruning; "
                                       "keep the sum below 1"))
        if problems:
            raise SectionProblems(problems)
        return self


AdapterSection = Annotated[Union[LoraSection, AdaLoraSection], Field(discriminator="method")]


class TaskSection(Section):
    """The task head. ``type`` names a module in ``peftkit/tasks``; the other keys are that head's options."""

    model_config = ConfigDict(extra="allow")
    type: str

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataSource(Section):
    """One data set: a train file (or hub id), its eval rows, and how to read them."""

    name: Optional[str] = Field(None, description="label for this data set's eval metrics; default from the file")
    train: str = Field(description="a local file (csv, tsv, json, jsonl, parquet, txt, conll), a file in an installed "
                                   "package (pkg:PACKAGE/PATH) or a hub data set id")
    eval: Optional[str] = None
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="carved from train when eval is not given")
    format: Literal["auto", "csv", "tsv", "json", "jsonl", "parquet", "txt", "conll"] = "auto"
    header: bool = True
    column_names: Optional[list[str]] = Field(None, description="names for the columns of a header-less file")
    columns: dict[str, str] = Field(default_factory=dict, description="task role -> column name")
    max_train_samples: Optional[int] = Field(None, ge=1)
    max_eval_samples: Optional[int] = Field(None, ge=1)
    split: str = Field("train", description="split to read from a hub data set")
    eval_split: Optional[str] = None
    encoding: str = "utf-8"
    # a second data set's own head (data.also[i].task); the first data set's head is the recipe's task section
    task: Optional[TaskSection] = Field(None, description="this data set's head (data.also only); default: the "
                                                          "task section's type, fitted to this data set's labels")

    def label(self) -> str:
        if self.name:
            return self.name
        path = Path(self.train)
        # SST-2/train.tsv -> SST-2; a hub id or a plainly named file -> its own name
        return path.parent.name if path.stem.lower() in {"train", "dev", "test", "validation"} and path.parent.name \
            else path.stem


# More variants of one row than this is a typo: the paper's largest count was 32, and each copy is a training row.
MAX_COPIES = 1000


def _copies(value: Any) -> Any:
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"use a whole number of copies per row, or auto (got {value!r})")
    if not 1 <= value <= MAX_COPIES:
        raise ValueError(f"must be from 1 to {MAX_COPIES} copies per row (got {value}); or use auto")
    return value


Copies = Annotated[Union[Literal["auto"], int], BeforeValidator(_copies)]


class AugmentSection(Section):
    """EDA (Wei & Zou 2019): each training row gets ``copies`` variants of its ``text``, each made by one of four
    word operations (``peftkit.core.augment``). A rate of 0 leaves its operation out. The defaults are the
    authors' code's (0.1 each, the "sweet spot across the board" of the paper's ablation); its Table 3 suggests
    0.05 up to 2,000 rows."""

    method: Literal["eda"] = "eda"
    copies: Copies = Field("auto", description="variants per training row; auto: the paper's Table 3, 16 up to "
                                               "500 rows, 8 up to 2,000, 4 above")
    alpha_sr: float = Field(0.1, ge=0, le=1, description="synonym replacement: this fraction of the words (at least "
                                                         "one) replaced by a WordNet synonym")
    alpha_ri: float = Field(0.1, ge=0, le=1, description="random insertion: this fraction of the words (at least one) "
                                                         "inserted, each a synonym of a word of the row")
    alpha_rs: float = Field(0.1, ge=0, le=1, description="random swap: this fraction of the words (at least one) "
                                                         "swaps of two words")
    p_rd: float = Field(0.1, ge=0, le=1, description="random deletion: each word deleted with this probability")
    keep_original: bool = Field(True, description="train on the original rows beside their copies")

    @model_validator(mode="after")
    def _some_operation(self) -> "AugmentSection":
        if not any((self.alpha_sr, self.alpha_ri, self.alpha_rs, self.p_rd)):
            raise ValueError("every rate is 0, so each copy would equal its row; raise one of alpha_sr, alpha_ri, "
                             "alpha_rs, p_rd or remove data.augment")
        return self


class DataSection(DataSource):
    """The first data set, plus any number of others (``also``) trained into the same adapter."""

    max_length: int = Field(128, ge=8, le=1_048_576)
    also: list[DataSource] = Field(default_factory=list, description="more data sets for the same adapter")
    heads: Literal["per_dataset", "shared"] = Field(
        "per_dataset", description="with data.also: one head per data set (its own labels and task type), or one "
                                   "head over the union of their labels")
    sampling: Literal["size", "temperature"] = Field(
        "size", description="with data.also: each data set's share of the training rows, as its size or as "
                            "size^(1/temperature) (small data sets drawn more often)")
    temperature: float = Field(2.0, gt=0, le=1000, description="for sampling: temperature; 1 is sampling by size")
    augment: Optional[AugmentSection] = Field(None, description="EDA variants of the training rows (never the eval "
                                                                "rows); null: none")

    def sources(self) -> list[DataSource]:
        return [self, *self.also]

    @model_validator(mode="after")
    def _distinct_names(self) -> "DataSection":
        labels = [source.label() for source in self.sources()]
        repeated = next((label for label in labels if labels.count(label) > 1), None)
        if repeated is not None:
            raise SectionProblems([("also", f"two data sets are called {repeated!r}; give each a distinct name")])
        problems = []
        if self.task is not None:
            problems.append(("task", "the first data set's head is the recipe's task section; move it there"))
        if self.heads == "shared":
            problems += [(f"also.{i}.task", "one shared head has the task section's type and labels; remove this "
                          "or set data.heads: per_dataset") for i, s in enumerate(self.also) if s.task is not None]
        if not self.also and self.sampling != "size":
            problems.append(("sampling", "only several data sets (data.also) are sampled; remove it"))
        if self.also and self.augment is not None:
            # each data set's share would be counted over its variants; not built until someone needs it
            problems.append(("augment", "is not supported with several data sets (data.also); remove one of them"))
        if problems:
            raise SectionProblems(problems)
        return self


class TrainSection(Section):
    epochs: float = Field(1.0, gt=0, le=100_000)
    max_steps: Optional[int] = Field(None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: int = Field(16, ge=1, le=65_536)
    eval_batch_size: Optional[int] = Field(None, ge=1, le=65_536)
    grad_accum: int = Field(1, ge=1, le=65_536)
    lr: float = Field(5e-4, gt=0)
    head_lr: Optional[float] = Field(None, gt=0, description="learning rate of the task head; default lr")
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    seed: int = Field(42, ge=0, le=2**32 - 1, description="numpy takes seeds in [0, 2**32)")
    eval_every: Optional[int] = Field(None, ge=1, description="optimizer steps between evaluations; default each epoch")
    eval_at_start: bool = Field(False, description="evaluate the untrained model too, as step 0")
    log_every: int = Field(10, ge=1)
    save_every: Optional[int] = Field(None, ge=1, description="optimizer steps between checkpoints; default each epoch")
    keep_checkpoints: int = Field(2, ge=1)
    group_by_length: bool = True
    gradient_checkpointing: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = True


def _name_as_text(value: Any) -> Any:
    # `--set output.name=2024` and `name: 2024` arrive as YAML integers; a name is text
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class OutputSection(Section):
    name: Annotated[str, BeforeValidator(_name_as_text)] = Field(description="the adapter's name in the registry")
    registry: str = Field("adapters", description="registry root; trained adapters land in <registry>/<name>/")
    runs: str = Field("runs", description="where checkpoints and TensorBoard logs go: <runs>/<name>/")

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        from ..naming import check_new_adapter_name

        try:
            return check_new_adapter_name(name)
        except PeftkitError as exc:
            raise ValueError(str(exc)) from None


class Recipe(Section):
    base: BaseModelSection
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    adapter: Optional[AdapterSection] = Field(None, description="null for full fine-tuning")
    task: TaskSection
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    output: OutputSection

    @model_validator(mode="after")
    def _cross_checks(self) -> "Recipe":
        if isinstance(self.adapter, LoraSection):
            problems = _init_problems(self.adapter, self.quantization)
            if problems:
                raise SectionProblems(problems)
        if self.quantization.bits and self.adapter is None:
            raise SectionProblems([(
                "adapter",
                f"required with quantization.bits: {self.quantization.bits} (a quantized base is frozen and cannot be "
                "fully fine-tuned); add an adapter section or set quantization.bits: null",
            )])
        if self.data.augment is not None:
            refusal = _augment_refusal(self.task.type)
            if refusal:
                raise SectionProblems([("data.augment", refusal)])
        storage = self.quantization.quant_storage
        if storage != "uint8" and self.quantization.bits != 4:
            raise SectionProblems([("quantization.quant_storage", "only 4-bit weights have a storage dtype; "
                                    "remove quant_storage or set quantization.bits: 4")])
        if storage != "uint8" and storage != self.base.dtype:
            raise SectionProblems([("quantization.quant_storage", f"{storage} needs base.dtype: {storage} (FSDP "
                                    "shards each layer as one tensor of one dtype); set base.dtype to the same")])
        return self

    @property
    def method(self) -> str:
        return self.adapter.method if self.adapter else "full"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _augment_refusal(task_type: str) -> Optional[str]:
    """Why ``data.augment`` cannot train a ``task_type`` head (the head says: ``TaskHead.augment_refusal``), or None."""
    from ..tasks import task_types

    heads = task_types()
    head = heads.get(task_type)
    if head is None or head.augment_refusal is None:  # an unknown type is reported by the task's own check
        return None
    fit = [name for name, h in sorted(heads.items()) if h.augment_refusal is None and not h.internal]
    return (f"not for {task_type}: {head.augment_refusal}; remove data.augment (EDA keeps the labels of "
            f"{' and '.join(fit)} heads)")


def _init_problems(adapter: LoraSection, quantization: QuantizationSection) -> list[tuple[str, str]]:
    """What ``adapter.init`` cannot do on this base, read from peft 0.21.2 (``tuners/lora/layer.py``,
    ``utils/loftq_utils.py``); each a one-line problem under ``adapter.init``."""
    init, bits = adapter.init, quantization.bits
    base = {None: "a float base", 8: "an 8-bit base", 4: "a 4-bit base"}[bits]
    if init in ("olora", "pissa"):
        why = {
            "olora": "peft's OLoRA rewrites each base weight as W - B A (on a quantized base it re-quantizes that "
                     "residual into new weights)",
            "pissa": "peft's PiSSA rewrites each base weight as the SVD residual W - B A (and refuses quantized "
                     "weights)",
        }[init]
        return [("adapter.init", f"{init} is not supported on {base}: {why}, so the saved adapter would not apply "
                                 "to the base it is loaded on; use init: default, gaussian or (4-bit) loftq")]
    if init != "loftq":
        problems = []
    elif bits is None:
        problems = [("adapter.init", "loftq corrects the rounding error of 4-bit weights and a float base has none; "
                                     "use init: default, or quantization.bits: 4")]
    elif bits == 8:
        problems = [("adapter.init", "loftq needs a 4-bit base (peft's replace_lora_weights_loftq supports only "
                                     "bitsandbytes 4-bit layers); use init: default, or quantization.bits: 4")]
    elif adapter.use_dora:
        problems = [("adapter.init", "loftq with use_dora is not supported (DoRA's magnitudes are set from the "
                                     "adapter peft starts with); drop one of them")]
    else:
        problems = []
    if init != "default" and adapter.init_from:
        problems.append(("adapter.init", f"{init} and init_from both set the adapter's starting weights; "
                                         "drop one of them"))
    return problems


# ----------------------------------------------------------------------------------------------------------
# Loading: YAML, extends, overrides, and errors that name their key path.


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise PeftkitError(f"recipe file {path} is a folder; name a YAML recipe file")
    if not path.is_file():
        raise PeftkitError(f"recipe file {path} does not exist; check the path")
    raw = path.read_bytes()
    if b"\0" in raw:
        raise PeftkitError(f"{path} is a binary file, not a YAML recipe; name the recipe's .yaml file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PeftkitError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); save the recipe "
                           "as UTF-8") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise PeftkitError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise PeftkitError(f"{path}: a recipe must be a mapping of sections, found {type(data).__name__}")
    return data


# A child section naming another adapter method or task type replaces its parent's section instead of
# merging into it: LoRA's `r` has no meaning under AdaLoRA, a classifier's `labels` none for a causal LM.
_KIND_KEYS = ("method", "type")


def _deep_merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    for kind in _KIND_KEYS:
        if kind in child and kind in parent and child[kind] != parent[kind]:
            return dict(child)
    merged = dict(parent)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_recipe_tree(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw recipe at ``path`` with every ``extends:`` ancestor merged beneath it."""
    path = path.resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise PeftkitError(f"recipe extends itself in a loop: {chain}; remove one of the extends")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise PeftkitError(f"{path}: extends must be a path to a recipe file, found {parent!r}")
    parent_path = path.parent / parent
    if parent_path.is_dir():
        raise PeftkitError(f"{path}: extends: {parent} is a folder ({parent_path}); name the parent recipe file")
    if not parent_path.is_file():
        raise PeftkitError(f"{path}: extends: {parent} does not exist (looked for {parent_path}); fix the path")
    return _deep_merge(read_recipe_tree(parent_path, (*_seen, path)), data)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (``4``, ``true``, ``[q, v]``)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise PeftkitError(f"--set {assignment!r}: expected KEY=VALUE, for example --set train.epochs=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise PeftkitError(f"--set {assignment}: {where} is a value, not a section; set {where}=... instead")
        node = child
    node[parts[-1]] = value


def build_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate raw recipe data; every problem, including the task head's own options, in one RecipeError."""
    problems: list[str] = []
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems = [line for e in exc.errors() for line in describe_error(e, Recipe, (LoraSection, AdaLoraSection))]
        recipe = None
    from ..tasks import validate_task_options

    for key, task in _task_sections(data):
        problems.extend(validate_task_options(task["type"], {k: v for k, v in task.items() if k != "type"}, key))
    if problems:
        raise RecipeError(source, list(dict.fromkeys(problems)))
    assert recipe is not None
    return recipe


def _task_sections(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The recipe's task sections, each with its key: ``task`` and any ``data.also[i].task``."""
    sections = [("task", data.get("task"))]
    also = data.get("data", {}).get("also") if isinstance(data.get("data"), dict) else None
    for i, source in enumerate(also if isinstance(also, list) else []):
        if isinstance(source, dict):
            sections.append((f"data.also[{i}].task", source.get("task")))
    return [(key, task) for key, task in sections if isinstance(task, dict) and isinstance(task.get("type"), str)]


def load_recipe(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    """Read, merge (``extends``), override (``--set``) and validate a recipe file."""
    path = Path(path)
    data = read_recipe_tree(path)
    for assignment in overrides:
        apply_override(data, assignment)
    return build_recipe(data, source=str(path))


__all__ = [
    "Recipe",
    "LoraSection",
    "AdaLoraSection",
    "AugmentSection",
    "load_recipe",
    "build_recipe",
    "apply_override",
    "read_recipe_tree",
]
