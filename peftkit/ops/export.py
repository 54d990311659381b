"""Export a registered adapter for tools that know nothing of peftkit.

``peft`` format: the adapter's own peft files (task head included, as ``modules_to_save``), its base named
portably in ``adapter_config.json`` (the hub id of a packaged base), the tokenizer, and a model card whose
loading snippet is the exact transformers + peft code to use. The export checks itself by loading the
adapter as that snippet does (:func:`peftkit.ops.model_card.peft_load`: the snippet's calls as fixed code on the
same values, on the local copy of the base) and comparing its logits with peftkit's own loading of the
adapter, so the card's code is known to work and to predict what peftkit predicts. No text is executed: the
values come from the validated metadata, never code built from it (``tests/test_export.py`` runs the card's
own text, in a fresh process).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

from ..config.metadata import AdapterMetadata
from ..config.recipe import BaseModelSection
from ..core.models import user_trust
from ..errors import PeftkitError
from ..store.artifacts import build_metadata, seal, staged_folder
from ..store.registry import Registry
from ..store.snapshot import read_verified
from .merge import check_output, derived_fields, folder_bytes, same_adapter, source_adapter

PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")
GGUF_FILE = "adapter.gguf"


def formats() -> dict[str, Callable[..., dict[str, Any]]]:
    """Export formats by name; one function each."""
    return {"peft": export_peft, "gguf": export_gguf}


def export_peft(files: dict[str, bytes], metadata: AdapterMetadata, staging: Path, out: Path,
                base_section: BaseModelSection) -> dict[str, Any]:
    """Write the peft-format export of the adapter whose verified ``files`` are given into ``staging``; return
    what the card needs and how to load the export as the card says (``load_plain``)."""
    from ..core.models import load_tokenizer, resolve_base
    from . import model_card

    for name in PEFT_FILES:
        (staging / name).write_bytes(files[name])
    config_path = staging / "adapter_config.json"
    config = json.loads(config_path.read_text())
    portable = model_card.hub_base_id(metadata)
    config["base_model_name_or_path"] = portable
    config["inference_mode"] = True
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    base = resolve_base(base_section)
    load_tokenizer(base, base_section).save_pretrained(staging)
    auto = model_card.model_class_name(metadata)
    return {
        "snippet": model_card.peft_snippet(metadata, str(out), portable, auto),
        "load_plain": lambda: model_card.peft_load(metadata, str(staging), str(base.path), auto),
        "base": portable,
        "summary": "It loads with transformers and peft alone, task head included.",
        "checked_as": "the model card's code (plain transformers + peft)",
    }


def export_gguf(files: dict[str, bytes], metadata: AdapterMetadata, staging: Path, out: Path,
                base_section: BaseModelSection) -> dict[str, Any]:
    """Write a llama.cpp LoRA adapter (``adapter.gguf``, :mod:`peftkit.ops.gguf_export`) into ``staging``. Its
    check (``load_plain``) reads the file back as llama.cpp does and adds each update it holds to the base's
    layer outputs, on the base loaded as the peft export's card loads it."""
    from transformers import AutoConfig

    from ..core.models import resolve_base
    from . import gguf_export, model_card

    base = resolve_base(base_section)
    base_config = AutoConfig.from_pretrained(base.path)
    weights, config = gguf_export.adapter_as_lora(files, metadata.adapter.method)
    why = gguf_export.refusal(metadata.name, metadata.task.type, config, weights, base_config.model_type)
    if why:
        raise PeftkitError(f"--format gguf: {why}")
    factors = gguf_export.lora_factors(weights, config)
    alpha = float(config["lora_alpha"])
    path = staging / GGUF_FILE
    gguf_export.write_gguf(path, gguf_export.gguf_tensors(factors, base_config, alpha), base_config, alpha,
                           metadata.name)
    portable = model_card.hub_base_id(metadata)
    auto = model_card.model_class_name(metadata)

    def load_plain() -> Any:
        return with_updates(model_card.plain_base(metadata, str(base.path), auto),
                            gguf_export.read_deltas(path, base_config))

    snippet = (f"# llama.cpp, with a GGUF file of the base model ({portable}):\n"
               f"llama-cli -m BASE.gguf --lora {out / GGUF_FILE} -p \"Hello\"\n"
               f"# llama-cpp-python:\n"
               f"python -c 'from llama_cpp import Llama; "
               f"print(Llama(\"BASE.gguf\", lora_path=\"{out / GGUF_FILE}\")(\"Hello\"))'\n")
    return {"snippet": snippet, "load_plain": load_plain, "base": portable, "library": "gguf",
            "snippet_language": "sh", "checked_as": "the GGUF file's updates, read back as llama.cpp applies them",
            "summary": (f"A llama.cpp LoRA adapter (`{GGUF_FILE}`, float32, {len(factors)} layers): load it beside "
                        "any GGUF file of the base model.")}


