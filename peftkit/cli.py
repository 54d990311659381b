"""The ``peftkit`` command: parse, call the library, print. A PeftkitError becomes one ``Error: ...`` line."""

from __future__ import annotations

import functools
import os
import sys
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


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _command_path(ctx: click.Context | None) -> str:
    """``peftkit adalora to-lora``: the command as typed, whatever name the program was started under."""
    names = []
    while ctx is not None:
        names.append(ctx.info_name if ctx.parent is not None else "peftkit")
        ctx = ctx.parent
    return " ".join(reversed(names or ["peftkit"]))


class _OneLineErrors(click.Group):
    """click, except that a usage error is one ``Error: ...`` line like every other (no usage block above it)."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            returned = super().main(*args, standalone_mode=False, **kwargs)
        except _NO_ARGS_IS_HELP as exc:  # `peftkit adapters` alone: its help, as click shows it
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            message = " ".join(exc.format_message().split()).rstrip(".")
            click.echo(f"Error: {message} (see {_command_path(exc.ctx)} --help)", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        # without standalone mode click returns the exit code of --help, --version and ctx.exit()
        sys.exit(returned if isinstance(returned, int) else 0)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="peftkit")
def main() -> None:
    """LoRA and AdaLoRA fine-tuning on frozen 4/8-bit bases, driven by YAML recipes."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # deprecation notices raised inside transformers/peft about their own internals: nothing a user can act on
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*is_gradient_checkpointing")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@_set_option
@click.option("--no-data", is_flag=True,
              help="Check the recipe alone, without finding its base model or reading its data files.")
@_friendly
def validate(recipe: str, overrides: tuple[str, ...], no_data: bool) -> None:
    """Check RECIPE: every problem at once, each with its key path."""
    from .config.recipe import load_recipe
    from .ops.validate import check_base, check_data

    loaded = load_recipe(recipe, overrides)
    if not no_data:
        found = [check_base(loaded), check_data(loaded)]  # both checked before either is printed: one line on error
        click.echo("\n".join(found))
    click.echo(f"{recipe}: ok")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@_set_option
@click.option("--resume", is_flag=True, help="Continue the run from its latest checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing adapter of the same name, and its run.")
@_friendly
def train(recipe: str, overrides: tuple[str, ...], resume: bool, overwrite: bool) -> None:
    """Fine-tune as RECIPE says: train, evaluate, save the adapter to the registry."""
    from .config.recipe import load_recipe

    loaded = load_recipe(recipe, overrides)
    from .train.training import train as run_training

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

    text, problem = describe(registry, name)
    click.echo(text)
    if problem is not None:
        raise PeftkitError(f"{name}: {problem}")


@adapters.command("rm")
@click.argument("name")
@_registry_option
@_friendly
def adapters_rm(name: str, registry: str) -> None:
    """Remove NAME from the registry."""
    from .store.registry import Registry

    whole = Registry(registry).remove(name)
    click.echo(f"removed {name}" if whole else f"removed {name} (an incomplete folder, without its peftkit.json)")


