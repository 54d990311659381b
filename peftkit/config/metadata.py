"""The typed schema of ``peftkit.json``: each field named once here, checked on every read and before every write.

A ``peftkit.json`` travels with the folder a user is handed, so nothing in it is taken on trust. On read
(:func:`validate`) its ``format_version`` is checked first (another format is one clear line), then its
``digest``, the sha256 of the canonical JSON of everything else (an edit or a damaged copy is caught before any
field is used), then every field against the schema below: dtypes and quantization from the recipe's fixed
sets, adapter names by the registry's rule, module names and file paths by pattern, every number finite, the
stored recipe by the recipe's own schema. The digest is a checksum, not a signature: anyone can recompute it.
What keeps a crafted file from reaching the code that uses its values is the schema.

The schema is strict (no coercion). A reader gets the typed model back (:data:`StoredMetadata`), never the
dict: every field a consumer reads is named and typed here, so a misspelt key fails at import-time checks and in
tests rather than as a ``KeyError`` in one command, and a field that changes is changed in one place. Writers
build a plain dict, which :func:`problems` checks before it is sealed; :meth:`_Schema.to_json` gives a section
back as the file held it, for a derived adapter that copies it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, SerializeAsAny, StringConstraints, ValidationError,
                      field_validator, model_validator)

from ..errors import PeftkitError
from ..tasks.base import HeadState, StateText
from .recipe import Dtype, QuantizationSection, Recipe

if TYPE_CHECKING:
    from ..tasks import TaskHead

FORMAT_VERSION = 2  # 2: peftkit.json carries its own digest
DIGEST = "digest"


def _finite_json(value: Any) -> Any:
    """JSON data (objects with text keys, arrays, text, booleans, null, numbers), every number finite."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError("keys must be text")
            _finite_json(item)
    elif isinstance(value, list):
        for item in value:
            _finite_json(item)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"numbers must be finite (got {value})")
    elif not (value is None or isinstance(value, (bool, int, float, str))):
        raise ValueError(f"not JSON data ({type(value).__name__})")
    return value


def _adapter_name(name: str) -> str:
    from ..naming import check_adapter_name

    try:
        return check_adapter_name(name)
    except PeftkitError as exc:
        raise ValueError(str(exc)) from None


def _relative_file(path: str) -> str:
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or "\\" in path or any(p in ("..", ".") for p in parts):
        raise ValueError("a file inside the folder, by its relative path")
    return path


def _timestamp(text: str) -> str:
    dt.datetime.fromisoformat(text)  # ValueError when it is not one
    return text


JsonDict = Annotated[dict[str, Any], AfterValidator(_finite_json)]
Line = StateText  # text that lands in a model card: one line, no control characters, no backquote
AdapterName = Annotated[str, AfterValidator(_adapter_name)]
FolderName = Annotated[str, StringConstraints(pattern=r"^[^/\\\x00-\x1f\x7f`]+$")]  # an export's or merge's --out
ModuleName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.]+$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Fingerprint = Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]
Timestamp = Annotated[str, AfterValidator(_timestamp)]
Files = dict[Annotated[str, AfterValidator(_relative_file)], Sha256]
Count = Annotated[int, Field(ge=0)]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    def to_json(self) -> dict[str, Any]:
        """This section as the file held it (keys it left out stay out), for a writer that copies it."""
        return self.model_dump(mode="json", exclude_unset=True)


class TaskInfo(_Schema):
    type: str
    options: JsonDict
    # what the head learned from the data, typed by the head's own schema (``TaskHead.State``: a classifier's
    # labels, a causal LM's data format), so that a new head brings its state's schema in its own file
    state: SerializeAsAny[HeadState]

    @model_validator(mode="before")
    @classmethod
    def _state_of_its_head(cls, data: Any) -> Any:
        from ..tasks import task_types

        if isinstance(data, dict) and isinstance(data.get("state"), dict) and data.get("type") in task_types():
            head = task_types()[data["type"]]
            try:
                data = {**data, "state": head.State.model_validate(data["state"])}
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(["state", *(str(part) for part in error["loc"])])
                raise ValueError(f"{where}: {_message(error['msg'])} (a {head.name} head's state)") from None
        return data

    def head(self) -> "TaskHead":
        """The task head the adapter was trained with, with what it learned from the data."""
        from ..tasks import make_task

        return make_task(self.type, self.options, self.state.to_json())

    @field_validator("type")
    @classmethod
    def _known(cls, value: str) -> str:
        from ..tasks import task_types

        if value not in task_types():
            raise ValueError(f"unknown task type {value!r}")
        return value


class BaseInfo(_Schema):
    identity: Line
    source: Literal["packaged", "local", "hub"]
    path: Line
    fingerprint: Fingerprint
    dtype: Dtype
    quantization: QuantizationSection
    memory_bytes: Count


class AdaLoraInfo(_Schema):
    init_r: Count
    target_r: Count
    target_budget: Count
    final_budget: Count
    final_ranks: dict[ModuleName, Count]
    reallocations: Count
    budget_history: list[Annotated[list[Count], Field(min_length=2, max_length=2)]]
    schedule: dict[Literal["total_step", "tinit", "tfinal"], Count]


