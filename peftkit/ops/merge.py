"""Merge a trained adapter into its base: one plain transformers model, with its drift measured.

Why not peft's ``merge_and_unload`` on the model as trained: on a 4-bit base peft dequantizes each weight,
adds the update and quantizes the sum again, so the merged weights are rounded back to 4 bits and the
outputs move by several percent, silently. The adapter learned its update against the *dequantized* weights
``dequant(Q(W))``, so the exact merge is::

    W_merged = dequant(Q(W)) + scaling * B A          (in float32; AdaLoRA: B (E * A) * alpha / r0)

done here by loading the base quantized exactly as in training, dequantizing it with transformers'
``dequantize`` (bitsandbytes' ``dequantize_4bit`` / int8 vector-wise dequantization), putting the adapter on
that float copy and letting peft merge it there (LoRA and AdaLoRA alike; modules_to_save become the task
head). The merged model is then cast to ``--dtype``, or re-quantized with ``--quantize`` (the drift that
costs is measured and refused past ``--max-drift``).

Every merge is checked on the folder it wrote, reloaded with plain transformers, against the adapter on its
base as trained (:mod:`peftkit.core.drift`). On an 8-bit base that drift is not zero even for the exact merge:
LLM.int8 also rounds every layer's *activations* to int8, which no set of float weights reproduces; the
merge's own rounding (merged vs. the adapter on the dequantized base) is reported beside it.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config.metadata import AdapterMetadata, ExportMetadata, MergedMetadata, StoredMetadata
from ..config.recipe import QuantizationSection
from ..core.drift import Sample, compare, describe, sample_inputs, scored_logits
from ..errors import PeftkitError
from ..finite import check_finite
from ..store.artifacts import METADATA_FILE, build_metadata, read_metadata, seal, staged_folder
from ..store.registry import Registry

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}
QUANTIZE = ("nf4", "fp4", "int8")
# max_rel_diff of the logits against base+adapter. Measured on MiniLM SST-2 (README): an exact float32 merge
# moves them by 6e-7, NF4 re-quantization by 0.73 with 90.6 % of labels the same, which this refuses; on the
# tiny test models bfloat16 moves them by ~6e-3.
DEFAULT_MAX_DRIFT = 0.25
FLOAT_SUBFOLDER = ".float32"


@dataclass
class MergeResult:
    folder: Path
    drift: dict[str, Any]
    merge_rounding: dict[str, Any]
    size_bytes: int


def source_adapter(registry: Registry, source: str, action: str = "merge") -> tuple[Path, StoredMetadata]:
    """The folder and metadata of a registered adapter name, or of an adapter folder given by its path; refuses
    what has nothing left to merge. Its files are checked where they are read (``read_verified``, ``load_trained``)."""
    if os.sep in source or source.startswith("."):
        folder = Path(source)
        if not (folder / METADATA_FILE).is_file():
            raise PeftkitError(f"{source} is not a peftkit adapter folder (no {METADATA_FILE}); give a registered "
                               "adapter name (`peftkit adapters list`) or an adapter's folder")
    else:
        folder = registry.folder(source)
    metadata = read_metadata(folder)
    if isinstance(metadata, MergedMetadata):
        raise PeftkitError(f"{source} is already merged (from adapter {metadata.merged_from}): there is no adapter "
                           f"left in it to {action}; {action} the adapter itself: peftkit {action} "
                           f"{metadata.merged_from} --out DIR")
    if isinstance(metadata, ExportMetadata):
        raise PeftkitError(f"{source} is an export of adapter {metadata.exported_from}; {action} the registered "
                           f"adapter instead: peftkit {action} {metadata.exported_from} --out DIR")
    if metadata.recipe.adapter is None:
        raise PeftkitError(f"{source} is a full fine-tune: it is already a whole transformers model with no adapter "
                           f"to {action}; load its folder with from_pretrained as it is")
    return folder, metadata


def derived_fields(metadata: AdapterMetadata) -> dict[str, Any]:
    """What an export or a merged model records of the adapter it was made from."""
    return {"source_files": metadata.files, "source_created": metadata.created, "task": metadata.task.to_json(),
            "base": metadata.base.to_json(), "adapter": metadata.adapter.to_json(), "metrics": metadata.metrics,
            "key_metric": metadata.key_metric, "recipe": metadata.recipe.to_dict()}


def same_adapter(loaded: Any, metadata: StoredMetadata, source: str) -> None:
    """Refuse when the adapter loaded is not the one checked before (replaced in between, by a rerun of
    ``peftkit train --overwrite`` say): what is written must describe the weights it holds."""
    if loaded.metadata.digest != metadata.digest:
        raise PeftkitError(f"{source} was replaced while it was being read; nothing was written, run the command "
                           "again")


def check_output(out: Path, force: bool, protected: list[Path]) -> None:
    """Refuse an existing ``out`` without ``force``, and always one that holds an adapter we would delete."""
    resolved = out.resolve()
    for keep in protected:
        keep = keep.resolve()
        if resolved == keep or resolved in keep.parents:
            raise PeftkitError(f"--out {out} would replace {keep}, the adapter being read; choose another --out")
    if out.exists() and not force:
        raise PeftkitError(f"--out {out} already exists; choose another folder or pass --force to replace it")


def parse_dtype(name: Optional[str], default: str) -> str:
    if name is None:
        return default
    if name not in DTYPES:
        raise PeftkitError(f"--dtype: unknown dtype {name!r}; use one of: fp32, bf16, fp16 (or float32, bfloat16, "
                           "float16)")
    return DTYPES[name]


def requantization(quantize: Optional[str], source_quant: QuantizationSection, dtype: str) -> Any:
    """The QuantizationSection for ``--quantize`` (4-bit keeps the source's double quantization)."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE:
        raise PeftkitError(f"--quantize: unknown type {quantize!r}; use one of: {', '.join(QUANTIZE)}")
    if quantize == "int8":
        return QuantizationSection(bits=8)
    double = source_quant.double_quant if source_quant.bits == 4 else True
    return QuantizationSection(bits=4, quant_type=quantize, double_quant=double, compute_dtype=dtype)


def _auto_class(metadata: StoredMetadata) -> Any:
    import transformers

    from .model_card import model_class_name

    return getattr(transformers, model_class_name(metadata))


def merged_float_model(loaded: Any, sample: Sample, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """The adapter merged in float32 into the dequantized base, and the merge's own rounding on ``sample``."""
    from peft import PeftModel

    from ..core.models import load_base_for_task, resolve_base

    base = load_base_for_task(loaded.recipe, loaded.task, resolve_base(loaded.recipe.base), loaded.tokenizer, device)
    if loaded.recipe.quantization.bits is not None:
        base = base.dequantize(dtype=torch.float32)
    base = base.to(torch.float32)
    with warnings.catch_warnings():
        # peft matches AdaLoRA's saved rank_pattern against LoRA-style keys and warns; AdaLoRA applies it
        warnings.filterwarnings("ignore", message=r"The following rank_pattern keys did not match")
        model = PeftModel.from_pretrained(base, loaded.folder).eval()
    unmerged = scored_logits(model, sample)
    merged = model.merge_and_unload().eval()
    return merged, compare(unmerged, scored_logits(merged, sample))


def _reload(folder: Path, auto_class: Any, quantized: bool, device: torch.device) -> Any:
    from ..core.quantized import freeze_quantized_layers

    kwargs = {"device_map": {"": device}} if quantized else {}
    model = auto_class.from_pretrained(folder, **kwargs)
    if not quantized:
        model.to(device)
    freeze_quantized_layers(model)
    return model.eval()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def merge(registry: Registry, source: str, out: str | Path, dtype: Optional[str] = None,
          quantize: Optional[str] = None, data_file: Optional[str] = None, rows: int = 64,
          max_drift: float = DEFAULT_MAX_DRIFT, accept_drift: bool = False, force: bool = False,
          say: Callable[[str], None] = lambda line: None, trust_remote_code: bool = False,
          allow_pickle: bool = False) -> MergeResult:
    """Merge adapter ``source`` into its base and write a transformers model folder at ``out``.

    ``trust_remote_code`` and ``allow_pickle`` are the caller's alone,
    as for :func:`peftkit.store.loading.load_trained`.
    """
    from ..core.cpu_paths import describe_path, path_for
    from ..core.models import bnb_config, describe_quantization
    from ..store.loading import load_trained
    from . import model_card

    out = Path(out)
    folder, metadata = source_adapter(registry, source)
    name = metadata.name
    check_output(out, force, [folder, registry.root])
    target_dtype = parse_dtype(dtype, metadata.base.dtype)
    requant = requantization(quantize, metadata.base.quantization, target_dtype)
    if not max_drift > 0:
        raise PeftkitError(f"--max-drift: {max_drift} leaves no room even for float rounding; give a positive "
                           f"fraction (default {DEFAULT_MAX_DRIFT})")
    try:
        loaded = load_trained(folder, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    except PeftkitError as exc:
        if str(exc).startswith("base.model:"):
            raise PeftkitError(f"cannot merge {name}: its base is not available ({exc})") from None
        raise
    same_adapter(loaded, metadata, source)
    say(f"loaded {name} on {metadata.base.identity} "
        f"({describe_quantization(loaded.recipe.quantization, loaded.recipe.base.dtype)})")
    sample = sample_inputs(loaded, data_file, rows)
    reference = scored_logits(loaded.model, sample)
    device = loaded.model.device
    loaded.model = None  # the reference is taken; free the quantized copy before building the float one

    merged, rounding = merged_float_model(loaded, sample, device)
    check_finite(merged.state_dict().items(), f"{name} merged into its base",
                 f"{name} itself holds them or its base does; nothing was written")
    say(f"merged in float32 into the dequantized base: {describe(rounding)} against the unmerged adapter")
    auto_class = _auto_class(metadata)
    with staged_folder(out, overwrite=force) as staging:
        if requant is None:
            merged.to(torch.device("cpu"), dtype=getattr(torch, target_dtype)).save_pretrained(staging)
        else:
            float_copy = staging / FLOAT_SUBFOLDER
            merged.to(torch.device("cpu")).save_pretrained(float_copy)
            del merged
            quantized = auto_class.from_pretrained(
                float_copy, dtype=getattr(torch, target_dtype), device_map={"": device},
                quantization_config=bnb_config(requant, [*metadata.adapter.head_modules,
                                                         *loaded.task.unquantized_modules]))
            quantized.save_pretrained(staging)
            del quantized
            shutil.rmtree(float_copy)
        loaded.tokenizer.save_pretrained(staging)
        written = _reload(staging, auto_class, requant is not None, device)
        drift = {"reference": f"{name} on its base, as trained", "source": sample.source, "rows": sample.rows,
                 **compare(reference, scored_logits(written, sample)), "max_drift": max_drift}
        del written
        what = f"re-quantized to {quantize}" if quantize else f"in {target_dtype}"
        four_bit = metadata.base.quantization.bits == 4 or quantize in ("nf4", "fp4")
        path = path_for(4 if four_bit else None, device.type, packed_allowed=False)
        say(f"written {what}, reloaded: {describe(drift)} against {name} as trained"
            + (f"; {describe_path(path)}" if path else ""))
        if drift["max_rel_diff"] > max_drift:
            if not accept_drift:
                raise PeftkitError(
                    f"the merged model {what} moves the logits by {drift['max_rel_diff']:.3g} of their largest value "
                    f"(labels agree on {100 * drift['label_agreement']:.1f}% of positions), past --max-drift "
                    f"{max_drift}; nothing was written. Pass --accept-drift to write it anyway, or merge without "
                    "--quantize")
            say(f"Warning: the drift is past --max-drift {max_drift}; written anyway (--accept-drift)")
        drift["accepted_past_max"] = drift["max_rel_diff"] > max_drift
        merge_info = {"dtype": target_dtype, "quantize": quantize,
                      "quantization": requant.model_dump(mode="json") if requant else None,
                      "how": "dequantized base + float32 merge (peft merge_and_unload)"}
        summary = (f"The adapter `{name}` ({metadata.adapter.method}) merged into its base "
                   f"`{metadata.base.identity}` ("
                   f"{describe_quantization(loaded.recipe.quantization, loaded.recipe.base.dtype)} during training): "
                   f"the base was dequantized and the adapter merged in float32, then "
                   + (f"re-quantized to {quantize}." if quantize else f"stored in {target_dtype}.")
                   + " A plain transformers model: no peft needed.")
        model_card.write(staging, model_card.render(
            metadata, "merged", f"{out.name}: {name} merged into {model_card.hub_base_id(metadata)}", summary,
            model_card.merged_snippet(str(out), model_card.model_class_name(metadata), requant is not None),
            "transformers", drift=drift, quantized_to=quantize))
        seal(staging, build_metadata(
            kind="merged", name=out.name, merged_from=name, **derived_fields(metadata), merge=merge_info, drift=drift,
            merge_rounding=rounding))
    return MergeResult(out, drift, rounding, folder_bytes(out))
