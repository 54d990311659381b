"""Tiny models, tokenizers and data sets built on the spot, so tests need neither the hub nor ../shared.

Dimensions are multiples of 64 (bitsandbytes' 4-bit blocks). The BERT encoder has biases on its linear
layers and the Llama decoder has none, so between them both kinds of layer are exercised.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "good great fine lovely superb bad awful poor dull boring the a film movie plot actor scene was is very "
    "quite rather not really story music ending start cast script show town river king queen said and of to "
    "in on it with for as at by from up down out over under again then once here there when where why how all"
).split()
POSITIVE, NEGATIVE = WORDS[:5], WORDS[5:10]
FILLER = WORDS[10:]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<|eos|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|eos|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tokenizer(folder: Path, chat_template: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chat = ["<|user|>", "<|assistant|>"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chat + WORDS + ["say"] + list("0123456789"))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS + chat)  # kept whole, not split at '<' and '|'

    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        eos_token="<|eos|>", model_max_length=128,
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def build_bert(folder: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128, pad_token_id=0)
    BertModel(config).save_pretrained(folder)
    build_tokenizer(folder)
    return folder


def build_llama(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=4, bos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    build_tokenizer(folder, chat_template=True)
    return folder


def sentiment_rows(n: int, seed: int, pair: bool = False) -> list[dict]:
    """Rows whose label is decided by a positive or negative word hidden among filler."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(FILLER, 6) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        row = {"sentence": " ".join(words), "label": label}
        if pair:
            row["sentence2"] = " ".join(rng.sample(FILLER, 4))
        rows.append(row)
    return rows


def scored_rows(n: int, seed: int) -> list[dict]:
    """Regression rows: 2.5 plus the number of positive words minus the number of negative ones (0.5 to 4.5, as
    STS-B's 0 to 5)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        good, bad = rng.randint(0, 2), rng.randint(0, 2)
        words = rng.sample(FILLER, 5) + rng.sample(POSITIVE, good) + rng.sample(NEGATIVE, bad)
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "score": f"{2.5 + good - bad:.1f}"})
    return rows


def labelled_set_rows(n: int, seed: int) -> list[dict]:
    """Multi-label rows: "pos" when a positive word is there (most rows), "neg" for a negative one (a quarter of
    them); both, one or none. Unequal shares, so a head's biases alone can lower the loss a little."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        labels = [name for name, share in (("pos", 0.8), ("neg", 0.25)) if rng.random() < share]
        words = rng.sample(FILLER, 6) + [rng.choice(POSITIVE if name == "pos" else NEGATIVE) for name in labels]
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "labels": ",".join(labels)})
    return rows


def write_tsv(path: Path, rows: list[dict]) -> Path:
    columns = list(rows[0])
    lines = ["\t".join(columns)] + ["\t".join(str(r[c]) for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_instructions(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = rng.choice(FILLER)
        rows.append({"instruction": f"say {word} again", "input": "", "output": f"{word} {word} {word}"})
    path.write_text(json.dumps(rows))
    return path


def write_text(path: Path, n_lines: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = [" ".join(["the", "king", "said", rng.choice(FILLER), "and", "the", "queen", "said", "again"])
             for _ in range(n_lines)]
    path.write_text("\n\n".join(lines) + "\n")
    return path


def adapter_metadata(name: str) -> dict:
    """Valid metadata for a stand-in adapter folder that holds no model (for tests of the registry's files)."""
    from peftkit.config.recipe import build_recipe
    from peftkit.store.artifacts import build_metadata

    recipe = build_recipe({"base": {"model": "stand-in"}, "task": {"type": "classification"},
                           "data": {"train": "train.tsv"}, "output": {"name": name}})
    return build_metadata(
        name=name, task={"type": "classification", "options": {}, "state": {"labels": ["0", "1"]}},
        base={"identity": "stand-in", "source": "local", "path": "stand-in", "fingerprint": "sha256:" + "0" * 64,
              "dtype": "float32", "quantization": recipe.quantization.model_dump(mode="json"), "memory_bytes": 0},
        adapter={"method": "lora", "targets": [], "head_modules": [], "trainable_parameters": 0,
                 "total_parameters": 0},
        metrics={}, key_metric=None, recipe=recipe.to_dict(), provenance={},
    )


def register_stand_in(root: str, name: str) -> None:
    """Write a stand-in adapter into registry ``root``, as a process of its own would. Here, not in the test
    module, so that a spawned process imports this light module rather than one that imports torch."""
    from peftkit.store.artifacts import seal, staged_folder

    with staged_folder(Path(root) / name) as folder:
        (folder / "adapter_model.safetensors").write_bytes(name.encode() * 100_000)
        seal(folder, adapter_metadata(name))
