"""Training on tiny models, for every base precision x adapter method x task head.

Each run checks four invariants: a few steps lower the eval loss, every saved adapter tensor moved away from
its initial value (the head alone can lower the loss), only adapter and head parameters move, and the saved
adapter reloaded onto a freshly loaded base gives the trained model's outputs.
"""

from __future__ import annotations

import json

import pytest
import torch

from peftkit.config.recipe import build_recipe
from peftkit.core.models import load_base_for_task, resolve_base
from peftkit.store.loading import load_trained
from peftkit.train.training import train

QUIET = {"echo": lambda line: None}


def _base_key(name: str) -> str | None:
    """The key a trained model's frozen tensor has in a freshly loaded base's state dict (None: trainable)."""
    if "lora_" in name or "modules_to_save" in name or "ranknum" in name:
        return None
    key = name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".original_module", "")
    # a new task head is initialised at random on every load; what is trained is its saved copy
    return None if key.split(".")[0] in ("classifier", "score") else key


def _batch(loaded, n: int = 8) -> dict[str, torch.Tensor]:
    encoded = _encoded_rows(loaded)
    rows = [encoded[i] for i in range(min(n, len(encoded)))]
    return loaded.task.model_inputs(loaded.task.collate(rows, loaded.tokenizer))


def _encoded_rows(loaded):
    from peftkit.core.data import encode, load_task_data

    raw = load_task_data(loaded.recipe.data, loaded.task, loaded.recipe.train.seed)
    return encode(raw.eval, loaded.task, loaded.tokenizer, loaded.recipe.data.max_length)


def record_initial_adapter(monkeypatch) -> dict[str, torch.Tensor]:
    """The adapter's tensors as :func:`peftkit.train.training.train` builds them, before its first optimizer step."""
    initial: dict[str, torch.Tensor] = {}
    from peftkit.train import transfer

    build = transfer.build_model  # what a run builds its model with (through transfer.prepare_run)

    def recording(plan, device, start=None):
        built = build(plan, device, start)
        initial.update({n: p.detach().clone() for n, p in built.model.named_parameters() if "lora_" in n})
        return built

    monkeypatch.setattr(transfer, "build_model", recording)
    return initial


