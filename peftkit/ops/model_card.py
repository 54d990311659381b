"""The README.md written with every merge and export: the hub's YAML metadata header, what the folder holds,
its measured figures, and the exact code that loads it.

The header is rendered by ``huggingface_hub.ModelCardData`` (the hub's own schema) rather than by hand.
The loading snippet is generated from the same objects peftkit loads with (the ``BitsAndBytesConfig`` of
:func:`peftkit.core.models.bnb_config`, the label map saved with the adapter), so it cannot drift from them.
Its text is made from those objects through fixed spellings (a torch dtype by its name in torch, every
other value by ``repr``), never from the metadata's text, so a crafted ``peftkit.json`` cannot put code in
a card; and peftkit never runs the text: :func:`peft_load` is the snippet as a function, on the same values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..config.metadata import AdapterMetadata
from ..config.recipe import DataSection

# peft task type -> the hub's pipeline tag
PIPELINE_TAGS = {"SEQ_CLS": "text-classification", "CAUSAL_LM": "text-generation",
                 "TOKEN_CLS": "token-classification", "SEQ_2_SEQ_LM": "text2text-generation"}


def auto_class_name(peft_task_type: str) -> str:
    """The transformers auto class for a peft task type, as peft's own AutoPeftModel classes pair them."""
    import peft.auto as auto

    wanted = auto.MODEL_TYPE_TO_PEFT_MODEL_MAPPING[peft_task_type]
    for candidate in vars(auto).values():
        if (isinstance(candidate, type) and issubclass(candidate, auto._BaseAutoPeftModel)
                and candidate._target_peft_class is wanted and candidate._target_class is not None):
            return candidate._target_class.__name__
    return "AutoModel"


def hub_base_id(metadata: AdapterMetadata) -> str:
    """The base model as another machine can name it: the hub id of a packaged model, else its identity."""
    from ..core.models import PACKAGED

    identity = metadata.base.identity
    return PACKAGED[identity].hub_id if identity in PACKAGED else identity


def _dtype_code(dtype: Any) -> str:
    return "torch." + str(dtype).removeprefix("torch.")  # a torch.dtype object, never a name from the metadata


def bnb_config_code(config: Any) -> str:
    """A ``BitsAndBytesConfig`` as Python source, exactly as peftkit built it for training."""
    import torch

    if config.load_in_8bit:
        args = ["load_in_8bit=True"]
    else:
        args = ["load_in_4bit=True", f"bnb_4bit_quant_type={config.bnb_4bit_quant_type!r}",
                f"bnb_4bit_use_double_quant={bool(config.bnb_4bit_use_double_quant)}",
                f"bnb_4bit_compute_dtype={_dtype_code(config.bnb_4bit_compute_dtype)}"]
        if config.bnb_4bit_quant_storage != torch.uint8:  # packed into a float dtype, for FSDP
            args.append(f"bnb_4bit_quant_storage={_dtype_code(config.bnb_4bit_quant_storage)}")
    if config.llm_int8_skip_modules:
        args.append(f"llm_int8_skip_modules={list(config.llm_int8_skip_modules)!r}")
    return "BitsAndBytesConfig(" + ", ".join(args) + ")"


def base_arguments(metadata: AdapterMetadata) -> list[list[tuple[str, Any, str]]]:
    """The keyword arguments of the base's ``from_pretrained`` in the card's snippet, as ``(name, value, source)``,
    one group per line of the snippet: the dtype, the label map, the quantization and where it runs."""
    import torch

    from ..core.models import bnb_config, torch_dtype

    dtype = torch_dtype(metadata.base.dtype)
    groups = [[("dtype", dtype, _dtype_code(dtype))]]
    labels = metadata.task.head().output_labels()
    if labels:
        id2label = {i: name for i, name in enumerate(labels)}
        label2id = {name: i for i, name in enumerate(labels)}
        groups.append([("num_labels", len(labels), repr(len(labels))), ("id2label", id2label, repr(id2label)),
                       ("label2id", label2id, repr(label2id))])
    keep = [*metadata.adapter.head_modules, *metadata.task.head().unquantized_modules]  # as training kept them
    config = bnb_config(metadata.base.quantization, list(dict.fromkeys(keep)))
    if config is not None:
        groups += [[("quantization_config", config, bnb_config_code(config))],
                   [("device_map", {"": "cuda:0" if torch.cuda.is_available() else "cpu"},
                     '{"": "cuda:0" if torch.cuda.is_available() else "cpu"}')]]
    return groups


