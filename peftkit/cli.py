"""The ``peftkit`` command: parse, call the library, print. A PeftkitError becomes one ``Error: ...`` line."""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Callable

import click

from .errors import PeftkitError

_set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a recipe field, e.g. --set train.epochs=2 (repeatable).",
)


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PeftkitError as exc:
            # one line, even when a message quotes a multi-line error from a library
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise click.ClickException(" ".join(lines)) from None
        except KeyboardInterrupt:
            raise click.ClickException("interrupted; the last checkpoint is kept, continue with --resume") from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="peftkit")
def main() -> None:
    """LoRA and AdaLoRA fine-tuning on frozen 4/8-bit bases, driven by YAML recipes."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # deprecation notices raised inside transformers/peft about their own internals: nothing a user can act on
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*is_gradient_checkpointing")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@_set_option
@click.option("--no-data", is_flag=True, help="Check the recipe alone, without reading its data files.")
@_friendly
def validate(recipe: str, overrides: tuple[str, ...], no_data: bool) -> None:
    """Check RECIPE: every problem at once, each with its key path."""
    from .recipe import load_recipe
    from .validate import check_data

    loaded = load_recipe(recipe, overrides)
    if not no_data:
        click.echo(check_data(loaded))
    click.echo(f"{recipe}: ok")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@_set_option
@click.option("--resume", is_flag=True, help="Continue the run from its latest checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing adapter of the same name, and its run.")
@_friendly
def train(recipe: str, overrides: tuple[str, ...], resume: bool, overwrite: bool) -> None:
    """Fine-tune as RECIPE says: train, evaluate, save the adapter to the registry."""
    from .recipe import load_recipe

    loaded = load_recipe(recipe, overrides)
    from .training import train as run_training

    run_training(loaded, resume=resume, overwrite=overwrite, echo=click.echo)


_registry_option = click.option(
    "--registry", default=lambda: os.environ.get("PEFTKIT_REGISTRY", "adapters"), show_default="adapters",
    help="Registry root (or set PEFTKIT_REGISTRY).",
)


@main.group()
def adapters() -> None:
    """List, inspect and remove registered adapters."""


@adapters.command("list")
@_registry_option
@_friendly
def adapters_list(registry: str) -> None:
    """One line per adapter: name, task, base, method, rank, size, key metric, created."""
    from .views import listing

    click.echo(listing(registry))


@adapters.command("show")
@click.argument("name")
@_registry_option
@_friendly
def adapters_show(name: str, registry: str) -> None:
    """Everything in NAME's metadata, whether its files check out, and AdaLoRA's rank report."""
    from .views import describe

    click.echo(describe(registry, name))


@adapters.command("rm")
@click.argument("name")
@_registry_option
@_friendly
def adapters_rm(name: str, registry: str) -> None:
    """Remove NAME from the registry."""
    from .registry import Registry

    Registry(registry).remove(name)
    click.echo(f"removed {name}")


@main.group()
def adalora() -> None:
    """AdaLoRA tools."""


@adalora.command("to-lora")
@click.argument("source")
@click.option("--name", required=True, help="Name of the LoRA adapter to register.")
@click.option("--overwrite", is_flag=True, help="Replace an existing adapter of that name.")
@click.option("--check", default=64, show_default=True, metavar="N",
              help="Compare both adapters' outputs on N eval rows (0: skip).")
@_registry_option
@_friendly
def adalora_to_lora(source: str, name: str, overwrite: bool, check: int, registry: str) -> None:
    """Convert AdaLoRA adapter SOURCE into an exact plain-LoRA adapter NAME with per-module ranks."""
    from .convert import measure_conversion, to_lora
    from .views import conversion_summary
    from .registry import Registry

    reg = Registry(registry)
    to_lora(reg, source, name, overwrite=overwrite, warn=lambda m: click.echo(f"Warning: {m}", err=True))
    click.echo(conversion_summary(reg, source, name))
    if check > 0:
        m = measure_conversion(reg, source, name, check)
        click.echo(f"outputs on {m['rows']} eval rows: max difference {m['max_abs_diff']:.2e} "
                   f"({m['max_rel_diff']:.2e} of the largest output), same prediction on "
                   f"{100 * m['same_argmax']:.1f}% of rows")


@main.command("eval")
@click.argument("name")
@click.option("--data", "data_file", required=True, type=click.Path(dir_okay=False), help="A labelled data file.")
@click.option("--group-by", default=None, metavar="COLUMN", help="Also report the metrics per value of COLUMN.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_registry_option
@_friendly
def eval_command(name: str, data_file: str, group_by: str | None, as_json: bool, registry: str) -> None:
    """Evaluate adapter NAME on a labelled file with its task's metrics."""
    import json

    from .evaluation import evaluate_file
    from .loading import load_trained
    from .registry import Registry

    loaded = load_trained(Registry(registry).folder(name))
    result = evaluate_file(loaded, data_file, group_by)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    show = lambda m: ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "rows")  # noqa: E731
    click.echo(f"{name} on {data_file} ({result['rows']} rows): {show(result['metrics'])}")
    for group, metrics in result.get("groups", {}).items():
        click.echo(f"  {group_by}={group} ({metrics['rows']} rows): {show(metrics)}")
    if "largest_gap" in result:
        gap = result["largest_gap"]
        click.echo(f"largest gap in {gap['metric']} between groups: {gap['value']:.4f}")
