"""EDA, "easy data augmentation" (Wei & Zou, EMNLP 2019): variants of each training text made by small word edits.

Each of a row's ``copies`` variants is made by one operation, on its text split at white space into ``l`` words:

* synonym replacement (SR): ``n = max(1, int(alpha_sr * l))`` distinct words that are not stop words, taken in
  random order among those WordNet has synonyms for, each replaced (every occurrence) by one of its synonyms;
* random insertion (RI): ``n = max(1, int(alpha_ri * l))`` times, a random synonym of a random word that is not a
  stop word is inserted at a random position;
* random swap (RS): ``n = max(1, int(alpha_rs * l))`` times, two words at distinct random positions change places;
* random deletion (RD): each word is deleted with probability ``p_rd``; a text of one word is kept, and when every
  word would go one of them stays.

The operations are dealt as the authors' ``eda.py`` deals them: ``copies // k + 1`` of each of the ``k`` enabled
ones (a rate of 0 disables one), shuffled, the first ``copies`` taken. Stop words (the authors' list, below) are
never replaced and never give a synonym to insert. Unlike ``eda.py``, which lowercases the text and deletes every
character but ``a-z`` before editing, the text keeps its case and punctuation: a word's letters are looked up, the
punctuation around them stays ("Good," -> "Beneficial,"), so variants read like the rows they come from and the
tokenizer sees what it sees at predict time.

Only the ``text`` column changes: a pair's ``text_pair`` and every label are copied as they are. Editing one side
of a pair changes at most one of the two sentences whose relation the label states, which keeps more pairs true
than editing both would (RD can drop a "not", SR a word the hypothesis repeats).

Deterministic: row ``i`` draws from ``random.Random("peftkit-eda:{seed}:{i}")``, the recipe's ``train.seed``. A
text seed is hashed with SHA-512, never with Python's salted ``hash``, and nothing iterates a set, so the rows are
the same under any ``PYTHONHASHSEED``, and a row's variants do not depend on the rows around it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

from ..config.recipe import AugmentSection
from ..errors import PeftkitError

# The stop words of the authors' eda.py: 127 words, never replaced and never given a synonym to insert.
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers herself it its
itself they them their theirs themselves what which who whom this that these those am is are was were be been being
have has had having do does did doing a an the and but if or because as until while of at by for with about against
between into through during before after above below to from up down in out on off over under again further then once
here there when where why how all any both each few more most other some such no nor not only own same so than too
very s t can will just don should now
""".split())

OPERATIONS = {"sr": "synonym replacement", "ri": "random insertion", "rs": "random swap", "rd": "random deletion"}
COLUMN = "text"  # the role augmented; see the module's docstring for why not text_pair
# a word's letters, with the punctuation around them kept aside: '"Good,' -> ('"', 'Good', ',')
_WORD = re.compile(r"(\W*)([A-Za-z]+(?:[-'][A-Za-z]+)*)(\W*)")


class Thesaurus(Protocol):
    """Where synonyms come from: :class:`peftkit.core.wordnet.WordNet`, or a small table in tests."""

    def synonyms(self, word: str) -> Sequence[str]:
        """Synonyms of a lowercase word, in a fixed order, without the word itself."""
        ...


def auto_copies(n_rows: int) -> int:
    """Variants per row by the paper's Table 3 (recommended n_aug): 16 for 500 rows, 8 for 2,000, 4 for 5,000 and
    more; taken here as 16 up to 500 rows, 8 up to 2,000, 4 above."""
    return 16 if n_rows <= 500 else 8 if n_rows <= 2000 else 4


def resolve_copies(settings: AugmentSection, n_rows: int) -> int:
    return auto_copies(n_rows) if settings.copies == "auto" else settings.copies


def row_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"peftkit-eda:{seed}:{index}")


def _key(token: str) -> Optional[str]:
    """The lowercase word a token holds, if it holds one that is not a stop word."""
    match = _WORD.fullmatch(token)
    word = match.group(2).lower() if match else None
    return word if word and word not in STOP_WORDS else None


def _in_case_of(synonym: str, word: str) -> str:
    if word.isupper() and len(word) > 1:
        return synonym.upper()
    return synonym[:1].upper() + synonym[1:] if word[:1].isupper() else synonym


def _replace(token: str, word: str, synonym: str) -> str:
    match = _WORD.fullmatch(token)
    if not match or match.group(2).lower() != word:
        return token
    before, letters, after = match.groups()
    return before + _in_case_of(synonym, letters) + after


def _words(tokens: list[str]) -> list[str]:
    return " ".join(tokens).split()  # a synonym of two words ("trade good") becomes two words


def synonym_replacement(words: list[str], n: int, rng: random.Random, thesaurus: Thesaurus) -> list[str]:
    candidates = [w for w in dict.fromkeys(_key(t) for t in words) if w and thesaurus.synonyms(w)]
    rng.shuffle(candidates)
    new = list(words)
    for word in candidates[:n]:
        synonym = rng.choice(thesaurus.synonyms(word))
        new = [_replace(token, word, synonym) for token in new]
    return _words(new)


def random_insertion(words: list[str], n: int, rng: random.Random, thesaurus: Thesaurus) -> list[str]:
    # a random word, as in the authors' code: a word that occurs twice is twice as likely
    candidates = [w for w in (_key(t) for t in words) if w and thesaurus.synonyms(w)]
    new = list(words)
    if not candidates:
        return new
    for _ in range(n):
        synonym = rng.choice(thesaurus.synonyms(rng.choice(candidates)))
        new.insert(rng.randint(0, len(new)), synonym)
    return _words(new)


