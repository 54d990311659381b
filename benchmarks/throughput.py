"""Throughput against sequence length and batch size, and quantized memory against model size.

    python benchmarks/throughput.py                          # MiniLM fp32 / 8-bit / 4-bit, then the memory sweep
    python benchmarks/throughput.py --model DIR --seq-lens 16 32 --batch-sizes 2 8 --sizes 64 128

1. Throughput: MiniLM loaded through peftkit (``load_pretrained`` + ``freeze_quantized_layers``) on a float32,
   LLM.int8 or NF4 base, with LoRA r=8 on every linear layer; training steps (forward, backward, AdamW) and
   inference passes on random token ids of exactly the given length (no padding), timed after one warm-up
   step. Sequence lengths are swept at one batch size and batch sizes at one length.
2. Memory: synthetic Llama models of growing width (plus the real MiniLM and SmolLM2-135M) quantized to NF4
   with double quantization and to LLM.int8. For the quantized linear layers, bytes per weight parameter,
   counting the packed weights and every quantization constant (absmax, nested absmax and its float32 scale per
   256 blocks, code books, offset; biases stay float32 and are reported apart). NF4 with double quantization
   allows 4 bits + 8/64 + 32/(64*256) bits = 0.516 bytes per parameter; LLM.int8 1 byte + one float32 scale
   per output row.

Results: ``benchmarks/results/throughput/`` (JSON, Markdown, PNG).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from common import describe_machine, fail, fmt, machine_info, markdown_table, mib, results_dir, write_results

NF4_DQ_BOUND = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # bytes per parameter: 0.5159
PRECISIONS = {"fp32": None, "8bit": 8, "4bit": 4}


def quantization(bits: Optional[int]) -> Any:
    from peftkit.config.recipe import QuantizationSection

    if bits == 4:
        return QuantizationSection(bits=4, quant_type="nf4", double_quant=True, compute_dtype="float32")
    return QuantizationSection(bits=bits)


def load(model: str, bits: Optional[int], device: Any, causal: bool = False) -> Any:
    """A base model loaded as peftkit loads it, heads kept in full precision, quantized layers frozen."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from peftkit.core.models import load_pretrained, resolve_base
    from peftkit.core.quantized import freeze_quantized_layers
    from peftkit.config.recipe import BaseModelSection

    spec = BaseModelSection(model=model)
    ref = resolve_base(spec)
    if causal:
        loaded = load_pretrained(AutoModelForCausalLM, ref, spec, quantization(bits), [], device)
    else:
        loaded = load_pretrained(AutoModelForSequenceClassification, ref, spec, quantization(bits), ["classifier"],
                                 device, num_labels=2)
    freeze_quantized_layers(loaded)
    return loaded


def is_causal_lm(model: str) -> bool:
    from transformers import AutoConfig

    from peftkit.core.models import resolve_base
    from peftkit.config.recipe import BaseModelSection

    config = AutoConfig.from_pretrained(resolve_base(BaseModelSection(model=model)).path)
    return any(a.endswith("ForCausalLM") for a in config.architectures or [])


