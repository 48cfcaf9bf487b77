"""Conversations for chat fine-tuning: read and check them, render them through the chat template, pack them.

The file format is the one chat datasets already use, one conversation per JSONL line:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

A rendered conversation is BOS followed by ``Tokenizer.encode_chat(messages)`` (each message is its role
token, its content and ``<|end|>``), with a mask of the tokens the model is trained to produce: the
content of every assistant message and the ``<|end|>`` closing it, so the model also learns to stop.
Message text is encoded as text, so a user who types "<|end|>" produces no control token.

Short conversations are packed together into rows of ``context_length + 1`` tokens (inputs and
next-token targets), padded with PAD; every target outside the mask, and on padding, is -100.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.evaluation.files import read_text_file

ROLES = ("system", "user", "assistant")
IGNORE = -100  # the target value the loss skips
# A row is filled by first fit among the most recent rows only: as good as full first fit on
# conversations this size, in linear time.
PACKING_LOOKBACK = 16


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict, ...]  # each {"role": "system" | "user" | "assistant", "content": str}
    source: str  # "file:line", or "stdlib:json.dumps" for the built-in set
    split_key: str = ""  # what the train/held-out hash is taken of (default: the messages)

    def key(self) -> str:
        return self.split_key or json.dumps(self.messages, sort_keys=True, ensure_ascii=False)

    def to_json(self) -> dict:
        return {"messages": [dict(message) for message in self.messages]}


@dataclass
class Skipped:
    where: str  # file:line
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def _check_messages(record) -> tuple[dict, ...]:
    """The record's messages as {"role", "content"} dicts; raises ValueError with the reason it is unusable."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError('no "messages" list' if "messages" not in record else '"messages" must be a non-empty list')
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {index} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {index} has role {role!r}; roles are system, user and assistant")
        if not isinstance(content, str):
            raise ValueError(f"message {index} ({role}) has no text \"content\"")
        checked.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in checked):
        raise ValueError("no assistant message with content: nothing to learn from")
    return tuple(checked)


def read_conversations(path: Path) -> tuple[list[Conversation], list[Skipped]]:
    """The usable conversations of a JSONL file (``.jsonl`` or ``.jsonl.gz``), and every line skipped with why.

    A bad line never stops the others from being read; a file with no usable conversation is an error.
    """
    path = Path(path)
    conversations, skipped, lines = [], [], 0
    for number, line in enumerate(read_text_file(path, "conversations").splitlines(), start=1):
        if not line.strip():
            continue
        lines += 1
        where = f"{path}:{number}"
        try:
            messages = _check_messages(json.loads(line))
        except json.JSONDecodeError as exc:
            skipped.append(Skipped(where, f"not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        except ValueError as exc:
            skipped.append(Skipped(where, str(exc)))
            continue
        conversations.append(Conversation(messages, source=where))
    if lines == 0:
        raise LmforgeError(f"{path} holds no conversations (expected JSONL lines of {{\"messages\": [{{\"role\", \"content\"}}, ...]}})")
    if not conversations:
        raise LmforgeError(f"{path} holds no usable conversation: all {lines} lines were skipped (first: {skipped[0]})")
    return conversations, skipped


def is_held_out(key: str, fraction: float) -> bool:
    """Deterministic split: the same key lands on the same side on every machine and run."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def split_conversations(conversations: list[Conversation], eval_fraction: float) -> tuple[list[Conversation], list[Conversation]]:
    """(train, held out), by a hash of each conversation's key; held-out ones in hash order (a mix of sources)."""
    train, held_out = [], []
    for conversation in conversations:
        (held_out if is_held_out(conversation.key(), eval_fraction) else train).append(conversation)
    held_out.sort(key=lambda c: hashlib.sha256(c.key().encode("utf-8")).digest())
    return train, held_out


def write_conversations(path: Path, conversations: list[Conversation]) -> None:
    from lmforge.artifacts import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(c.to_json(), ensure_ascii=False) + "\n" for c in conversations))


