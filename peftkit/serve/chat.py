"""A chat conversation (OpenAI's ``messages``) as the prompt token ids a served causal-LM adapter reads.

An instruction adapter gets the layout it was trained with (``tasks/causal_lm.py`` records it: the tokenizer's
chat template when ``task.chat_template`` was ``auto`` and the tokenizer had one, else peftkit's plain
"### Instruction / ### Response" layout), so one user message gives exactly the prompt ``Server.generate``
builds for that text. A plain-text adapter and the base were trained on no layout: they get the tokenizer's chat
template when it has one, else the same plain layout.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from ..errors import PeftkitError

ROLES = ("system", "user", "assistant")
INSTRUCTION, RESPONSE = "### Instruction:\n", "\n\n### Response:\n"


def chat_prompt_ids(task: Optional[Any], tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """``task``: the adapter's causal-LM head (None for the base). ``messages``: role and content each, the last
    one the user's."""
    if not messages or messages[-1]["role"] != "user":
        raise PeftkitError("messages: the last message must be the user's")
    instruction = task is not None and task.state.get("format") == "instruction"
    template = bool(getattr(tokenizer, "chat_template", None))
    if instruction:  # as causal_lm.py decided in training
        template = template and task.options.chat_template == "auto"
    if instruction and len(messages) == 1:  # what training wrote before a response, to the token
        return list(task.prompt_ids(tokenizer, messages[0]["content"]))
    if template:
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        encoded = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        # a list, or a BatchEncoding where transformers defaults to return_dict
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    return _plain_layout(tokenizer, messages)


def _plain_layout(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """The plain layout, turn by turn as training wrote one: each answer followed by EOS. A system message
    opens the first instruction as a paragraph of its own (training had none: this is the nearest fit)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    ids: list[int] = []
    for i, message in enumerate(turns):
        if message["role"] == "user":
            text = f"{system}\n\n{message['content']}" if system and not ids else message["content"]
            # the first turn is tokenized as training tokenized a prompt (special tokens included)
            ids += tokenizer(f"{INSTRUCTION}{text}{RESPONSE}", add_special_tokens=not ids)["input_ids"]
        else:
            if i == 0:
                raise PeftkitError("messages: an assistant message cannot come before the first user message")
            ids += tokenizer(message["content"], add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
    return ids