class AdapterInfo(_Schema):
    method: Literal["lora", "adalora", "full"]
    targets: list[ModuleName]
    head_modules: list[ModuleName]
    rank_pattern: Optional[dict[ModuleName, Count]] = None
    trainable_parameters: Count
    total_parameters: Optional[Count]
    adalora: Optional[AdaLoraInfo] = None


class AugmentationInfo(_Schema):
    """``data.augment`` as the run applied it (``peftkit.core.augment.Augmentation.record``): the settings, the
    copies ``auto`` resolved to, and the training rows before and after."""

    method: Literal["eda"]
    copies: Annotated[int, Field(ge=1)]
    alpha_sr: float
    alpha_ri: float
    alpha_rs: float
    p_rd: float
    keep_original: bool
    column: Line
    thesaurus: Line
    rows_before: Count
    rows_after: Count


class TrainingInfo(_Schema):
    optimizer_steps: Count
    steps_per_epoch: Count
    train_rows: Count
    eval_rows: Count
    seconds: float
    examples: Count
    examples_per_second: Optional[float]
    device: Line
    num_processes: Count
    augmentation: Optional[AugmentationInfo] = None


class _Common(_Schema):
    format_version: int  # checked against FORMAT_VERSION first, by validate
    digest: Sha256
    created: Timestamp
    versions: dict[str, Line]
    task: TaskInfo
    base: BaseInfo
    adapter: AdapterInfo
    metrics: dict[Line, float]
    key_metric: Optional[Line]
    recipe: Recipe
    files: Files


class AdapterMetadata(_Common):
    """A registered adapter: trained, combined, converted."""

    name: AdapterName
    history: list[dict[Line, float]] = Field(default_factory=list)
    training: Optional[TrainingInfo] = None
    provenance: JsonDict


class _Derived(_Common):
    name: FolderName
    source_files: Files
    source_created: Optional[Timestamp]


class ExportMetadata(_Derived):
    kind: Literal["export"]
    format: Literal["peft", "gguf"]  # pinned to peftkit.ops.export.formats() by a test
    exported_from: AdapterName
    check: Optional[JsonDict]


class MergeInfo(_Schema):
    dtype: Dtype
    quantize: Optional[Literal["nf4", "fp4", "int8"]]
    quantization: Optional[QuantizationSection]
    how: Line


class MergedMetadata(_Derived):
    kind: Literal["merged"]
    merged_from: AdapterName
    merge: MergeInfo
    drift: JsonDict
    merge_rounding: JsonDict


KINDS: dict[Optional[str], type[_Common]] = {None: AdapterMetadata, "export": ExportMetadata,
                                             "merged": MergedMetadata}
StoredMetadata = Union[AdapterMetadata, ExportMetadata, MergedMetadata]


def digest(metadata: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces, ASCII) of everything but the digest itself."""
    rest = {k: v for k, v in metadata.items() if k != DIGEST}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _message(text: str) -> str:
    text = text.removeprefix("Value error, ")
    return text[:1].lower() + text[1:]


def parse(metadata: dict[str, Any]) -> tuple[Optional[StoredMetadata], list[str]]:
    """``metadata`` as its typed model, and what is wrong with it against the schema, one ``key.path: message``
    each (the model is None unless that list is empty)."""
    from ..tasks import validate_task_options

    kind = metadata.get("kind")
    if kind not in KINDS:
        return None, [f"kind: unknown kind {kind!r}"]
    try:
        model = KINDS[kind].model_validate(metadata, strict=True)
    except ValidationError as exc:
        return None, [f"{'.'.join(str(part) for part in e['loc'])}: {_message(e['msg'])}" for e in exc.errors()]
    recipe_task = {k: v for k, v in metadata["recipe"]["task"].items() if k != "type"}
    found = (validate_task_options(model.task.type, model.task.options, internal=True)
             + [f"recipe.{p}" for p in validate_task_options(metadata["recipe"]["task"]["type"], recipe_task)])
    return (None if found else model), found


def problems(metadata: dict[str, Any]) -> list[str]:
    """What is wrong with ``metadata`` against the schema (empty when valid)."""
    return parse(metadata)[1]


def validate(metadata: Any, path: Path) -> StoredMetadata:
    """``metadata`` as read from ``path`` (JSON, every number finite), refused in one line unless it is a
    peftkit.json in this version's format, unedited and valid."""
    fix = "restore the folder from a copy you trust, or retrain the adapter"
    if not isinstance(metadata, dict) or not isinstance(metadata.get("format_version"), int):
        raise PeftkitError(f"{path} is not peftkit metadata (no format_version); {fix}")
    version = metadata["format_version"]
    if version > FORMAT_VERSION:
        raise PeftkitError(f"{path} is format {version}, written by a newer peftkit (this one reads format "
                           f"{FORMAT_VERSION}); upgrade peftkit: pip install -U peftkit")
    if version < FORMAT_VERSION:
        raise PeftkitError(f"{path} is format {version}, written by an earlier peftkit without a checksum of its "
                           f"own, which this one does not read (format {FORMAT_VERSION}); retrain the adapter")
    if metadata.get(DIGEST) != digest(metadata):
        raise PeftkitError(f"{path} was edited or is corrupt (its digest does not match its content); {fix}")
    model, found = parse(metadata)
    if model is None:
        shown = "; ".join(found[:3]) + (f"; and {len(found) - 3} more" if len(found) > 3 else "")
        raise PeftkitError(f"{path} does not hold valid peftkit metadata ({shown}); {fix}")
    return model

