"""One base model in memory serving many registered adapters: switched per call or mixed in one batch.

    server = load_server(Registry("adapters"), ["sst2-qlora", "agnews-qlora"])
    server.predict(["great film", "stocks fell"], adapter=["sst2-qlora", "agnews-qlora"])

Every adapter's LoRA weights live in one peft model over the shared base (see ``served_adapter.py`` for why
the task heads do not); a batch runs through the base once, each row through its own adapter's LoRA
weights (peft's ``adapter_names`` routing), and then through its own head. The name ``base`` stands for
the base model without adapter. Rows come out as each adapter gives them alone (``tests/test_serving.py``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from ..core.cpu_paths import path_for
from ..core.models import (describe_quantization, load_pretrained, load_tokenizer, memory_footprint, pick_device,
                           resolve_base, user_trust)
from ..core.quantized import freeze_quantized_layers
from ..errors import PeftkitError
from ..naming import BASE
from ..store.registry import Registry
from ..store.snapshot import read_snapshot
from ..tasks.base import encode_text, score_text
from .served_adapter import ServedAdapter, prepare
from .sharing import check_together, describe_adapter, inject, shared_class

_PEFT_BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


def peft_name(index: int) -> str:
    # registry names may hold '.', which torch refuses in module names: peft knows each adapter by position
    return f"served{index}"
Rows = Sequence[Union[str, dict[str, Any]]]


@dataclass
class Encoded:
    input_ids: list[int]
    token_type_ids: Optional[list[int]] = None


def _is_decoder(config: Any) -> bool:
    return any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))


def _is_encoder_decoder(config: Any) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


@dataclass
class LoadSetup:
    """How :func:`load_server` loaded the shared base: what an adapter added later (``live.py``) must agree with."""
    registry: Registry
    quantized: bool
    auto_class: str
    strip_prefix: Optional[str]
    trust: dict[str, bool]


class Server:
    """Built by :func:`load_server`."""

    def __init__(self, model: nn.Module, peft_model: Any, tokenizer: Any, adapters: dict[str, ServedAdapter],
                 decoder: bool, base_bytes: int, description: dict[str, Any], encoder_decoder: bool = False,
                 setup: Optional[LoadSetup] = None):
        # the base's model class, LoRA layers injected: a decoder's ForCausalLM, an encoder-decoder's
        # ForConditionalGeneration (T5), else an encoder's body
        self.model = model
        self.peft_model = peft_model
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.peft_names = {name: peft_name(i) for i, name in enumerate(adapters)}
        self.decoder = decoder
        self.encoder_decoder = encoder_decoder
        self.base_bytes = base_bytes
        self.description = description
        self.device = next(model.parameters()).device
        self.setup = setup

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def served(self, name: str) -> Optional[ServedAdapter]:
        """The adapter a row name routes to: ``adapter``, or ``adapter:view`` for one task of a multi-task
        adapter (None for ``base``)."""
        return self.adapters.get(name.partition(":")[0])

    def memory(self) -> dict[str, Any]:
        """Bytes of the shared base, and what each adapter adds (its LoRA weights and head)."""
        per_adapter = {}
        shared = {id(p) for p in self.model.parameters()}  # a head may reuse the base's own modules (masked LM)
        for name, served in self.adapters.items():
            internal = f".{self.peft_names[name]}."
            lora = sum(p.numel() * p.element_size() for n, p in self.model.named_parameters()
                       if internal in n and ".lora_" in n)
            head = sum(p.numel() * p.element_size() for p in served.head.parameters()
                       if id(p) not in shared) if served.head else 0
            per_adapter[name] = lora + head
        return {"base_bytes": self.base_bytes, "adapters": per_adapter,
                "total_bytes": self.base_bytes + sum(per_adapter.values())}

    # ---- routing ---------------------------------------------------------------------------------------

    def _names(self, adapter: Union[str, Sequence[str]], count: int) -> list[str]:
        names = [adapter] * count if isinstance(adapter, str) else list(adapter)
        if len(names) != count:
            raise PeftkitError(f"adapter: {len(names)} names for {count} rows; give one name, or one per row")
        for name in dict.fromkeys(names):
            adapter, _, view = name.partition(":")
            views = self.adapters[adapter].task.serve_views() if adapter in self.adapters else []
            if view and adapter in self.adapters and view not in views:
                shown = f"its tasks: {', '.join(views)}" if views else "it has one task; name the adapter alone"
                raise PeftkitError(f"adapter {name!r}: {adapter} has no task {view!r}; {shown}")
            if name != BASE and adapter not in self.adapters:
                import difflib

                close = difflib.get_close_matches(name, [*self.adapters, BASE], n=2, cutoff=0.5)
                hint = f"did you mean {', '.join(close)}?" if close else f"loaded: {', '.join(self.adapters)}, {BASE}"
                raise PeftkitError(f"adapter {name!r} is not loaded in this server; {hint}")
        return names

    @contextmanager
    def _routed(self, names: list[str]) -> Iterator[None]:
        """Inside: each row of the next forward passes goes through its own adapter's LoRA weights."""
        peft_names = [_PEFT_BASE if n == BASE else self.peft_names[n] for n in names]
        with self.peft_model.base_model._enable_peft_forward_hooks(adapter_names=peft_names):
            yield

    def _groups(self, names: list[str]) -> list[list[int]]:
        """Row groups that can share one forward pass: all rows, unless a DoRA adapter is involved (peft's
        mixed batches do not support DoRA), then one group per adapter."""
        if not any(self.adapters[n].use_dora for n in set(names) if n != BASE):
            return [list(range(len(names)))]
        return [[i for i, n in enumerate(names) if n == name] for name in dict.fromkeys(names)]

    # ---- encoding --------------------------------------------------------------------------------------

    def _encode(self, row: Union[str, dict[str, Any]], name: str) -> Encoded:
        fields = {"text": row} if isinstance(row, str) else dict(row)
        served = self.adapters.get(name)
        wanted = ("text", "tokens") if served is not None and "tokens" in served.task.serve_fields else ("text",)
        if not any(field in fields for field in wanted):
            raise PeftkitError(f"a row for {name} has no {' or '.join(repr(f) for f in wanted)} "
                               f"(it has: {', '.join(fields) or 'nothing'})")
        if served is not None:
            ids, types = served.task.serve_encode(fields, self.tokenizer, served.recipe.data.max_length)
        else:  # the base's own rows: plain text
            ids, types = encode_text(str(fields["text"]), self.tokenizer, None)
        return Encoded(ids, types)

    def _pad(self, encoded: list[Encoded], left: bool = False) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in encoded)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        with_types = any(e.token_type_ids is not None for e in encoded)
        types = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            n = len(e.input_ids)
            span = slice(width - n, width) if left else slice(0, n)
            ids[i, span] = torch.tensor(e.input_ids)
            mask[i, span] = 1
            if e.token_type_ids is not None:
                types[i, span] = torch.tensor(e.token_type_ids)
        batch = {"input_ids": ids, "attention_mask": mask}
        if with_types:
            batch["token_type_ids"] = types
        return {k: v.to(self.device) for k, v in batch.items()}

    # ---- forward ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def outputs(self, rows: Rows, adapter: Union[str, Sequence[str]], batch_size: int = 32) -> list[torch.Tensor]:
        """Each row's raw output under its adapter: class logits for a classifier, per-token logits for a
        tagger and a causal LM (and for ``base`` on a decoder), the pooled features for ``base`` on an encoder."""
        names = [name.partition(":")[0] for name in self._names(adapter, len(rows))]  # a task's rows: its adapter's
        encoded = [self._encode(row, name) for row, name in zip(rows, names)]
        results: list[Optional[torch.Tensor]] = [None] * len(rows)
        # similar lengths together: less padding, same results (padding is masked)
        order = sorted(range(len(rows)), key=lambda i: len(encoded[i].input_ids))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            chunk_names = [names[i] for i in chunk]
            for group in self._groups(chunk_names):
                index = [chunk[g] for g in group]
                for i, out in zip(index, self._forward([encoded[i] for i in index], [names[i] for i in index])):
                    results[i] = out
        missing = [i for i, r in enumerate(results) if r is None]
        assert not missing, f"rows {missing} got no output"  # every row is in exactly one batch group above
        return results  # type: ignore[return-value]

    def _forward(self, encoded: list[Encoded], names: list[str]) -> list[torch.Tensor]:
        batch = self._pad(encoded)
        body = self.model.get_decoder() if self.decoder else self.model.base_model  # the encoder itself, or its body
        with self._routed(names):
            out = self._encoder_decoder_body(batch) if self.encoder_decoder else body(**batch)
        hidden = out.last_hidden_state
        lengths = batch["attention_mask"].sum(-1)
        rows: list[torch.Tensor] = []
        for i, name in enumerate(names):
            served = self.adapters.get(name)
            if served is not None and served.head is not None:
                if served.pooling == "tokens":  # the head on every token of the row (a tagger, a masked LM)
                    features = hidden[i, : int(lengths[i])]
                elif served.pooling == "pooler":
                    features = out.pooler_output[i]
                elif served.pooling == "eos":
                    features = hidden[i, self._last_eos(batch["input_ids"][i])]
                else:
                    features = hidden[i, self._last_token(batch["input_ids"][i])]
                rows.append(served.head(features.to(next(served.head.parameters()).dtype)).float().cpu())
            elif self.decoder:
                rows.append(self.model.get_output_embeddings()(hidden[i, : int(lengths[i])]).float().cpu())
            else:
                pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else hidden[:, 0]
                rows.append(pooled[i].float().cpu())
        return rows

    def _encoder_decoder_body(self, batch: dict[str, torch.Tensor]) -> Any:
        """The decoder's states over the input shifted right, as T5ForSequenceClassification computes them."""
        encoded = self.model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return self.model.get_decoder()(input_ids=self.model._shift_right(batch["input_ids"]),
                                        encoder_hidden_states=encoded.last_hidden_state,
                                        encoder_attention_mask=batch["attention_mask"])

    def _last_eos(self, ids: torch.Tensor) -> int:
        # T5ForSequenceClassification's rule: the state at the row's last EOS token
        where = (ids == self.model.config.eos_token_id).nonzero()
        if len(where) == 0:
            raise PeftkitError("a row has no EOS token, which a T5 classifier pools at; the tokenizer adds one")
        return int(where[-1])

    def _last_token(self, ids: torch.Tensor) -> int:
        # the rule transformers' ...ForSequenceClassification uses: the rightmost token that is not padding
        pad = self.tokenizer.pad_token_id
        if pad is None:
            return ids.shape[-1] - 1
        positions = torch.arange(ids.shape[-1], device=ids.device)
        return int((positions * (ids != pad).int()).argmax(-1))

    # ---- predictions -----------------------------------------------------------------------------------

    def predict(self, rows: Rows, adapter: Union[str, Sequence[str]], batch_size: int = 32) -> list[dict[str, Any]]:
        """Per row: ``label`` and ``probs`` for a classifier; ``loss`` and ``perplexity`` of the text for a
        causal LM (its mean next-token loss); ``output``, the greedy generation, for a seq2seq adapter."""
        names = self._names(adapter, len(rows))
        if BASE in names and not self.decoder:
            raise PeftkitError(f"adapter base: an {'encoder-decoder' if self.encoder_decoder else 'encoder'} base "
                               "has no head of its own to predict with; name an adapter for those rows")
        written = [i for i, n in enumerate(names) if self.encoder_decoder and self.served(n).task.generates]
        scored = [i for i in range(len(rows)) if i not in set(written)]
        predictions: list[dict[str, Any]] = [{} for _ in rows]
        if written:  # a seq2seq adapter predicts by writing its output
            longest = max(self.served(names[i]).task.options.max_new_tokens for i in written)
            texts = self.generate([self._text(rows[i], names[i]) for i in written], [names[i] for i in written],
                                  max_new_tokens=longest, batch_size=batch_size)
            for i, text in zip(written, texts):
                predictions[i] = {"adapter": names[i], "output": text}
        outputs = self.outputs([rows[i] for i in scored], [names[i] for i in scored], batch_size) if scored else []
        for i, logits in zip(scored, outputs):
            name, row = names[i], rows[i]
            served = self.served(name)
            adapter, _, view = name.partition(":")  # a multi-task adapter's task: its part of the prediction
            ids = lambda row=row, adapter=adapter: self._encode(row, adapter).input_ids  # noqa: E731
            prediction = served.task.serve_prediction(logits, ids) if served is not None else score_text(logits, ids())
            predictions[i] = {"adapter": name, **(prediction[view] if view else prediction)}
        return predictions

    def _text(self, row: Union[str, dict[str, Any]], name: str) -> str:
        if isinstance(row, str):
            return row
        if "text" not in row:
            raise PeftkitError(f"a row for {name} has no 'text' (it has: {', '.join(row) or 'nothing'})")
        return str(row["text"])

    def generate(self, prompts: Sequence[str], adapter: Union[str, Sequence[str]], max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None,
                 batch_size: int = 8) -> list[str]:
        """Continue each prompt with its own adapter (instruction adapters get their training prompt layout).
        ``temperature`` 0 is greedy decoding; above 0, sampling with ``top_p`` / ``top_k``."""
        names = self._generating(adapter, len(prompts))
        ids = [self.prompt_ids(prompt, name) for prompt, name in zip(prompts, names)]
        return [self.decode(new) for new in self.generate_ids(ids, names, max_new_tokens, temperature, top_p, top_k,
                                                               seed, batch_size)]

    def decode(self, new_ids: Sequence[int]) -> str:
        """A generation's text from its new token ids (special tokens such as EOS and padding dropped)."""
        return self.tokenizer.decode(list(new_ids), skip_special_tokens=True).strip()

    def _generating(self, adapter: Union[str, Sequence[str]], count: int) -> list[str]:
        names = self._names(adapter, count)
        if not self.decoder and not self.encoder_decoder:
            raise PeftkitError("generate needs a causal-LM or encoder-decoder base; this server's base is an encoder")
        for name in dict.fromkeys(names):
            served = self.adapters.get(name)
            if served is not None and not served.task.generates:
                kind = "text-to-text" if self.encoder_decoder else "causal-LM"
                raise PeftkitError(f"adapter {name} is a {served.task.name} adapter; generate needs {kind} adapters "
                                   f"(use `peftkit predict --adapter {name}`)")
        return names

    @torch.no_grad()
    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], adapter: Union[str, Sequence[str]],
                     max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                     seed: Optional[int] = None, batch_size: int = 8,
                     watch: Optional[Callable[[list[int]], Any]] = None) -> list[list[int]]:
        """:meth:`generate` on prompts already in token ids; each row's new token ids, as ``model.generate`` gives
        them (after an EOS, padding up to the longest row of its batch). ``watch(rows)``, when given, returns a
        transformers ``StoppingCriteria`` for each ``model.generate`` call, over those rows' indices in
        ``prompt_ids``: it sees every step's tokens and may end rows early (how the HTTP server streams)."""
        names = self._generating(adapter, len(prompt_ids))
        if seed is not None:
            torch.manual_seed(seed)
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k or None}
        generated: list[Optional[list[int]]] = [None] * len(prompt_ids)
        for start in range(0, len(prompt_ids), batch_size):
            chunk = list(range(start, min(start + batch_size, len(prompt_ids))))
            for group in self._groups([names[i] for i in chunk]):
                index = [chunk[g] for g in group]
                # a decoder appends on the right of its prompt; an encoder-decoder's decoder starts afresh
                batch = self._pad([Encoded(list(prompt_ids[i])) for i in index], left=not self.encoder_decoder)
                extra: dict[str, Any] = {}
                if watch is not None:
                    from transformers import StoppingCriteriaList

                    extra["stopping_criteria"] = StoppingCriteriaList([watch(index)])
                with self._routed([names[i] for i in index]):
                    out = self.model.generate(**batch, max_new_tokens=max_new_tokens,
                                              pad_token_id=self.tokenizer.pad_token_id, **sampling, **extra)
                # after the prompt; an encoder-decoder's output starts with its decoder start token
                width = 1 if self.encoder_decoder else batch["input_ids"].shape[1]
                for i, ids in zip(index, out):
                    generated[i] = ids[width:].tolist()
        return [g or [] for g in generated]

    def prompt_ids(self, prompt: str, name: str) -> list[int]:
        """A prompt's token ids as ``generate`` gives them to adapter ``name``."""
        served = self.adapters.get(name)
        if self.encoder_decoder:  # the source as the adapter's encoder read it in training (its task.prefix)
            if served is None:
                return list(self.tokenizer(prompt)["input_ids"])
            return served.task.serve_encode({"text": prompt}, self.tokenizer, served.recipe.data.max_length)[0]
        if served is None:  # the base gets the prompt laid out as the loaded instruction adapters get it
            served = next((a for a in self.adapters.values() if a.task.state.get("format") == "instruction"), None)
        if served is not None and served.task.state.get("format") == "instruction":
            return served.task.prompt_ids(self.tokenizer, prompt)
        return list(self.tokenizer(prompt)["input_ids"])


