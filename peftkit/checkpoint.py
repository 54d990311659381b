"""Training checkpoints: everything needed to continue a killed run as if it had never stopped.

``<runs>/<name>/checkpoints/step-<N>/`` holds the trainable weights (safetensors), the optimizer and LR
scheduler states, every random generator, the position in the data, and AdaLoRA's allocator state. Each
checkpoint is written to a staging folder and renamed into place, so ``--resume`` only ever sees complete
ones; the oldest are pruned to ``train.keep_checkpoints``. Only the main process writes; under FSDP the
weights and optimizer state are first gathered from every process's shard, and scattered back on resume.

Nothing in a checkpoint is a pickle, so a checkpoint someone else crafted cannot run code on ``--resume``:
the states' tensors go to ``training.safetensors`` and everything else to ``training.json``, where tuples,
non-text dict keys (the optimizer's parameter indices) and numpy arrays are spelled out (:func:`to_json`),
so the states come back exactly as they were and a resumed run is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from .artifacts import staged_folder
from .errors import PeftkitError, first_line

if TYPE_CHECKING:
    from .recipe import Recipe

STATE_FILE = "trainer_state.json"
TENSORS_FILE = "training.safetensors"
TRAINING_FILE = "training.json"
PICKLED_FILE = "training.pt"  # where earlier peftkit versions pickled the states; never loaded


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step-*") if (p / STATE_FILE).is_file() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def rng_state() -> dict[str, Any]:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def every_rng_state(world: int) -> list[dict[str, Any]]:
    """Every process's random generators, in rank order; all processes call it. Each process draws its own
    dropout masks, so a resumed multi-process run matches an uninterrupted one only if every process gets its
    own generators back (restoring the main process's everywhere gave every rank the same masks)."""
    if world == 1:
        return [rng_state()]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, rng_state())  # in memory between live processes, never a file
    return gathered


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


# FSDP (version 1) inserts this into parameter names; state dicts and the unwrapped model do not have it
_FSDP_PREFIX = "_fsdp_wrapped_module."


def _full_state_dict_type(model: torch.nn.Module, rank0_only: bool) -> Any:
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=True, rank0_only=rank0_only),
                                FullOptimStateDictConfig(offload_to_cpu=True, rank0_only=rank0_only))