def _trust(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--trust-remote-code`` and ``--allow-pickle``, handed to the command as one ``trust`` dict of keyword
    arguments for the library: the only way to switch either on for an adapter (its stored recipe never does)."""
    @click.option("--trust-remote-code", is_flag=True,
                  help="Run Python code shipped in the base model's folder (for bases that need it).")
    @click.option("--allow-pickle", is_flag=True,
                  help="Load a base whose weights are only pickles (pytorch_model.bin), which can run code.")
    @functools.wraps(fn)
    def wrapper(*args: Any, trust_remote_code: bool, allow_pickle: bool, **kwargs: Any) -> Any:
        return fn(*args, trust={"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}, **kwargs)

    return wrapper


@main.group()
def adalora() -> None:
    """AdaLoRA tools."""


@adalora.command("to-lora")
@click.argument("source")
@click.option("--name", required=True, help="Name of the LoRA adapter to register.")
@click.option("--overwrite", is_flag=True, help="Replace an existing adapter of that name.")
@click.option("--check", default=64, show_default=True, metavar="N", type=click.IntRange(min=0),
              help="Compare both adapters' outputs on N eval rows (0: skip).")
@_registry_option
@_trust
@_friendly
def adalora_to_lora(source: str, name: str, overwrite: bool, check: int, registry: str,
                     trust: dict[str, bool]) -> None:
    """Convert AdaLoRA adapter SOURCE into an exact plain-LoRA adapter NAME with per-module ranks."""
    from .ops.convert import measure_conversion, to_lora
    from .store.registry import Registry
    from .views import conversion_summary

    reg = Registry(registry)
    to_lora(reg, source, name, overwrite=overwrite, warn=lambda m: click.echo(f"Warning: {m}", err=True))
    click.echo(conversion_summary(reg, source, name))
    if check > 0:
        m = measure_conversion(reg, source, name, check, **trust)
        click.echo(f"outputs on {m['rows']} eval rows: max difference {m['max_abs_diff']:.2e} "
                   f"({m['max_rel_diff']:.2e} of the largest output), same prediction on "
                   f"{100 * m['same_argmax']:.1f}% of rows")


_serve_options = [
    click.option("--adapter", "adapters_", multiple=True, required=True, metavar="NAME",
                 help="A registered adapter (repeatable: all share one base); `base` is the base model alone."),
    click.option("--unquantized", is_flag=True, help="Load the base unquantized (adapters trained on 4/8 bits)."),
    click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1)),
]


def _serve(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_serve_options):
        fn = option(fn)
    return fn


def _server(registry: str, names: tuple[str, ...], unquantized: bool, trust: dict[str, bool]) -> Any:
    from .serve.serving import BASE, load_server

    adapters = [n for n in dict.fromkeys(names) if n != BASE]
    if not adapters:
        raise click.UsageError("name at least one registered adapter with --adapter")
    server = load_server(registry, adapters, quantized=not unquantized, **trust)
    for name, info in server.description["adapters"].items():
        if info["trained_on"] != server.description["weights"]:
            click.echo(f"note: {name} was trained on a {info['trained_on']} base and is served on "
                       f"{server.description['weights']} weights; its outputs differ slightly from training's",
                       err=True)
    return server


@main.command()
@click.argument("texts", nargs=-1)
@_serve
@click.option("--input", "input_file", type=click.Path(dir_okay=False),
              help="Rows to predict (jsonl, json, csv, tsv, parquet, txt); an `adapter` column routes each row.")
@click.option("--column", "columns", multiple=True, metavar="ROLE=COLUMN", help="e.g. --column text=review")
@click.option("--output", default=None, type=click.Path(dir_okay=False), help="Write JSON lines here (default stdout).")
@_registry_option
@_trust
@_friendly
def predict(texts: tuple[str, ...], adapters_: tuple[str, ...], unquantized: bool, batch_size: int,
            input_file: str | None, columns: tuple[str, ...], output: str | None, registry: str,
            trust: dict[str, bool]) -> None:
    """Predict TEXTS (or --input rows) with every --adapter, in mixed batches on one base: JSON lines out."""
    from .serve.predict_io import parse_columns, read_input, route, write_lines

    if bool(texts) == bool(input_file):
        raise click.UsageError("give texts on the command line or --input FILE (one of the two)")
    overrides = parse_columns(columns)
    server = _server(registry, adapters_, unquantized, trust)
    names = list(dict.fromkeys(adapters_))
    if input_file:
        fields, routed, numbers = route(server, names, read_input(input_file), input_file, overrides)
    else:
        fields = [{"text": t} for t in texts for _ in names]
        routed, numbers = names * len(texts), [i for i in range(len(texts)) for _ in names]
    predictions = server.predict(fields, routed, batch_size)
    write_lines([{"row": n, "text": f["text"], **p} for n, f, p in zip(numbers, fields, predictions)], output)


@main.command()
@click.argument("prompts", nargs=-1, required=True)
@_serve
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="0: greedy decoding; above 0: sampling.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0: no top-k cut.")
@click.option("--seed", default=None, type=int, help="Seed for sampling.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@_registry_option
@_trust
@_friendly
def generate(prompts: tuple[str, ...], adapters_: tuple[str, ...], unquantized: bool, batch_size: int,
             max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None, as_json: bool,
             registry: str, trust: dict[str, bool]) -> None:
    """Continue each of PROMPTS with every causal-LM --adapter (answer it, for seq2seq adapters on a T5-family
    base), in one batch on one base."""
    import json

    server = _server(registry, adapters_, unquantized, trust)
    names = list(dict.fromkeys(adapters_))
    routed = [n for _ in prompts for n in names]
    asked = [p for p in prompts for _ in names]
    texts = server.generate(asked, routed, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            top_k=top_k, seed=seed, batch_size=batch_size)
    for name, prompt, text in zip(routed, asked, texts):
        if as_json:
            click.echo(json.dumps({"adapter": name, "prompt": prompt, "text": text}, ensure_ascii=False))
        else:
            click.echo(f"[{name}] {prompt}\n{text}\n")


@main.command()
@click.option("--adapter", "adapters_", multiple=True, required=True, metavar="NAME",
              help="A registered adapter to serve (repeatable: all share one base); more load at runtime.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(min=1),
              help="Most rows in one batch, gathered across requests.")
@click.option("--max-wait-ms", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="How long a request waits for others to join its batch.")
@click.option("--unquantized", is_flag=True, help="Load the base unquantized (adapters trained on 4/8 bits).")
@_registry_option
@_trust
@_friendly
def serve(adapters_: tuple[str, ...], host: str, port: int, max_batch: int, max_wait_ms: float, unquantized: bool,
          registry: str, trust: dict[str, bool]) -> None:
    """Serve the --adapter NAMEs over HTTP: OpenAI-compatible completions and chat, /v1/classify for the other
    heads, /v1/models, runtime load/unload, /health and /metrics; requests batched together on one base."""
    from .serve.http_run import require_http, serve_http

    require_http()  # before minutes of loading
    server = _server(registry, adapters_, unquantized, trust)
    try:
        serve_http(server, host, port, max_batch, max_wait_ms)
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C again once it has shut down gracefully: done
        pass


@main.command("eval")
@click.argument("name")
@click.option("--data", "data_file", required=True, type=click.Path(dir_okay=False), help="A labelled data file.")
@click.option("--group-by", default=None, metavar="COLUMN",
              help="Also report the metrics per value of COLUMN and the gaps between groups.")
@click.option("--positive-label", default=None, metavar="LABEL",
              help="With --group-by: the label whose selection rate, TPR and FPR are compared (default: the second "
                   "label of a binary task, e.g. 1 of 0/1; with more labels each one-vs-rest).")
@click.option("--plot", default=None, type=click.Path(dir_okay=False), metavar="FILE.png",
              help="With --group-by: draw the per-group metrics and the gaps into FILE.png (needs matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_registry_option
@_trust
@_friendly
def eval_command(name: str, data_file: str, group_by: str | None, positive_label: str | None, plot: str | None,
                 as_json: bool, registry: str, trust: dict[str, bool]) -> None:
    """Evaluate adapter NAME on a labelled file with its task's metrics (per group, with gaps, by --group-by)."""
    from .core.evaluation import evaluate_file
    from .finite import dumps
    from .store.loading import load_trained
    from .store.registry import Registry
    from .views import eval_text

    if plot is not None:
        from .core.fairness_plot import check_plot_target

        if group_by is None:
            raise PeftkitError("--plot: draws the groups of --group-by COLUMN; add --group-by or leave --plot out")
        check_plot_target(plot)  # before the model loads, not after the whole evaluation
    loaded = load_trained(Registry(registry).folder(name), packed_inference=True, **trust)  # nothing trains after eval
    result = evaluate_file(loaded, data_file, group_by, positive_label=positive_label)
    if plot is not None:
        from .core.fairness_plot import plot_groups

        plot_groups(result, loaded.task.key_metric[0], plot, f"{name} on {os.path.basename(data_file)}, "
                    f"by {group_by}")
        click.echo(f"wrote {plot}", err=True)  # stderr: --json output stays one JSON document
    click.echo(dumps(result, indent=2) if as_json else eval_text(name, data_file, result))


def _folder_size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes >= 2**20 else f"{n_bytes / 1024:.1f} KiB"


@main.command("merge")
@click.argument("name")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder of the merged model.")
@click.option("--dtype", default=None, metavar="fp32|bf16|fp16", help="Dtype of the merged weights (default: the base's).")
@click.option("--quantize", default=None, metavar="nf4|fp4|int8", help="Re-quantize the merged model with bitsandbytes.")
@click.option("--data", "data_file", default=None, type=click.Path(dir_okay=False),
              help="Measure the drift on this labelled file (default: the adapter's recipe eval data).")
@click.option("--rows", default=64, show_default=True, type=click.IntRange(min=1), help="Rows the drift is measured on.")
@click.option("--max-drift", default=None, type=float,
              help="Refuse to write past this largest logit difference, relative to the largest logit (default 0.25).")
@click.option("--accept-drift", is_flag=True, help="Write the merged model even past --max-drift.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@_registry_option
@_trust
@_friendly
def merge_command(name: str, out: str, dtype: str | None, quantize: str | None, data_file: str | None, rows: int,
                  max_drift: float | None, accept_drift: bool, force: bool, registry: str,
                  trust: dict[str, bool]) -> None:
    """Merge adapter NAME into its base: a plain transformers model folder, with the drift measured."""
    from .ops.merge import DEFAULT_MAX_DRIFT, merge
    from .store.registry import Registry

    result = merge(Registry(registry), name, out, dtype=dtype, quantize=quantize, data_file=data_file, rows=rows,
                   max_drift=DEFAULT_MAX_DRIFT if max_drift is None else max_drift, accept_drift=accept_drift,
                   force=force, say=click.echo, **trust)
    click.echo(f"saved {result.folder} ({_folder_size(result.size_bytes)})")


@main.command("combine")
@click.argument("names", nargs=-1, required=True)
@click.option("--weights", required=True, metavar="W1,W2,...", help="One weight per adapter.")
@click.option("--method", default="linear", show_default=True, help="peft's combination type (linear, cat, svd, ties, ...).")
@click.option("--density", default=None, type=float, help="Fraction of entries kept by ties, dare_* and magnitude_prune.")
@click.option("--svd-rank", default=None, type=click.IntRange(min=1),
              help="Rank of the svd methods' result (default: the largest).")
@click.option("--seed", default=0, show_default=True, help="Seed of dare's random pruning.")
@click.option("--name", "new_name", required=True, help="Name of the adapter to register.")
@click.option("--overwrite", is_flag=True, help="Replace an existing adapter of that name.")
@_registry_option
@_trust
@_friendly
def combine_command(names: tuple[str, ...], weights: str, method: str, density: float | None, svd_rank: int | None,
                    seed: int, new_name: str, overwrite: bool, registry: str, trust: dict[str, bool]) -> None:
    """Combine registered adapters NAMES into a new registered adapter."""
    from .ops.combine import combine
    from .store.registry import Registry

    try:
        parsed = [float(w) for w in weights.split(",")]
    except ValueError:
        raise click.ClickException(f"--weights: {weights!r} is not a comma-separated list of numbers, e.g. 0.5,0.5") from None
    folder = combine(Registry(registry), list(names), parsed, method, new_name, density=density, svd_rank=svd_rank,
                     seed=seed, overwrite=overwrite, say=click.echo, **trust)
    click.echo(f"registered {new_name} in {folder.parent}/ (evaluate it with: peftkit eval {new_name} --data FILE)")


@main.command("export")
@click.argument("name")
@click.option("--format", "fmt", default="peft", show_default=True,
              help="peft (PeftModel.from_pretrained on the plain base) or gguf (a llama.cpp LoRA adapter: causal-LM "
                   "adapters on Llama bases).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option("--check", default=16, show_default=True, metavar="N", type=click.IntRange(min=0),
              help="Run the model card's loading code and compare it with peftkit on N eval rows (0: skip).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@_registry_option
@_trust
@_friendly
def export_command(name: str, fmt: str, out: str, check: int, force: bool, registry: str,
                   trust: dict[str, bool]) -> None:
    """Export adapter NAME for tools without peftkit (peft format: PeftModel.from_pretrained on the plain base)."""
    from .ops.export import export
    from .store.registry import Registry

    result = export(Registry(registry), name, fmt, out, force=force, check_rows=check, say=click.echo, **trust)
    click.echo(f"saved {result['folder']} ({_folder_size(result['size_bytes'])})")
