"""Entities from tag sequences, and entity-level precision / recall / F1, as seqeval scores them by default.

A tag is ``O`` or ``PREFIX-TYPE`` with a prefix among B (begin), I (inside), E (end), S (single); BILOU's L and U
are read as E and S, and a tag with no prefix (``PER``, the IO scheme) as ``I-PER``. Chunks are cut by the
conlleval rules that seqeval's default (non-strict) mode follows, so IOB1, IOB2 and BIOES sequences all score as
their authors meant, and an ill-formed sequence the way conlleval would read it: an ``I-`` after ``O`` or after
another type starts an entity, an ``E-``/``S-`` ends one, a change of type ends one.

An entity is (type, first word, last word); a predicted entity counts when one gold entity of the same sentence
matches it exactly. Scores are micro-averaged over all entities (seqeval's ``f1_score`` default): precision =
correct / predicted, recall = correct / gold, F1 = 2PR / (P + R), each 0 where its denominator is 0.
"""

from __future__ import annotations

from typing import Iterable, Sequence

_PREFIXES = {"B": "B", "I": "I", "E": "E", "S": "S", "L": "E", "U": "S"}

Entity = tuple[str, int, int]  # (type, first word, last word), words counted from 0


def split_tag(tag: str) -> tuple[str, str]:
    """(prefix, type) of a tag: ``B-PER`` -> (B, PER), ``O`` -> (O, ""), ``PER`` -> (I, PER)."""
    if tag == "O" or not tag:
        return "O", ""
    head, sep, rest = tag.partition("-")
    if sep and head in _PREFIXES and rest:
        return _PREFIXES[head], rest
    return "I", tag


def _ends(prev: str, prev_type: str, tag: str, type_: str) -> bool:
    if prev in ("E", "S"):
        return True
    if prev in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev != "O" and prev_type != type_


def _starts(prev: str, prev_type: str, tag: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag != "O" and prev_type != type_


def entities(tags: Sequence[str]) -> list[Entity]:
    """The entities one sentence's tags mark, in order."""
    found: list[Entity] = []
    prev, prev_type, begin = "O", "", 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, type_ = split_tag(tag)
        if _ends(prev, prev_type, prefix, type_):
            found.append((prev_type, begin, i - 1))
        if _starts(prev, prev_type, prefix, type_):
            begin = i
        prev, prev_type = prefix, type_
    return found


def entity_scores(gold: Iterable[Sequence[str]], predicted: Iterable[Sequence[str]]) -> dict[str, float]:
    """Micro-averaged entity precision, recall and F1, and word accuracy, over sentences of tags (in [0, 1])."""
    correct = n_gold = n_pred = words = right = 0
    for sentence, (gold_tags, pred_tags) in enumerate(zip(gold, predicted, strict=True)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(f"sentence {sentence}: {len(gold_tags)} gold tags but {len(pred_tags)} predicted")
        true_set, pred_set = set(entities(gold_tags)), set(entities(pred_tags))
        correct += len(true_set & pred_set)
        n_gold += len(true_set)
        n_pred += len(pred_set)
        words += len(gold_tags)
        right += sum(g == p for g, p in zip(gold_tags, pred_tags))
    precision = correct / n_pred if n_pred else 0.0
    recall = correct / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"entity_f1": f1, "entity_precision": precision, "entity_recall": recall,
            "token_accuracy": right / words if words else 0.0}