def random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    new = list(words)
    if len(new) < 2:
        return new
    for _ in range(n):
        i = rng.randrange(len(new))
        j = rng.randrange(len(new) - 1)
        j += j >= i  # any position but i
        new[i], new[j] = new[j], new[i]
    return new


def random_deletion(words: list[str], p: float, rng: random.Random) -> list[str]:
    if len(words) <= 1:
        return list(words)
    kept = [word for word in words if rng.random() >= p]
    return kept or [rng.choice(words)]


def _rates(settings: AugmentSection) -> dict[str, float]:
    return {"sr": settings.alpha_sr, "ri": settings.alpha_ri, "rs": settings.alpha_rs, "rd": settings.p_rd}


def eda(text: str, settings: AugmentSection, copies: int, rng: random.Random,
        thesaurus: Thesaurus) -> list[tuple[str, str]]:
    """``copies`` variants of ``text``, each as (operation, variant); a variant may equal the text (a row with no
    word WordNet knows gets no synonym), as in the paper."""
    words = text.split()
    rates = _rates(settings)
    enabled = [op for op, rate in rates.items() if rate > 0]
    plan = [op for op in enabled for _ in range(copies // len(enabled) + 1)]
    rng.shuffle(plan)
    variants = []
    for op in plan[:copies]:
        n = max(1, int(rates[op] * len(words)))
        if not words:
            new = words
        elif op == "sr":
            new = synonym_replacement(words, n, rng, thesaurus)
        elif op == "ri":
            new = random_insertion(words, n, rng, thesaurus)
        elif op == "rs":
            new = random_swap(words, n, rng)
        else:
            new = random_deletion(words, rates[op], rng)
        variants.append((op, " ".join(new)))
    return variants


def augment_texts(texts: Sequence[str], settings: AugmentSection, seed: int, copies: int,
                  thesaurus: Thesaurus) -> list[list[tuple[str, str]]]:
    """Each text's variants (:func:`eda`), text ``i`` drawn from :func:`row_rng` ``(seed, i)``."""
    return [eda(str(text), settings, copies, row_rng(seed, i), thesaurus) for i, text in enumerate(texts)]


@dataclass(frozen=True)
class Augmentation:
    """What augmentation did to a run's training rows: saved in ``peftkit.json`` (``training.augmentation``)."""

    settings: AugmentSection
    copies: int
    rows_before: int
    rows_after: int
    thesaurus: str

    def record(self) -> dict[str, Any]:
        return {**self.settings.model_dump(mode="json"), "copies": self.copies, "column": COLUMN,
                "thesaurus": self.thesaurus, "rows_before": self.rows_before, "rows_after": self.rows_after}

    def describe(self) -> str:
        beside = " beside the originals" if self.settings.keep_original else " in place of the originals"
        return (f"EDA, {self.copies} copies of each of the {self.rows_before:,} training rows{beside}: "
                f"{self.rows_after:,} rows")


def _thesaurus(thesaurus: Optional[Thesaurus]) -> Thesaurus:
    if thesaurus is not None:
        return thesaurus
    from .wordnet import load_wordnet

    return load_wordnet()


def _summary(rows: Any, settings: AugmentSection, thesaurus: Thesaurus) -> Augmentation:
    if COLUMN not in rows.column_names:
        raise PeftkitError(f"data.augment: the training rows have no {COLUMN} column to augment; map one with "
                           "data.columns or remove data.augment")
    n, copies = len(rows), resolve_copies(settings, len(rows))
    return Augmentation(settings, copies, n, n * (copies + settings.keep_original),
                        getattr(thesaurus, "version", type(thesaurus).__name__))


def augment_rows(rows: Any, settings: AugmentSection, seed: int,
                 thesaurus: Optional[Thesaurus] = None) -> tuple[Any, Augmentation]:
    """The training rows (a role-named ``datasets.Dataset``) with their variants: each row (unless
    ``keep_original`` is false) followed by its copies; every column but ``text`` copied from its row."""
    thesaurus = _thesaurus(thesaurus)
    summary = _summary(rows, settings, thesaurus)
    texts = rows[COLUMN]
    order: list[int] = []
    new_texts: list[str] = []
    for i, variants in enumerate(augment_texts(texts, settings, seed, summary.copies, thesaurus)):
        made = ([texts[i]] if settings.keep_original else []) + [variant for _, variant in variants]
        order += [i] * len(made)
        new_texts += made
    augmented = rows.select(order).remove_columns(COLUMN).add_column(COLUMN, new_texts)
    return augmented.select_columns(rows.column_names), summary


def preview(rows: Any, settings: AugmentSection, seed: int, thesaurus: Optional[Thesaurus] = None,
            scan: int = 50) -> tuple[Augmentation, list[tuple[str, str, str]]]:
    """What :func:`augment_rows` would do, without making every variant (``peftkit validate``): the counts, and
    for each enabled operation the first of the first ``scan`` rows it changes, as (operation, row, variant).
    The variants shown are the ones training makes from those rows."""
    thesaurus = _thesaurus(thesaurus)
    summary = _summary(rows, settings, thesaurus)
    enabled = [op for op, rate in _rates(settings).items() if rate > 0]
    shown: dict[str, tuple[str, str]] = {}
    texts = rows.select(range(min(scan, len(rows))))[COLUMN]
    for text, variants in zip(texts, augment_texts(texts, settings, seed, summary.copies, thesaurus)):
        for op, variant in variants:
            if op not in shown and variant != " ".join(str(text).split()):
                shown[op] = (str(text), variant)
        if len(shown) == len(enabled):
            break
    return summary, [(OPERATIONS[op], *shown[op]) for op in enabled if op in shown]