def peft_snippet(metadata: AdapterMetadata, folder: str, base: str, auto: str) -> str:
    """Plain transformers + peft code that loads an exported adapter on its base (``auto``: the auto class)."""
    groups = base_arguments(metadata)
    quantized = any(name == "quantization_config" for group in groups for name, _, _ in group)
    imports = [auto, "AutoTokenizer"] + (["BitsAndBytesConfig"] if quantized else [])
    kwargs = [", ".join(f"{name}={source}" for name, _, source in group) for group in groups]
    args = ",\n    ".join([repr(base), *kwargs])
    return (f"import torch\nfrom peft import PeftModel\nfrom transformers import {', '.join(imports)}\n\n"
            f"base = {auto}.from_pretrained(\n    {args},\n)\n"
            f"model = PeftModel.from_pretrained(base, {folder!r}).eval()\n"
            f"tokenizer = AutoTokenizer.from_pretrained({folder!r})\n")


def plain_base(metadata: AdapterMetadata, base: str, auto: str) -> Any:
    """The base as :func:`peft_snippet`'s code loads it, before the adapter."""
    import transformers

    kwargs = {name: value for group in base_arguments(metadata) for name, value, _ in group}
    return getattr(transformers, auto).from_pretrained(base, **kwargs)


def peft_load(metadata: AdapterMetadata, folder: str, base: str, auto: str) -> Any:
    """The ``model`` that :func:`peft_snippet`'s code builds, built by this fixed code on the same arguments."""
    from peft import PeftModel

    return PeftModel.from_pretrained(plain_base(metadata, base, auto), folder).eval()


def merged_snippet(folder: str, auto: str, quantized: bool) -> str:
    device = ', device_map={"": "cuda:0" if torch.cuda.is_available() else "cpu"}' if quantized else ""
    return (f"import torch\nfrom transformers import {auto}, AutoTokenizer\n\n"
            f"model = {auto}.from_pretrained({folder!r}{device}).eval()\n"
            f"tokenizer = AutoTokenizer.from_pretrained({folder!r})\n")


def model_class_name(metadata: AdapterMetadata) -> str:
    """The transformers auto class of the adapter's task model: its head's own (``TaskHead.auto_class``), else
    peft's pairing for the head's peft task type."""
    from ..tasks import task_types

    head = task_types()[metadata.task.type]
    return head.auto_class or auto_class_name(head.peft_task_type)


def pipeline_tag(metadata: AdapterMetadata) -> Optional[str]:
    from ..tasks import task_types

    head = task_types()[metadata.task.type]
    return head.pipeline_tag or PIPELINE_TAGS.get(head.peft_task_type)


def _data_sets(data: DataSection) -> tuple[list[str], list[str]]:
    """The recipe's data as (hub data set ids, local files): the card's ``datasets:`` key takes hub ids only, the
    hub links each to its page; local files are named in the card's text instead."""
    from ..core.data import names_a_file

    locations = [location for source in data.sources() for location in (source.train, source.eval)
                 if location]
    local = [loc for loc in locations if names_a_file(loc)]
    hub = [loc for loc in locations if loc not in local]
    return list(dict.fromkeys(hub)), list(dict.fromkeys(local))


def _tags(metadata: AdapterMetadata, kind: str, quantized_to: Optional[str]) -> list[str]:
    quant = metadata.base.quantization
    tags = ["peftkit", metadata.adapter.method, kind]
    if quant.bits:
        tags += ["bitsandbytes", "4-bit" if quant.bits == 4 else "8-bit"]
        tags += [quant.quant_type] if quant.bits == 4 else []
    if quantized_to:
        tags.append(quantized_to)
    return list(dict.fromkeys(tags))


