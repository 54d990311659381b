"""Multi-adapter serving: one base with 1, 2, 4 and 8 adapters, against grouped batches and merged models.

    python benchmarks/multi_adapter.py                            # sst2-qlora on 4-bit MiniLM, real SST-2 dev rows
    python benchmarks/multi_adapter.py --rows 128 --adapters 1 2 4 8 --repeats 5 --threads 1

For each N, the same ``--rows`` SST-2 dev sentences are assigned round-robin to N adapters and classified three
ways, batch size 32, timed after a warm-up, the median of ``--repeats`` passes:

* **mixed**: one ``peftkit.serve.serving`` server holding the N adapters on one shared base; every batch mixes rows
  of all N adapters (one forward through the base, peft routes each row through its own LoRA weights, then
  through its own head). N = 1 is the single-adapter reference; the target is mixed(N=8) >= 80 % of it.
* **grouped**: the same server, each adapter's rows in batches of their own (one adapter per batch).
* **merged**: one plain transformers model per adapter, the adapter merged in float32 into the dequantized
  base (``peftkit.ops.merge.merged_float_model``, the exact merge ``peftkit merge`` writes), each running its own
  rows. Its throughput excludes loading; the time to swap one merged model in (``from_pretrained`` of a saved
  merged folder, page cache warm, and one row through it) is measured apart, and a throughput that pays one swap per adapter (none
  for N = 1) is given: what serving from merged models costs when only one of them is kept in memory.

Each strategy includes its own input preparation (the server tokenizes row by row; the merged path tokenizes
each adapter's rows in one call). Throughput is rows per CPU-second of this process (with one thread, the
default, the time its core spent, which other processes on a shared machine disturb far less than the wall
time; both are recorded). The passes for every N and strategy are interleaved within each repeat, each repeat
starting at a different pass, so that the machine's load and cache state fall on all of them alike.

Memory: ``server.memory()`` (the base's bytes, and each adapter's LoRA and head bytes as the server holds
them), the resident memory of a process that loads the N-adapter server and runs one batch (a child forked
per N before the main process loads any model, so that other loads do not count; the children run while the
main process sets up and end before any timing), and the bytes of N merged float32 models.

The adapters: the real ``sst2-qlora`` (``peftkit train recipes/sst2-qlora.yaml``) is variant 0, unchanged; the
other variants are synthetic, copies of it in a temporary registry whose LoRA ``B`` matrices are scaled by a
random factor in [0.5, 1.5) and given Gaussian noise, re-sealed so that their checksums verify. Training 8
adapters would take half an hour here and would not change what is measured: speed and memory depend on the
shapes, ranks, target modules and head of the adapters, which the variants share with a real one; their
accuracy is not measured. That the mixed batches are right is checked on the 8 variants: each row of a mixed
batch against the same rows run through its adapter alone on the server, and against its merged model.

Results: ``benchmarks/results/multi_adapter/`` (results.json, results.md, multi_adapter.png).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from common import (SHARED_DATA, current_rss_bytes, describe_machine, fail, fmt, machine_info, markdown_table, mib,
                    own_peak_rss_bytes, results_dir, write_results)

SCRIPT = Path(__file__).resolve()
WEIGHTS = "adapter_model.safetensors"
TARGET = 0.8  # mixed batches over 8 adapters keep at least this share of single-adapter throughput
STRATEGIES = ("mixed", "grouped", "merged")


# ---- the adapters ------------------------------------------------------------------------------------------

def quantization_for(bits: int) -> dict[str, Any]:
    from peftkit.config.recipe import QuantizationSection

    if bits == 4:
        section = QuantizationSection(bits=4, quant_type="nf4", double_quant=True, compute_dtype="float32")
    else:
        section = QuantizationSection(bits=None if bits == 32 else bits)
    return section.model_dump(mode="json")


def make_variants(source: Path, root: Path, count: int, bits: int, seed: int, noise: float) -> list[dict[str, Any]]:
    """``count`` registered copies of the adapter in ``source`` under ``root``: variant 0 as it is, the others
    with every LoRA B scaled by a random factor in [0.5, 1.5) plus noise of ``noise`` times its own std.
    ``bits`` other than the source's rewrites the recipe's quantization (the variants are then served, and
    merged, from a base loaded that way)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from peftkit.store.artifacts import read_metadata, seal

    metadata = read_metadata(source).to_json()  # copied into each variant's own peftkit.json
    weights = load_file(source / WEIGHTS)
    with safe_open(source / WEIGHTS, "pt") as handle:
        file_metadata = handle.metadata()
    quant = quantization_for(bits)
    generator = torch.Generator().manual_seed(seed)
    variants = []
    for index in range(count):
        name = f"{metadata['name']}-v{index}"
        folder = root / name
        shutil.copytree(source, folder)
        factor = 1.0 if index == 0 else 0.5 + float(torch.rand((), generator=generator))
        if index:
            perturbed = {}
            for key, tensor in weights.items():
                if key.endswith("lora_B.weight"):
                    tensor = tensor * factor + noise * tensor.std() * torch.randn(tensor.shape, generator=generator)
                perturbed[key] = tensor.contiguous()
            save_file(perturbed, folder / WEIGHTS, metadata=file_metadata)
        fields = {k: v for k, v in metadata.items() if k != "files"}
        fields["name"] = name
        if fields["recipe"]["quantization"].get("bits") != quant["bits"]:
            fields["recipe"] = {**fields["recipe"], "quantization": quant}
        info = {"of": metadata["name"], "index": index, "lora_B_factor": round(factor, 4),
                "lora_B_noise": 0.0 if index == 0 else noise, "synthetic": index > 0}
        # peftkit.json's schema has no benchmark field: lineage goes under provenance
        fields["provenance"] = {**fields.get("provenance", {}), "benchmark_variant": info}
        seal(folder, fields)
        variants.append({"name": name, **info})
    return variants


