"""The router's OpenAPI 3 description, served at ``GET /openapi.json``. Every route is described here;
tests/integration/test_admin_api.py checks that no registered route is missing."""

from __future__ import annotations

from typing import Any

from vllm_model_router.routes import INFERENCE_ROUTES, MULTIPART_ROUTES
from vllm_model_router.scheduler import State

MODEL_STATES = [s.value for s in State]  # the scheduler's own states, so the description never lags behind
# /v1/models in endpoint mode: the engine's own models while the engine cannot be reached
CARD_STATUSES = [*MODEL_STATES, "unavailable"]
ERROR_STATUSES = {
    "400": "The body is not JSON, not an object, or `model` is missing or not a string",
    "401": "No key, or a wrong one, while `auth.api_keys` is set (`WWW-Authenticate: Bearer`)",
    "403": "A client key on a route that needs an admin key",
    "404": "Unknown model (the message lists the available names), unknown route, or an endpoint the model does "
           "not serve",
    "408": "The body did not arrive within `limits.client_body_timeout`",
    "413": "The body is larger than `limits.max_body_mb`",
    "502": "The connection to the model's server was lost",
    "503": "The model failed to load: the reason and the last lines of its log",
    "504": "Waited longer than `load_timeout` for the model to load, or the model did not answer within "
           "`limits.first_byte_timeout`",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: str) -> dict[str, Any]:
    return {c: {"$ref": f"#/components/responses/E{c}"} for c in codes}


NAME = {"name": "name", "in": "path", "required": True, "description": "A model's name or one of its aliases",
        "schema": {"type": "string"}}


def _admin_action(summary: str, description: str, op_id: str, params: list[dict[str, Any]] | None = None
                  ) -> dict[str, Any]:
    return {"post": {
        "tags": ["admin"], "summary": summary, "description": description, "operationId": op_id,
        "parameters": [NAME, *(params or [])],
        "responses": {"200": _json(_ref("AdminModel"), "The model's state afterwards"),
                      **_errors("401", "403", "404", "503", "504")},
    }}


def _inference(summary: str, op_id: str, request_schema: str, params: list[dict[str, Any]] | None = None
               ) -> dict[str, Any]:
    return {"post": {
        "tags": ["openai"], "summary": summary, "operationId": op_id, **({"parameters": params} if params else {}),
        "description": "Makes the model resident (loading it, evicting the least recently used idle models if "
                       "needed), then forwards the body unchanged (an alias is rewritten to the model's name) "
                       "and returns the upstream status, headers and body. With `\"stream\": true` the answer "
                       "is a server-sent event stream forwarded chunk by chunk.",
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request_schema)}}},
        "responses": {
            "200": {"description": "The model server's answer",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            **_errors(*ERROR_STATUSES),
        },
    }}


def _other_inference_routes() -> dict[str, Any]:
    """The forwarded routes besides chat, completions and embeddings (routes.py is the list)."""
    out: dict[str, Any] = {}
    for route, upstream in INFERENCE_ROUTES.items():
        if route in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            continue
        op_id = "forward" + "".join(w.capitalize() for w in route[len("/v1/"):].replace("/", "_").split("_"))
        spec = _inference(f"Forwarded to the model's server (vLLM's `{upstream}`)", op_id, "InferenceRequest")
        if route in MULTIPART_ROUTES:  # the audio is a file part; the model a form field
            spec["post"]["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["model", "file"],
                "properties": {"model": {"type": "string"}, "file": {"type": "string", "format": "binary"}}}}}}
        out[route] = spec
    return out


