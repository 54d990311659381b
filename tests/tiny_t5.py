"""A tiny T5 (encoder-decoder) and its tokenizer, built on the spot like the models of ``tiny.py``.

The vocabulary is ``tiny.py``'s, with T5's conventions: padding is id 0 and starts every decoder input
(``decoder_start_token_id``), and the tokenizer ends each text with the EOS token, as T5's does.
Dimensions are multiples of 64 (bitsandbytes' 4-bit blocks).
"""

from __future__ import annotations

import random
from pathlib import Path

from .tiny import FILLER, SPECIALS, WORDS, write_tsv

EOS_ID = SPECIALS.index("<|eos|>")


def build_t5_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS + ["say", "summarize:", "copy:"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="$A <|eos|>", pair="$A <|eos|> $B:1 <|eos|>:1", special_tokens=[("<|eos|>", EOS_ID)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="<|eos|>",
                                   model_max_length=128)
    fast.save_pretrained(folder)
    return fast


def build_t5(folder: Path) -> Path:
    """A 2+2-layer T5 with gated-GELU feed-forward layers (T5 v1.1 / FLAN-T5's). transformers 5 ties T5's output
    layer to its embeddings whatever the config says; ``tie_word_embeddings=False`` still marks v1.1's layout, whose
    decoder output is not scaled by ``d_model ** -0.5``."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=128, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_decoder_layers=2,
                      num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0,
                      eos_token_id=EOS_ID, decoder_start_token_id=0, relative_attention_num_buckets=8)
    model = T5ForConditionalGeneration(config)
    with torch.no_grad():  # unscaled, T5's initialization gives logits of ~30 and a first loss of ~30
        model.lm_head.weight.mul_(config.d_model ** -0.5)
    model.save_pretrained(folder)
    build_t5_tokenizer(folder)
    return folder


def copy_rows(n: int, seed: int) -> list[dict]:
    """Rows whose target is "say" and the source's first two words: the constant first word is learned in a few
    steps, so even a briefly trained tiny model writes something before its EOS."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(FILLER, 4)
        rows.append({"source": " ".join(words), "target": "say " + " ".join(words[:2])})
    return rows


def write_copy_tsv(path: Path, n: int, seed: int) -> Path:
    return write_tsv(path, copy_rows(n, seed))
