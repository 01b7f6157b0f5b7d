"""The house rules that keep the package readable, checked on every run: each layer imports only the
layers below it (import-linter, contracts in .importlinter), product code never imports the test and
demo tools, the scheduler stays pure, and no module grows past about 400 lines without saying why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "vllm_model_router"
MAX_LINES = 420  # "about 400"
LONG_FILE_NOTE = "# Longer than 400 lines because"


def test_import_contracts_hold() -> None:
    # in a process of its own: import-linter reconfigures logging, which other tests' log capture needs
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
         f"sys.exit(lint_imports(config_filename={str(ROOT / '.importlinter')!r}, no_cache=True))"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr


def test_no_module_is_long_without_saying_why() -> None:
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        if len(lines) > MAX_LINES and not any(ln.startswith(LONG_FILE_NOTE) for ln in lines[:30]):
            long.append(f"{path.relative_to(PACKAGE)}: {len(lines)} lines")
    assert not long, f"modules over {MAX_LINES} lines without a '{LONG_FILE_NOTE} ...' note at the top: {long}"
