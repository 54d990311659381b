"""peftkit: LoRA and AdaLoRA fine-tuning on frozen 4/8-bit bases, driven by YAML recipes.

``import peftkit`` is cheap: torch, transformers and peft load only when a function that needs them runs.
"""

from .config.recipe import Recipe, load_recipe
from .core.cpu_paths import silence_kernel_hub_notice
from .errors import PeftkitError, RecipeError

silence_kernel_hub_notice()  # bitsandbytes' notice about an optional hub kernel; see cpu_paths

__version__ = "0.1.0"


def train(recipe: "Recipe | str", overrides: tuple[str, ...] = (), **kwargs):  # type: ignore[no-untyped-def]
    """Train a recipe (a :class:`Recipe` or a path to its YAML); see :func:`peftkit.train.training.train`."""
    from .train.training import train as run

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    return run(recipe, **kwargs)


_LAZY = {
    "AdaLoraCallback": ("peftkit.train.adalora_callback", "AdaLoraCallback"),
    "Registry": ("peftkit.store.registry", "Registry"),
    "load_trained": ("peftkit.store.loading", "load_trained"),
    "load_server": ("peftkit.serve.serving", "load_server"),
    "to_lora": ("peftkit.ops.convert", "to_lora"),
    "rank_report": ("peftkit.core.rank_report", "report"),
}


def __getattr__(name: str):  # PEP 562: the heavier parts of the API import on first use
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'peftkit' has no attribute {name!r}")


__all__ = ["AdaLoraCallback", "PeftkitError", "RecipeError", "Recipe", "load_recipe", "train", "Registry", "load_trained",
           "load_server", "to_lora",
           "rank_report", "__version__"]