def _history_schemas() -> dict[str, Any]:
    """``GET /admin/history``'s answer. Times are Unix seconds."""
    num, opt = {"type": "number"}, {"type": "number", "nullable": True}
    return {
        "History": {"type": "object", "required": ["now", "since", "minutes", "bucket_seconds", "lanes", "marks",
                                                   "models", "queue"], "properties": {
            "now": num, "since": {**num, "description": "`now` - `minutes` x 60"},
            "minutes": {"type": "integer"}, "bucket_seconds": {"type": "integer", "enum": [60]},
            "lanes": {"type": "array", "items": _ref("HistoryLane"),
                      "description": "One per unit (`chat`, `chat@1`...), by unit name"},
            "marks": {"type": "array", "items": _ref("HistoryMark"), "description": "Oldest first"},
            "models": {"type": "object", "additionalProperties": {"type": "array", "items": _ref("HistoryBucket")},
                       "description": "Per model (replicas merged): its minutes with requests, oldest first"},
            "queue": {"type": "array", "description": "[time, requests waiting in total], oldest first; the "
                      "first one may be the count in effect at `since`",
                      "items": {"type": "array", "items": num, "minItems": 2, "maxItems": 2}}}},
        "HistoryLane": {"type": "object", "properties": {
            "unit": {"type": "string"}, "model": {"type": "string"}, "replica": {"type": "integer"},
            "spans": {"type": "array", "description": "Oldest first, clipped to the window; `unloaded` left out",
                      "items": {"type": "object", "properties": {
                          "state": {"type": "string", "enum": MODEL_STATES}, "start": num,
                          "end": {**opt, "description": "null: still in that state"}}}}}},
        "HistoryMark": {"type": "object", "properties": {
            "time": num, "unit": {"type": "string", "nullable": True}, "model": {"type": "string", "nullable": True},
            "kind": {"type": "string", "enum": ["swap", "failure", "load", "sleep", "wake", "node"]},
            "event": _ref("LifecycleEvent")}},
        "HistoryBucket": {"type": "object", "properties": {
            "start": num, "requests": {"type": "integer"},
            "errors": {"type": "integer", "description": "Answered 5xx or 429"},
            "wait_p50": opt, "wait_p99": opt, "first_byte_p50": opt, "first_byte_p99": opt}},
    }