def load_server(registry: Union[Registry, str], names: Sequence[str], device: str = "auto",
                quantized: bool = True, check_base: bool = True, packed_inference: bool = True,
                trust_remote_code: bool = False, allow_pickle: bool = False) -> Server:
    """Load ``names`` from ``registry`` onto one base model.

    The base is loaded once, quantized as the adapters were trained (they must agree), or unquantized with
    ``quantized=False`` (for adapters trained on a 4/8-bit base; outputs then differ slightly from training's).
    On a CPU with AVX512-BF16, 4-bit layers run on bitsandbytes' packed bfloat16 kernel (faster; see
    :mod:`peftkit.core.cpu_paths`); ``packed_inference=False`` keeps them on training's float32 path.
    ``trust_remote_code`` and ``allow_pickle`` are the caller's alone, never read from the adapters' stored recipes.
    """
    registry = registry if isinstance(registry, Registry) else Registry(registry)
    if not names:
        raise PeftkitError("name at least one adapter to serve")
    if BASE in names:
        raise PeftkitError(f"{BASE!r} stands for the base model without adapter; it is always available")
    if len(set(names)) != len(names):
        raise PeftkitError(f"adapter {next(n for n in names if names.count(n) > 1)!r} is named twice")
    names = list(dict.fromkeys(name.partition(":")[0] for name in names))  # a multi-task adapter's tasks: itself
    snapshots = [read_snapshot(registry, name) for name in names]
    first = snapshots[0]
    check_together(snapshots, quantized)
    recipes = [s.metadata.recipe for s in snapshots]
    trusted = [user_trust(r.base, s.name, trust_remote_code, allow_pickle) for s, r in zip(snapshots, recipes)]
    recipe = recipes[0].model_copy(update={"base": trusted[0]})
    quantization = recipe.quantization if quantized else recipe.quantization.model_copy(update={"bits": None})
    base = resolve_base(recipe.base)
    if check_base:
        from ..store.loading import check_same_base

        check_same_base(base, first.metadata, ", ".join(names))
    tokenizer = load_tokenizer(base, recipe.base)
    torch_device = pick_device(device)
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base.path, trust_remote_code=recipe.base.trust_remote_code)
    decoder, encoder_decoder = _is_decoder(config), _is_encoder_decoder(config)
    heads = [s.metadata.task.head() for s in snapshots]
    auto = "AutoModelForSeq2SeqLM" if encoder_decoder else shared_class(snapshots, heads, decoder)
    # what the adapters' task models kept out of quantization
    keep = list(dict.fromkeys(["lm_head", "score", "classifier", "classification_head",
                               *(m for h in heads for m in h.unquantized_modules)]))
    model = load_pretrained(getattr(transformers, auto), base, recipe.base, quantization, keep, torch_device)
    freeze_quantized_layers(model, packed_inference)  # a server only predicts
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    base_bytes = memory_footprint(model)
    # adapters were trained on the task model: a classifier's modules sit under the body (bert., transformer.), a
    # T5 classifier's too while its seq2seq siblings and a masked LM's are on the same class as the shared base
    strip = model.base_model_prefix if auto in ("AutoModel", "AutoModelForSeq2SeqLM") else None
    served = {s.name: prepare(s, model, strip) for s in snapshots}
    peft_model = model
    for index, adapter in enumerate(served.values()):
        peft_model = inject(peft_model, peft_name(index), adapter)
    description = {
        "base": first.metadata.base.identity,
        "weights": describe_quantization(quantization, recipe.base.dtype),
        "cpu_4bit_path": path_for(quantization.bits, torch_device.type, packed_inference),
        "adapters": {s.name: describe_adapter(s) for s in snapshots},
    }
    setup = LoadSetup(registry, quantized, auto, strip, {"trust_remote_code": trust_remote_code,
                                                         "allow_pickle": allow_pickle})
    return Server(model, peft_model, tokenizer, served, decoder, base_bytes, description, encoder_decoder, setup)