def with_updates(model: Any, deltas: dict[str, Any]) -> Any:
    """``model`` with each update of ``deltas`` (module path -> weight update) added to its layer's output by a
    forward hook: the float base stays as loaded (quantized, if it was), as LoRA's own forward leaves it."""
    import torch

    def hook(delta: torch.Tensor) -> Callable[..., Any]:
        return lambda module, args, output: output + torch.nn.functional.linear(
            args[0].to(delta.dtype), delta).to(output.dtype)

    for module, delta in deltas.items():
        model.get_submodule(module).register_forward_hook(hook(delta.to(model.device)))
    return model.eval()


def export(registry: Registry, source: str, fmt: str, out: str | Path, force: bool = False, check_rows: int = 16,
           data_file: Optional[str] = None, say: Callable[[str], None] = lambda line: None,
           trust_remote_code: bool = False, allow_pickle: bool = False) -> dict[str, Any]:
    """Export adapter ``source`` in format ``fmt`` to the folder ``out``; return a summary with the check.

    ``trust_remote_code`` and ``allow_pickle`` are the caller's alone,
    as for :func:`peftkit.store.loading.load_trained`.
    """
    from ..core.cpu_paths import describe_path, path_for
    from ..core.drift import compare, describe, sample_inputs, scored_logits
    from ..store.loading import load_trained
    from . import model_card

    known = formats()
    if fmt not in known:
        raise PeftkitError(f"--format: unknown format {fmt!r}; use one of: {', '.join(known)}")
    out = Path(out)
    folder, metadata = source_adapter(registry, source, action="export")
    check_output(out, force, [folder, registry.root])
    name = metadata.name
    base_section = user_trust(metadata.recipe.base, name, trust_remote_code, allow_pickle)
    # the files exported are the bytes checked against the metadata, read once (a file replaced meanwhile cannot
    # slip into the export)
    files = read_verified(folder, metadata)
    with staged_folder(out, overwrite=force) as staging:
        written = known[fmt](files, metadata, staging, out, base_section)
        check = None
        if check_rows > 0:
            # the same bitsandbytes CPU path as plain peft takes here, so the two can agree to float rounding
            loaded = load_trained(folder, packed_inference=True, trust_remote_code=trust_remote_code,
                                  allow_pickle=allow_pickle)
            same_adapter(loaded, metadata, source)
            path = path_for(metadata.base.quantization.bits, loaded.model.device.type, True)
            sample = sample_inputs(loaded, data_file, check_rows)
            reference = scored_logits(loaded.model, sample)
            loaded.model = None
            plain = written["load_plain"]()
            check = {"reference": f"{name} loaded by peftkit", "source": sample.source, "rows": sample.rows,
                     **compare(reference, scored_logits(plain, sample)), "cpu_4bit_path": path}
            del plain
            say(f"checked: {written['checked_as']} against peftkit: {describe(check)}"
                + (f"; {describe_path(path)}" if path else ""))
        bits = metadata.base.quantization.bits
        summary = (f"The adapter `{name}` ({metadata.adapter.method}, trained by peftkit) in {fmt} format, "
                   f"for the base `{written['base']}`"
                   + (" loaded in 4 bits" if bits == 4 else " loaded in 8 bits" if bits == 8 else "")
                   + ". " + written["summary"])
        model_card.write(staging, model_card.render(
            metadata, "adapter", f"{out.name}: {name}", summary, written["snippet"], written.get("library", "peft"),
            check=check, snippet_language=written.get("snippet_language", "python")))
        seal(staging, build_metadata(
            kind="export", format=fmt, name=out.name, exported_from=name, **derived_fields(metadata), check=check))
    return {"folder": out, "check": check, "size_bytes": folder_bytes(out)}