def openapi_spec(version: str) -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/health": {"get": {
            "tags": ["operations"], "summary": "Liveness", "operationId": "health",
            "responses": {"200": {"description": "`OK` while the router is up",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}},
        }},
        "/metrics": {"get": {
            "tags": ["operations"], "summary": "Prometheus metrics", "operationId": "metrics",
            "description": "Prometheus text exposition (OpenMetrics when the `Accept` header asks for it). "
                           "The metrics are listed in the README's Metrics section.",
            "responses": {"200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}},
        }},
        "/openapi.json": {"get": {
            "tags": ["operations"], "summary": "This description", "operationId": "openapi",
            "responses": {"200": _json({"type": "object"}, "OpenAPI 3 document")},
        }},
        "/ui": {"get": {
            "tags": ["operations"], "summary": "Dashboard", "operationId": "dashboard",
            "description": "A live dashboard: models, memory, the event feed, load and unload buttons. "
                           "`/ui/` redirects here.",
            "responses": {"200": {"description": "HTML page",
                                  "content": {"text/html": {"schema": {"type": "string"}}}}},
        }},
        "/ui/{asset}": {"get": {
            "tags": ["operations"], "summary": "Dashboard assets", "operationId": "dashboardAsset",
            "parameters": [{"name": "asset", "in": "path", "required": True,
                            "schema": {"type": "string", "enum": ["index.html", "app.js", "style.css"]}}],
            "responses": {"200": {"description": "The file"}, **_errors("404")},
        }},
        "/v1/models": {"get": {
            "tags": ["openai"], "summary": "Every model (and alias) the router can serve", "operationId": "listModels",
            "responses": {"200": _json(_ref("ModelList"), "The models with their status")},
        }},
        "/v1/chat/completions": _inference("Chat completion", "createChatCompletion", "ChatCompletionRequest"),
        "/v1/completions": _inference("Completion", "createCompletion", "InferenceRequest"),
        "/v1/embeddings": _inference("Embeddings", "createEmbedding", "InferenceRequest"),
        **_other_inference_routes(),
        "/admin/models": {"get": {
            "tags": ["admin"], "summary": "Every model's state and the capacity in use", "operationId": "adminModels",
            "responses": {"200": _json(_ref("AdminModels"), "Models and capacity")},
        }},
        "/admin/models/{name}/load": _admin_action(
            "Load a model", "Makes the model resident; answers once it is loaded (or failed).", "loadModel"),
        "/admin/models/{name}/unload": _admin_action(
            "Unload a model", "Waits for the model's in-flight requests, then stops it and answers once its "
            "processes are gone. `?force=true` stops it at once.", "unloadModel",
            [{"name": "force", "in": "query", "required": False, "schema": {"type": "boolean", "default": False},
              "description": "Stop at once, failing the requests in flight"}]),
        "/admin/models/{name}/pin": _admin_action(
            "Pin a model", "A pinned model is never evicted (it still counts against capacity and may still be "
            "unloaded by an operator).", "pinModel"),
        "/admin/models/{name}/unpin": _admin_action(
            "Unpin a model", "The model may be evicted again.", "unpinModel"),
        "/admin/models/{name}/scale": {"post": {
            "tags": ["admin"], "summary": "Set the replicas a model keeps", "operationId": "scaleModel",
            "description": "For a model with `replicas`: keep N copies resident (pinned, loaded when they fit); "
                           "copies beyond N stop once idle. Answers at once, with the model as it is then.",
            "parameters": [NAME, {"name": "replicas", "in": "query", "required": True,
                                  "description": "Copies to keep, from the model's `replicas.min` to its `max`",
                                  "schema": {"type": "integer", "minimum": 0}}],
            "responses": {"200": _json(_ref("AdminModel"), "The model afterwards"),
                          **_errors("400", "401", "403", "404")},
        }},
        "/admin/models/{name}/logs": {"get": {
            "tags": ["admin"], "summary": "The model process's output", "operationId": "modelLogs",
            "parameters": [
                NAME,
                {"name": "lines", "in": "query", "required": False, "description": "How many of the last lines",
                 "schema": {"type": "integer", "minimum": 0, "maximum": 10000, "default": 200}},
                {"name": "follow", "in": "query", "required": False, "schema": {"type": "boolean", "default": False},
                 "description": "Stream: the last `lines` lines, then each new line as the process prints it "
                                "(chunked text/plain), until the client disconnects"},
            ],
            "responses": {
                "200": {"description": "The lines (JSON), or a text stream with `follow=true`", "content": {
                    "application/json": {"schema": _ref("ModelLogs")},
                    "text/plain": {"schema": {"type": "string"}},
                }},
                **_errors("400", "404"),
            },
        }},
        "/admin/events": {"get": {
            "tags": ["admin"], "summary": "Lifecycle events (server-sent events)", "operationId": "events",
            "description": "The recent history first, then every event as it happens. Each message is "
                           "`id: <seq>`, `event: <kind>` and `data: <LifecycleEvent as JSON>`; comments are sent "
                           "as keep-alives. Kinds include load_started, loaded, load_failed, unloading, unloaded, "
                           "exited, rejected, pinned, unpinned, scaled, found, gone, memory_not_released.",
            "parameters": [
                {"name": "history", "in": "query", "required": False, "description": "How many past events first",
                 "schema": {"type": "integer", "minimum": 0, "default": 50}},
                {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "integer"},
                 "description": "Resume: send the events after this one instead of `history`"},
                {"name": "named", "in": "query", "required": False, "schema": {"type": "boolean", "default": True},
                 "description": "false: no `event:` line, so a browser EventSource receives every kind through "
                                "`onmessage`"},
            ],
            "responses": {"200": {"description": "Event stream",
                                  "content": {"text/event-stream": {"schema": _ref("LifecycleEvent")}}},
                          **_errors("400")},
        }},
        "/admin/history": {"get": {
            "tags": ["admin"], "summary": "The last hour: states, lifecycle marks, requests, the queue",
            "operationId": "history",
            "description": "What the router kept in memory of the last hour (at most), for charts: each unit's "
                           "states as spans, the lifecycle events worth a marker, per model and minute the "
                           "requests, errors (5xx and 429) and the median and 99th percentile of the wait for "
                           "the model and of the time to first byte, and the total of waiting requests.",
            "parameters": [{"name": "minutes", "in": "query", "required": False,
                            "description": "How far back: a whole number of minutes",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 60, "default": 60}}],
            "responses": {"200": _json(_ref("History"), "The last `minutes` minutes"),
                          **_errors("400", "401", "403")},
        }},
    }
    schemas: dict[str, Any] = {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                           "param": {"type": "string", "nullable": True},
                           "code": {"oneOf": [{"type": "string"}, {"type": "integer"}], "nullable": True}}}}},
        "InferenceRequest": {"type": "object", "required": ["model"], "additionalProperties": True,
                             "properties": {"model": {"type": "string", "description": "A model name or alias"},
                                            "stream": {"type": "boolean"}}},
        "ChatCompletionRequest": {"type": "object", "required": ["model", "messages"], "additionalProperties": True,
                                  "properties": {"model": {"type": "string"},
                                                 "messages": {"type": "array", "items": {"type": "object"}},
                                                 "stream": {"type": "boolean"}}},
        "ModelCard": {"type": "object", "properties": {
            "id": {"type": "string"}, "object": {"type": "string", "enum": ["model"]}, "created": {"type": "integer"},
            "owned_by": {"type": "string"}, "status": {"type": "string", "enum": CARD_STATUSES},
            "root": {"type": "string", "description": "For an alias: the model it names"}}},
        "ModelList": {"type": "object", "properties": {"object": {"type": "string", "enum": ["list"]},
                                                       "data": {"type": "array", "items": _ref("ModelCard")}}},
        "AdminModel": {"type": "object", "properties": {
            "name": {"type": "string"}, "aliases": {"type": "array", "items": {"type": "string"}},
            "state": {"type": "string", "enum": MODEL_STATES},
            "since": {"type": "number", "description": "Unix time of the last state change"},
            "last_used": {"type": "number", "nullable": True, "description": "Unix time a request last finished"},
            "in_flight": {"type": "integer"}, "waiting": {"type": "integer"}, "draining": {"type": "boolean"},
            "resident": {"type": "boolean", "description": "Holds its memory and a place against max_resident: "
                         "loading, loaded, waking, falling asleep or still stopping"},
            "pinned": {"type": "boolean"}, "memory_gb": {"type": "number"}, "loads": {"type": "integer"},
            "failures": {"type": "integer"}, "last_error": {"type": "string", "nullable": True},
            "pid": {"type": "integer", "nullable": True, "description": "Absent for a model with replicas"},
            "port": {"type": "integer", "nullable": True, "description": "Absent for a model with replicas"},
            "replicas": {"type": "array", "items": _ref("Replica"),
                         "description": "Only for a model with replicas: each copy (its figures above are "
                                        "over its copies, its state the best of theirs)"},
            "replicas_config": {"type": "object", "description": "Only for a model with replicas",
                                "properties": {"min": {"type": "integer"}, "max": {"type": "integer"},
                                               "target_in_flight": {"type": "integer"},
                                               "idle": {"type": "number", "description": "Seconds"}}}},
            "additionalProperties": True},
        "Replica": {"type": "object", "properties": {
            "name": {"type": "string", "description": "The copy's unit name: `chat`, `chat@1`..."},
            "replica": {"type": "integer"}, "state": {"type": "string", "enum": MODEL_STATES},
            "since": {"type": "number"}, "last_used": {"type": "number", "nullable": True},
            "in_flight": {"type": "integer"}, "pinned": {"type": "boolean"},
            "extra": {"type": "boolean", "description": "Beyond the copies kept: stopped first, and once idle"},
            "gpus": {"type": "array", "items": {"type": "integer"}}, "resident": {"type": "boolean"},
            "sleep_level": {"type": "integer"}, "last_error": {"type": "string", "nullable": True},
            "pid": {"type": "integer", "nullable": True}, "port": {"type": "integer", "nullable": True}},
            "additionalProperties": True},
        "AdminModels": {"type": "object", "properties": {
            "models": {"type": "array", "items": _ref("AdminModel")},
            "capacity": {"type": "object", "properties": {
                "max_resident": {"type": "integer"}, "memory_gb": {"type": "number", "nullable": True},
                "resident": {"type": "array", "items": {"type": "string"},
                             "description": "Resident units (a replica by its unit name: `chat@1`)"},
                "resident_memory_gb": {"type": "number"}}}}},
        "ModelLogs": {"type": "object", "properties": {"model": {"type": "string"},
                                                       "lines": {"type": "array", "items": {"type": "string"}}}},
        **_history_schemas(),
        "LifecycleEvent": {"type": "object", "properties": {
            "seq": {"type": "integer"}, "time": {"type": "number", "description": "Unix time"},
            "kind": {"type": "string"}, "model": {"type": "string", "nullable": True},
            "reason": {"type": "string"},
            "data": {"type": "object", "description": "Details, e.g. `seconds` of a load, `status` of a rejection"}}},
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "vLLM Model Router", "version": version,
                 "description": "One OpenAI-compatible endpoint in front of many model servers, made resident on "
                                "demand. Errors use the OpenAI envelope `{\"error\": {message, type, param, "
                                "code}}`."},
        "tags": [{"name": "openai", "description": "OpenAI-compatible API"},
                 {"name": "admin", "description": "Operating the models"},
                 {"name": "operations", "description": "Health, metrics, this description, the dashboard"}],
        "paths": paths,
        # keys are needed only where auth: is configured (see the README); /health, /ui and this are always open
        "security": [{}, {"bearer": []}, {"apiKey": []}],
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "A client or admin key"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key",
                           "description": "The same key in another header"},
            },
            "schemas": schemas,
            "responses": {f"E{code}": _json(_ref("Error"), text) for code, text in ERROR_STATUSES.items()},
        },
    }