def read_texts(path: Path, rows: int) -> list[str]:
    """The first ``rows`` sentences of a GLUE-style tsv (header with a ``sentence`` column), cycled if short."""
    lines = path.read_text().splitlines()
    column = lines[0].split("\t").index("sentence")
    sentences = [line.split("\t")[column].strip() for line in lines[1:] if line.strip()]
    if not sentences:
        fail(f"{path}: no sentences")
    return [sentences[i % len(sentences)] for i in range(rows)]


# ---- the three strategies ----------------------------------------------------------------------------------

class MergedModel:
    """One adapter merged into its float32 base: a plain transformers classifier, its own tokenization."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length

    def outputs(self, texts: list[str], batch_size: int) -> list[Any]:
        import torch

        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        columns = list(encoded.keys())
        order = sorted(range(len(texts)), key=lambda i: len(encoded["input_ids"][i]))
        results: list[Any] = [None] * len(texts)
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                batch = self.tokenizer.pad({c: [encoded[c][i] for i in chunk] for c in columns}, return_tensors="pt")
                logits = self.model(**batch).logits.float()
                for i, row in zip(chunk, logits):
                    results[i] = row
        return results


def build_merged(registry: Any, name: str, tokenizer: Any, probe: list[str]) -> tuple[MergedModel, dict[str, Any]]:
    """The exact float32 merge ``peftkit merge`` does, kept in memory; its rounding against the unmerged
    adapter (on the dequantized base) over ``probe``."""
    from peftkit.store.artifacts import read_metadata
    from peftkit.core.drift import Sample
    from peftkit.store.loading import LoadedAdapter
    from peftkit.ops.merge import merged_float_model

    folder = registry.folder(name)
    metadata = read_metadata(folder)
    recipe = metadata.recipe
    task = metadata.task.head()
    loaded = LoadedAdapter(folder, metadata, recipe, task, tokenizer, None)
    batch = dict(tokenizer(probe, truncation=True, max_length=recipe.data.max_length, padding=True,
                           return_tensors="pt"))
    import warnings

    import torch

    with warnings.catch_warnings():  # transformers' deprecation of a name peft still calls while merging
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*is_gradient_checkpointing")
        model, rounding = merged_float_model(loaded, Sample("probe", len(probe), [batch]), torch.device("cpu"))
    return MergedModel(model.eval(), tokenizer, recipe.data.max_length), rounding


def assign(count: int, names: list[str]) -> list[str]:
    return [names[i % len(names)] for i in range(count)]


def rows_of(names: list[str], name: str) -> list[int]:
    return [i for i, n in enumerate(names) if n == name]


def runners(server: Any, merged: dict[str, MergedModel], texts: list[str], names: list[str],
            batch_size: int) -> dict[str, Callable[[], None]]:
    groups = {name: [texts[i] for i in rows_of(names, name)] for name in dict.fromkeys(names)}
    return {
        "mixed": lambda: server.outputs(texts, names, batch_size),
        "grouped": lambda: [server.outputs(rows, name, batch_size) for name, rows in groups.items()],
        "merged": lambda: [merged[name].outputs(rows, batch_size) for name, rows in groups.items()],
    }


def timed(fn: Callable[[], Any]) -> dict[str, float]:
    """Wall-clock and CPU seconds of ``fn()`` (this process's CPU time: all its threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def swap_in(auto_class: Any, folder: Path, tokenizer: Any, text: str) -> None:
    """Load a saved merged model and classify one row: the row makes every weight be read, which loading
    alone may leave to the first forward (safetensors files are memory-mapped)."""
    import torch

    model = auto_class.from_pretrained(folder).eval()
    with torch.no_grad():
        model(**tokenizer([text], return_tensors="pt"))


def padding_ratio(lengths: list[int], groups: list[list[int]], batch_size: int) -> float:
    """Token positions computed (each batch padded to its longest row, rows sorted by length within each group
    as the server and the merged path do) per real token."""
    computed = 0
    for group in groups:
        ordered = sorted(lengths[i] for i in group)
        computed += sum(max(chunk) * len(chunk) for chunk in
                        (ordered[k:k + batch_size] for k in range(0, len(ordered), batch_size)))
    return computed / sum(lengths)


# ---- checks ------------------------------------------------------------------------------------------------

def check_mixed(server: Any, merged: dict[str, MergedModel], texts: list[str], batch_size: int) -> dict[str, Any]:
    """Each row of a mixed batch over all the server's adapters against its adapter alone on the server and
    against its merged model; and how far the variants' outputs are from each other (they must differ)."""
    import torch

    names = assign(len(texts), server.names)
    mixed = torch.stack(server.outputs(texts, names, batch_size))
    alone = torch.zeros_like(mixed)
    by_merged = torch.zeros_like(mixed)
    every = {}
    for name in server.names:
        every[name] = torch.stack(server.outputs(texts, name, batch_size))
        index = rows_of(names, name)
        alone[index] = every[name][index]
        by_merged[index] = torch.stack(merged[name].outputs([texts[i] for i in index], batch_size))
    scale = float(mixed.abs().max())
    first = every[server.names[0]]
    spread = max((float((every[n] - first).abs().max()) for n in server.names[1:]), default=0.0)
    result = {
        "rows": len(texts), "adapters": len(server.names), "max_abs_logit": scale,
        "mixed_vs_alone_max_abs_diff": float((mixed - alone).abs().max()),
        "mixed_vs_merged_max_abs_diff": float((mixed - by_merged).abs().max()),
        "variants_max_abs_diff_from_v0": spread,
        "same_label_mixed_vs_merged": float((mixed.argmax(-1) == by_merged.argmax(-1)).float().mean()),
    }
    tolerance = 1e-4 * max(scale, 1.0)
    result["ok"] = (result["mixed_vs_alone_max_abs_diff"] <= tolerance
                    and result["mixed_vs_merged_max_abs_diff"] <= 1e-3 * max(scale, 1.0)
                    and (len(server.names) == 1 or spread > 100 * tolerance))
    return result


# ---- memory, in a child process per N ----------------------------------------------------------------------


def server_memory(registry: Path, names: list[str], texts: list[str]) -> dict[str, Any]:
    """Load a server with ``names``, run one batch: ``server.memory()`` and this process's resident memory."""
    from peftkit.serve.serving import load_server

    server = load_server(registry, names)
    server.outputs(texts, assign(len(texts), names), len(texts))
    return {"memory": server.memory(), "rss_bytes": current_rss_bytes(), "peak_rss_bytes": own_peak_rss_bytes()}


def import_serving_libraries(folder: Path) -> None:
    """Import what loading a server of the adapter in ``folder`` imports (bitsandbytes, peft's LoRA layers,
    the tokenizer and the base's model class: seconds of CPU), once, before the memory children are forked."""
    import bitsandbytes  # noqa: F401
    import peft.tuners.lora  # noqa: F401
    from transformers import MODEL_MAPPING, AutoConfig, PreTrainedTokenizerFast  # noqa: F401
    from transformers.integrations import bitsandbytes as _  # noqa: F401

    from peftkit.store.artifacts import read_metadata
    from peftkit.core.models import resolve_base

    base = resolve_base(read_metadata(folder).recipe.base)
    MODEL_MAPPING[type(AutoConfig.from_pretrained(base.path))]


def fork_memory_child(registry: Path, names: list[str], texts: list[str]) -> tuple[int, int]:
    """:func:`server_memory` in a forked child; returns its pid and the pipe its JSON answer comes through.

    Forked before this process loads any model (and before torch has started a thread pool, which a fork
    would not carry over), the child starts with the libraries imported and nothing else, as a serving process
    would, and pays no second start-up; its RSS counts what it touches of what it shares with this process.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        return pid, read_end
    os.close(read_end)
    try:  # whatever happens, this process must never return into the caller's code
        try:
            answer = {"ok": True, **server_memory(registry, names, texts)}
        except BaseException as exc:  # the parent reports it
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        with os.fdopen(write_end, "w") as pipe:
            pipe.write(json.dumps(answer))
    finally:
        os._exit(0)


def collect_memory_child(pid: int, read_end: int, count: int) -> dict[str, Any]:
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    answer = json.loads(text) if text else {"ok": False, "error": "it died without an answer"}
    if not answer.pop("ok"):
        fail(f"the memory child for {count} adapter(s) failed: {answer['error']}")
    return answer


# ---- the run -----------------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=256, help="SST-2 dev sentences classified per timed pass")
    p.add_argument("--adapters", nargs="+", type=int, default=[1, 2, 4, 8], help="adapter counts N")
    p.add_argument("--bits", type=int, choices=[4, 8, 32], default=4, help="the shared base's precision")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per N and strategy (the median is kept)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (0: torch's default); one by default, as in compare_methods.py")
    p.add_argument("--registry", default=str(SCRIPT.parent.parent / "adapters"), help="where the source adapter is")
    p.add_argument("--adapter", default="sst2-qlora", help="the registered adapter the variants are made from")
    p.add_argument("--data", default=str(SHARED_DATA / "glue" / "SST-2" / "dev.tsv"), help="tsv with a sentence column")
    p.add_argument("--check-rows", type=int, default=32, help="rows of the mixed-batch correctness check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=0.5, help="noise added to the variants' LoRA B, times B's std")
    p.add_argument("--out", help="results folder (default benchmarks/results/multi_adapter)")
    args = p.parse_args(argv)
    if min(args.adapters) < 1 or args.rows < max(args.adapters) or args.repeats < 1 or args.batch_size < 1:
        fail("--adapters, --repeats and --batch-size must be >= 1, and --rows at least the largest N")
    args.adapters = sorted(set(args.adapters))
    return args


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def summarise(args: argparse.Namespace, times: dict[tuple[int, str], list[dict[str, float]]],
              memory: dict[int, dict[str, Any]], merged_bytes: int, swap: dict[str, float],
              padding: dict[int, dict[str, float]]) -> list[dict[str, Any]]:
    """Per N: throughput from CPU time (``rows_per_cpu_second``, the headline: with one thread, what the
    core did, whoever else was waiting for it) and from wall time (``rows_per_second``), memory, padding."""
    single = min(args.adapters)

    def seconds(n: int, strategy: str, clock: str) -> list[float]:
        return [t[clock] for t in times[(n, strategy)]]

    rows = []
    for n in args.adapters:
        row: dict[str, Any] = {"adapters": n}
        for strategy in STRATEGIES:
            for clock, key in (("cpu", "rows_per_cpu_second"), ("wall", "rows_per_second")):
                row[f"{strategy}_{key}"] = args.rows / median(seconds(n, strategy, clock))
                row[f"{strategy}_{clock}_seconds"] = [round(x, 6) for x in seconds(n, strategy, clock)]
        for clock, key in (("cpu", "rows_per_cpu_second"), ("wall", "rows_per_second")):
            suffix = "" if clock == "cpu" else "_wall"
            single_seconds, mixed_seconds = seconds(single, "mixed", clock), seconds(n, "mixed", clock)
            row[f"mixed_of_single{suffix}"] = median(single_seconds) / median(mixed_seconds)
            row[f"mixed_of_single_paired{suffix}"] = median([a / b for a, b in zip(single_seconds, mixed_seconds)])
            row[f"mixed_of_grouped{suffix}"] = row[f"mixed_{key}"] / row[f"grouped_{key}"]
            # one merged model resident at a time: a pass over N > 1 adapters swaps each one in once
            swaps = n if n > 1 else 0
            row[f"merged_with_swaps_{key}"] = args.rows / (median(seconds(n, "merged", clock)) + swaps * swap[clock])
        row["padding_mixed"], row["padding_grouped"] = padding[n]["mixed"], padding[n]["grouped"]
        served = memory[n]["memory"]
        row.update(base_bytes=served["base_bytes"], adapter_bytes=served["adapters"],
                   adapters_total_bytes=sum(served["adapters"].values()), server_total_bytes=served["total_bytes"],
                   process_rss_bytes=memory[n]["rss_bytes"], process_peak_rss_bytes=memory[n]["peak_rss_bytes"],
                   merged_models_bytes=n * merged_bytes)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    return markdown_table(rows, [
        ("N", lambda r: r["adapters"]),
        ("mixed", lambda r: fmt(r["mixed_rows_per_cpu_second"], 1)),
        ("of single", lambda r: f"{100 * r['mixed_of_single']:.0f} %"),
        ("grouped", lambda r: fmt(r["grouped_rows_per_cpu_second"], 1)),
        ("merged", lambda r: fmt(r["merged_rows_per_cpu_second"], 1)),
        ("merged + swaps", lambda r: fmt(r["merged_with_swaps_rows_per_cpu_second"], 1)),
        ("padding mixed / grouped", lambda r: f"{r['padding_mixed']:.2f} / {r['padding_grouped']:.2f}"),
        ("adapters KiB", lambda r: fmt(r["adapters_total_bytes"] / 1024, 0)),
        ("server MiB", lambda r: mib(r["server_total_bytes"])),
        ("process RSS MiB", lambda r: mib(r["process_rss_bytes"])),
        ("N merged models MiB", lambda r: mib(r["merged_models_bytes"])),
    ])


def plot(rows: list[dict[str, Any]], folder: Path, title: str) -> str:
    from plots import lines

    ns = [r["adapters"] for r in rows]
    single = rows[0]["mixed_rows_per_cpu_second"] / rows[0]["mixed_of_single"]
    throughput = {
        "mixed batches (one server)": (ns, [r["mixed_rows_per_cpu_second"] for r in rows]),
        "grouped by adapter (one server)": (ns, [r["grouped_rows_per_cpu_second"] for r in rows]),
        "merged models, loaded": (ns, [r["merged_rows_per_cpu_second"] for r in rows]),
        "merged models, one swap each": (ns, [r["merged_with_swaps_rows_per_cpu_second"] for r in rows]),
        f"{TARGET:.0%} of single adapter": ([ns[0], ns[-1]], [TARGET * single] * 2),
    }
    memory = {
        "server: base + adapters": (ns, [r["server_total_bytes"] / 2**20 for r in rows]),
        "server process RSS": (ns, [r["process_rss_bytes"] / 2**20 if r["process_rss_bytes"] else None for r in rows]),
        "N merged float32 models": (ns, [r["merged_models_bytes"] / 2**20 for r in rows]),
    }
    path = folder / "multi_adapter.png"
    lines(path, title,
          [("adapters N", "rows / CPU-second (1 thread)", throughput), ("adapters N", "MiB", memory)], log_x=True)
    return path.name


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    import torch

    from peftkit.store.artifacts import read_metadata
    from peftkit.errors import PeftkitError
    from peftkit.store.registry import Registry
    from peftkit.serve.serving import load_server

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    folder = results_dir("multi_adapter", args.out)
    machine = machine_info()
    print(f"machine: {describe_machine(machine)}", flush=True)
    texts = read_texts(Path(args.data), args.rows)
    started = time.perf_counter()

    def say(line: str) -> None:
        print(f"[{time.perf_counter() - started:4.0f} s] {line}", flush=True)

    with tempfile.TemporaryDirectory(prefix="multi-adapter-") as tmp:
        work = Path(tmp)
        try:
            source = Registry(args.registry).folder(args.adapter)
            source_metadata = read_metadata(source).to_json()
            variants = make_variants(source, work / "adapters", max(args.adapters), args.bits, args.seed, args.noise)
            registry = Registry(work / "adapters")
            names = [v["name"] for v in variants]
            say(f"{len(names)} variants of {args.adapter} in {registry.root}")
            import_serving_libraries(registry.folder(names[0]))
            # the memory children run while this process loads and merges; they are done before any timing
            children = {n: fork_memory_child(registry.root, names[:n], texts[:args.batch_size]) for n in args.adapters}
            servers = {n: load_server(registry, names[:n]) for n in args.adapters}
            tokenizer = servers[max(args.adapters)].tokenizer
            merged, rounding = {}, {}
            for name in names:
                merged[name], rounding[name] = build_merged(registry, name, tokenizer, texts[:16])
            merged_bytes = int(merged[names[0]].model.get_memory_footprint())
            say(f"{len(merged)} merged float32 models built, {mib(merged_bytes)} MiB each")
            check = check_mixed(servers[max(args.adapters)], merged, texts[:args.check_rows], args.batch_size)
            say(f"mixed-batch check: {json.dumps(check)}")
            memory = {n: collect_memory_child(*child, n) for n, child in children.items()}
            say("memory measured: " + ", ".join(f"N={n} RSS {mib(m['rss_bytes'])} MiB" for n, m in memory.items()))
            swap_folder = work / "merged-v0"
            merged[names[0]].model.save_pretrained(swap_folder)
            auto_class = type(merged[names[0]].model)
            swaps = [timed(lambda: swap_in(auto_class, swap_folder, tokenizer, texts[0])) for _ in range(3)]
            swap = {clock: median([t[clock] for t in swaps]) for clock in ("wall", "cpu")}
            encoded = tokenizer(texts, truncation=True, max_length=merged[names[0]].max_length)
            lengths = [len(ids) for ids in encoded["input_ids"]]
            padding = {}
            for n in args.adapters:
                owners = assign(len(texts), names[:n])
                padding[n] = {"mixed": padding_ratio(lengths, [list(range(len(texts)))], args.batch_size),
                              "grouped": padding_ratio(lengths, [rows_of(owners, m) for m in names[:n]],
                                                       args.batch_size)}
            plans = {n: runners(servers[n], merged, texts, assign(len(texts), names[:n]), args.batch_size)
                     for n in args.adapters}
            warm = texts[:args.batch_size]
            for n in args.adapters:
                for run in runners(servers[n], merged, warm, assign(len(warm), names[:n]), args.batch_size).values():
                    run()
            times: dict[tuple[int, str], list[dict[str, float]]] = {
                (n, s): [] for n in args.adapters for s in STRATEGIES}
            passes = [(n, strategy) for n in args.adapters for strategy in STRATEGIES]
            for repeat in range(args.repeats):
                # each repeat starts further along the list: no pass always runs first, or after the same one
                start = repeat * len(passes) // args.repeats
                for n, strategy in passes[start:] + passes[:start]:
                    times[(n, strategy)].append(timed(plans[n][strategy]))
                say(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(
                    f"N={n} " + "/".join(f"{args.rows / times[(n, s)][-1]['cpu']:.0f}" for s in STRATEGIES)
                    for n in args.adapters) + " rows/CPU-s (mixed/grouped/merged)")
        except PeftkitError as exc:
            fail(str(exc))
            raise
    rows = summarise(args, times, memory, merged_bytes, swap, padding)
    biggest = rows[-1]
    target = {"adapters": biggest["adapters"], "single_adapters": rows[0]["adapters"], "clock": "cpu",
              "mixed_of_single": biggest["mixed_of_single"], "paired_median": biggest["mixed_of_single_paired"],
              "mixed_of_single_wall": biggest["mixed_of_single_wall"], "target": TARGET,
              "met": biggest["mixed_of_single"] >= TARGET}
    payload = {
        "machine": machine, "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "variants": variants, "mixed_batch_check": check, "merge_rounding": rounding,
        "merged_model_bytes": merged_bytes, "swap_seconds": swaps, "swap_seconds_median": swap, "rows": rows,
        "target": target,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    adapter = source_metadata["recipe"]["adapter"]
    method = {"lora": "LoRA", "adalora": "AdaLoRA"}.get(adapter["method"], adapter["method"])
    data = "SST-2 dev" if Path(args.data).parts[-3:] == ("glue", "SST-2", "dev.tsv") else Path(args.data).name
    title = (f"One {args.bits}-bit base serving N {method} adapters ({source_metadata['base']['identity']}, "
             f"{data} rows, batch {args.batch_size})")
    payload["plots"] = [plot(rows, folder, title)]
    verdict = "met" if target["met"] else "NOT met"
    markdown = (
        f"Machine: {describe_machine(machine)}; {args.threads or 'default'} CPU thread(s).\n\n"
        f"{args.adapter} ({method} r={adapter.get('r', adapter.get('target_r'))} + head) and {max(args.adapters) - 1} "
        f"synthetic variant(s) of it (LoRA B perturbed; speed and memory only, accuracy not measured) on one "
        f"{args.bits}-bit base; {args.rows} {data} rows "
        f"round-robin over N adapters, batch {args.batch_size}, median of {args.repeats} passes. Throughput in rows "
        f"per CPU-second of this process (with one thread: what its core did, however busy the machine); "
        f"padding: token positions computed per real token.\n\n"
        + table(rows) + "\n\n"
        f"Target: mixed batches over {target['adapters']} adapters keep {100 * target['mixed_of_single']:.0f} % of "
        f"single-adapter throughput (paired per repeat: {100 * target['paired_median']:.0f} %; by wall-clock time: "
        f"{100 * target['mixed_of_single_wall']:.0f} %) against {TARGET:.0%}: {verdict}. Swapping in one merged model "
        f"takes {swap['cpu']:.2f} CPU-s ({swap['wall']:.2f} s wall) "
        f"({mib(merged_bytes)} MiB each). Mixed-batch check over {check['rows']} rows and {check['adapters']} "
        f"adapters: largest difference {check['mixed_vs_alone_max_abs_diff']:.1e} against each adapter alone, "
        f"{check['mixed_vs_merged_max_abs_diff']:.1e} against its merged model (logits up to "
        f"{check['max_abs_logit']:.2f}); {'ok' if check['ok'] else 'FAILED'}.")
    write_results(folder, payload, markdown)
    print(markdown)
    print(f"\nwrote {folder}/results.json, results.md, {', '.join(payload['plots'])}")


if __name__ == "__main__":
    main()