def render(metadata: AdapterMetadata, kind: str, title: str, summary: str, snippet: str,
           library: str, drift: Optional[dict[str, Any]] = None, quantized_to: Optional[str] = None,
           check: Optional[dict[str, Any]] = None, snippet_language: str = "python") -> str:
    """The model card's text; ``metadata`` is the source adapter's peftkit metadata, ``check`` an export's
    comparison of the card's code with peftkit."""
    from huggingface_hub import ModelCardData

    metrics = dict(metadata.metrics)
    hub_data, local_data = _data_sets(metadata.recipe.data)
    card = ModelCardData(
        base_model=hub_base_id(metadata), library_name=library, tags=_tags(metadata, kind, quantized_to),
        datasets=hub_data or None, metrics=sorted(metrics) or None,
        pipeline_tag=pipeline_tag(metadata),
    )
    lines = ["---", card.to_yaml(), "---", "", f"# {title}", "", summary, ""]
    if local_data:
        lines += ["## Training data", "", "Local files, as the recipe named them:", ""]
        lines += [f"- `{location}`" for location in local_data] + [""]
    if metrics:
        evaluated = metadata.training.eval_rows if metadata.training else None
        lines += [f"## Evaluation of the source adapter ({metadata.name}"
                  + (f", {evaluated} rows of {metadata.recipe.data.eval}" if evaluated else "") + ")",
                  "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items()] + [""]
    if drift:
        lines += ["## Measured drift against the adapter on its base, as trained", "",
                  f"On {drift['rows']} rows of `{drift['source']}`:", "", "| | |", "|---|---|"]
        for key in ("max_rel_diff", "mean_rel_diff", "max_abs_diff", "label_agreement", "positions"):
            value = drift[key]
            lines.append(f"| {key} | {value:.3e} |" if isinstance(value, float) and key != "label_agreement"
                         else f"| {key} | {value} |")
        lines.append("")
    if (quantized_to in ("nf4", "fp4")) if kind == "merged" else metadata.base.quantization.bits == 4:
        lines += _cpu_path_section(check)
    lines += ["## Loading", "", f"```{snippet_language}", snippet.rstrip(), "```", "",
              "## Provenance", "", "```json",
              json.dumps({"source_adapter": metadata.name, "base": metadata.base.identity,
                          "base_fingerprint": metadata.base.fingerprint,
                          "quantization": metadata.base.quantization.model_dump(mode="json"),
                          "adapter_created": metadata.created}, indent=2),
              "```", ""]
    return "\n".join(lines)


def _cpu_path_section(check: Optional[dict[str, Any]]) -> list[str]:
    """What a user of a 4-bit model on a CPU should expect (see :mod:`peftkit.core.cpu_paths`)."""
    from ..core.cpu_paths import MEASURED_PACKED_DIFFERENCE, cpu_model

    lines = ["## 4-bit layers on a CPU", "",
             "On a CPU with AVX512-BF16 (Intel Xeons from Cooper Lake on, AMD EPYC from Zen 4 on), bitsandbytes runs "
             "4-bit layers through a packed bfloat16 kernel whenever the model predicts without gradients; training "
             "computed them "
             "in float32. Outputs there differ from the evaluation above by bfloat16 rounding "
             f"({MEASURED_PACKED_DIFFERENCE}, measured by peftkit on MiniLM). Other CPUs, and GPUs, take the "
             "float32 path.", ""]
    if check and check.get("cpu_4bit_path"):
        lines += [f"This export was checked on {cpu_model()}, on the {check['cpu_4bit_path']} path: the card's code "
                  f"against peftkit on the same path differed by at most {check['max_rel_diff']:.2e} of the largest "
                  "logit.", ""]
    return lines


def write(folder: Path, text: str) -> None:
    (folder / "README.md").write_text(text)
