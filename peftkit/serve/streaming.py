"""Following each row of a batched ``model.generate`` call step by step: its own token limit, its EOS, a client
that went away, and its text streamed as it grows.

transformers calls a ``StoppingCriteria`` after every decoding step with the ids so far; :class:`Watch` is one,
over the rows of one call. A row it reports done stops there (transformers pads it from then on) while the
other rows go on unchanged: each row's tokens depend only on its own prompt and adapter, so a row that stops
early, or runs to a longer limit than its neighbours, gets the tokens it would get alone.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch


def until_stop(ids: Sequence[int], max_tokens: int, eos: set[int]) -> list[int]:
    """A row's own generation out of its batch's: at most ``max_tokens``, ending at its first EOS (kept, as
    ``model.generate`` alone ends there)."""
    kept: list[int] = []
    for token in list(ids)[:max_tokens]:
        kept.append(int(token))
        if token in eos:
            break
    return kept


def settled(text: str, finished: bool) -> str:
    """The part of a generation's text so far that later tokens can no longer change, once stripped as the final
    text is: everything before its last whitespace (a decoder may yet join the last word with what follows,
    or drop the space before it, and a byte-level token may be half a character)."""
    text = text.lstrip()
    if finished:
        return text.rstrip()
    cut = max(text.rfind(" "), text.rfind("\n"), text.rfind("\t"))
    return text[:cut] if cut > 0 else ""


class RowState:
    """One row being generated: its new ids so far, and the text already handed to ``on_text``."""

    def __init__(self, max_tokens: int, eos: set[int], decode: Callable[[list[int]], str],
                 on_text: Optional[Callable[[str], None]], abandoned: Callable[[], bool]):
        self.max_tokens = max_tokens
        self.eos = eos
        self.decode = decode
        self.on_text = on_text
        self.abandoned = abandoned
        self.ids: list[int] = []
        self.finished = False
        self.dropped = False  # stopped because its client went away
        self.sent = ""

    def take(self, token: int) -> None:
        self.ids.append(token)
        self.finished = token in self.eos or len(self.ids) >= self.max_tokens
        if self.on_text is not None and not self.finished:  # the finished text is sent once the call returns
            self._send(settled(self.decode(self.ids), finished=False))

    def finish(self, text: str) -> bool:
        """Send what is left of the row's final ``text``; False if what was sent is not its beginning (a
        decoder that rewrote settled text: never seen, but then the stream and the final text would differ)."""
        if self.on_text is None:
            return True
        if not text.startswith(self.sent):
            return False
        self._send(text)
        return True

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            delta, self.sent = text[len(self.sent):], text
            self.on_text(delta)  # type: ignore[misc]


class Watch:
    """The stopping criterion of one ``model.generate`` call over ``rows`` (in the call's row order)."""

    def __init__(self, rows: list[RowState]):
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        last = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, last):
            if not row.finished:
                row.take(int(token))
            if not row.finished and row.abandoned():  # its client went away: the row stops, its neighbours go on
                row.finished = row.dropped = True
        return torch.tensor([row.finished for row in self.rows], dtype=torch.bool, device=input_ids.device)
