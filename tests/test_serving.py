"""One base, many adapters: a mixed batch gives each row what its adapter gives alone, heads of any size."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from peftkit.config.recipe import build_recipe
from peftkit.core.cpu_paths import DEQUANTIZED, PACKED_BF16
from peftkit.errors import PeftkitError
from peftkit.serve.serving import load_server
from peftkit.store.artifacts import seal
from peftkit.store.loading import load_trained
from peftkit.store.registry import Registry
from peftkit.train.training import train
from tests import tiny
from tests.conftest import make_recipe
from tests.cpu_paths import PATHS, path_ran, put_on_path

QUIET = {"echo": lambda line: None}
TEXTS = ["the film was great and good", "bad awful plot", "the king said again", "a movie", "dull boring"]


def _four_label_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    topics = {"royal": ["king", "queen"], "place": ["town", "river"], "film": ["film", "movie"],
              "music": ["music", "show"]}
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(topics))
        words = rng.sample(tiny.FILLER[12:], 5) + [rng.choice(topics[label])]
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "label": label})
    return rows


def _train(tiny_dir: Path, out: Path, name: str, **kwargs) -> None:
    data = make_recipe(tiny_dir, out, **kwargs)
    data["train"].update(max_steps=4, eval_at_start=False, lr=2e-2)
    data["output"]["name"] = name
    train(build_recipe(data), **QUIET)


@pytest.fixture(scope="module")
def registry(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    out = tmp_path_factory.mktemp("serving")
    tiny.write_tsv(out / "four.tsv", _four_label_rows(128, seed=11))
    llama = {"base": {"model": str(tiny_dir / "llama")}}
    _train(tiny_dir, out, "sentiment", quant="4bit", **llama)
    _train(tiny_dir, out, "topics", quant="4bit", adapter="adalora", **llama,
           data={"train": str(out / "four.tsv"), "eval": None, "eval_fraction": 0.25, "max_length": 32})
    _train(tiny_dir, out, "chat", task="causal_lm", quant="4bit")
    _train(tiny_dir, out, "bert-sentiment", quant="4bit")
    _train(tiny_dir, out, "bert-topics", quant="4bit",
           data={"train": str(out / "four.tsv"), "eval": None, "eval_fraction": 0.25, "max_length": 32})
    return Registry(out / "adapters")


def _alone(registry: Registry, name: str, texts: list[str], path: str = DEQUANTIZED) -> list[torch.Tensor]:
    """What the adapter gives on its own: its trained task model (peft + transformers), rows one by one."""
    loaded = load_trained(registry.folder(name), packed_inference=path == PACKED_BF16)
    outs = []
    for text in texts:
        batch = loaded.tokenizer([text], return_tensors="pt")
        batch.pop("token_type_ids", None) if "llama" in str(loaded.recipe.base.model) else None
        with torch.no_grad():
            logits = loaded.model(**batch).logits[0]
        outs.append(logits.float())
    return outs


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= 1e-5 * b.abs().max().clamp(min=1.0))


@pytest.mark.parametrize("path", PATHS)
def test_mixed_batch_equals_each_adapter_alone(registry, path):
    server = load_server(registry, ["sentiment", "topics", "chat"], packed_inference=path == PACKED_BF16)
    assert server.description["cpu_4bit_path"] == path
    names = ["sentiment", "topics", "chat", "base", "topics", "sentiment", "chat", "chat"]
    texts = [TEXTS[i % len(TEXTS)] for i in range(len(names))]
    mixed = server.outputs(texts, names, batch_size=8)
    assert path_ran(server.model) == path
    for name in ("sentiment", "topics", "chat"):
        rows = [i for i, n in enumerate(names) if n == name]
        alone = _alone(registry, name, [texts[i] for i in rows], path)
        for i, expected in zip(rows, alone):
            assert mixed[i].shape == expected.shape
            assert _close(mixed[i], expected), (name, path, (mixed[i] - expected).abs().max())
    assert mixed[0].shape == (2,) and mixed[1].shape == (4,)
    # the base rows are the base model's own logits, untouched by any adapter
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    plain = AutoModelForCausalLM.from_pretrained(
        registry.get("chat").metadata.recipe.base.model, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    ids = server.tokenizer([texts[3]], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base_logits = put_on_path(plain, path)(input_ids=ids).logits[0].float()
    assert _close(mixed[3], base_logits), f"base rows against plain transformers, both on the {path_ran(plain)} path"
    assert not _close(mixed[3], _alone(registry, "chat", [texts[3]], path)[0])  # the adapter does change the outputs


def test_switching_per_call_and_predictions(registry):
    server = load_server(registry, ["sentiment", "topics", "chat"])
    one = server.predict(TEXTS[:2], adapter="topics")
    assert [set(p["probs"]) for p in one] == [{"film", "music", "place", "royal"}] * 2
    assert all(abs(sum(p["probs"].values()) - 1) < 1e-4 for p in one)
    assert all(p["label"] == max(p["probs"], key=p["probs"].get) for p in one)
    lm = server.predict(TEXTS[:1], adapter="chat")[0]
    assert lm["perplexity"] == pytest.approx(torch.tensor(lm["loss"]).exp().item(), rel=1e-3)
    mixed = server.predict(TEXTS[:2], adapter=["sentiment", "topics"])
    assert mixed[1] == one[1] and set(mixed[0]["probs"]) == {"0", "1"}


@pytest.mark.parametrize("path", PATHS)
def test_encoder_base_pooled_heads(registry, path):
    server = load_server(registry, ["bert-sentiment", "bert-topics"], packed_inference=path == PACKED_BF16)
    names = ["bert-sentiment", "bert-topics"] * 3
    texts = TEXTS + TEXTS[:1]
    mixed = server.outputs(texts, names)
    for name in ("bert-sentiment", "bert-topics"):
        rows = [i for i, n in enumerate(names) if n == name]
        for i, expected in zip(rows, _alone(registry, name, [texts[i] for i in rows], path)):
            assert _close(mixed[i], expected), (name, path_ran(server.model), (mixed[i] - expected).abs().max())


def test_memory_grows_by_the_adapters_not_the_base(registry):
    one = load_server(registry, ["sentiment"]).memory()
    three = load_server(registry, ["sentiment", "topics", "chat"])
    memory = three.memory()
    assert memory["base_bytes"] == one["base_bytes"]
    lora_params = sum(p.numel() * p.element_size() for n, p in three.model.named_parameters() if ".lora_" in n)
    heads = sum(p.numel() * p.element_size() for a in three.adapters.values() if a.head for p in a.head.parameters())
    assert sum(memory["adapters"].values()) == lora_params + heads
    assert memory["adapters"]["sentiment"] == one["adapters"]["sentiment"]
    assert sum(memory["adapters"].values()) < memory["base_bytes"]


def test_generate_mixed_equals_alone(registry):
    server = load_server(registry, ["chat"])
    prompts = ["say king again", "say the very long river story again and again"]
    mixed = server.generate(prompts, adapter=["chat", "base"], max_new_tokens=6)
    assert server.generate(prompts[:1], adapter="chat", max_new_tokens=6) == mixed[:1]
    assert server.generate(prompts[1:], adapter="base", max_new_tokens=6) == mixed[1:]
    sampled = [server.generate(prompts, adapter="chat", max_new_tokens=6, temperature=1.0, seed=3) for _ in range(2)]
    assert sampled[0] == sampled[1]
    with pytest.raises(PeftkitError, match=r"^adapter sentiment is a classification adapter; generate needs"):
        load_server(registry, ["sentiment"]).generate(prompts, adapter="sentiment")


def test_bad_names_and_mismatched_bases(registry):
    with pytest.raises(PeftkitError, match=r"^no adapter named 'sentimnet' .*did you mean sentiment"):
        load_server(registry, ["sentimnet"])
    with pytest.raises(PeftkitError, match=r"^bert-sentiment was trained on .* and sentiment on .*share one base$"):
        load_server(registry, ["sentiment", "bert-sentiment"])
    server = load_server(registry, ["sentiment"])
    with pytest.raises(PeftkitError, match=r"^adapter 'sentimen' is not loaded in this server; did you mean sentiment\?$"):
        server.predict(["x"], adapter="sentimen")


def test_corrupt_or_removed_while_loading(registry, tmp_path, monkeypatch):
    import shutil

    copy = Registry(tmp_path / "copy")
    shutil.copytree(registry.folder("sentiment"), copy.root / "sentiment")
    weights = copy.root / "sentiment" / "adapter_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-10] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(PeftkitError, match=r"adapter_model.safetensors is corrupt"):
        load_server(copy, ["sentiment"])

    shutil.copytree(registry.folder("topics"), copy.root / "topics")
    real_read = Path.read_bytes

    def read_then_vanish(self: Path) -> bytes:
        if self.name == "adapter_model.safetensors" and "topics" in str(self):
            copy.remove("topics")  # a concurrent `peftkit adapters rm` lands mid-load
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_then_vanish)
    with pytest.raises(PeftkitError, match=r"^adapter 'topics' was removed from .* while it was being loaded"):
        load_server(copy, ["topics"])


def _cli(registry: Registry, *args: str):
    from click.testing import CliRunner

    from peftkit.cli import main

    return CliRunner().invoke(main, [*args, "--registry", str(registry.root)])


def test_predict_command_routes_rows_and_writes_json_lines(registry, tmp_path):
    import json

    rows = [{"sentence": "good film", "adapter": "sentiment"}, {"sentence": "the king", "adapter": "topics"},
            {"sentence": "the queen", "adapter": "chat"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = _cli(registry, "predict", "--adapter", "sentiment", "--adapter", "topics", "--adapter", "chat",
                  "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"))
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(o["row"], o["adapter"]) for o in out] == [(0, "sentiment"), (1, "topics"), (2, "chat")]
    server = load_server(registry, ["sentiment", "topics", "chat"])
    expected = server.predict(["good film", "the king", "the queen"], ["sentiment", "topics", "chat"])
    assert [{k: v for k, v in o.items() if k not in ("row", "text")} for o in out] == expected

    # no adapter column: every row through every adapter, texts from the command line too
    result = _cli(registry, "predict", "--adapter", "sentiment", "--adapter", "topics", "good film", "the king")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [(o["row"], o["adapter"]) for o in lines] == [(0, "sentiment"), (0, "topics"), (1, "sentiment"),
                                                         (1, "topics")]


def test_predict_command_bad_input(registry, tmp_path):
    (tmp_path / "in.csv").write_text("body,id\ngood film,1\n")
    result = _cli(registry, "predict", "--adapter", "sentiment", "--input", str(tmp_path / "in.csv"))
    assert result.exit_code == 1
    assert result.output.startswith("Error: --input: ") and "has no text column for sentiment" in result.output
    assert "--column text=COLUMN" in result.output and len(result.output.strip().splitlines()) == 1
    ok = _cli(registry, "predict", "--adapter", "sentiment", "--input", str(tmp_path / "in.csv"), "--column",
              "text=body")
    assert ok.exit_code == 0, ok.output
    missing = _cli(registry, "predict", "--adapter", "sentiment", "--input", str(tmp_path / "nope.csv"))
    assert missing.output.strip() == f"Error: --input: file {tmp_path / 'nope.csv'} does not exist; check the path"
    typo = _cli(registry, "predict", "--adapter", "sentimnt", "hello")
    assert typo.exit_code == 1 and "did you mean sentiment" in typo.output


def test_generate_command(registry):
    result = _cli(registry, "generate", "--adapter", "chat", "--adapter", "base", "say king again",
                  "--max-new-tokens", "4", "--json")
    assert result.exit_code == 0, result.output
    import json

    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [line["adapter"] for line in lines] == ["chat", "base"]
    server = load_server(registry, ["chat"])
    assert [line["text"] for line in lines] == server.generate(["say king again"] * 2, ["chat", "base"],
                                                               max_new_tokens=4)


def test_adapters_trained_on_four_bits_served_unquantized(registry):
    quantized = load_server(registry, ["sentiment", "topics"])
    plain = load_server(registry, ["sentiment", "topics"], quantized=False)
    assert plain.description["weights"] == "float32"
    assert plain.description["adapters"]["sentiment"]["trained_on"].startswith("4-bit NF4")
    assert plain.base_bytes > 2 * quantized.base_bytes
    names = ["sentiment", "topics"] * 2
    a, b = quantized.outputs(TEXTS[:4], names), plain.outputs(TEXTS[:4], names)
    assert all(x.shape == y.shape for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, b))  # really other weights, not the 4-bit ones


def test_a_base_with_other_weights_is_refused(registry, tmp_path):
    import json
    import shutil

    copy = Registry(tmp_path / "copy")
    shutil.copytree(registry.folder("sentiment"), copy.root / "sentiment")
    meta_file = copy.root / "sentiment" / "peftkit.json"
    metadata = json.loads(meta_file.read_text())
    metadata["base"]["fingerprint"] = "sha256:" + "0" * 64
    seal(meta_file.parent, metadata)
    with pytest.raises(PeftkitError, match=r"^sentiment was trained on .* with weights sha256:000000000000, but .* now "
                                           r"has sha256:.*pass check_base=False"):
        load_server(copy, ["sentiment"])
    assert load_server(copy, ["sentiment"], check_base=False).names == ["sentiment"]


def test_names_with_dots_are_served(registry, tmp_path):
    import shutil

    copy = Registry(tmp_path / "copy")
    shutil.copytree(registry.folder("sentiment"), copy.root / "sentiment.v2")
    shutil.copytree(registry.folder("topics"), copy.root / "topics")
    server = load_server(copy, ["sentiment.v2", "topics"])
    assert [p["adapter"] for p in server.predict(TEXTS[:2], ["sentiment.v2", "topics"])] == ["sentiment.v2", "topics"]
    assert set(server.memory()["adapters"]) == {"sentiment.v2", "topics"} and all(server.memory()["adapters"].values())


def test_label_names_are_what_predictions_and_id2label_show(tiny_dir, tmp_path):
    data = make_recipe(tiny_dir, tmp_path, quant="4bit")
    data["task"]["label_names"] = {0: "negative", 1: "positive"}  # the data's labels are 0 and 1
    data["train"].update(max_steps=2, eval_at_start=False)
    data["output"]["name"] = "named"
    train(build_recipe(data), **QUIET)
    registry = Registry(tmp_path / "adapters")
    predictions = load_server(registry, ["named"]).predict(TEXTS[:2], adapter="named")
    assert [set(p["probs"]) for p in predictions] == [{"negative", "positive"}] * 2
    assert load_trained(registry.folder("named")).model.config.id2label == {0: "negative", 1: "positive"}

    data["task"]["label_names"], data["output"]["name"] = {7: "seven"}, "other"
    with pytest.raises(PeftkitError, match=r"task.label_names: '7' is not a label of the data \(0, 1\)"):
        train(build_recipe(data), **QUIET)
