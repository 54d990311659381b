"""Load a trained adapter folder back onto a freshly loaded base, checking that both are what they claim."""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.metadata import StoredMetadata
from ..config.recipe import Recipe
from ..core.models import (BaseRef, fingerprint, load_base_for_task, load_tokenizer, pick_device, resolve_base,
                           user_trust)
from ..errors import PeftkitError
from ..tasks import TaskHead
from .artifacts import check_readable, file_head, read_metadata, sha256_file
from .snapshot import read_verified


@dataclass
class LoadedAdapter:
    folder: Path
    metadata: StoredMetadata
    recipe: Recipe
    task: TaskHead
    tokenizer: Any
    model: Any  # in eval mode


def verify_files(folder: Path, metadata: StoredMetadata) -> None:
    """Every file recorded at save time is present with the same sha256."""
    for relative, expected in metadata.files.items():
        path = folder / relative
        if not path.is_file():
            raise PeftkitError(f"{folder}: {relative} is missing; restore it or retrain the adapter")
        if sha256_file(path) != expected:
            raise PeftkitError(f"{path} is corrupt (its checksum differs from the one saved); restore it or retrain")
        check_readable(path, file_head(path, relative), path.stat().st_size)


def check_same_base(base: BaseRef, metadata: StoredMetadata, who: str) -> None:
    """Refuse a base whose weights are not those ``metadata``'s adapter was trained on."""
    found = fingerprint(base.path)
    if found != metadata.base.fingerprint:
        raise PeftkitError(
            f"{who} was trained on {metadata.base.identity} with weights "
            f"{metadata.base.fingerprint[:19]}, but {base.identity} now has {found[:19]}; point "
            "base.model at the original weights, or pass check_base=False if you know they are compatible"
        )


def load_trained(folder: str | Path, device: str = "auto", check_base: bool = True,
                 packed_inference: bool = False, trust_remote_code: bool = False,
                 allow_pickle: bool = False) -> LoadedAdapter:
    """The adapter in ``folder`` on its base model, ready for inference.

    ``check_base=False`` is the expert override for a base whose weights differ from the ones the adapter
    was trained on (a re-saved copy, say); by default that is refused. ``packed_inference=True`` lets 4-bit
    layers run on bitsandbytes' packed bfloat16 CPU kernel where the CPU has one (faster, bfloat16 rounding;
    see :mod:`peftkit.core.cpu_paths`): for a model that only predicts. By default they compute as in training.
    ``trust_remote_code`` and ``allow_pickle`` are the caller's alone: whatever the adapter's stored recipe says,
    it never switches them on (:func:`peftkit.core.models.user_trust`).
    """
    folder = Path(folder)
    metadata = read_metadata(folder)
    # an adapter's files are read once, checked, and peft reads those bytes (a private copy): a file replaced
    # between the check and peft's read cannot slip through. A fully fine-tuned model (the whole model's
    # weights, gigabytes for a large base: a private copy would double the disk it needs) is checked in place
    # before and again after it is loaded from the folder, so a file replaced in between is caught too.
    adapter_files = read_verified(folder, metadata) if metadata.recipe.adapter is not None else None
    if adapter_files is None:
        verify_files(folder, metadata)
    recipe = metadata.recipe
    recipe = recipe.model_copy(update={"base": user_trust(recipe.base, folder.name, trust_remote_code, allow_pickle)})
    task = metadata.task.head()
    base = resolve_base(recipe.base)
    if check_base:
        check_same_base(base, metadata, folder.name)
    tokenizer = load_tokenizer(base, recipe.base)
    torch_device = pick_device(device)
    if recipe.adapter is None:  # full fine-tuning saved the whole model
        whole = BaseRef(folder, metadata.name, "local")
        quantization = recipe.quantization.model_copy(update={"bits": None})
        model = load_base_for_task(recipe.model_copy(update={"quantization": quantization}), task, whole,
                                   tokenizer, torch_device, packed_inference)
        verify_files(folder, metadata)
    else:
        from peft import PeftModel

        model = load_base_for_task(recipe, task, base, tokenizer, torch_device, packed_inference)
        with warnings.catch_warnings():
            # peft matches AdaLoRA's saved rank_pattern against LoRA-style keys and warns; AdaLoRA applies it
            warnings.filterwarnings("ignore", message=r"The following rank_pattern keys did not match")
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*is_gradient_checkpointing")
            with tempfile.TemporaryDirectory(prefix="peftkit-adapter-") as private:
                for relative, blob in adapter_files.items():
                    (Path(private) / relative).parent.mkdir(parents=True, exist_ok=True)
                    (Path(private) / relative).write_bytes(blob)
                model = PeftModel.from_pretrained(model, private, adapter_name="default")
    model.eval()
    return LoadedAdapter(folder, metadata, recipe, task, tokenizer, model)
