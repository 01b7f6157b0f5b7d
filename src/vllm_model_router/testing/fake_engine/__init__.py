"""Fake vLLM-compatible OpenAI server: a TEST AND DEMO TOOL, not an inference engine.

It loads no model and runs no neural network. It answers the subset of the vLLM 0.32
OpenAI-compatible HTTP API that the router relies on (``/health``, ``/v1/models``,
``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, runtime LoRA adapter
loading, sleep mode, ``/metrics``) with deterministic canned text derived from the request,
so that the router can be tested, demonstrated and benchmarked without a GPU or model weights.

It also reproduces the process-level behaviours of a real vLLM server that a supervisor must
cope with: a startup delay during which the port refuses connections, startup failures,
crashes in the middle of a stream, a server that ignores SIGTERM, a shutdown that takes time
(``--shutdown-delay``; ``--signal-log`` records each signal it receives), and an engine child
process that survives a SIGKILL of the API server. It can model a saturated engine too
(``--max-num-seqs``, ``--service-time``: a full batch queues requests inside the engine). ``GET
/fake/state`` exposes counters for test assertions.

Run it with ``vllm-model-router fake-engine --port 8001 --served-model-name demo`` or
``python -m vllm_model_router.testing.fake_engine --port 8001 --served-model-name demo``.

Modules: ``cli`` (options and ``main``), ``server`` (the app, the routes every engine has, the
server's life), ``inference``, ``lora`` and ``sleep`` (the route groups), ``state`` (what the
engine remembers), ``batch`` (the running and waiting requests), ``process`` (startup, signals,
the worker child, crashes), ``wire`` (vLLM's response shapes).
"""

from vllm_model_router.testing.fake_engine.cli import main

__all__ = ["main"]
