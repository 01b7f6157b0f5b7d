"""Router logs: human-readable lines by default, JSON lines with ``--log-format json`` (env LOG_FORMAT).

Every lifecycle event (load, eviction, failure, rejection...) is logged once, at INFO, by
``log_lifecycle_event`` with its model and reason; in JSON the event's fields are top-level keys
(``kind``, ``model``, ``reason``, plus details such as ``seconds``), so a log pipeline can filter on
them without parsing the message.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from vllm_model_router.state.lifecycle import LifecycleEvent

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
EVENT_LOGGER = "vllm_model_router.events"
MODEL_LOGGER_PREFIX = "vllm_model_router.model."  # the process driver's per-model output
_CORE_KEYS = ("time", "level", "logger", "message")

log = logging.getLogger(EVENT_LOGGER)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if k not in _CORE_KEYS})
        elif record.name.startswith(MODEL_LOGGER_PREFIX):
            out["model"] = record.name[len(MODEL_LOGGER_PREFIX):]
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if fmt not in FORMATS:  # only possible through LOG_FORMAT: the command line checks its choices
        logging.getLogger("vllm_model_router").warning("unknown log format %r (expected %s): using text",
                                                       fmt, " or ".join(FORMATS))


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}".rstrip("0").rstrip(".")
    if isinstance(v, str) and (not v or any(c.isspace() or c in '"=' for c in v)):
        return json.dumps(v, ensure_ascii=False)  # quoted, newlines escaped: one event, one line
    return str(v)


def log_lifecycle_event(event: LifecycleEvent) -> None:
    """A listener for ``runtime.events``: one INFO line per event, with structured fields."""
    fields: dict[str, Any] = {**event.data, "kind": event.kind, "model": event.model, "reason": event.reason,
                              "seq": event.seq}
    details = "".join(f" {k}={_value(v)}" for k, v in event.data.items())
    log.info("%s model=%s reason=%s%s", event.kind, event.model or "-", _value(event.reason), details,
             extra={"fields": fields})
