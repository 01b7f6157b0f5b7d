"""``python -m vllm_model_router.testing.fake_engine ...``: the same as ``vllm-model-router fake-engine ...``."""

import sys

from vllm_model_router.testing.fake_engine.cli import main

sys.exit(main())