def with_lora(model: Any, bits: Optional[int], r: int = 8) -> Any:
    from peft import LoraConfig

    from peftkit.core.adapters import inject, resolve_target_modules

    targets = resolve_target_modules(model, "all-linear", ("classifier",))
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets, task_type="SEQ_CLS",
                        modules_to_save=["classifier"])
    return inject(model, config, quantized=bits is not None, gradient_checkpointing=False)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(model: Any, batch: int, seq_len: int, steps: int, train: bool, device: Any) -> float:
    """Seconds per step (mean over ``steps`` after one warm-up step) on random ids of exactly ``seq_len``."""
    import torch

    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, seq_len), generator=generator).to(device)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (batch,), generator=generator).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4) if train else None
    model.train(train)
    elapsed = 0.0
    for i in range(steps + 1):
        _sync(device)
        started = time.perf_counter()
        if train:
            logits = model(input_ids=ids, attention_mask=mask).logits
            torch.nn.functional.cross_entropy(logits.float(), labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
        _sync(device)
        if i > 0:  # the first step pays for allocations and kernel selection
            elapsed += time.perf_counter() - started
    return elapsed / steps


def throughput_sweep(args: argparse.Namespace, device: Any) -> list[dict[str, Any]]:
    points = [(args.fixed_batch, s) for s in args.seq_lens]
    points += [(b, args.fixed_len) for b in args.batch_sizes if (b, args.fixed_len) not in points]
    rows = []
    for precision in args.precisions:
        bits = PRECISIONS[precision]
        model = with_lora(load(args.model, bits, device), bits)
        for batch, seq_len in points:
            for mode in ("train", "inference"):
                seconds = time_steps(model, batch, seq_len, args.steps, mode == "train", device)
                row = {"precision": precision, "mode": mode, "batch": batch, "seq_len": seq_len,
                       "seconds_per_step": float(f"{seconds:.6g}"), "examples_per_second": round(batch / seconds, 2),
                       "tokens_per_second": round(batch * seq_len / seconds, 1)}
                rows.append(row)
                print(f"  {precision:<5} {mode:<9} batch {batch:>3} length {seq_len:>4}: "
                      f"{row['examples_per_second']:>9.1f} examples/s {row['tokens_per_second']:>10.0f} tokens/s",
                      flush=True)
        del model
    return rows


def quantized_layer_bytes(model: Any) -> dict[str, Any]:
    """What the bitsandbytes layers of ``model`` hold: weight parameters and the bytes that store them.

    Shared tensors (a code book several layers point at) are counted once, by storage address.
    """
    import bitsandbytes as bnb

    seen: set[int] = set()

    def size(tensor: Any) -> int:
        if tensor is None or tensor.data_ptr() in seen:
            return 0
        seen.add(tensor.data_ptr())
        return tensor.numel() * tensor.element_size()

    out = {"layers": 0, "parameters": 0, "weight_bytes": 0, "constant_bytes": 0, "bias_bytes": 0}
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            out["parameters"] += int(state.shape.numel())
            out["weight_bytes"] += size(module.weight.data)
            out["constant_bytes"] += size(state.absmax) + size(state.code)
            if state.nested:
                out["constant_bytes"] += size(state.state2.absmax) + size(state.state2.code) + size(state.offset)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            out["parameters"] += module.weight.numel()
            out["weight_bytes"] += size(module.weight.data)
            out["constant_bytes"] += size(getattr(module.weight, "SCB", None))
        else:
            continue
        out["layers"] += 1
        out["bias_bytes"] += size(module.bias) if module.bias is not None else 0
    stored = out["weight_bytes"] + out["constant_bytes"]
    out["bytes_per_parameter"] = stored / out["parameters"] if out["parameters"] else None
    return out


def synthetic_llama(folder: Path, hidden: int, layers: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), max_position_embeddings=256,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def memory_sweep(args: argparse.Namespace, device: Any) -> list[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="peftkit-throughput-"))
    models: list[tuple[str, str, bool]] = []
    for hidden in args.sizes:
        models.append((f"llama-h{hidden}x{args.layers}", str(synthetic_llama(work / f"h{hidden}", hidden, args.layers)),
                       True))
    models += [(Path(name).name, name, is_causal_lm(name)) for name in args.real_models]
    rows = []
    for label, model_ref, causal in models:
        fp32_bytes = None
        for bits in (None, 8, 4):
            model = load(model_ref, bits, device, causal=causal)
            footprint = int(model.get_memory_footprint())
            if bits is None:
                fp32_bytes = footprint
                total = sum(p.numel() for p in model.parameters())
                del model
                continue
            held = quantized_layer_bytes(model)
            rows.append({"model": label, "bits": bits, "total_parameters": total, **held,
                         "model_bytes": footprint, "fp32_model_bytes": fp32_bytes,
                         "model_ratio_to_fp32": round(footprint / fp32_bytes, 4)})
            print(f"  {label:<18} {bits}-bit: {held['parameters']:>12,} quantized weights, "
                  f"{held['bytes_per_parameter']:.4f} bytes/parameter; whole model {mib(footprint)} MiB "
                  f"({100 * footprint / fp32_bytes:.1f}% of float32)", flush=True)
            del model
    return rows


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm", help="the encoder for the throughput sweep (name or folder)")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    p.add_argument("--seq-lens", nargs="+", type=int, default=[16, 32, 64, 128])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 16, 64])
    p.add_argument("--fixed-batch", type=int, help="batch size of the length sweep (default: the middle one)")
    p.add_argument("--fixed-len", type=int, help="length of the batch-size sweep (default: the middle one)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per point, after one warm-up step")
    p.add_argument("--sizes", nargs="*", type=int, default=[256, 512, 1024, 1536],
                   help="hidden sizes of the synthetic Llama models (multiples of 64)")
    p.add_argument("--layers", type=int, default=4, help="layers of the synthetic models")
    p.add_argument("--real-models", nargs="*", default=["minilm", "smollm2-135m"])
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default); see compare_methods")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", help="results folder (default benchmarks/results/throughput)")
    args = p.parse_args(argv)
    bad = [s for s in args.sizes if s <= 0 or s % 64]
    if bad:
        fail(f"--sizes: {bad[0]} is not a positive multiple of 64 (bitsandbytes' 4-bit blocks); use 256, 512, ...")
    if min(args.seq_lens + args.batch_sizes) < 1 or args.steps < 1:
        fail("--seq-lens, --batch-sizes and --steps must be >= 1")
    args.fixed_batch = args.fixed_batch or args.batch_sizes[len(args.batch_sizes) // 2]
    args.fixed_len = args.fixed_len or args.seq_lens[len(args.seq_lens) // 2]
    return args


def tables(throughput: list[dict[str, Any]], memory: list[dict[str, Any]]) -> str:
    parts = []
    if throughput:
        parts.append("Throughput (LoRA r=8 on every linear layer; tokens/s, examples/s in brackets):\n\n" + markdown_table(
            throughput, [("precision", lambda r: r["precision"]), ("mode", lambda r: r["mode"]),
                         ("batch", lambda r: r["batch"]), ("length", lambda r: r["seq_len"]),
                         ("tokens/s", lambda r: f"{r['tokens_per_second']:,.0f} ({r['examples_per_second']:,.1f})"),
                         ("ms/step", lambda r: fmt(r["seconds_per_step"], 1, 1000))]))
    if memory:
        parts.append(f"Quantized layers' memory (NF4 + double quantization allows {NF4_DQ_BOUND:.4f} bytes/parameter):"
                     "\n\n" + markdown_table(memory, [
                         ("model", lambda r: r["model"]), ("bits", lambda r: r["bits"]),
                         ("parameters", lambda r: f"{r['total_parameters']:,}"),
                         ("quantized weights", lambda r: f"{r['parameters']:,}"),
                         ("bytes/parameter", lambda r: f"{r['bytes_per_parameter']:.4f}"),
                         ("over the NF4 bound", lambda r: f"{r['bytes_per_parameter'] / NF4_DQ_BOUND:.3f}x"
                          if r["bits"] == 4 else ""),
                         ("model MiB", lambda r: mib(r["model_bytes"])),
                         ("float32 MiB", lambda r: mib(r["fp32_model_bytes"])),
                         ("of float32", lambda r: f"{100 * r['model_ratio_to_fp32']:.1f} %")]))
    return "\n\n".join(parts)


def plot(throughput: list[dict[str, Any]], memory: list[dict[str, Any]], folder: Path,
         args: argparse.Namespace) -> list[str]:
    from plots import lines

    written = []
    if throughput:
        for sweep, key, label in (("seq_len", "seq_len", "sequence length"), ("batch", "batch", "batch size")):
            other = "batch" if key == "seq_len" else "seq_len"
            panels = []
            for mode in ("train", "inference"):
                series = {}
                for precision in args.precisions:
                    fixed = args.fixed_batch if key == "seq_len" else args.fixed_len
                    pts = sorted((r for r in throughput if r["precision"] == precision and r["mode"] == mode
                                  and r[other] == fixed), key=lambda r: r[key])
                    series[precision] = ([r[key] for r in pts], [r["tokens_per_second"] for r in pts])
                panels.append((label, f"{mode} tokens / s", series))
            path = folder / f"throughput_{sweep}.png"
            lines(path, f"MiniLM + LoRA r=8: throughput against {label}", panels, log_x=True)
            written.append(path.name)
    if memory:
        series = {}
        for bits in (4, 8):
            pts = sorted((r for r in memory if r["bits"] == bits), key=lambda r: r["parameters"])
            series[f"{bits}-bit"] = ([r["parameters"] for r in pts], [r["bytes_per_parameter"] for r in pts])
        path = folder / "memory_per_parameter.png"
        lines(path, "Bytes per parameter of the quantized layers against model size",
              [("quantized weight parameters", "bytes / parameter", series)], log_x=True,
              reference=("NF4 + double quant bound", NF4_DQ_BOUND))
        written.append(path.name)
    return written


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    import torch

    from peftkit.errors import PeftkitError
    from peftkit.core.models import pick_device

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    folder = results_dir("throughput", args.out)
    machine = machine_info()
    print(f"machine: {describe_machine(machine)}", flush=True)
    try:
        device = pick_device(args.device)
        throughput = [] if args.skip_throughput else throughput_sweep(args, device)
        memory = [] if args.skip_memory else memory_sweep(args, device)
    except PeftkitError as exc:
        fail(str(exc))
        raise
    payload = {"machine": machine, "settings": {k: v for k, v in vars(args).items() if k != "out"},
               "nf4_double_quant_bound": NF4_DQ_BOUND, "throughput": throughput, "memory": memory}
    payload["plots"] = plot(throughput, memory, folder, args)
    markdown = f"Machine: {describe_machine(machine)}; {args.threads or 'default'} CPU thread(s), device {device}.\n\n" \
        + tables(throughput, memory)
    write_results(folder, payload, markdown)
    print(markdown)
    print(f"\nwrote {folder}/results.json, results.md, {', '.join(payload['plots'])}")


if __name__ == "__main__":
    sys.exit(main())
