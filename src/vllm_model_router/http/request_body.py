"""Finding the ``model`` a client's request names, and renaming it (an alias → the model's own name).

A JSON body (chat, completions, embeddings, ...) carries it as a key; a ``multipart/form-data`` body
(audio transcriptions and translations, where the audio is a file part) as a form field. Multipart is
parsed with python-multipart, the parser Starlette and vLLM's own server use, so the router reads the
form the way the engine will; renaming the field splices the new value into the raw bytes and leaves
every other part, the audio included, byte for byte as the client sent it.

A JSON body's ``model`` is read without building the object (``json_model``): msgspec decodes only that
key and checks the rest of the document as it skips it, so a 200 KB conversation costs 0.1 to 0.2 ms
instead of the 0.5 to 1.9 ms ``json.loads`` takes to build every string of it. The standard library
stays the judge of what is valid: whatever msgspec refuses (or could judge differently: NaN, lone
surrogates, a UTF-16 body, invalid UTF-8) goes through ``json.loads`` as before, so the same bodies are
accepted and refused, with the same messages. One boundary moves a little: both parsers stop at Python's
recursion limit, and json.loads sits three frames deeper, so a body nested within three levels of that
limit (about 990 levels) is now forwarded for the engine to judge instead of refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import msgspec
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from vllm_model_router.errors import BadRequest

MAX_MODEL_FIELD = 1024  # bytes: a model name, not a file


class _ModelOnly(msgspec.Struct):
    """A JSON object, of which only ``model`` is kept (the other keys are checked and skipped)."""

    model: object = None


_MODEL_ONLY = msgspec.json.Decoder(_ModelOnly)
FAST_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)


def json_model(raw: bytes) -> str:
    """The ``model`` of a JSON object body, or the 400 :func:`parse_json` gives: the same answer for
    every body, without building the object when the body is plain UTF-8 JSON (the usual case)."""
    if is_plain_utf8(raw):
        try:
            found = _MODEL_ONLY.decode(raw)
        except FAST_ERRORS:
            pass  # json.loads says what is wrong, or accepts what msgspec does not (NaN, a UTF-16 body, ...)
        else:
            return _checked_model(found.model)
    return parse_json(raw)[1]


def json_payload(raw: bytes) -> dict[str, Any]:
    """The JSON object of a body :func:`json_model` accepted (for an alias to rename, a prompt to hash):
    built by msgspec where it can, else by json.loads, the same objects either way."""
    if is_plain_utf8(raw):
        try:
            payload = msgspec.json.decode(raw)
        except FAST_ERRORS:
            pass
        else:
            if isinstance(payload, dict):
                return payload
    return parse_json(raw)[0]


def is_plain_utf8(raw: bytes) -> bool:
    """Whether msgspec may read ``raw``: whether json.loads would decode it as UTF-8 (it allows encoded
    surrogates); msgspec does not look inside the strings it skips."""
    if raw.isascii():
        return True
    try:
        raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return False
    return True


def parse_json(raw: bytes) -> tuple[dict[str, Any], str]:
    """The JSON object and its ``model``, or a 400 that says what is wrong."""
    try:
        payload = json.loads(raw)
    except UnicodeDecodeError as e:
        raise BadRequest(f"request body is not valid UTF-8: {e.reason}") from e
    except RecursionError as e:
        raise BadRequest("request body is nested too deeply") from e
    except ValueError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from e
    if not isinstance(payload, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(payload).__name__}")
    return payload, _checked_model(payload.get("model"))


def _checked_model(model: object) -> str:
    if model is None:
        raise BadRequest("you must provide a model parameter", param="model")
    if not isinstance(model, str):
        raise BadRequest(f"'model' must be a string, got {type(model).__name__}", param="model")
    return model


def is_multipart(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "multipart/form-data"


@dataclass
class _Field:
    name: bytes = b""
    value: bytes = b""
    spans: list[tuple[int, int]] = field(default_factory=list)  # where the value is in the body
    in_body: bool = True  # every piece of the value came as a slice of the body itself


@dataclass
class FormModel:
    """The ``model`` field of a multipart body: its value and where its bytes are in the body (None when
    the parser handed the value over in pieces that are not one slice of the body)."""

    model: str
    span: tuple[int, int] | None

    def rewrite(self, raw: bytes, name: str) -> bytes:
        if self.span is None:
            raise BadRequest("the 'model' form field cannot be renamed; send the model's own name", param="model")
        start, end = self.span
        return raw[:start] + name.encode() + raw[end:]


def _field_name(disposition: bytes) -> bytes | None:
    kind, params = parse_options_header(disposition)
    return params.get(b"name") if kind == b"form-data" else None


def parse_form_model(raw: bytes, content_type: str) -> FormModel:
    """The ``model`` form field of a multipart/form-data body, or a 400 that says what is wrong."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart/form-data request without a boundary")
    fields: list[_Field] = []
    header: list[bytes] = [b"", b""]  # the header being read: name, value

    def on_part_begin() -> None:
        fields.append(_Field())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        if header[0].lower() == b"content-disposition" and fields:
            fields[-1].name = _field_name(header[1]) or b""
        header[0], header[1] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if fields and fields[-1].name == b"model":
            f = fields[-1]
            f.value += data[start:end]
            f.spans.append((start, end))
            f.in_body = f.in_body and data is raw
            if len(f.value) > MAX_MODEL_FIELD:
                raise BadRequest("the 'model' form field is too long", param="model")

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data,
    })
    try:
        parser.write(raw)  # one buffer: the offsets the callbacks get are offsets into the body
        parser.finalize()
    except MultipartParseError as e:
        raise BadRequest(f"request body is not valid multipart/form-data: {e}") from e
    models = [f for f in fields if f.name == b"model"]
    if not models:
        raise BadRequest("you must provide a model parameter (a 'model' form field)", param="model")
    if len(models) > 1:
        raise BadRequest("the form has more than one 'model' field", param="model")
    f = models[0]
    try:
        model = f.value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest("the 'model' form field is not valid UTF-8", param="model") from e
    if not model:
        raise BadRequest("you must provide a model parameter", param="model")
    contiguous = f.in_body and all(a[1] == b[0] for a, b in zip(f.spans, f.spans[1:], strict=False))
    return FormModel(model, (f.spans[0][0], f.spans[-1][1]) if contiguous else None)
