"""What lets registered adapters share one base model, and how each is put into it: used when a server is
loaded (``serving.load_server``) and when an adapter joins a running one (``live.py``)."""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from ..core.models import describe_quantization
from ..core.quantized import packed_kept
from ..errors import PeftkitError
from .served_adapter import ServedAdapter


def describe_adapter(adapter: Any) -> dict[str, str]:
    """What ``Server.description`` says of one adapter (a snapshot or a served adapter)."""
    recipe = adapter.metadata.recipe
    return {"task": adapter.metadata.task.type, "method": adapter.metadata.adapter.method,
            "trained_on": describe_quantization(recipe.quantization, recipe.base.dtype)}


def check_together(adapters: Sequence[Any], quantized: bool) -> None:
    """Refuse adapters (snapshots or served adapters: a ``name`` and ``metadata`` each) that cannot share a base."""
    first = adapters[0]
    for other in adapters[1:]:
        if other.metadata.base.fingerprint != first.metadata.base.fingerprint:
            raise PeftkitError(
                f"{other.name} was trained on {other.metadata.base.identity} "
                f"({other.metadata.base.fingerprint[:19]}) and {first.name} on "
                f"{first.metadata.base.identity} ({first.metadata.base.fingerprint[:19]}): "
                "adapters served together must share one base"
            )
    recipes = [a.metadata.recipe for a in adapters]
    setups = {(r.base.dtype, r.quantization.model_dump_json()) for r in recipes}
    if len(setups) > 1 and quantized:
        shown = "; ".join(f"{a.name}: {describe_quantization(r.quantization, r.base.dtype)}"
                          for a, r in zip(adapters, recipes))
        raise PeftkitError(f"the adapters were trained on differently loaded bases ({shown}); serve them in "
                           "separate servers, or unquantized (--unquantized / quantized=False)")


def shared_class(snapshots: list[Any], heads: list[Any], decoder: bool) -> str:
    """The auto class the shared base loads with: the one every adapter's head asks for (``TaskHead.serve_base``)."""
    default = "AutoModelForCausalLM" if decoder else "AutoModel"
    wanted = {s.name: h.serve_base or default for s, h in zip(snapshots, heads)}
    first = next(iter(wanted))
    other = next((name for name, auto in wanted.items() if auto != wanted[first]), None)
    if other is not None:
        raise PeftkitError(f"{first} needs the base loaded as {wanted[first]} and {other} as {wanted[other]}; serve "
                           "them in separate servers")
    return wanted[first]


def inject(target: nn.Module, internal: str, adapter: ServedAdapter) -> Any:
    """``adapter``'s LoRA weights put into ``target`` as peft adapter ``internal``, frozen and in eval mode, its head
    on the base's device: the base model becomes a peft model, a peft model gains one more adapter. Returns the
    peft model."""
    import warnings

    from peft import PeftModel, get_peft_model, set_peft_model_state_dict

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*already.*adapter")
        # transformers' notice about its own renamed internals, raised inside peft: nothing to act on
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*is_gradient_checkpointing")
        if isinstance(target, PeftModel):
            target.add_adapter(internal, adapter.lora_config)
            peft_model = target
        else:
            peft_model = get_peft_model(target, adapter.lora_config, adapter_name=internal)
    with packed_kept(peft_model):  # a server that has predicted already: its packed 4-bit layers stay as they are
        result = set_peft_model_state_dict(peft_model, adapter.lora_weights, adapter_name=internal)
    missing = [k for k in result.missing_keys if f".{internal}." in k and ".lora_" in k]
    if result.unexpected_keys or missing:
        wrong = (result.unexpected_keys or missing)[0]
        raise PeftkitError(f"{adapter.name}: its weights do not fit the base model ({wrong}); it was trained on "
                           "another architecture")
    for parameter in peft_model.parameters():
        parameter.requires_grad_(False)
    adapter.lora_weights = {}  # now in the model; the copy is not kept
    if adapter.head is not None:
        adapter.head.to(next(peft_model.parameters()).device)
    peft_model.eval()
    return peft_model
