"""A GGUF adapter from recipes/alpaca-qlora.yaml in llama.cpp (llama-cpp-python), against peft on the same base.

    python benchmarks/gguf_llama_cpp.py [--adapter NAME --registry DIR] [--tokens 32]

Trains ``alpaca-qlora`` (its 40 steps) unless ``--adapter`` names a registered causal-LM adapter, exports it with
``peftkit export --format gguf``, and runs the README's prompt (in the chat template the adapter was trained with)
through two engines, each with and without the adapter, on the same token ids:

- llama.cpp on the packaged SmolLM2 GGUF (Q4_1 weights; its CPU matmuls also round activations to 8 bits), the
  adapter loaded from the exported file;
- transformers + peft on that GGUF dequantized to float32 (how peftkit loads the base), the adapter from peftkit's
  own files. Not the NF4 base the adapter trained on: llama.cpp never sees that one.

Reported: the prompt's next-token logits base against base (the floor the engines' arithmetic sets), adapted
against adapted, and the adapter's own change of those logits (with minus without) as each engine sees it: its
correlation and relative difference. A wrong tensor name, scale or Q/K permutation shows there first. Then the
greedy continuations token by token. Stored in ``benchmarks/results/gguf_llama_cpp/``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from common import REPO, describe_machine, fail, machine_info, results_dir, write_results

PROMPT = "Give three tips for staying healthy."  # the README's `peftkit generate` example


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", help="a registered causal-LM adapter on smollm2-135m (default: train alpaca-qlora)")
    p.add_argument("--registry", help="its registry (default: a temporary one)")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens to compare")
    p.add_argument("--out", help="results folder (default benchmarks/results/gguf_llama_cpp)")
    p.add_argument("--loud", type=float, default=8.0, help="the adapter's update times this for the loud comparison")
    p.add_argument("--repack", action="store_true",
                   help="let llama.cpp repack the weights (default off: see without_weight_repacking)")
    return p.parse_args(argv)


def peftkit(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "peftkit", *args], check=True, cwd=REPO)


def without_weight_repacking() -> None:
    """llama.cpp's ``--no-repack`` (``use_extra_bufts = false``) for every model llama-cpp-python loads: on a CPU
    that reports AMX, llama.cpp repacks the weights for AMX tiles, and a virtual machine that does not let a
    process use them (these sandboxes) dies with an illegal instruction. Without repacking the same weights run on
    the AVX512/AVX2 kernels."""
    import llama_cpp.llama as bindings

    default = bindings.llama_cpp.llama_model_default_params

    def params() -> Any:
        chosen = default()
        chosen.use_extra_bufts = False
        return chosen

    bindings.llama_cpp.llama_model_default_params = params


def llama_cpp_run(base_gguf: Path, lora: Optional[Path], ids: list[int], tokens: int, scale: float = 1.0
                  ) -> tuple[list[float], list[int]]:
    """The prompt's next-token logits and the greedy continuation, in llama.cpp (the adapter times ``scale``)."""
    from llama_cpp import Llama

    kwargs = {"lora_path": str(lora), "lora_scale": scale} if lora else {}
    llm = Llama(model_path=str(base_gguf), n_ctx=512, logits_all=True, verbose=False, n_threads=2, **kwargs)
    llm.eval(ids)
    first = [float(x) for x in llm.scores[llm.n_tokens - 1]]
    out: list[int] = []
    for _ in range(tokens):
        nxt = int(llm.scores[llm.n_tokens - 1].argmax())
        out.append(nxt)
        if nxt == llm.token_eos():
            break
        llm.eval([nxt])
    return first, out


def unpermuted_file(folder: Path, entry: Any, work: Path) -> Path:
    """The adapter as a GGUF file whose Q and K rows are left in transformers' order: what a converter that
    forgot llama.cpp's permutation would write."""
    from transformers import AutoConfig

    from peftkit.core.models import resolve_base
    from peftkit.ops import gguf_export
    from peftkit.store.snapshot import read_verified

    files = read_verified(folder, entry.metadata)
    weights, config = gguf_export.adapter_as_lora(files, entry.metadata.adapter.method)
    base_config = AutoConfig.from_pretrained(resolve_base(entry.metadata.recipe.base).path)
    kept, gguf_export.permute_rows = gguf_export.permute_rows, lambda B, heads: B
    try:
        tensors = gguf_export.gguf_tensors(gguf_export.lora_factors(weights, config), base_config,
                                           float(config["lora_alpha"]))
    finally:
        gguf_export.permute_rows = kept
    path = work / "unpermuted.gguf"
    gguf_export.write_gguf(path, tensors, base_config, float(config["lora_alpha"]), "unpermuted")
    return path


def peft_run(model: Any, ids: list[int], tokens: int) -> tuple[list[float], list[int]]:
    """The same in transformers + peft, greedy step by step on the full sequence (no cache: nothing to differ)."""
    import torch

    seq = list(ids)
    first: list[float] = []
    with torch.no_grad():
        for step in range(tokens):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
            if step == 0:
                first = logits.tolist()
            nxt = int(logits.argmax())
            seq.append(nxt)
            if nxt == model.config.eos_token_id:
                break
    return first, seq[len(ids):]


