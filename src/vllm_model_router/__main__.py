from vllm_model_router.cli import main

raise SystemExit(main())
