"""vLLM Model Router: one OpenAI-compatible endpoint in front of many model servers."""

__version__ = "0.1.0"
