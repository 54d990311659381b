"""Token classification (tagging, NER): one tag per word, predicted from the word's first sub-token.

Rows hold ``tokens`` (a sentence's words) and ``tags`` (one per word): lists, or strings split on whitespace; a
CoNLL file (``data.format: conll``) reads into exactly these. Tags are names (``B-person``), or numbers named
in id order by ``task.labels``. Words are cut into sub-tokens by the base's (fast) tokenizer; as in transformers'
token-classification example, a word's first sub-token carries its tag and the others, like the special tokens,
get -100 (no loss); with ``label_all_subwords: true`` they carry it too (a ``B-`` tag as its ``I-``). Words cut
off by ``data.max_length`` are neither trained nor scored.

Loss: cross-entropy over the tagged sub-tokens. Metrics (``spans.py``): entity precision, recall and F1 as
seqeval scores them by default (micro-averaged; IOB1, IOB2 and BIOES read alike), word accuracy, and loss. The
key metric is entity F1.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Optional

from pydantic import Field, field_validator

from ..errors import PeftkitError
from .base import HeadOptions, HeadState, StateText, TaskHead
from .pooled import linear_head
from .spans import entities, entity_scores, split_tag

IGNORE = -100


class TokenClassificationOptions(HeadOptions):
    labels: Optional[list[str]] = Field(
        None, min_length=2, description="tag names in id order (needed when the data writes tags as numbers)")
    label_all_subwords: bool = Field(False, description="every sub-token of a word carries its tag, not the first")

    @field_validator("labels")
    @classmethod
    def _distinct(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        if value is not None:
            repeated = sorted({v for v in value if value.count(v) > 1})
            if repeated:
                raise ValueError(f"{repeated[0]!r} is listed twice; list each tag once")
        return value


class TokenClassificationState(HeadState):
    labels: list[StateText]  # tag names in id order


def _cells(value: Any) -> list[Any]:
    if isinstance(value, str):
        return value.split()
    return list(value) if value is not None else []


def _tag_order(tags: set[str]) -> list[str]:
    """O first, then by entity type, B before I before E before S (readable id2label)."""
    rank = {"O": 0, "B": 1, "I": 2, "E": 3, "S": 4}
    return sorted(tags, key=lambda t: (t != "O", split_tag(t)[1], rank.get(t.split("-", 1)[0], 5), t))


class TokenClassification(TaskHead):
    name = "token_classification"
    augment_refusal = "EDA inserts, swaps and deletes words, so the per-word tags would no longer match the words"
    Options = TokenClassificationOptions
    State = TokenClassificationState
    peft_task_type = "TOKEN_CLS"
    roles = {
        "tokens": ("tokens", "words", "text"),
        "tags": ("tags", "ner_tags", "labels", "label"),
    }
    required_roles = ("tokens", "tags")
    head_module_names = ("classifier", "score")  # BERT-style encoders / Llama-style decoders
    key_metric = ("entity_f1", "max")
    serve_fields = ("text", "tokens")

    def __init__(self, options: HeadOptions, state: Optional[dict[str, Any]] = None):
        super().__init__(options, state)
        self._width: Optional[int] = None  # per-row width of eval tensors: data.max_length, once encoded
        self._served: OrderedDict[tuple[int, ...], list[Optional[int]]] = OrderedDict()

    @property
    def labels(self) -> list[str]:
        return self.state["labels"]

    def output_labels(self) -> list[str]:
        return list(self.labels)

    # ---- data ------------------------------------------------------------------------------------------

    def _tag_name(self, value: Any, where: str) -> str:
        if isinstance(value, bool):
            value = str(value)
        if isinstance(value, int):
            names = self.options.labels
            if not names:
                raise PeftkitError(f"{where}: tags are numbers ({value}); name them in task.labels, in id order, so "
                                   "that entities can be read from them")
            if not 0 <= value < len(names):
                raise PeftkitError(f"{where}: tag {value} has no name in task.labels ({len(names)} names); "
                                   "name every tag id")
            return names[value]
        return str(value).strip()

    def _sentences(self, rows: Any, source: str) -> list[tuple[list[str], list[str]]]:
        sentences = []
        for i, (tokens, tags) in enumerate(zip(rows["tokens"], rows["tags"])):
            words, marks = _cells(tokens), _cells(tags)
            where = f"{source}: row {i + 1}"
            if len(words) != len(marks):
                raise PeftkitError(f"{where} has {len(words)} tokens but {len(marks)} tags; give one tag per token "
                                   "(check data.columns.tags names the tag column)")
            sentences.append(([str(w) for w in words], [self._tag_name(m, where) for m in marks]))
        return sentences

    def fit(self, train_rows: Any, eval_rows: Any, eval_source: str) -> None:
        if "labels" not in self.state:
            seen = {tag for _, tags in self._sentences(train_rows, "data.train") for tag in tags}
            if self.options.labels:
                stray = sorted(seen - set(self.options.labels))
                if stray:
                    raise PeftkitError(f"data.train: tag {stray[0]!r} is not in task.labels; add it to task.labels "
                                       "or fix the data")
                self.state["labels"] = list(self.options.labels)
            else:
                self.state["labels"] = _tag_order(seen)
        if len(self.labels) < 2:
            raise PeftkitError(f"data.train: only one tag ({self.labels[0]!r}) in the training data; tagging needs "
                               "at least two")
        if eval_rows is not None:
            known = set(self.labels)
            for i, (_, tags) in enumerate(self._sentences(eval_rows, eval_source)):
                unknown = next((t for t in tags if t not in known), None)
                if unknown is not None:
                    raise PeftkitError(f"{eval_source}: row {i + 1} has tag {unknown!r}, which the training data "
                                       "does not have; fix that row, or list the tag in task.labels")

    def _ids(self) -> dict[str, int]:
        ids = self.__dict__.get("_id_map")
        if ids is None or len(ids) != len(self.labels):
            ids = self.__dict__["_id_map"] = {name: i for i, name in enumerate(self.labels)}
        return ids

    def _inside(self, tag_id: int) -> int:
        """The tag a word's later sub-tokens carry: a ``B-`` tag's ``I-`` where the tag set has it."""
        tag = self.labels[tag_id]
        if tag.startswith("B-"):
            return self._ids().get("I-" + tag[2:], tag_id)
        return tag_id

    def _tokenize(self, words: list[list[str]], tokenizer: Any, max_length: Optional[int]) -> Any:
        if not getattr(tokenizer, "is_fast", False):
            raise PeftkitError("task.type token_classification: the base's tokenizer is not a fast tokenizer, which "
                               "is needed to align sub-tokens with words; use a base with a tokenizer.json")
        return tokenizer(words, is_split_into_words=True, truncation=max_length is not None, max_length=max_length)

    def encode(self, rows: dict[str, list], tokenizer: Any, max_length: int) -> dict[str, list]:
        self._width = max_length
        words = [[str(w) for w in _cells(t)] for t in rows["tokens"]]
        enc = self._tokenize(words, tokenizer, max_length)
        features = {k: list(v) for k, v in enc.items()}
        if "tags" in rows:
            ids = self._ids()
            firsts, alls = [], []
            for i, tags in enumerate(rows["tags"]):
                tag_ids = [ids[self._tag_name(t, "data")] for t in _cells(tags)]
                first, every, previous = [], [], None
                for word in enc.word_ids(i):
                    if word is None:
                        first.append(IGNORE)
                        every.append(IGNORE)
                    elif word != previous:
                        first.append(tag_ids[word])
                        every.append(tag_ids[word])
                    else:
                        first.append(IGNORE)
                        every.append(self._inside(tag_ids[word]))
                    previous = word
                firsts.append(first)
                alls.append(every)
            features["labels"] = firsts  # what is scored: one tag per word
            if self.options.label_all_subwords:
                features["subword_labels"] = alls  # what is trained
        return features

    def collate(self, features: list[dict[str, Any]], tokenizer: Any) -> dict[str, Any]:
        import torch

        targets = ("labels", "subword_labels")
        inputs = [{k: v for k, v in f.items() if k not in targets} for f in features]
        batch = dict(tokenizer.pad(inputs, return_tensors="pt"))
        width = batch["input_ids"].shape[1]
        for key in targets:
            if features and key in features[0]:
                padded = torch.full((len(features), width), IGNORE, dtype=torch.long)
                for i, f in enumerate(features):
                    padded[i, : len(f[key])] = torch.tensor(f[key], dtype=torch.long)
                batch[key] = padded
        return batch

    # ---- model -----------------------------------------------------------------------------------------

    def load_model(self, load: Callable[..., Any], tokenizer: Any) -> Any:
        from transformers import AutoModelForTokenClassification

        names = self.output_labels()
        model = load(AutoModelForTokenClassification, num_labels=len(names), id2label=dict(enumerate(names)),
                     label2id={name: i for i, name in enumerate(names)})
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if k not in ("labels", "subword_labels")}

    @staticmethod
    def _token_losses(outputs: Any, targets: Any) -> Any:
        import torch.nn.functional as F

        logits = outputs.logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                               reduction="none").view_as(targets)

    def loss(self, outputs: Any, batch: dict[str, Any]) -> Any:
        targets = batch.get("subword_labels", batch["labels"])
        return self._token_losses(outputs, targets).sum() / (targets != IGNORE).sum().clamp(min=1)

    # ---- evaluation ------------------------------------------------------------------------------------

    def eval_batch(self, outputs: Any, batch: dict[str, Any]) -> dict[str, Any]:
        """Per row: the tagged words' gold and predicted tag ids, left-aligned and padded with -100 to
        ``data.max_length`` (rows of every batch share one width, to be concatenated), its loss sum and count."""
        import torch

        labels = batch["labels"]
        tagged = labels != IGNORE
        preds = outputs.logits.argmax(-1)
        width = max(self._width or 0, labels.shape[1])
        gold = torch.full((labels.shape[0], width), IGNORE, dtype=torch.long)
        pred = torch.full_like(gold, IGNORE)
        for i in range(labels.shape[0]):
            n = int(tagged[i].sum())
            gold[i, :n] = labels[i][tagged[i]].cpu()
            pred[i, :n] = preds[i][tagged[i]].cpu()
        losses = self._token_losses(outputs, labels)
        return {"gold": gold, "pred": pred, "loss_sum": losses.sum(-1), "tokens": tagged.sum(-1)}

    def metrics(self, collected: dict[str, Any]) -> dict[str, float]:
        gold_rows, pred_rows = [], []
        for gold, pred in zip(collected["gold"].tolist(), collected["pred"].tolist()):
            n = sum(1 for g in gold if g != IGNORE)
            gold_rows.append([self.labels[g] for g in gold[:n]])
            pred_rows.append([self.labels[p] for p in pred[:n]])
        loss = float(collected["loss_sum"].sum() / collected["tokens"].sum().clamp(min=1))
        return {**entity_scores(gold_rows, pred_rows), "loss": loss}

    # ---- serving ---------------------------------------------------------------------------------------

    def _words(self, fields: dict[str, Any]) -> list[str]:
        words = fields.get("tokens")
        return [str(w) for w in (_cells(words) if words is not None else str(fields["text"]).split())]

    def serve_encode(self, fields: dict[str, Any], tokenizer: Any, max_length: Optional[int]
                     ) -> tuple[list[int], Optional[list[int]]]:
        """A row's words (``tokens``, or ``text`` split on whitespace) as token ids. Which token starts which
        word is kept, keyed by the ids, for :meth:`serve_prediction` (which the server hands the ids alone)."""
        words = self._words(fields)
        enc = self._tokenize([words], tokenizer, max_length)
        ids = list(enc["input_ids"][0])
        starts, previous = [], None
        for word in enc.word_ids(0):
            starts.append(word if word is not None and word != previous else None)
            previous = word
        self._served[tuple(ids)] = [*starts, None, *words]  # starts, a separator, then the words
        self._served.move_to_end(tuple(ids))
        while len(self._served) > 4096:
            self._served.popitem(last=False)
        types = enc.get("token_type_ids")
        return ids, list(types[0]) if types is not None else None

    def shared_head(self, adapter: str, state: dict[str, Any], shared_model: Any) -> tuple[Any, Optional[str]]:
        """The adapter's linear head, applied to every token's hidden state ("tokens")."""
        head, _ = linear_head(adapter, self.name, state, shared_model, len(self.labels))
        return head, "tokens"

    def serve_prediction(self, logits: Any, input_ids: Callable[[], list[int]]) -> dict[str, Any]:
        """Per word its tag and the tag's probability, and the entities the tags mark (type, words, word span)."""
        import torch

        ids = tuple(input_ids())  # encodes the row again, which keeps its word starts
        kept = self._served[ids]
        n_tokens = len(ids)
        starts, words = kept[:n_tokens], kept[n_tokens + 1:]
        probs = torch.softmax(logits.float(), -1)
        tags: list[str] = []
        scores: list[float] = []
        for position, word in enumerate(starts):
            if word is not None:
                tags.append(self.labels[int(probs[position].argmax())])
                scores.append(round(float(probs[position].max()), 6))
        shown = words[: len(tags)]  # words past max_length got no token
        found = [{"type": kind, "start": first, "end": last + 1, "text": " ".join(shown[first:last + 1])}
                 for kind, first, last in entities(tags)]
        return {"tokens": shown, "tags": tags, "scores": scores, "entities": found}


TASK = TokenClassification