@dataclass
class Rendered:
    ids: list[int]  # BOS + encode_chat(messages)
    trained: list[bool]  # per token: is it a target the model learns (assistant content and its <|end|>)?
    truncated: bool = False


def render(tokenizer, messages) -> Rendered:
    """BOS + the chat template's tokens, with the mask of assistant content and closing ``<|end|>`` tokens."""
    ids, trained = [tokenizer.bos_id], [False]
    for message in messages:
        part = tokenizer.encode_chat([message])  # role token, content, <|end|>
        ids += part
        trained += [False] + [message["role"] == "assistant"] * (len(part) - 1)
    return Rendered(ids, trained)


@dataclass
class RenderStats:
    conversations: int = 0
    truncated: int = 0  # longer than a row: cut to its first row, which still holds assistant tokens
    too_long: int = 0  # longer than a row with no assistant token in the first one: skipped
    tokens: int = 0
    trained_tokens: int = 0
    skipped: list[str] = field(default_factory=list)


def render_all(tokenizer, conversations: list[Conversation], max_tokens: int) -> tuple[list[Rendered], RenderStats]:
    """Render every conversation, cutting those longer than ``max_tokens`` (or skipping them, when the cut
    would leave no assistant token to learn)."""
    rendered, stats = [], RenderStats()
    for conversation in conversations:
        item = render(tokenizer, conversation.messages)
        if len(item.ids) > max_tokens:
            item = Rendered(item.ids[:max_tokens], item.trained[:max_tokens], truncated=True)
            if not any(item.trained):
                stats.too_long += 1
                stats.skipped.append(f"{conversation.source}: longer than {max_tokens} tokens before its first assistant answer")
                continue
            stats.truncated += 1
        rendered.append(item)
        stats.conversations += 1
        stats.tokens += len(item.ids)
        stats.trained_tokens += sum(item.trained)
    return rendered, stats


@dataclass
class PackedRows:
    """Rows of ``row_length`` tokens; ``members[i]`` lists (conversation index, start) of what row i holds."""

    tokens: np.ndarray  # (rows, row_length) int64, PAD after the last conversation
    trained: np.ndarray  # (rows, row_length) bool
    members: list[list[tuple[int, int]]]

    def inputs_and_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (rows, row_length - 1): targets are the next tokens, -100 where not trained."""
        tokens = torch.from_numpy(self.tokens)
        targets = tokens[:, 1:].clone()
        targets[~torch.from_numpy(self.trained[:, 1:])] = IGNORE
        return tokens[:, :-1].contiguous(), targets


def pack(rendered: list[Rendered], row_length: int, pad_id: int, pack_rows: bool = True) -> PackedRows:
    """Lay conversations into rows of ``row_length`` tokens (each at most that long), several per row when
    ``pack_rows``. A conversation is never split across rows, so its tokens and mask stay as rendered."""
    if not rendered:
        raise LmforgeError("no conversations to pack")
    rows: list[list[int]] = []
    masks: list[list[bool]] = []
    members: list[list[tuple[int, int]]] = []
    for index, item in enumerate(rendered):
        if len(item.ids) > row_length:
            raise ValueError(f"conversation {index} has {len(item.ids)} tokens, more than a row of {row_length}")
        target = None
        if pack_rows:
            for row in range(max(0, len(rows) - PACKING_LOOKBACK), len(rows)):
                if len(rows[row]) + len(item.ids) <= row_length:
                    target = row
                    break
        if target is None:
            rows.append([]), masks.append([]), members.append([])
            target = len(rows) - 1
        members[target].append((index, len(rows[target])))
        rows[target] += item.ids
        masks[target] += item.trained
    tokens = np.full((len(rows), row_length), pad_id, dtype=np.int64)
    trained = np.zeros((len(rows), row_length), dtype=bool)
    for row, (ids, mask) in enumerate(zip(rows, masks)):
        tokens[row, : len(ids)] = ids
        trained[row, : len(mask)] = mask
    return PackedRows(tokens, trained, members)
