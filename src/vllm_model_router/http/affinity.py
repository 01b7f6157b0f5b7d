"""Prompt-prefix affinity: a short hash of how a request's prompt begins.

vLLM's prefix cache is per engine: a request whose prompt starts like an earlier one (the same system
prompt, the same first turns) is cheaper on the engine that served that one. Among equally busy replicas
the scheduler prefers the one that last served the same key (``RequestArrived.affinity``). The key covers
the first ``PREFIX_CHARS`` characters of the prompt (of a chat: of its messages' roles and texts, in
order), so it costs the same however long the conversation, and it is computed only for models with
replicas. It is a CRC-32: stable, fast, and collisions only cost a cache miss.

From the raw body (``body_prefix_key``) a chat's messages are located by msgspec without being decoded,
then decoded one by one only until the prefix is long enough: the key of a 200 KB conversation costs what
its first messages cost, not the whole body.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterable
from typing import Any

import msgspec

from vllm_model_router.http.request_body import FAST_ERRORS, is_plain_utf8, json_payload

PREFIX_CHARS = 512
PREFIX_TOKENS = 128


def _text(content: Any) -> str:
    """A message's text: its string, or the text parts of a list of parts (images and the like skipped)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _chat_text(messages: Iterable[Any]) -> str:
    """The first ``PREFIX_CHARS`` of a chat's roles and texts; reads ``messages`` only as far as that."""
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
    return "".join(parts)[:PREFIX_CHARS]


def _crc(text: str) -> int | None:
    return zlib.crc32(text.encode("utf-8", "replace")) if text else None


class _Prompt(msgspec.Struct):
    """What the key reads of a body: a chat's messages left undecoded, or the prompt."""

    messages: list[msgspec.Raw] | msgspec.UnsetType | None = msgspec.UNSET
    prompt: object = msgspec.UNSET
    input: object = msgspec.UNSET


_PROMPT = msgspec.json.Decoder(_Prompt)


def body_prefix_key(raw: bytes) -> int | None:
    """``prefix_key`` of a JSON body the router accepted, decoding no more of it than the key needs."""
    if is_plain_utf8(raw):
        try:
            found = _PROMPT.decode(raw)
        except FAST_ERRORS:
            pass  # messages that are not a list, NaN somewhere...: the whole object, as prefix_key reads it
        else:
            if not isinstance(found.messages, list):
                return prefix_key({k: v for k, v in (("prompt", found.prompt), ("input", found.input))
                                   if v is not msgspec.UNSET})
            with contextlib.suppress(*FAST_ERRORS):
                return _crc(_chat_text(msgspec.json.decode(m) for m in found.messages))
    return prefix_key(json_payload(raw))


def prefix_key(payload: dict[str, Any]) -> int | None:
    """The hash of the start of the request's prompt, or None when it has none to speak of."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        text = _chat_text(messages)
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
    return _crc(text)
