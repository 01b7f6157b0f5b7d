"""Prompt-prefix affinity: a short hash of how a request's prompt begins.

vLLM's prefix cache is per engine: a request whose prompt starts like an earlier one (the same system
prompt, the same first turns) is cheaper on the engine that served that one. Among equally busy replicas
the scheduler prefers the one that last served the same key (``RequestArrived.affinity``). The key covers
the first ``PREFIX_CHARS`` characters of the prompt (of a chat: of its messages' roles and texts, in
order), so it costs the same however long the conversation, and it is computed only for models with
replicas. It is a CRC-32: stable, fast, and collisions only cost a cache miss.
"""

from __future__ import annotations

import zlib
from typing import Any

PREFIX_CHARS = 512
PREFIX_TOKENS = 128


def _text(content: Any) -> str:
    """A message's text: its string, or the text parts of a list of parts (images and the like skipped)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prefix_key(payload: dict[str, Any]) -> int | None:
    """The hash of the start of the request's prompt, or None when it has none to speak of."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        size = 0
        for m in messages:
            if not isinstance(m, dict):
                continue
            piece = f"{m.get('role', '')}\x00{_text(m.get('content'))}\x01"
            parts.append(piece)
            size += len(piece)
            if size >= PREFIX_CHARS:
                break
        text = "".join(parts)[:PREFIX_CHARS]
    else:
        prompt = payload.get("prompt", payload.get("input"))
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch: its first prompt
        if isinstance(prompt, list):  # token ids
            text = ",".join(str(t) for t in prompt[:PREFIX_TOKENS])
        elif isinstance(prompt, str):
            text = prompt[:PREFIX_CHARS]
        else:
            return None
    if not text:
        return None
    return zlib.crc32(text.encode("utf-8", "replace"))