def training_state(model: torch.nn.Module, unwrapped: torch.nn.Module, optimizer: Any,
                   sharded: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainable weights and the optimizer state, whole, as one process holds them.

    Under FSDP each process holds a shard: every process must call this (it gathers), and only the main
    process gets the result (the others get empty dicts), named as in the unwrapped model.
    """
    if not sharded:
        return trainable_state(unwrapped), optimizer.state_dict()
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    trainable = {n.replace(_FSDP_PREFIX, "") for n, p in model.named_parameters() if p.requires_grad}
    with _full_state_dict_type(model, rank0_only=True):
        weights = {n: t.contiguous() for n, t in model.state_dict().items() if n in trainable}
        optimizer_state = FSDP.optim_state_dict(model, optimizer)
    return weights, optimizer_state


# How training.json spells what JSON has no word for; each is a one-key object. A dict whose keys are not all
# text, or that has a key starting with "$", is written as a list of pairs so it cannot pass for one of these.
_TENSOR, _TUPLE, _ITEMS, _ARRAY = "$tensor", "$tuple", "$items", "$ndarray"


def to_json(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON data, its tensors moved into ``tensors`` (named by number) and referred to by name."""
    import numpy as np

    if isinstance(value, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = value.detach().cpu().contiguous()
        return {_TENSOR: name}
    if isinstance(value, np.ndarray):
        return {_ARRAY: [value.dtype.str, list(value.shape), value.ravel().tolist()]}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {_TUPLE: [to_json(v, tensors) for v in value]}
    if isinstance(value, list):
        return [to_json(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: to_json(v, tensors) for k, v in value.items()}
        return {_ITEMS: [[to_json(k, tensors), to_json(v, tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a checkpoint cannot hold a {type(value).__name__}")  # a bug: every state is plain data


def from_json(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`to_json`; a malformed value raises ValueError (or KeyError for a missing tensor)."""
    import numpy as np

    if isinstance(value, list):
        return [from_json(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and next(iter(value)) in (_TENSOR, _TUPLE, _ITEMS, _ARRAY):
        (mark, inner), = value.items()
        if mark == _TENSOR:
            return tensors[inner]
        if mark == _TUPLE:
            return tuple(from_json(v, tensors) for v in inner)
        if mark == _ITEMS:
            return {from_json(k, tensors): from_json(v, tensors) for k, v in inner}
        dtype, shape, data = inner
        if np.dtype(dtype).kind not in "biuf":
            raise ValueError(f"numpy dtype {dtype!r}")
        return np.array(data, dtype=dtype).reshape(shape)
    return {k: from_json(v, tensors) for k, v in value.items()}


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                    scheduler: Any, progress: dict[str, Any], extra: dict[str, Any], keep: int,
                    rng_states: Optional[list[dict[str, Any]]] = None) -> Path:
    """``rng_states``: every process's generators (:func:`every_rng_state`); None: this process's only."""
    from safetensors.torch import save_file

    target = checkpoint_dir(run_dir) / f"step-{step}"
    tensors: dict[str, torch.Tensor] = {}
    rngs = rng_states or [rng_state()]
    # the main process's under "rng" as before (a checkpoint of one process is unchanged), the others' beside it
    state = to_json({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rngs[0],
                     **({"rng_other_processes": rngs[1:]} if len(rngs) > 1 else {}), "extra": extra}, tensors)
    with staged_folder(target, overwrite=True) as folder:
        save_file(weights, str(folder / "trainable.safetensors"))
        save_file(tensors, str(folder / TENSORS_FILE))
        (folder / TRAINING_FILE).write_text(json.dumps(state))
        (folder / STATE_FILE).write_text(json.dumps(progress, indent=2))
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _unreadable(path: Path, exc: Exception) -> PeftkitError:
    return PeftkitError(f"checkpoint {path} is unreadable ({type(exc).__name__}); delete it to resume from an "
                        "earlier one")


def check_readable(path: Path) -> None:
    """Refuse, before anything heavy, a checkpoint in the pickled format of earlier versions (never opened) or one
    whose files are not what peftkit writes (the safetensors headers and the JSON are read, not the tensors)."""
    from safetensors import safe_open

    if not (path / TRAINING_FILE).is_file() and (path / PICKLED_FILE).is_file():
        raise PeftkitError(
            f"checkpoint {path} holds its training state as a pickle ({PICKLED_FILE}, written by an earlier peftkit), "
            "which can run code when loaded and is not read; start over with --overwrite"
        )
    try:
        for name in ("trainable.safetensors", TENSORS_FILE):
            with safe_open(str(path / name), framework="pt"):
                pass
        for name in (TRAINING_FILE, STATE_FILE):
            json.loads((path / name).read_text())
    except Exception as exc:
        raise _unreadable(path, exc) from None


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    from safetensors.torch import load_file

    check_readable(path)
    try:
        weights = load_file(str(path / "trainable.safetensors"))
        tensors = load_file(str(path / TENSORS_FILE))
        state = from_json(json.loads((path / TRAINING_FILE).read_text()), tensors)
        progress = json.loads((path / STATE_FILE).read_text())
        if not all(isinstance(part, dict) for part in (state, progress, state.get("extra", {}))):
            raise ValueError("not a mapping")
    except Exception as exc:
        raise _unreadable(path, exc) from None
    return weights, state, progress


def load_checkpoint(path: Path, model: torch.nn.Module, unwrapped: torch.nn.Module, optimizer: Any, scheduler: Any,
                    sharded: bool, rank: int = 0, world: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore a checkpoint in place, on every process; return (progress, extra). Each process takes its own
    random generators back when the checkpoint holds as many as there are processes now; otherwise (another
    process count, or a checkpoint from before they were kept per process) every process takes the main one's."""
    weights, state, progress = _read(path)
    params = {n.replace(_FSDP_PREFIX, ""): p for n, p in unwrapped.named_parameters()}
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing or set(weights) - set(params):
        raise PeftkitError(
            f"checkpoint {path} does not match this recipe's model ({len(missing)} trainable tensors missing); "
            "resume with the recipe that started the run"
        )
    try:
        if sharded:  # FSDP scatters the whole tensors to each process's shard
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            with _full_state_dict_type(model, rank0_only=False):
                model.load_state_dict(weights, strict=False)
                optimizer.load_state_dict(FSDP.optim_state_dict_to_load(model, optimizer, state["optimizer"]))
        else:
            with torch.no_grad():
                for name, tensor in weights.items():
                    params[name].copy_(tensor.to(params[name].device))
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        others = state.get("rng_other_processes", [])
        own = rank > 0 and isinstance(others, list) and len(others) == world - 1
        set_rng_state(others[rank - 1] if own else state["rng"])
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:
        raise PeftkitError(
            f"checkpoint {path} does not fit this run ({type(exc).__name__}: {first_line(exc)}); delete it to "
            "resume from an earlier one, or start over with --overwrite"
        ) from None
    return progress, state.get("extra", {})


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# Fields that may change between a run and its resumption: they do not change what is computed.
_FREE_ON_RESUME = {"train": {"progress", "eval_every", "log_every", "save_every", "keep_checkpoints", "eval_batch_size",
                             "eval_at_start", "device"}, "output": {"registry"}}


def resume_relevant(recipe: "Recipe") -> dict[str, Any]:
    data = recipe.to_dict()
    for section, keys in _FREE_ON_RESUME.items():
        for key in keys:
            data.get(section, {}).pop(key, None)
    return data


def check_same_run(saved: Optional[dict[str, Any]], current: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume a checkpoint peftkit does not read, or with a recipe that would compute something else."""
    check_readable(checkpoint)
    if saved is None:
        return
    for section in sorted(set(saved) | set(current)):
        before, now = saved.get(section) or {}, current.get(section) or {}
        if not isinstance(before, dict) or not isinstance(now, dict):
            before, now = {"": before}, {"": now}
        for key in sorted(set(before) | set(now)):
            if before.get(key) != now.get(key):
                where = f"{section}.{key}".rstrip(".")
                raise PeftkitError(
                    f"--resume: {where} was {before.get(key)!r} when {checkpoint} was written and is "
                    f"{now.get(key)!r} now; resume with the original value, or start over with --overwrite"
                )