def saved_adapter_changes(adapter_dir, initial: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """Saved tensor name -> RMS of (saved - initial) (None: empty, a rank-0 module), for every LoRA / AdaLoRA tensor.

    peft saves AdaLoRA shrunk to the ranks its mask kept (``rank_pattern``); the initial tensors are cut the
    same way, so a pruned rank (its lambda zeroed by the mask) is not mistaken for one that never moved.
    """
    from safetensors.torch import load_file

    pattern = json.loads((adapter_dir / "adapter_config.json").read_text()).get("rank_pattern") or {}
    changes = {}
    for key, saved in load_file(adapter_dir / "adapter_model.safetensors").items():
        if ".lora_" not in key:
            continue
        module, rest = key.split(".lora_")  # rest: "A.weight" (LoRA) or "A" (AdaLoRA's parameters)
        kind = rest.split(".")[0]
        start = initial[key.replace(f".lora_{kind}", f".lora_{kind}.default", 1)]
        mask = pattern.get(f"{module.removeprefix('base_model.model.')}.lora_E")
        if mask is not None:  # AdaLoRA: E and A hold one row per rank, B one column
            keep = torch.tensor(mask)
            start = start[:, keep] if kind == "B" else start[keep]
        assert saved.shape == start.shape, key
        changes[key] = float((saved.float() - start.float()).pow(2).mean().sqrt()) if saved.numel() else None
    return changes


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
@pytest.mark.parametrize("quant", ["fp32", "8bit", "4bit"])
@pytest.mark.parametrize("adapter", ["lora", "adalora"])
def test_train_lowers_loss_moves_only_adapter_and_reloads(recipe_for, task, quant, adapter, monkeypatch):
    check_training_invariants(recipe_for, task, quant, adapter, monkeypatch)


# the other pooled heads share classification's model and loop; their own parts are target, loss and metrics, so
# a sample of the matrix (each head on a quantized base, each method once) rather than all of it
@pytest.mark.parametrize(("task", "quant", "adapter"), [
    ("regression", "4bit", "lora"), ("regression", "8bit", "adalora"),
    ("multi_label", "4bit", "adalora"), ("multi_label", "fp32", "lora"),
])
def test_other_pooled_heads_train_move_only_adapter_and_reload(recipe_for, task, quant, adapter, monkeypatch):
    # the regressor starts at zero, not at the targets' mean (2.5): the tiny random BERT learns too little in 32
    # steps for its loss to fall reliably otherwise; the start at the mean has its own test (test_regression.py)
    options = {"start_at_mean": False} if task == "regression" else {}
    check_training_invariants(recipe_for, task, quant, adapter, monkeypatch, task_options=options)


def check_training_invariants(recipe_for, task: str, quant: str, adapter: str, monkeypatch,
                              task_options: dict | None = None) -> None:
    data = recipe_for(task=task, quant=quant, adapter=adapter)
    data["task"].update(task_options or {})
    recipe = build_recipe(data)
    initial = record_initial_adapter(monkeypatch)
    result = train(recipe, **QUIET)

    history = result.metadata.history
    steps = result.metadata.training.optimizer_steps
    assert history[0]["step"] == 0 and history[-1]["step"] == steps
    assert history[-1]["loss"] < history[0]["loss"] - 1e-4, history

    # every saved adapter tensor moved: LoRA's A and B (B from zero), AdaLoRA's P, Q and lambda (from zero). Adam
    # moves a parameter by at most about its lr per step; these runs move each tensor's RMS by 2.0 to 35 % of
    # lr x steps (measured over the matrix), a parameter without gradient by exactly 0
    assert all(not t.any() for n, t in initial.items() if ".lora_B." in n and adapter == "lora")
    assert all(not t.any() for n, t in initial.items() if ".lora_E." in n)
    lr = recipe.train.lr * (recipe.adapter.lr_scale if adapter == "adalora" else 1.0)
    changes = saved_adapter_changes(result.adapter_dir, initial)
    kinds = {"lora": {"A", "B"}, "adalora": {"A", "B", "E"}}[adapter]
    assert {k.split(".lora_")[1].split(".")[0] for k in changes} == kinds
    still = {k: c for k, c in changes.items() if c is not None and c < 0.005 * lr * steps}
    assert not still, f"adapter tensors that barely moved (RMS change; lr x steps = {lr * steps:g}): {still}"

    # only adapter and head parameters changed: every frozen tensor equals a freshly loaded base's
    trained = result.model
    loaded = load_trained(result.adapter_dir)
    fresh = load_base_for_task(loaded.recipe, loaded.task, resolve_base(loaded.recipe.base), loaded.tokenizer,
                               torch.device("cpu")).state_dict()
    compared = 0
    for name, tensor in trained.state_dict().items():
        key = _base_key(name)
        if key is None:
            continue
        assert key in fresh, f"{name} -> {key} missing from the fresh base"
        assert fresh[key].dtype == tensor.dtype and torch.equal(fresh[key], tensor), f"{name} changed in training"
        compared += 1
    assert compared >= len([k for k in fresh if "classifier" not in k and "score" not in k]) - 2

    trainable = [n for n, p in trained.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)

    # reload onto a fresh base reproduces the outputs
    trained.eval()
    batch = _batch(loaded)
    with torch.no_grad():
        expected = trained(**batch).logits
        got = loaded.model(**batch).logits
    if adapter == "lora":
        assert torch.equal(expected, got)
    else:  # peft stores AdaLoRA shrunk to its surviving ranks: same sums, another order
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_full_fine_tune_reloads_exactly_and_a_file_replaced_while_loading_is_caught(recipe_for, monkeypatch):
    """A full fine-tune is the whole model's weights: loaded from its folder, checked before and after the load."""
    import peftkit.store.loading as loading
    from peftkit.errors import PeftkitError

    result = train(build_recipe(recipe_for(adapter=None, train={"max_steps": 4, "eval_at_start": False})), **QUIET)
    assert result.metadata.recipe.adapter is None and result.metadata.adapter.method == "full"
    loaded = load_trained(result.adapter_dir)
    batch = _batch(loaded)
    result.model.eval()
    with torch.no_grad():
        assert torch.equal(result.model(**batch).logits, loaded.model(**batch).logits)

    weights = next(p for p in result.adapter_dir.iterdir() if p.suffix == ".safetensors")
    real = loading.load_base_for_task

    def replaced_while_loading(*args, **kwargs):
        model = real(*args, **kwargs)
        weights.write_bytes(weights.read_bytes()[:-1] + b" ")  # after the first check, before the second
        return model

    monkeypatch.setattr(loading, "load_base_for_task", replaced_while_loading)
    with pytest.raises(PeftkitError, match=rf"^{weights} is corrupt \(its checksum differs"):
        load_trained(result.adapter_dir)


def test_lora_options_reach_peft(recipe_for):
    """rsLoRA, DoRA (on a 4-bit base), named targets and a layer subset end up in the saved peft config."""
    data = recipe_for(quant="4bit", train={"max_steps": 2, "eval_at_start": False})
    data["adapter"].update({"use_rslora": True, "use_dora": True, "target_modules": ["query", "value"],
                            "layers": [1]})
    result = train(build_recipe(data), **QUIET)
    import json

    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["use_rslora"] and config["use_dora"] and config["layers_to_transform"] == [1]
    adapted = {n.split(".lora_")[0] for n, _ in result.model.named_parameters() if ".lora_A." in n}
    assert adapted == {"base_model.model.bert.encoder.layer.1.attention.self.query",
                       "base_model.model.bert.encoder.layer.1.attention.self.value"}
    assert any("lora_magnitude_vector" in n for n, _ in result.model.named_parameters())


def test_same_seed_same_losses(recipe_for):
    runs = [train(build_recipe(recipe_for(adapter="lora", quant="4bit", output={"name": f"seed{i}"},
                                          train={"max_steps": 4, "eval_every": 2})), **QUIET) for i in range(2)]
    assert runs[0].metadata.history == runs[1].metadata.history
    other = train(build_recipe(recipe_for(adapter="lora", quant="4bit", output={"name": "seed-other"},
                                          train={"max_steps": 4, "eval_every": 2, "seed": 8})), **QUIET)
    assert other.metadata.history[-1] != runs[0].metadata.history[-1]


def test_optimizer_is_fused_on_cpu(recipe_for):
    # torch's default AdamW steps parameter by parameter on the CPU; fused (Trainer's default too) is one kernel
    from peftkit.train.trainer import build_optimizer as _optimizer

    recipe = build_recipe(recipe_for(task="classification", quant="fp32", adapter="lora"))
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64))
    optimizer = _optimizer(model, recipe, head_modules=[])
    assert optimizer.defaults["fused"] is True
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 4
