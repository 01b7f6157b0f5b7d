"""Test and demo tools, never imported by the router itself: a fake vLLM-compatible engine (reachable
as ``vllm-model-router fake-engine`` for the demo), the trace simulator, and fakes for tests."""