def compare(a: list[float], b: list[float]) -> dict[str, float]:
    import torch

    x, y = torch.tensor(a), torch.tensor(b)
    return {"max_abs_diff": float((x - y).abs().max()), "rel_diff": float((x - y).norm() / y.norm()),
            "correlation": float(torch.corrcoef(torch.stack([x, y]))[0, 1]), "same_argmax": bool(x.argmax() == y.argmax())}


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        fail("llama-cpp-python is not installed: pip install llama-cpp-python (it builds llama.cpp from source)")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO))
    from peftkit.core.models import PACKAGED, installed_folder, load_tokenizer, resolve_base
    from peftkit.store.registry import Registry

    info = machine_info()
    print(describe_machine(info), flush=True)
    work = Path(tempfile.mkdtemp(prefix="peftkit-gguf-"))
    registry = Path(args.registry) if args.registry else work / "adapters"
    name = args.adapter or "alpaca-qlora"
    if not args.adapter:
        peftkit("train", "recipes/alpaca-qlora.yaml", "--set", f"output.registry={registry}", "--set",
                f"output.runs={work / 'runs'}", "--set", "train.progress=false")
    peftkit("export", name, "--format", "gguf", "--out", str(work / "gguf"), "--registry", str(registry))

    entry = Registry(registry).get(name)
    folder, recipe = entry.folder, entry.metadata.recipe
    packaged = PACKAGED["smollm2-135m"]
    base_gguf = installed_folder("smollm2-135m") / packaged.gguf_file
    base = resolve_base(recipe.base)
    tokenizer = load_tokenizer(base, recipe.base)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)

    if not args.repack:
        without_weight_repacking()
    runs = {"llama.cpp base": llama_cpp_run(base_gguf, None, ids, args.tokens),
            "llama.cpp adapted": llama_cpp_run(base_gguf, work / "gguf" / "adapter.gguf", ids, args.tokens)}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32),
                                      str(folder)).eval()
    runs["peft adapted"] = peft_run(model, ids, args.tokens)
    with model.disable_adapter():
        runs["peft base"] = peft_run(model, ids, args.tokens)

    # The same at --loud times the adapter's update, in both engines, so that the update stands well above the
    # engines' own difference; and a file written with Q/K rows left unpermuted, to show what a wrong file gives.
    runs["llama.cpp loud"] = llama_cpp_run(base_gguf, work / "gguf" / "adapter.gguf", ids, 1, args.loud)
    runs["llama.cpp loud, unpermuted"] = llama_cpp_run(base_gguf, unpermuted_file(folder, entry, work), ids, 1,
                                                       args.loud)
    for module in model.modules():
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
            module.scaling["default"] *= args.loud
    runs["peft loud"] = peft_run(model, ids, 1)

    change = lambda engine, arm="adapted": [w - b for w, b in zip(runs[f"{engine} {arm}"][0],  # noqa: E731
                                                                   runs[f"{engine} base"][0])]
    summary = {
        "base_vs_base": compare(runs["llama.cpp base"][0], runs["peft base"][0]),
        "adapted_vs_adapted": compare(runs["llama.cpp adapted"][0], runs["peft adapted"][0]),
        "adapter_change": compare(change("llama.cpp"), change("peft")),
        "adapter_change_size": float(torch.tensor(change("peft")).norm() / torch.tensor(runs["peft base"][0]).norm()),
        "loud_adapter_change": compare(change("llama.cpp", "loud"), change("peft", "loud")),
        "loud_adapter_change_unpermuted_file": compare(change("llama.cpp", "loud, unpermuted"), change("peft", "loud")),
        "loud_adapter_change_size": float(torch.tensor(change("peft", "loud")).norm()
                                          / torch.tensor(runs["peft base"][0]).norm()),
    }
    texts = {k: tokenizer.decode(v[1]) for k, v in runs.items()}
    agree = lambda a, b: next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))  # noqa: E731
    summary["greedy_tokens_equal_adapted"] = agree(runs["llama.cpp adapted"][1], runs["peft adapted"][1])
    summary["greedy_tokens_equal_base"] = agree(runs["llama.cpp base"][1], runs["peft base"][1])
    summary["adapter_changes_greedy_text"] = runs["peft adapted"][1] != runs["peft base"][1]
    lines = [f"# GGUF adapter in llama.cpp ({llama_cpp.__version__}) against peft, SmolLM2-135M\n",
             describe_machine(info), "", f"Adapter `{name}`; prompt {PROMPT!r} in the chat template, "
             f"{len(ids)} tokens; greedy {args.tokens} tokens.", "",
             "| next-token logits | max abs diff | relative diff | correlation | same argmax |", "|---|---|---|---|---|"]
    for key in ("base_vs_base", "adapted_vs_adapted", "adapter_change", "loud_adapter_change",
                "loud_adapter_change_unpermuted_file"):
        c = summary[key]
        lines.append(f"| {key.replace('_', ' ')} | {c['max_abs_diff']:.3f} | {c['rel_diff']:.4f} | "
                     f"{c['correlation']:.5f} | {c['same_argmax']} |")
    lines += ["", f"The adapter changes the logits by {summary['adapter_change_size']:.3f} of their norm (peft); "
              f"at {args.loud}x (llama.cpp's lora_scale, peft's scaling) by {summary['loud_adapter_change_size']:.3f}. "
              f"Greedy tokens equal before the first difference: {summary['greedy_tokens_equal_adapted']} of "
              f"{args.tokens} adapted, {summary['greedy_tokens_equal_base']} base.", ""]
    lines += [f"- **{k}**: {json.dumps(v)}" for k, v in texts.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(results_dir("gguf_llama_cpp", args.out),
                  {"machine": info, "settings": vars(args), "prompt_ids": ids, "summary": summary,
                   "greedy": {k: v[1] for k, v in runs.items()}, "texts": texts}, text)


if __name__ == "__main__":
    main()
